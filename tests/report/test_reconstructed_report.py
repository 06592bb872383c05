"""The main job chooses by what ships (issue 17.3): with calibration inputs every candidate plan is measured
reconstructed (least squares from unlabeled inputs), the reconstructed model ships in pruned.pt, the uniform
baseline gets the same recovery, and every number is re-measured here independently."""

import json

import pytest
import torch

from prunescope.cli import main
from prunescope.examples import digits
from prunescope.masks import load_masks
from prunescope.narrow import as_pruned, load_pruned, reconstruct
from prunescope.report import run_report

X = torch.ones(digits.INPUT_SIZE)
ALL_BATCHES = digits.calibration_batches


def first_inputs(n):
    out, k = [], 0
    for b in ALL_BATCHES():
        if k >= n:
            break
        out.append(b)
        k += b.shape[0]
    return out


def test_cli_no_finetune_ships_the_reconstructed_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(digits, "calibration_batches", lambda: first_inputs(256))  # fewer inputs: a faster test
    code = main(["report", "--flops-target", "0.25", "--no-finetune", "--plan-evals", "3", "--sparsities",
                 "0.5,0.75", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["plan_metric"] == "reconstructed"
    assert s["flops_after"] <= 0.25 * s["flops_before"]
    assert [st["step"].split(" (")[0] for st in s["recovery_steps"]] == ["least-squares reconstruction"]
    assert s["metric_after_finetuned"] is None
    model = digits.load_trained()
    masks = load_masks(tmp_path / "masks.pth")
    # the shipped model is the reconstruction of the shipped masks from the calibration inputs
    ref = reconstruct(model, masks, X, first_inputs(256))
    shipped = load_pruned(digits.DigitsNet(), tmp_path / "pruned.pt")
    assert digits.evaluate(shipped) == s["metric_final"] == s["metric_after_reconstructed"]
    assert digits.evaluate(ref) == s["metric_final"]
    for k, v in ref.state_dict().items():
        assert torch.allclose(v, shipped.state_dict()[k], atol=1e-5), k
    # as pruned it is far worse: the reconstruction is what makes a 25% model usable
    with as_pruned(model, masks, X):
        assert digits.evaluate(model) == s["metric_after_measured"]
    assert s["metric_after_reconstructed"] >= s["metric_after_measured"] + 0.2
    assert s["metric_after_reconstructed"] >= 0.95
    # the plan was chosen by that metric: the chosen candidate's measurement is the reconstructed one
    chosen = [c for c in s["plan_candidates"] if c["plan"] == s["plan"]]
    assert len(chosen) == 1 and chosen[0]["measured"] == chosen[0]["reconstructed"] == s["metric_final"]
    assert chosen[0]["as_pruned"] == s["metric_after_measured"]
    assert all(c["reconstructed"] is not None and c["as_pruned"] is not None for c in s["plan_candidates"])
    assert max(c["measured"] for c in s["plan_candidates"]) == s["metric_final"]
    # the uniform baseline got the same recovery
    assert s["uniform_metric_reconstructed"] == s["uniform_metric_final"] is not None
    assert [st["step"] for st in s["uniform_recovery_steps"]] == [st["step"] for st in s["recovery_steps"]]
    assert "reconstructed" in out


def test_recovery_order_reconstruct_then_finetune_for_plan_and_uniform(tmp_path):
    model = digits.load_trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def finetune(m):
        digits.finetune(m, epochs=1)

    res = run_report(model, digits.evaluate, X, tmp_path, flops_target=0.55, sparsities=[0.5], plan_evals=2,
                     progress=False, console=None, calibrate=digits.calibration_batches, finetune=finetune,
                     calibration_samples=128)
    s = res.summary
    steps = [st["step"].split(" (")[0] for st in s["recovery_steps"]]
    assert steps == ["least-squares reconstruction", "fine-tuning"]
    assert s["recovery_steps"][0]["step"].endswith("(128 unlabeled inputs)")
    assert s["metric_final"] == s["metric_after_finetuned"]
    assert digits.evaluate(load_pruned(digits.DigitsNet(), tmp_path / "pruned.pt")) == s["metric_final"]
    assert [st["step"] for st in s["uniform_recovery_steps"]] == [st["step"] for st in s["recovery_steps"]]
    assert s["uniform_metric_final"] == s["uniform_recovery_steps"][-1]["metric"]
    chosen = next(c for c in s["plan_candidates"] if c["plan"] == s["plan"])
    assert chosen["finetuned"] == s["metric_final"]
    # the proxy fit: the reconstructed metric the plan was chosen by against the fine-tuned one, over the
    # candidates fine-tuned (the shipped plan and the uniform one; one candidate when they are the same plan)
    tuned = [c for c in s["plan_candidates"] if c["finetuned"] is not None]
    assert s["proxy_metric"] == "reconstructed" and s["proxy_final_candidates"] == len(tuned) >= 1
    assert s["proxy_final_mae"] == pytest.approx(sum(abs(c["reconstructed"] - c["finetuned"]) for c in tuned)
                                                 / len(tuned), abs=1e-6)
    assert s["proxy_as_pruned_final_mae"] == pytest.approx(sum(abs(c["as_pruned"] - c["finetuned"]) for c in tuned)
                                                           / len(tuned), abs=1e-6)
    page = (tmp_path / "report.html").read_text()
    assert f"was off the final (fine-tuned) {s['metric']} by {s['proxy_final_mae']:.4f}" in page
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model comes back


def test_without_calibration_the_plan_metric_is_as_pruned(tmp_path):
    res = run_report(digits.load_trained(), digits.evaluate, X, tmp_path, flops_target=0.6, sparsities=[0.5],
                     plan_evals=2, progress=False, console=None)
    s = res.summary
    assert s["plan_metric"] == "as-pruned" and s["metric_after_reconstructed"] is None
    # the sweep is NNI's as-pruned analysis with L1 units, as before calibration-aware sweeps existed
    assert (s["sweep_metric"], s["unit_score"], s["sensitivity_semantics"]) == ("as-pruned", "l1", "as pruned")
    assert res.stages.sweep.analysis is not None and res.stages.sweep.analysis.prune_type == "l1"
    assert all(c["reconstructed"] is None and c["as_pruned"] == c["measured"] for c in s["plan_candidates"])
