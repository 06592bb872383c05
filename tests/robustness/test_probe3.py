"""The third reliability probe's defects (issue 16, item 4), each with the case that showed it.

Each test failed before its fix: a crash (AssertionError, raw torch errors), a wrong number in a note, or a bad
input accepted silently.
"""

from __future__ import annotations

import os
import types

import pytest
import robust_models as rm
import torch
from torch import nn

from prunescope.cli import main
from prunescope.report.search import PlanSearch
from prunescope.report.steps import _knapsack

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _models_on_path(monkeypatch):
    monkeypatch.syspath_prepend(HERE)


# ---- the plan step's knapsack ----------------------------------------------------------------------------------


def _fake_run(base: int, target: int, exact_saving, grid: dict[str, list[float]]):
    """A plan problem with known, non-additive savings: ``exact_saving(plan)`` is what a plan really saves."""
    r = types.SimpleNamespace(dense=types.SimpleNamespace(total_flops=base), keys=list(grid), target_macs=target,
                              flops_target=target / base, excluded={}, note="", uniform=None)
    r.macs_of = lambda plan: base - exact_saving({k: v for k, v in plan.items() if v > 0})
    search = PlanSearch(r.keys, grid, lambda k, s: s, r.macs_of, lambda p: 0.0, 1.0, 1.0, target)
    return r, search


def test_knapsack_resolve_jumps_past_a_plan_that_misses_the_exact_count():
    """a and b save 300 each alone, 499 together (their savings overlap): the additive optimum {a: .5, b: .5}
    misses a target of 500 by one MAC. Tightening the budget by that one MAC per re-solve found the same plan
    20 times and gave up (None, then an AssertionError in the plan step); now the next solve asks for more than
    that plan's additive saving and finds {a: .75, b: .5}."""
    single = {("a", 0.5): 300, ("a", 0.75): 450, ("b", 0.5): 300}

    def exact(plan):
        s = sum(single[(k, v)] for k, v in plan.items())
        return s - 101 if len(plan) == 2 else s  # 499 for .5/.5, 649 for .75/.5

    r, search = _fake_run(1000, 500, exact, {"a": [0.5, 0.75], "b": [0.5]})
    c = _knapsack(r, search)
    assert c is not None and c.plan == {"a": 0.75, "b": 0.5}
    assert c.macs == 1000 - 649 <= 500 and r.note == ""


def test_unreachable_target_note_gives_the_heaviest_plans_exact_count():
    """Before: 'saves 700 of 1,000 MACs (keeps 30.0%)' (single-set savings summed); the heaviest plan really
    keeps 600 MACs."""
    single = {("a", 0.5): 350, ("b", 0.5): 350}
    r, search = _fake_run(1000, 100, lambda p: sum(single[(k, v)] for k, v in p.items()) - 300 * (len(p) == 2),
                          {"a": [0.5], "b": [0.5]})
    c = _knapsack(r, search)
    assert c.plan == {"a": 0.5, "b": 0.5} and c.macs == 600
    assert "keeps 600 of 1,000 MACs (60.0%, saves 400)" in r.note, r.note
    assert "700" not in r.note


def test_report_sparsities_quarter_steps_completes(tmp_path, capsys):
    """`prunescope report --sparsities 0.25,0.5,0.75` on the embedded default died on an AssertionError."""
    code = main(["report", "--out", str(tmp_path / "r"), "--sparsities", "0.25,0.5,0.75", "--no-recovery",
                 "--plan-evals", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out  # 0: the target is met
    import json

    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["target_met"] and s["flops_after"] <= 0.5 * s["flops_before"]


# ---- parametrized (weight_norm) layers in the report ------------------------------------------------------------


def test_report_with_a_weight_norm_conv_excludes_its_sets_and_completes(tmp_path):
    """TinyCNN with a weight_norm conv2: the residual set conv1+conv2 is left alone with a reason, conv3 is still
    pruned, the report completes (it failed in step 3: the sweep refused every parametrized layer of the model)."""
    from prunescope.report import run_report

    torch.manual_seed(0)
    model = rm.TinyCNN().eval()
    nn.utils.parametrizations.weight_norm(model.conv2)
    x = torch.randn(2, 3, 8, 8)
    ref = model(x).detach()

    def val(m):
        with torch.no_grad():
            return -float((m(x) - ref).abs().mean())

    res = run_report(model, val, x, tmp_path / "r", flops_target=0.9, sparsities=[0.5], progress=False,
                     console=None)
    assert res.plan == {"conv3": 0.5}, res.plan
    assert "conv2" in res.summary["excluded_sets"]["conv1+conv2"] and "computed" in \
        res.summary["excluded_sets"]["conv1+conv2"]
