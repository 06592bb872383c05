"""The residual stream of a ViT with a class token (issue 19): ``torch.cat([cls_token.expand(B, -1, -1), x], 1)``
concatenates a parameter along the token axis, its channel axis aligned with the stream's. The removal plan cuts
the token parameter like the position embedding, so the stream set is offered, ``shrink`` narrows it, the
shrunk model computes what ``as_pruned`` computes and costs what the effective counter says. A token made by an
op that mixes channels, or a parameter concatenated along the channel axis, stays protected with the reason.

Token and position parameters are random (not timm's zeros), so a removed channel of a token row that reached a
consumer would show in the output.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from prunescope import count_flops_params, unit_masks
from prunescope.errors import ConfigError
from prunescope.examples.vit_digits import DigitsViT
from prunescope.graph import trace
from prunescope.narrow import ShrinkWarning, as_pruned, shrink
from prunescope.narrow.prunable import prunable_sets


def _randomise_tokens(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "dist_token", "reg_token", "pos_embed", "position_embeddings")):
                p.normal_()
    return model.eval()


def _check(model: nn.Module, x: torch.Tensor, stream: str, tokens: list[str],
           out=lambda y: y) -> nn.Module:
    """The stream set (the one holding ``stream``) is offered; unit masks at 30 % on every offered set ->
    shrink (no warning, nothing kept) == as_pruned (rtol 1e-4 of the output's scale) -> the dense count of the
    shrunk model == the effective count; the token parameters narrow with the stream. Returns the shrunk model."""
    g = trace(model, x)
    p = prunable_sets(model, g, x)
    assert any(stream in s for s in p.sets), p.excluded
    masks = unit_masks(model, x, 0.3, graph=g)
    keep = masks[stream]["weight"].flatten(1).ne(0).any(1)
    assert 0 < int(keep.sum()) < keep.numel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, res = shrink(model, masks, x, graph=g, return_result=True)
    assert not [str(w.message) for w in caught if issubclass(w.category, ShrinkWarning)]
    assert not res.fixed and not res.protected
    for name in tokens:
        old, new = model.get_parameter(name), small.get_parameter(name)
        assert new.shape[-1] == int(keep.sum()) and new.shape[:-1] == old.shape[:-1]
        torch.testing.assert_close(new, old[..., keep])  # the kept slice of the token
    with torch.no_grad():
        with as_pruned(model, masks, x, graph=g) as ref:
            want = out(ref(x))
        got = out(small(x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    dense = count_flops_params(small, x, verbose=False)[:2]
    eff = count_flops_params(model, x, masks=masks, effective=True, verbose=False)[:2]
    assert dense == eff
    return small


def _by_hand(model: DigitsViT, keep: torch.Tensor) -> DigitsViT:
    """``model`` rebuilt with the embedding width ``keep.sum()``: every module that reads or writes the stream
    replaced by a new one holding the kept slice of the weights (q/k/v and the MLP keep their own widths)."""
    k = int(keep.sum())
    ref = copy.deepcopy(model)

    def linear(old: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
        w = old.weight.detach()
        w = w[rows] if rows is not None else w
        w = w[:, cols] if cols is not None else w
        new = nn.Linear(w.shape[1], w.shape[0])
        new.weight.data.copy_(w)
        new.bias.data.copy_(old.bias.detach()[rows] if rows is not None else old.bias.detach())
        return new

    def norm(old: nn.LayerNorm) -> nn.LayerNorm:
        new = nn.LayerNorm(k, eps=old.eps)
        new.weight.data.copy_(old.weight.detach()[keep])
        new.bias.data.copy_(old.bias.detach()[keep])
        return new

    conv = nn.Conv2d(1, k, kernel_size=2, stride=2)
    conv.weight.data.copy_(model.patch_embed.weight.detach()[keep])
    conv.bias.data.copy_(model.patch_embed.bias.detach()[keep])
    ref.patch_embed = conv
    ref.cls_token = nn.Parameter(model.cls_token.detach()[..., keep].clone())
    ref.pos_embed = nn.Parameter(model.pos_embed.detach()[..., keep].clone())
    for blk in ref.blocks:
        blk.norm1, blk.norm2 = norm(blk.norm1), norm(blk.norm2)
        for name in ("q", "k", "v"):
            setattr(blk.attn, name, linear(getattr(blk.attn, name), None, keep))
        blk.attn.proj = linear(blk.attn.proj, keep, None)
        blk.mlp.fc1 = linear(blk.mlp.fc1, None, keep)
        blk.mlp.fc2 = linear(blk.mlp.fc2, keep, None)
    ref.norm = norm(ref.norm)
    ref.head = linear(ref.head, None, keep)
    return ref.eval()


def test_vit_digits_stream_equals_model_built_by_hand() -> None:
    model = _randomise_tokens(DigitsViT())
    x = torch.randn(3, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = trace(model, x)
    masks = unit_masks(model, x, 0.3, graph=g, layers=["patch_embed"])  # the stream set alone
    assert "blocks.1.mlp.fc2" in masks and "blocks.0.attn.q" not in masks
    keep = masks["patch_embed"]["weight"].flatten(1).ne(0).any(1)
    assert int(keep.sum()) == 64 - int(64 * 0.3)
    small = shrink(model, masks, x, graph=g)
    ref = _by_hand(model, keep)
    assert small.cls_token.shape == (1, 1, 45) and small.pos_embed.shape == (1, 17, 45)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-5)
        with as_pruned(model, masks, x, graph=g) as masked:
            torch.testing.assert_close(masked(x), want, rtol=1e-5, atol=1e-5)
    hand = count_flops_params(ref, x, verbose=False)[:2]
    assert count_flops_params(small, x, verbose=False)[:2] == hand
    assert count_flops_params(model, x, masks=masks, effective=True, verbose=False)[:2] == hand
    # the model given to shrink / as_pruned is unchanged: weights, width, mode, no hooks left
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.cls_token.shape == (1, 1, 64) and not model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


_TIMM = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=5)


@pytest.mark.parametrize("kind", ["cls", "cls+reg2", "reg2-no-embed-class", "distilled"])
def test_timm_vit_stream(kind: str, one_thread: None) -> None:
    timm = pytest.importorskip("timm")
    from timm.models.deit import VisionTransformerDistilled

    extra = {"cls": {}, "cls+reg2": {"class_token": True, "reg_tokens": 2},
             "reg2-no-embed-class": {"reg_tokens": 2, "no_embed_class": True}, "distilled": {}}[kind]
    cls = VisionTransformerDistilled if kind == "distilled" else timm.models.vision_transformer.VisionTransformer
    model = _randomise_tokens(cls(**_TIMM, **extra))
    tokens = ["cls_token", "pos_embed"] + (["reg_token"] if "reg" in kind else []) + (
        ["dist_token"] if kind == "distilled" else [])
    _check(model, torch.randn(2, 3, 16, 16), "patch_embed.proj", tokens)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_vit_stream(attn: str, one_thread: None) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=16, image_size=8, patch_size=4, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=24, attn_implementation=attn, num_labels=3)
    model = _randomise_tokens(transformers.ViTForImageClassification(cfg))
    _check(model, torch.randn(2, 3, 8, 8), "vit.embeddings.patch_embeddings.projection",
           ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings"], out=lambda y: y.logits)


class _Tokens(nn.Module):
    """Patch tokens from ``embed``; a token joined by ``mode``: a pure view of ``cls`` ("view"; "add": added to
    every token), ``cls @ mix``
    (mixes channels, not a layer), a Linear of ``cls`` (a layer: its outputs join the stream set), or ``extra``
    concatenated along the channel axis ("channels")."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        wide = 16 if mode == "channels" else 8
        self.embed = nn.Linear(4, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.mix = nn.Parameter(torch.randn(8, 8))
        self.cls_proj = nn.Linear(8, 8)
        self.extra = nn.Parameter(torch.randn(1, 1, 8))
        self.norm = nn.LayerNorm(wide)
        self.fc = nn.Linear(wide, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n = x.shape[:2]
        if self.mode == "view":
            x = torch.cat([self.cls.view(1, 1, -1).expand(b, -1, -1), x], 1)
        elif self.mode == "matmul":
            x = torch.cat([(self.cls @ self.mix).expand(b, -1, -1), x], 1)
        elif self.mode == "linear":
            x = torch.cat([self.cls_proj(self.cls).expand(b, -1, -1), x], 1)
        elif self.mode == "add":  # CaiT's x_cls + attn(...): a view of the token added to channels
            x = x + self.cls.expand(b, n, -1)
        else:
            x = torch.cat([x, self.extra.expand(b, n, -1)], -1)
        return self.head(torch.relu(self.fc(self.norm(x))[:, 0]))


@pytest.mark.parametrize("mode,param", [("matmul", "cls"), ("channels", "extra")])
def test_token_that_cannot_be_cut_stays_protected(mode: str, param: str) -> None:
    model = _Tokens(mode).eval()
    x = torch.randn(2, 5, 4)
    g = trace(model, x)
    p = prunable_sets(model, g, x)
    assert ("embed",) not in p.sets
    assert f"'cat' combines them with a tensor derived from parameter '{param}'" in p.excluded["embed"]
    with pytest.raises(ConfigError, match="'cat'"):
        unit_masks(model, x, 0.3, graph=g, layers=["embed"])


@pytest.mark.parametrize("mode", ["view", "add", "linear"])
def test_token_view_or_layer_output_narrows(mode: str) -> None:
    """A view of the token, concatenated or added, is cut like the token; a token made by a layer joins the
    stream set (its rows go)."""
    model = _Tokens(mode).eval()
    small = _check(model, torch.randn(2, 5, 4), "embed", [] if mode == "linear" else ["cls"])
    if mode == "linear":
        assert small.cls_proj.out_features == small.embed.out_features < 8


def test_token_row_read_without_a_norm_stays(one_thread: None) -> None:
    """The token's removed channels are not zero in the as-pruned model: a layer reading the stream directly
    (no norm in between) would see them, so the set stays, with the reason."""

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.cls = nn.Parameter(torch.randn(1, 1, 8))
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
            return self.head(x[:, 0] + self.fc(x[:, 0]))

    model = Bare().eval()
    x = torch.randn(2, 5, 4)
    p = prunable_sets(model, trace(model, x), x)
    assert p.sets == [] and "'cat'" in p.excluded["embed+fc"] and "not zero" in p.excluded["embed+fc"]
