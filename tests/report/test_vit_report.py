"""``prunescope report --example vit-digits`` end to end (fast settings): heads and MLP units are the prunable
groups, and summary.json describes the shipped (shrunk, reconstructed, fine-tuned) model, checked by reloading
it."""

from __future__ import annotations

import json

import pytest
import torch

from prunescope import count_flops_params
from prunescope.cli import main
from prunescope.examples import vit_digits
from prunescope.narrow import load_pruned


@pytest.fixture(scope="module")
def vit_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit_report")
    finetune = vit_digits.finetune
    batches = vit_digits.calibration_batches
    with pytest.MonkeyPatch.context() as mp:  # one epoch of recovery, 256 calibration inputs: a short test
        mp.setattr(vit_digits, "finetune", lambda m: finetune(m, epochs=1))
        mp.setattr(vit_digits, "calibration_batches", lambda: batches()[:2])
        code = main(["report", "--example", "vit-digits", "--out", str(out), "--sparsities", "0.25,0.5,0.75",
                     "--plan-evals", "4", "--no-progress"])
    return code, out, json.loads((out / "summary.json").read_text())


def test_vit_report_plan_prunes_units(vit_report):
    code, out, s = vit_report
    assert code == 0 and s["target_met"]
    assert s["flops_after"] < s["flops_before"] and s["flops_after"] <= 0.5 * s["flops_before"]
    assert s["params_after"] < s["params_before"]
    assert any(".attn.q+" in k for k in s["plan"]) or any(".attn.q+" in k for k in s["uniform_plan"])
    # the residual stream (patch_embed + every proj and fc2), concatenated with the class token, is prunable: shrink
    # cuts the class token and the position embedding with it; only the classifier is left alone
    assert set(s["excluded_sets"]) == {"head"}
    # reconstruction from the unlabeled inputs, then fine-tuning (LayerNorm: no BatchNorm step)
    assert [st["step"] for st in s["recovery_steps"]] == ["least-squares reconstruction (256 unlabeled inputs)",
                                                          "fine-tuning"]
    assert s["plan_metric"] == "reconstructed"


def test_vit_report_numbers_are_the_shipped_model(vit_report):
    _, out, s = vit_report
    small = load_pruned(vit_digits.DigitsViT(), out / "pruned.pt").eval()
    assert vit_digits.evaluate(small) == s["metric_final"]
    flops, params, _ = count_flops_params(small, torch.ones(vit_digits.INPUT_SIZE), verbose=False)
    assert (flops, params) == (s["flops_after"], s["params_after"])
    for block in small.blocks:  # whole heads went: q/k/v widths are multiples of head_dim, all equal
        widths = {block.attn.q.out_features, block.attn.k.out_features, block.attn.v.out_features}
        assert len(widths) == 1 and widths.pop() % block.attn.head_dim == 0
        assert block.attn.proj.in_features == block.attn.q.out_features


def test_example_choice_in_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "vit-digits" in capsys.readouterr().out
    assert main(["report", "resnet18", "--example", "vit-digits", "--input-size", "1,3,8,8", "--val", "a:b",
                 "--out", str(tmp_path)]) == 2
    assert "--example" in capsys.readouterr().err
