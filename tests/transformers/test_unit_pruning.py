"""Unit pruning on transformers: head masks remove whole heads (whole kv groups under GQA), scored by hand; the
group sensitivity sweep prunes the same units; the masks are conflict-free and shrink to the masked output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunescope import head_masks, unit_masks
from prunescope.examples.vit_digits import DigitsViT
from prunescope.graph import trace
from prunescope.masks import fix_mask_conflict
from prunescope.sensitivity import SensitivityAnalysis

X = torch.ones(1, 1, 8, 8)


def _vit() -> DigitsViT:
    torch.manual_seed(0)
    return DigitsViT().eval()


def _rows_l1(layer: nn.Linear, head: int, d: int) -> float:
    return float(layer.weight.detach()[head * d:(head + 1) * d].abs().double().sum())


@pytest.mark.parametrize("consumers", [False, True])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_vit_head_masks_by_hand(sparsity: float, consumers: bool) -> None:
    model = _vit()
    masks = head_masks(model, X, sparsity, consumers=consumers)
    assert sorted(masks) == sorted(f"blocks.{b}.attn.{p}" for b in range(2) for p in "qkv")
    for b in range(2):
        att = model.blocks[b].attn
        score = []
        for h in range(4):
            s = sum(_rows_l1(getattr(att, p), h, 16) for p in "qkv")
            if consumers:  # the proj columns that read head h
                s += float(att.proj.weight.detach()[:, h * 16:(h + 1) * 16].abs().double().sum())
            score.append(s)
        gone = sorted(range(4), key=score.__getitem__)[:int(4 * sparsity)]
        want = torch.tensor([h not in gone for h in range(4)]).repeat_interleave(16).float()
        for p in "qkv":
            m = masks[f"blocks.{b}.attn.{p}"]
            assert torch.equal(m["bias"], want)
            assert torch.equal(m["weight"], want[:, None].expand(64, 64))
    fixed = fix_mask_conflict(masks, model, X)
    for k, m in masks.items():
        assert torch.equal(fixed[k]["weight"], m["weight"])


def test_vit_mlp_units_and_shrink_equals_masked() -> None:
    from prunescope.narrow import as_pruned, shrink

    model = _vit()
    masks = unit_masks(model, X, 0.5, layers=["blocks.0.attn.q", "blocks.1.attn.q", "blocks.0.mlp.fc1",
                                               "blocks.1.mlp.fc1"])
    assert int(masks["blocks.0.mlp.fc1"]["bias"].sum()) == 64
    x = torch.randn(4, 1, 8, 8)
    small = shrink(model, masks, X)
    assert small.blocks[0].attn.q.out_features == 32 and small.blocks[1].mlp.fc1.out_features == 64
    with torch.no_grad(), as_pruned(model, masks, graph=trace(model, X)):
        ref = model(x)
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-4, atol=1e-5)


def test_group_sensitivity_prunes_whole_heads() -> None:
    model = _vit()
    seen: dict[str, torch.Tensor] = {}

    def val(m: nn.Module) -> float:
        q = m.blocks[0].attn.q.weight.detach()
        seen.setdefault("q", (q.abs().sum(1) == 0).clone()) if bool((q == 0).any()) else None
        with torch.no_grad():
            return float(m(X).sum())

    sa = SensitivityAnalysis(model, val, sparsities=[0.5], layer_types=(nn.Linear, nn.Conv2d),
                             group_dependencies=True, dummy_input=X, progress=False)
    res = sa.analysis(val_args=[model], specified_layers=["blocks.0.attn.q"])
    assert list(res) == ["blocks.0.attn.q+blocks.0.attn.k+blocks.0.attn.v"]
    zero_rows = seen["q"].view(4, 16)
    assert zero_rows.all(1).sum() == 2 and (zero_rows.all(1) | ~zero_rows.any(1)).all()  # 2 whole heads


class GQA(nn.Module):
    """8 query heads of 4 channels, 2 kv heads (groups of 4 query heads), SDPA with ``enable_gqa``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 8), nn.Linear(32, 8)
        self.o = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, 4).transpose(1, 2)
        k = self.k(x).view(b, n, -1, 4).transpose(1, 2)
        v = self.v(x).view(b, n, -1, 4).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o(y.transpose(1, 2).reshape(b, n, -1))


def test_gqa_unit_is_a_kv_group() -> None:
    torch.manual_seed(0)
    model = GQA().eval()
    x = torch.ones(1, 5, 32)
    masks = head_masks(model, x, 0.5, consumers=False)
    score = [sum(_rows_l1(model.q, h, 4) for h in range(4 * g, 4 * g + 4)) + _rows_l1(model.k, g, 4)
             + _rows_l1(model.v, g, 4) for g in range(2)]
    gone = min(range(2), key=score.__getitem__)
    assert masks["q"]["bias"].tolist() == [float(c // 16 != gone) for c in range(32)]
    for p in "kv":
        assert masks[p]["bias"].tolist() == [float(c // 4 != gone) for c in range(8)]


def test_tiny_bert_head_masks() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 50, (2, 6))}
    masks = head_masks(model, x, 0.5)
    q = masks["encoder.layer.0.attention.self.query"]["bias"].view(4, 4)
    assert (q.all(1) | ~q.bool().any(1)).all() and int(q.all(1).sum()) == 2
    for p in ("key", "value"):
        assert torch.equal(masks[f"encoder.layer.0.attention.self.{p}"]["bias"].view(4, 4), q)


def test_tiny_llama_gqa_masks_remove_whole_kv_groups() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32)
    model = transformers.LlamaModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 50, (2, 6))}
    masks = head_masks(model, x, 0.5)  # 2 units (kv groups of 2 query heads, head_dim 8): one goes
    q = masks["layers.0.self_attn.q_proj"]["weight"][:, 0].view(2, 16)  # query heads 2g, 2g+1 read kv head g
    k = masks["layers.0.self_attn.k_proj"]["weight"][:, 0].view(2, 8)
    v = masks["layers.0.self_attn.v_proj"]["weight"][:, 0].view(2, 8)
    kept = q.all(1)
    assert int(kept.sum()) == 1 and not q[~kept].any()
    assert torch.equal(k.all(1), kept) and torch.equal(v.all(1), kept) and not k[~kept].any()
    # gated MLP: a unit is a gate row and an up row (and a down column)
    mlp = unit_masks(model, x, 0.5, layers=["layers.0.mlp.gate_proj"])
    gate, up = mlp["layers.0.mlp.gate_proj"]["weight"][:, 0], mlp["layers.0.mlp.up_proj"]["weight"][:, 0]
    assert torch.equal(gate, up) and int(gate.sum()) == 12


def test_unit_sweep_checkpoint_resumes(tmp_path) -> None:
    model = _vit()
    calls = []

    def val(m: nn.Module) -> float:
        calls.append(1)
        with torch.no_grad():
            return float(m(X).sum())

    kw = dict(sparsities=[0.25, 0.5], layer_types=(nn.Linear,), group_dependencies=True, dummy_input=X,
              progress=False, checkpoint=tmp_path / "ck.jsonl")
    first = SensitivityAnalysis(model, val, **kw).analysis(val_args=[model], specified_layers=["blocks.0.attn.q"])
    n = len(calls)
    again = SensitivityAnalysis(model, val, **kw).analysis(val_args=[model], specified_layers=["blocks.0.attn.q"])
    assert again == first and len(calls) == n  # every evaluation came from the checkpoint (units fingerprinted)
