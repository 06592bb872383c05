"""timm attention heads are offered by ``unit_masks`` (issue 19): their channels are pinned only by sizes the
forward reads from ``num_heads`` / ``attn_dim``, which ``shrink`` updates, so ``prunable_sets`` sends them to the
shrink trial instead of excluding them. Reference: the same ViT narrowed by hand (a fresh timm ``Attention``
with fewer heads holding the kept q/k/v rows and output-projection columns)."""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from timm.models.vision_transformer import Attention, VisionTransformer  # noqa: E402

from prunescope import head_masks, shrink, unit_masks  # noqa: E402
from prunescope.graph import trace  # noqa: E402
from prunescope.narrow import as_pruned  # noqa: E402

DIM, HEADS, HEAD_DIM, DEPTH = 32, 4, 8, 1


def _by_hand(model: VisionTransformer, gone: dict[int, list[int]]) -> VisionTransformer:
    """``model`` with heads ``gone[block]`` removed, built from a fresh timm ``Attention`` per block."""
    ref = copy.deepcopy(model)
    for b, heads in gone.items():
        old = model.blocks[b].attn
        kept = [h for h in range(HEADS) if h not in heads]
        cols = torch.tensor([h * HEAD_DIM + d for h in kept for d in range(HEAD_DIM)])
        rows = torch.cat([part * DIM + cols for part in range(3)])  # q, k, v rows of the kept heads
        new = Attention(DIM, num_heads=len(kept), attn_head_dim=HEAD_DIM, qkv_bias=old.qkv.bias is not None).eval()
        with torch.no_grad():
            new.qkv.weight.copy_(old.qkv.weight[rows])
            if old.qkv.bias is not None:
                new.qkv.bias.copy_(old.qkv.bias[rows])
            new.proj.weight.copy_(old.proj.weight[:, cols])
            new.proj.bias.copy_(old.proj.bias)
        ref.blocks[b].attn = new
    return ref


def test_unit_masks_offers_timm_heads_and_shrink_removes_them() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=2,
                              num_classes=5).eval()
    x = torch.randn(2, 3, 16, 16)
    before = copy.deepcopy(model.state_dict())
    g = trace(model, x)
    qkv = [f"blocks.{b}.attn.qkv" for b in range(DEPTH)]
    # a named layer whose set is not offered is a ConfigError naming the reason (main: "unsafe to prune")
    masks = unit_masks(model, x, 0.5, layers=qkv, graph=g)
    assert sorted(masks) == qkv
    gone: dict[int, list[int]] = {}
    for b, name in enumerate(qkv):
        removed = (masks[name]["bias"] == 0).nonzero().flatten().tolist()
        heads = sorted({(r % DIM) // HEAD_DIM for r in removed})
        gone[b] = heads
        assert len(heads) == HEADS // 2  # int(4 * 0.5) whole heads: their q, k and v rows, nothing else
        assert removed == sorted(p * DIM + h * HEAD_DIM + d for p in range(3) for h in heads for d in range(HEAD_DIM))
    # head_masks removes the same heads (its masks are the qkv sets of unit_masks, chosen by the same scores)
    hm = head_masks(model, x, 0.5, consumers=False, graph=g)
    assert sorted(hm) == qkv
    assert all(torch.equal(hm[n]["weight"], masks[n]["weight"]) for n in qkv)

    small = shrink(model, masks, x, graph=g)
    assert [small.blocks[b].attn.num_heads for b in range(DEPTH)] == [2] * DEPTH
    assert [small.blocks[b].attn.qkv.out_features for b in range(DEPTH)] == [3 * 2 * HEAD_DIM] * DEPTH
    ref = _by_hand(model, gone)
    with torch.no_grad():
        got = small(x)
        want = ref(x)
        with as_pruned(model, masks, x, graph=g) as m:
            masked = m(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, masked, rtol=1e-4, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model is left as it was


class _HeadSplit(torch.nn.Module):
    """Self-attention over ``(B, N, 32)`` with 4 heads of 8; ``literal``: the head split is written as numbers
    (``reshape(B, N, 3, 4, 8)``), else read from ``self.num_heads`` / ``self.head_dim`` / ``self.attn_dim`` as timm
    does."""

    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.literal, self.num_heads, self.head_dim, self.attn_dim = literal, 4, 8, 32
        self.inp, self.qkv, self.proj = torch.nn.Linear(6, 32), torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        B, N, _ = h.shape
        if self.literal:
            qkv = self.qkv(h).reshape(B, N, 3, 4, 8)
        else:
            qkv = self.qkv(h).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1) @ v
        o = a.transpose(1, 2).reshape(B, N, 32 if self.literal else self.attn_dim)
        return self.out(torch.relu(self.proj(o)))


@pytest.mark.parametrize("literal", [False, True])
def test_size_pinned_heads_offered_only_when_shrink_updates_the_sizes(literal: bool) -> None:
    """The trial decides: sizes read from attributes follow (offered, and shrink removes the heads); a literal
    head split does not (excluded, the pin named as the reason)."""
    from prunescope.narrow.prunable import prunable_sets

    torch.manual_seed(0)
    model, x = _HeadSplit(literal).eval(), torch.randn(2, 5, 6)
    g = trace(model, x)
    p = prunable_sets(model, g, x)
    if literal:
        assert ("qkv",) not in p.sets
        why = p.excluded["qkv"]
        assert "shrink cannot remove" in why and "unsafe to prune" in why and "'reshape' writes the size 4" in why
        return
    assert ("qkv",) in p.sets
    masks = unit_masks(model, x, 0.5, layers=["qkv"], graph=g)
    small = shrink(model, masks, x, graph=g)
    assert (small.num_heads, small.head_dim, small.attn_dim, small.qkv.out_features) == (2, 8, 16, 48)
    with torch.no_grad(), as_pruned(model, masks, x, graph=g) as m:
        torch.testing.assert_close(small(x), m(x), rtol=1e-4, atol=1e-6)
