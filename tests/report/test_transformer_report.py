"""``run_report`` on tiny Hugging Face BERT and GPT-2: attention sets (whole heads) and MLP sets are the prunable
groups, the shipped shrunk model is the measured one."""

from __future__ import annotations

import pytest
import torch

from prunescope import count_flops_params
from prunescope.narrow import load_pruned

transformers = pytest.importorskip("transformers")

from prunescope.report import run_report  # noqa: E402


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32, num_labels=3,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return transformers.GPT2ForSequenceClassification(cfg).eval()
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_transformer_report_prunes_heads_and_mlp_units(tmp_path, kind):
    from prunescope.masks.pruners import transposed_linear_types

    if kind == "gpt2" and not transposed_linear_types():
        pytest.skip("masks for Hugging Face Conv1D are not available in this checkout")
    model = _model(kind)
    ids = torch.randint(0, 50, (16, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits

    def val(m):  # agreement with the dense logits (higher is better)
        with torch.no_grad():
            return -float(((m(input_ids=ids).logits - ref) ** 2).mean()) * 1e4

    x = {"input_ids": ids[:2]}
    res = run_report(model, val, x, tmp_path, sparsities=[0.25, 0.5, 0.75], plan_evals=4, progress=False,
                     console=None)
    s = res.summary
    assert s["target_met"] and s["flops_after"] < s["flops_before"]
    attn = [k for k in res.plan if k.endswith("attention.self.value") or k.endswith("attn.c_attn")]
    assert attn, res.plan
    # the chosen plan's metric measured as pruned (masks) equals the shrunk model's
    chosen = next(c for c in s["plan_candidates"] if c["plan"] == s["plan"])
    assert chosen["measured"] == pytest.approx(s["metric_after_measured"], rel=1e-4, abs=1e-6)
    small = load_pruned(_model(kind), tmp_path / "pruned.pt").eval()
    flops, params, _ = count_flops_params(small, x, verbose=False)
    assert (flops, params) == (s["flops_after"], s["params_after"])
    assert val(small) == pytest.approx(s["metric_final"], rel=1e-5)
    for key in attn:
        kept = 4 - int(4 * res.plan[key])
        if kind == "gpt2":  # fused q/k/v Conv1D, weight (in, 3 * heads * head_dim)
            assert small.get_submodule(key).weight.shape[1] == 3 * kept * 8
            continue
        layer = key.split("+")[0].rsplit(".", 1)[0]  # ...attention.self
        assert small.get_submodule(layer).query.out_features == kept * 8  # whole heads of head_dim 8 went
