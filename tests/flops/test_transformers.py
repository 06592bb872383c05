"""Hugging Face transformers (random init from a config, on the meta device: nothing downloaded).

Reference: the hand-derived MAC count of a transformer — per layer Q, K, V and output projections
(4·L·H²), attention scores and weighted values (2·L²·H) and the MLP (2·L·H·I) — plus the heads.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunescope.flops import flops_report  # noqa: E402


def test_bert_base():
    with torch.device("meta"):
        model = transformers.BertModel(transformers.BertConfig())
    ids = torch.ones(1, 128, dtype=torch.long, device="meta")
    rep = flops_report(model, {"input_ids": ids})
    L, H, FF, n = 128, 768, 3072, 12
    assert rep.total_flops == n * (4 * L * H * H + 2 * L * L * H + 2 * L * H * FF) + H * H  # + pooler (CLS)
    assert rep.by_category["attention"] == n * 2 * L * L * H
    assert rep.total_params == sum(p.numel() for p in model.parameters())


def test_gpt2_conv1d_layers_and_tied_head():
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    ids = torch.ones(2, 64, dtype=torch.long, device="meta")
    rep = flops_report(model, {"input_ids": ids})
    B, L, H, V = 2, 64, 768, 50257
    assert rep.total_flops == B * (12 * (4 * L * H * H + 2 * L * L * H + 8 * L * H * H) + L * H * V)
    # the LM head shares the embedding matrix: counted once
    assert rep.total_params == sum(p.numel() for p in model.parameters()) == 124_439_808
