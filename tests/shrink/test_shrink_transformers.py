"""Shrink on transformers: remove 25% of the heads (whole kv groups under GQA) and 25% of the MLP units.

Physical proof on each model: the shrunk model runs, has the planned head count, equals the masked model
(fp32, rtol 1e-4; heads and MLP units are not normalised across channels, so the as-pruned output is exact),
and its dense count equals the effective count of the masked model (MACs and params). Masks are built here
from :class:`HeadDependency` (which query heads form a unit and which q/k/v channels make each) and from the
MLP's first layer, spread over every layer tied to the chosen channels by the channel engine.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunescope import as_pruned, count_flops_params, shrink  # noqa: E402
from prunescope.graph import trace  # noqa: E402
from prunescope.masks.layers import expand_filters, num_filters  # noqa: E402
from prunescope.narrow import load_pruned, save_pruned  # noqa: E402
from prunescope.topology import HeadDependency, channel_atoms  # noqa: E402


def _hf(kind: str, attn: str):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, attn_implementation=attn)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, max_position_embeddings=32, **common)
        return transformers.BertModel(cfg), {"input_ids": torch.randint(0, 50, (2, 6))}, ["intermediate.dense"]
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_key_value_heads=2,
                                       max_position_embeddings=32, **common)
        return transformers.LlamaModel(cfg), {"input_ids": torch.randint(0, 50, (2, 6))}, ["mlp.up_proj"]
    if kind == "vit":
        cfg = transformers.ViTConfig(hidden_size=16, image_size=8, patch_size=4, **common)
        return transformers.ViTModel(cfg), {"pixel_values": torch.randn(2, 3, 8, 8)}, ["intermediate.dense"]
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=32, n_inner=24,
                                  attn_implementation=attn, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(cfg), {"input_ids": torch.randint(0, 50, (2, 6))}, ["mlp.c_fc"]


def _timm(name: str, fused: bool):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=4)
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused
    return m, torch.randn(2, 3, 32, 32), ["mlp.fc1"]


def unit_masks(model, x, graph, frac: float, mlp_suffixes: list[str], skip_pinned: bool):
    """Masks removing ``frac`` of every attention's units and of every MLP's hidden units."""
    ca = channel_atoms(graph)
    mods = dict(model.named_modules())
    drop: dict[str, set[int]] = {}
    for a in HeadDependency(model, x, traced_model=graph).attentions:
        if a.pinned and skip_pinned:
            continue  # e.g. T5's cross-attention: its head count is fixed by a zeros(1, n_heads, ...) bias
        units = a.units[: max(1, int(len(a.units) * frac))]
        heads = sorted(j for u in units for j in u)
        groups = sorted({a.kv_group[j] for j in heads})
        drop.setdefault(a.q, set()).update(c for j in heads for c in a.q_channels[j])
        drop.setdefault(a.k, set()).update(c for g in groups for c in a.k_channels[g])
        drop.setdefault(a.v, set()).update(c for g in groups for c in a.v_channels[g])
    for name in ca.layers:
        if any(name.endswith(s) for s in mlp_suffixes):
            n = ca.layers[name].out_channels
            drop.setdefault(name, set()).update(range(0, n, int(round(1 / frac))))
    # spread over every layer whose channels are tied to the chosen ones
    classes = {int(ca.atom_class(ca.atom(layer, c))) for layer, cs in drop.items() for c in cs}
    for cls in classes:
        for layer, c in ca.class_members(cls):
            if layer in mods and ca.layers[layer].kind in ("linear", "embedding"):
                drop.setdefault(layer, set()).add(c)
    masks = {}
    for layer, cs in drop.items():
        mod = mods[layer]
        keep = torch.ones(num_filters(mod), dtype=torch.bool)
        keep[sorted(cs)] = False
        masks[layer] = {"weight": expand_filters(mod, keep, torch.ones_like(mod.weight)),
                        "bias": keep.float() if getattr(mod, "bias", None) is not None else None}
    return masks


def _out(model, x):
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


def check(model, x, mlp, heads_left, skip_pinned=False):
    """``skip_pinned``: leave the attentions the engine pins alone (else shrink must remove them physically:
    timm's sizes read from ``self.num_heads`` look like literals in the trace)."""
    model.eval()
    g = trace(model, x)
    masks = unit_masks(model, x, g, 0.25, mlp, skip_pinned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no conflict fixing, no kept channel: the masks are exact units
        small = shrink(model, masks, x)
    with as_pruned(model, masks, x):
        ref = _out(model, x)
    torch.testing.assert_close(_out(small, x), ref, rtol=1e-4, atol=1e-5)
    if heads_left is None:  # every attention pinned: heads stay
        heads_left = [a.heads for a in HeadDependency(model, x, traced_model=g).attentions]
    assert [a.heads for a in HeadDependency(small, x).attentions] == heads_left
    dense = count_flops_params(small, x, verbose=False)
    eff = count_flops_params(model, x, masks=masks, effective=True, verbose=False)
    assert dense[:2] == eff[:2]
    full = count_flops_params(model, x, verbose=False)
    assert dense[0] < full[0] and dense[1] < full[1]
    return small


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "vit"])
def test_hf_heads_and_mlp_units(kind: str, attn: str) -> None:
    model, x, mlp = _hf(kind, attn)
    # 4 heads: one unit of 4 removed; LLaMA GQA: 2 kv groups of 2 query heads, one whole group removed
    small = check(model, x, mlp, [2, 2] if kind == "llama" else [3, 3])
    assert small.config is model.config or small.config.to_dict() == model.config.to_dict()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_t5_self_attention_heads_with_their_relative_bias_column(attn: str) -> None:
    """T5: a head goes with its column of the relative position bias (an Embedding(buckets, heads) in the
    first block, reused by the others); cross-attention heads stay (pinned by a zeros(1, n_heads, ...) bias)."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, num_heads=4, d_ff=24, num_layers=2,
                                num_decoder_layers=2, attn_implementation=attn, decoder_start_token_id=0)
    model = transformers.T5Model(cfg)
    x = {"input_ids": torch.randint(0, 50, (2, 6)), "decoder_input_ids": torch.randint(0, 50, (2, 5))}
    small = check(model, x, ["DenseReluDense.wi"], [3, 3, 3, 4, 3, 4], skip_pinned=True)
    bias = small.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    assert tuple(bias.weight.shape) == (32, 3) and bias.embedding_dim == 3


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_tiny_patch16_224"])
def test_timm_vit_heads_and_mlp_units(name: str, fused: bool) -> None:
    model, x, mlp = _timm(name, fused)
    heads = {"vit_small_patch16_224": 6, "deit_tiny_patch16_224": 3}[name]
    left = heads - max(1, int(heads * 0.25))
    small = check(model, x, mlp, [left] * 4)
    assert {m.num_heads for m in small.modules() if hasattr(m, "qkv")} == {left}


def test_gpt2_split_size_is_updated_and_embed_dim_is_not(tmp_path) -> None:
    model, x, mlp = _hf("gpt2", "eager")
    small = check(model, x, mlp, [3, 3])
    attn = small.h[0].attn
    assert (attn.split_size, attn.embed_dim, attn.head_dim) == (12, 16, 4)
    assert (small.h[0].attn.c_attn.nf, small.h[0].attn.c_proj.nx) == (36, 12)
    # save / load into a fresh dense model: same shapes, attributes and output
    save_pruned(small, tmp_path / "g.pt")
    fresh, _, _ = _hf("gpt2", "eager")
    loaded = load_pruned(fresh, tmp_path / "g.pt")
    assert loaded.h[0].attn.split_size == 12
    torch.testing.assert_close(_out(loaded.eval(), x), _out(small, x))


def test_a_literal_head_count_keeps_heads_and_removes_in_head_positions() -> None:
    """view(B, L, 4, -1): the head count is written, so a head cannot go (its channels stay, with a warning);
    the same in-head position of every head can (head_dim 4 -> 3), and that equals the masked model."""
    import torch.nn.functional as F
    from torch import nn

    from prunescope.narrow import ShrinkWarning

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, z):
            b, n, _ = z.shape
            q, k, v = (p(z).view(b, n, 4, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))

    torch.manual_seed(0)
    m = Attn().eval()
    z = torch.randn(2, 3, 16)

    def masks_without(channels):
        keep = torch.ones(16)
        keep[channels] = 0
        return {n: {"weight": keep[:, None].expand(16, 16).clone(), "bias": keep.clone()} for n in "qkv"}

    with pytest.warns(ShrinkWarning, match="conflicts"):
        small = shrink(m, masks_without([0, 1, 2, 3]), z)  # head 0
    assert small.q.out_features == 16 and small.o.in_features == 16
    # in-head position 0 of every head: q/k keep it (SDPA's default scale 1/sqrt(head_dim) would change),
    # v loses it (the output's own dims), and that equals the masked model
    masks = masks_without([0, 4, 8, 12])
    with pytest.warns(ShrinkWarning, match="sqrt"):
        small = shrink(m, masks, z)
    assert (small.q.out_features, small.k.out_features, small.v.out_features, small.o.in_features) == (16, 16, 12, 12)
    with as_pruned(m, masks, z):
        ref = m(z)
    torch.testing.assert_close(small(z), ref, rtol=1e-4, atol=1e-6)
    assert np.array_equal(m.q.weight.shape, (16, 16))


def test_a_size_written_as_a_literal_refuses_with_the_pin() -> None:
    """reshape(B, N, 3, 4, 4) with literals (no attribute to update): removing a head is refused, naming the op."""
    from torch import nn

    from prunescope.narrow import ShrinkError

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, z):
            b, n, _ = z.shape
            q, k, v = self.qkv(z).reshape(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
            a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
            return self.o(a.transpose(1, 2).reshape(b, n, 16))

    m = Fused().eval()
    z = torch.randn(2, 3, 16)
    keep = torch.ones(48)
    keep[[0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35]] = 0  # head 0 of q, k and v
    masks = {"qkv": {"weight": keep[:, None].expand(48, 16).clone(), "bias": keep.clone()}}
    with pytest.raises(ShrinkError, match="unsafe to prune.*reshape"):
        shrink(m, masks, z)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_torchvision_transformers_mlp_units_heads_pinned(kind: str) -> None:
    """torchvision ViT (nn.MultiheadAttention: packed in_proj_weight must stay embed_dim wide) and Swin
    (reshape(B, N, 3, heads, C // heads) with C the block's input width): heads stay, MLP units go."""
    from torchvision.models import VisionTransformer
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    if kind == "vit":
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)
    else:
        model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4])
    x = torch.randn(2, 3, 32, 32)
    hd = HeadDependency(model.eval(), x)
    assert hd.attentions and all(a.pinned for a in hd.attentions)
    small = check(model, x, ["mlp.0"], None, skip_pinned=True)
    assert small.encoder.layers[0].mlp[0].out_features == 48 if kind == "vit" else True
