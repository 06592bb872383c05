"""Issue-13 quality bar on the embedded default at a 50% MACs target (the main job, default settings, the plan
chosen as pruned: ``reconstruct=False``; the reconstructed choice is tested in test_reconstructed_report.py).

The plan is measured on shrunk models against the uniform baseline and against 10 random plans that meet the
same target (measured the same way: shrunk, then evaluated); its prediction is the one made before its own
measurement; recovery (BatchNorm re-estimation + fine-tuning) is shipped in pruned.pt.
"""

import json
import random
import warnings

import pytest
import torch

from prunescope.examples import digits
from prunescope.flops import flops_report
from prunescope.masks import fix_mask_conflict
from prunescope.masks.pruners import group_masks
from prunescope.narrow import load_pruned, shrink
from prunescope.report import run_report

pytestmark = pytest.mark.slow
X = torch.ones(digits.INPUT_SIZE)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "report"
    model = digits.load_trained()
    res = run_report(model, digits.evaluate, X, out, flops_target=0.5, progress=False, console=None,
                     calibrate=digits.calibration_batches, finetune=digits.finetune, reconstruct=False)
    return model, res, out


def shrunk_metric(model, plan):
    mods = dict(model.named_modules())
    merged = {}
    for key, s in plan.items():
        if s > 0:
            members = key.split("+")
            merged.update(zip(members, group_masks([mods[m] for m in members], s, "l1")))
    masks = fix_mask_conflict(merged, model, X) if merged else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = shrink(model, masks, X, fix_conflicts=False)
    return digits.evaluate(small), flops_report(small, X).total_flops


def test_plan_beats_uniform_and_its_prediction_holds(main_job):
    model, res, out = main_job
    s = res.summary
    target = 0.5 * s["flops_before"]
    assert s["flops_after"] <= target and s["uniform_flops_after"] <= target
    assert s["metric_after_measured"] >= s["uniform_metric_measured"] + 0.03
    assert abs(s["metric_after_predicted"] - s["metric_after_measured"]) <= 0.03
    # the prediction was made before the plan's own measurement: it is the candidate's recorded prediction
    chosen = [c for c in s["plan_candidates"] if c["plan"] == s["plan"]]
    assert len(chosen) == 1 and chosen[0]["predicted"] == s["metric_after_predicted"]
    # independent re-measurement of both plans as shrunk models
    assert shrunk_metric(model, s["plan"]) == (s["metric_after_measured"], s["flops_after"])
    assert shrunk_metric(model, s["uniform_plan"]) == (s["uniform_metric_measured"], s["uniform_flops_after"])


def test_plan_at_least_the_best_of_ten_random_plans(main_job):
    model, res, _ = main_job
    s = res.summary
    keys = list(s["plan"]) + [k for k in (s["uniform_plan"] or {}) if k not in s["plan"]]
    rng = random.Random(13)
    grid = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    got = []
    while len(got) < 10:
        plan = {k: rng.choice(grid) for k in keys}
        metric, macs = shrunk_metric(model, plan)
        if macs <= 0.5 * s["flops_before"]:
            got.append(metric)
    assert s["metric_after_measured"] >= max(got), (s["metric_after_measured"], sorted(got))


def test_recovery_is_shipped_in_pruned_pt(main_job):
    _, res, out = main_job
    s = json.loads((out / "summary.json").read_text())
    assert s["metric_after_calibrated"] is not None and s["metric_after_finetuned"] is not None
    assert s["metric_final"] == s["metric_after_finetuned"] >= 0.97
    assert s["flops_after"] <= 0.5 * s["flops_before"]
    assert sum(step["seconds"] for step in s["recovery_steps"]) < 60
    final = load_pruned(digits.DigitsNet(), out / "pruned.pt")
    assert digits.evaluate(final) == s["metric_final"]
    assert flops_report(final, X).total_flops == s["flops_after"]
