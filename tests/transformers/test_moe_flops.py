"""MACs of mixture-of-experts layers (``torch._grouped_mm``) against hand-derived counts, on CPU.

With T tokens, top-k routing, hidden H and expert width I, the experts do T·k token-expert pairs, each a
gate/up product (H -> 2I) and a down product (I -> H): T·k·3·H·I MACs — not E times that, and not zero (the
op had no formula: Mixtral counted 31 % and Qwen2-MoE 79 % of their MACs).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunescope.flops import flops_report  # noqa: E402

B, L, H, HEADS, KV, E, K = 2, 6, 16, 4, 2, 4, 2
T, HD = B * L, H // HEADS


def _rows(rep, suffix: str) -> int:
    return sum(r.flops for r in rep.rows if r.name.endswith(suffix))


def _attention() -> int:  # q, o: H -> H; k, v: H -> KV·HD; scores and weighted values: 2·L·L·HD per head
    return T * H * H * 2 + T * H * KV * HD * 2 + B * HEADS * 2 * L * L * HD


def test_mixtral_experts() -> None:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=50, hidden_size=H, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=HEADS, num_key_value_heads=KV, num_local_experts=E,
                                     num_experts_per_tok=K, max_position_embeddings=32)
    model = transformers.MixtralModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 50, (B, L))}
    rep = flops_report(model, x)
    assert _rows(rep, "mlp.experts") == T * K * 3 * H * 24
    assert rep.total_flops == _attention() + T * H * E + T * K * 3 * H * 24  # + router
    assert flops_report(model, x, mode="full").uncounted == {}


def test_qwen2_moe_experts_and_shared_expert() -> None:
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=50, hidden_size=H, intermediate_size=40, moe_intermediate_size=12,
                                      shared_expert_intermediate_size=20, num_experts=E, num_experts_per_tok=K,
                                      num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV,
                                      max_position_embeddings=32)
    model = transformers.Qwen2MoeModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 50, (B, L))}
    rep = flops_report(model, x)
    assert _rows(rep, "mlp.experts") == T * K * 3 * H * 12
    shared = T * 3 * H * 20 + T * H  # shared expert (gate, up, down) and its scalar gate
    assert rep.total_flops == _attention() + T * H * E + T * K * 3 * H * 12 + shared
    assert flops_report(model, x, mode="full").uncounted == {}
