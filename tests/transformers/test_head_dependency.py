"""HeadDependency: heads, head_dim, kv groups and the q/k/v/o layers of every attention, against hand tables.

Tables are derived from the configs: BERT and GPT-2 with hidden 16 and 4 heads (head h = channels 4h..4h+3;
GPT-2's fused c_attn holds q, k, v at offsets 0, 16, 32), LLaMA with hidden 32, 4 query heads and 2 kv heads
(head_dim 8; query heads 2g and 2g+1 read kv head g). Eager and SDPA attention must give the same table.
The kv-group units are checked physically: removing one group runs and equals the masked model.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from prune_helpers import classes_of, mask, prune  # noqa: E402
from test_attention_topology import Attention, tiny  # noqa: E402

from prunescope.topology import AttentionWeightDependency, HeadDependency  # noqa: E402


def heads(n: int, d: int, offset: int = 0) -> list[list[int]]:
    return [list(range(offset + d * h, offset + d * (h + 1))) for h in range(n)]


EXPECTED = {
    "bert": dict(module="encoder.layer.{}.attention.self",
                 layers=["encoder.layer.{}.attention.self.query", "encoder.layer.{}.attention.self.key",
                         "encoder.layer.{}.attention.self.value", "encoder.layer.{}.attention.output.dense"],
                 heads=4, head_dim=4, kv_heads=4, v_head_dim=4, q_channels=heads(4, 4), k_channels=heads(4, 4),
                 v_channels=heads(4, 4), o_columns=heads(4, 4), kv_group=[0, 1, 2, 3], units=[[0], [1], [2], [3]]),
    "gpt2": dict(module="h.{}.attn", layers=["h.{}.attn.c_attn", "h.{}.attn.c_proj"],
                 heads=4, head_dim=4, kv_heads=4, v_head_dim=4, q_channels=heads(4, 4), k_channels=heads(4, 4, 16),
                 v_channels=heads(4, 4, 32), o_columns=heads(4, 4), kv_group=[0, 1, 2, 3],
                 units=[[0], [1], [2], [3]]),
    "llama": dict(module="layers.{}.self_attn",
                  layers=["layers.{}.self_attn.q_proj", "layers.{}.self_attn.k_proj", "layers.{}.self_attn.v_proj",
                          "layers.{}.self_attn.o_proj"],
                  heads=4, head_dim=8, kv_heads=2, v_head_dim=8, q_channels=heads(4, 8), k_channels=heads(2, 8),
                  v_channels=heads(2, 8), o_columns=heads(4, 8), kv_group=[0, 0, 1, 1], units=[[0, 1], [2, 3]]),
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_hand_tables(kind: str, attn: str) -> None:
    model, x = tiny(kind, attn)
    hd = HeadDependency(model, x)
    assert len(hd.attentions) == 2
    for i, a in enumerate(hd.attentions):
        exp = {k: (v.format(i) if isinstance(v, str) else v) for k, v in EXPECTED[kind].items()}
        exp["layers"] = [n.format(i) for n in EXPECTED[kind]["layers"]]
        got = {k: getattr(a, k) for k in exp}
        assert got == exp
        assert a.pinned == [] and a.group_size == exp["heads"] // exp["kv_heads"]
    assert AttentionWeightDependency(model, x).dependency_sets == [a.layers for a in hd.attentions]


def test_llama_remove_a_kv_group_physically() -> None:
    model, x = tiny("llama", "sdpa")
    hd = HeadDependency(model, x)
    a, ca = hd.attentions[0], hd.atoms
    g = a.units[1]  # query heads 2, 3 and kv head 1
    cls = classes_of(ca, a.q, [c for j in g for c in a.q_channels[j]])
    assert len(cls) == 1 and set(classes_of(ca, a.k, a.k_channels[1])) == set(cls)
    with torch.no_grad():
        torch.testing.assert_close(prune(model, ca, cls)(**x).last_hidden_state,
                                   mask(model, ca, cls)(**x).last_hidden_state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sdpa", [True, False])
def test_head_count_written_fixes_heads_and_per_head_mask_pins(sdpa: bool) -> None:
    x = torch.randn(2, 5, 16)
    a = HeadDependency(Attention("head_count", sdpa).eval(), x).attentions[0]
    assert (a.q, a.k, a.v, a.o, a.heads, a.head_dim) == ("q", "k", "v", "o", 4, 4)
    assert a.units == []  # the head count is written in the code: no head can go (in-head positions can)
    a = HeadDependency(Attention("head_size", sdpa).eval(), x).attentions[0]
    assert a.units == [[0], [1], [2], [3]] and a.pinned == []
    a = HeadDependency(Attention("head_size", sdpa).eval(), (x, torch.zeros(1, 4, 5, 5))).attentions[0]
    assert a.units == [[0], [1], [2], [3]] and len(a.pinned) == 1 and "cannot shrink" in a.pinned[0]
