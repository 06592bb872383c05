"""PlanSearch on synthetic problems with a known answer (no model): budget, feasibility, uniform, prediction."""

import itertools

import pytest

from prunescope.report.search import PlanSearch

KEYS = ["a", "b", "c"]
GRID = {k: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] for k in KEYS}
COST = {"a": 100, "b": 60, "c": 40}  # MACs per unit sparsity removed
SLOPE = {"a": 0.2, "b": 0.5, "c": 0.1}  # single-set loss per unit sparsity
TRUE_W = {"a": 1.5, "b": 2.0, "c": 3.0}  # the real interaction factors: measured loss = sum w_k * l_k


def make(budget=16, target=150):
    def loss(k, s):
        return SLOPE[k] * s

    def macs(plan):
        return int(round(200 - sum(COST[k] * s for k, s in plan.items())))

    def measure(plan):
        return 1.0 - sum(TRUE_W[k] * loss(k, s) for k, s in plan.items())

    return PlanSearch(KEYS, GRID, loss, macs, measure, 1.0, 1.0, target, budget=budget)


def test_search_respects_budget_feasibility_and_returns_the_best_measured():
    ps = make(budget=10)
    best = ps.run([ps.uniform()])
    assert len(ps.measured) <= 10
    assert all(c.macs <= 150 for c in ps.measured)
    assert best.measured == max(c.measured for c in ps.measured)
    # it beats the uniform start on this problem (c is cheap in loss per MACs... a is the best MACs per loss)
    assert best.measured > ps.measured[0].measured


def test_uniform_is_the_smallest_common_sparsity_meeting_the_target():
    ps = make()
    u = ps.uniform()
    s = u.plan["a"]
    assert u.macs <= 150 and all(v == s for v in u.plan.values())
    # any common sparsity 0.001 smaller misses the target
    assert ps.macs({k: s - 0.001 for k in KEYS}) > 150


def test_prediction_recovers_per_set_interactions_and_is_recorded_before_measuring():
    ps = make(budget=40, target=180)
    plans = [{"a": 0.5}, {"b": 0.5}, {"c": 0.6}, {"a": 0.4, "b": 0.2}, {"b": 0.3, "c": 0.4}, {"a": 0.3, "c": 0.5}]
    for p in plans:
        ps.run_measure(ps.candidate(p, "probe"))
    # with the loss exactly linear in the single-set losses, the fitted factors are the true ones (up to the
    # weak pull towards one common factor)
    assert ps.slopes() == pytest.approx([TRUE_W[k] for k in KEYS], rel=0.03)
    c = ps.candidate({"a": 0.3, "b": 0.3, "c": 0.2}, "test")
    predicted = ps.predict(c)
    ps.run_measure(c)
    assert c.predicted == predicted and c.measured == pytest.approx(predicted, abs=5e-3)
    # the first prediction (nothing measured yet) is the additive one
    first = make().candidate({"a": 0.5}, "x")
    assert make().predict(first) == pytest.approx(1.0 - SLOPE["a"] * 0.5)


def test_same_answer_whatever_the_key_order():
    answers = set()
    for keys in itertools.permutations(KEYS):
        ps = make()
        ps.keys = list(keys)
        best = ps.run([ps.uniform()])
        answers.add((tuple(sorted(best.plan.items())), round(best.measured, 12)))
    assert len(answers) == 1
