"""The planner against brute force over every combination (small knapsacks with a known optimum)."""

import itertools
import random

import pytest

from prunescope.knapsack import Option, max_saving, solve


def brute(options, required):
    groups = list(options)
    best = None
    for combo in itertools.product(*[[None, *options[g]] for g in groups]):
        saving = sum(o.saving for o in combo if o)
        loss = sum(o.loss for o in combo if o)
        if saving >= required and (best is None or loss < best[0] - 1e-12):
            best = (loss, combo)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    options = {}
    for g in range(rng.randint(1, 5)):
        levels = sorted(rng.sample([0.1, 0.25, 0.5, 0.75, 0.9], rng.randint(1, 4)))
        cost = rng.randint(10, 1000)
        options[f"g{g}"] = [Option(s, int(cost * s), rng.random() * s) for s in levels]
    required = rng.randint(1, max(1, max_saving(options)))
    got = solve(options, required)
    ref = brute(options, required)
    assert ref is not None and got is not None
    assert sum(o.saving for o in got.values()) >= required
    assert sum(o.loss for o in got.values()) == pytest.approx(ref[0], abs=1e-12)


def test_hand_made_optimum():
    # cheapest way to save 100: b alone at 0.5 loses 0.05; a at 0.9 + nothing else loses 0.3
    options = {
        "a": [Option(0.5, 60, 0.02), Option(0.9, 100, 0.30)],
        "b": [Option(0.5, 100, 0.05)],
        "c": [Option(0.5, 40, 0.01)],
    }
    plan = solve(options, 100)
    assert {g: o.sparsity for g, o in plan.items()} in ({"a": 0.5, "c": 0.5},)  # 100 saved for 0.03


def test_infeasible_and_trivial():
    options = {"a": [Option(0.5, 10, 0.1)]}
    assert solve(options, 11) is None
    assert solve(options, 0) == {}


def test_equal_losses_prefer_the_plan_nearest_the_requirement() -> None:
    """All single-set losses zero (as after a reconstructed sweep): the plan saves what is required, not the most
    it can. With ``a`` merged first, a capped-at-the-requirement state would keep a@0.9 (saving 300, three times
    the budget) and drop a@0.5 (90, one set short) before ``b`` could complete it."""
    opts = {"a": [Option(0.5, 90, 0.0), Option(0.9, 300, 0.0)], "b": [Option(0.5, 20, 0.0)]}
    plan = solve(opts, 100)
    assert {g: o.sparsity for g, o in plan.items()} == {"a": 0.5, "b": 0.5}
    # a real loss difference still wins over the tie-break, however small against the savings
    opts["b"] = [Option(0.5, 20, 1e-6)]
    assert {g: o.sparsity for g, o in solve(opts, 100).items()} == {"a": 0.9}
