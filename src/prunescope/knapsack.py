"""Choose per-group sparsities that meet a FLOPs budget with the smallest predicted metric loss.

The problem is a multiple-choice knapsack: every prunable group (a channel-dependency set) takes exactly one
of its measured sparsities (or none); each choice saves some MACs and costs a predicted metric loss read off
the sensitivity sweep; the sum of savings must reach the required amount and the sum of losses is minimised.

:func:`solve` is exact. It merges the groups one after another and keeps only the Pareto-optimal
``(saving, loss)`` states (more saving, less loss), so no brute force over all combinations is needed.

>>> from prunescope.knapsack import Option, solve
>>> opts = {"a": [Option(0.5, 40, 0.01), Option(0.9, 70, 0.30)], "b": [Option(0.5, 50, 0.02)]}
>>> sorted((g, o.sparsity) for g, o in solve(opts, 80).items())
[('a', 0.5), ('b', 0.5)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Option", "solve", "max_saving"]


@dataclass(frozen=True)
class Option:
    """Pruning one group at ``sparsity`` saves ``saving`` MACs and loses ``loss`` of the metric (predicted)."""

    sparsity: float
    saving: int
    loss: float


NONE = Option(0.0, 0, 0.0)


def max_saving(options: Mapping[str, Sequence[Option]]) -> int:
    """The largest saving any plan can reach."""
    return sum(max((o.saving for o in opts), default=0) for opts in options.values())


def solve(
    options: Mapping[str, Sequence[Option]], required: int, max_states: int = 200_000
) -> dict[str, Option] | None:
    """The choice per group with total saving ≥ ``required`` and the smallest total loss.

    Groups left out of the result stay unpruned. Returns ``None`` when even the largest savings cannot reach
    ``required``. Ties in loss prefer the smaller total saving (the plan nearest the requirement: a predicted
    loss of zero is a prediction, and single-set losses that are all zero, as after a reconstructed sweep, do
    not make pruning beyond the budget free), then the lower sparsities. The tie-break is a penalty of
    ``1e-9 × (smallest positive loss) × saving / (largest saving)`` added to every loss: too small to outweigh
    any real difference, large enough to order equal losses.
    """
    if required <= 0:
        return {}
    top = max_saving(options)
    if top < required:
        return None
    positive = [o.loss for opts in options.values() for o in opts if o.loss > 0]
    per_mac = 1e-9 * (min(positive) if positive else 1.0) / top
    groups = [g for g, opts in options.items() if opts]
    # a state: saving -> (loss, choices); capped at `required` (more saving than needed has no value)
    frontier: list[tuple[int, float, tuple[tuple[str, Option], ...]]] = [(0, 0.0, ())]
    for g in groups:
        merged: dict[int, tuple[float, tuple[tuple[str, Option], ...]]] = {}
        for saving, loss, choice in frontier:
            for opt in (NONE, *options[g]):
                s = min(required, saving + opt.saving)
                lo = loss + opt.loss + per_mac * opt.saving
                ch = choice if opt is NONE else (*choice, (g, opt))
                cur = merged.get(s)
                if cur is None or lo < cur[0] - 1e-15:
                    merged[s] = (lo, ch)
        # keep the Pareto front: for increasing saving, strictly decreasing loss
        pts = sorted(merged.items(), key=lambda kv: (-kv[0], kv[1][0]))
        front: list[tuple[int, float, tuple[tuple[str, Option], ...]]] = []
        best = float("inf")
        for s, (lo, ch) in pts:
            if lo < best - 1e-15:
                front.append((s, lo, ch))
                best = lo
        front.reverse()
        if len(front) > max_states:  # thin evenly; keeps the extremes
            step = len(front) / max_states
            front = [front[int(i * step)] for i in range(max_states)] + [front[-1]]
        frontier = front
    done = [st for st in frontier if st[0] >= required]
    if not done:
        return None
    s, lo, ch = min(done, key=lambda st: st[1])
    return dict(ch)
