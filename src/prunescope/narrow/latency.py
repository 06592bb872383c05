"""CPU latency of models measured side by side: interleaved runs, median per model.

Interleaving (A, B, A, B, ...) exposes every model to the same machine load, so the ratio of two medians is
meaningful even on a busy machine. Models run in eval mode without autograd; their modes come back as they were.
:func:`time_models` also says how many runs each median is of and whether a time budget cut them short
(``per_model_s``: a fixed budget per model, what the report uses so that a large model's timing stays short).

>>> import torch
>>> ms = measure_latency({'a': torch.nn.Linear(8, 8)}, torch.ones(1, 8), runs=3, warmup=1)
>>> sorted(ms) == ['a'] and ms['a'] > 0
True
>>> t = time_models({'a': torch.nn.Linear(8, 8)}, torch.ones(1, 8), runs=4, warmup=1)
>>> t.runs, t.capped
(4, False)
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..graph import make_inputs, preserved_training

__all__ = ["measure_latency", "time_models", "Latency", "MIN_RUNS"]

#: a time budget never cuts the timing below this many measured runs per model
MIN_RUNS = 3


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per forward of each model (``ms``), each of ``runs`` interleaved timed runs (after the
    warm-up); ``capped``: a budget stopped the runs before the ``runs`` asked for; ``budget_s``: the total budget
    that applied (None: none)."""

    ms: dict[str, float]
    runs: int
    capped: bool
    budget_s: float | None


def time_models(models: Mapping[str, nn.Module], x: Any, *, runs: int = 15, warmup: int = 2,
                budget_s: float | None = 20.0, per_model_s: float | None = None) -> Latency:
    """Time every model on ``x``, interleaved, ``warmup`` rounds then up to ``runs`` timed rounds; the rounds stop
    early (after at least :data:`MIN_RUNS` timed ones) once ``budget_s`` seconds in all, or ``per_model_s`` seconds
    per model (the smaller of the two), have passed since the first round started."""
    items = list(models.items())
    budgets = [b for b in (budget_s, None if per_model_s is None else per_model_s * len(items)) if b is not None]
    budget = min(budgets) if budgets else None
    inputs = {name: make_inputs(m, x) for name, m in items}
    times: dict[str, list[float]] = {name: [] for name, _ in items}
    capped = False
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for _, m in items:
            stack.enter_context(preserved_training(m, False))
        start = time.perf_counter()
        for r in range(warmup + runs):
            for name, m in items:
                args, kw = inputs[name]
                t0 = time.perf_counter()
                m(*args, **kw)
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(dt)
            if (budget is not None and r + 1 < warmup + runs and r + 1 >= warmup + MIN_RUNS
                    and time.perf_counter() - start > budget):
                capped = True
                break
    done = len(next(iter(times.values()))) if times else 0
    return Latency({name: statistics.median(v) * 1e3 for name, v in times.items()}, done, capped, budget)


def measure_latency(models: Mapping[str, nn.Module], x: Any, *, runs: int = 15, warmup: int = 2,
                    budget_s: float | None = 20.0, per_model_s: float | None = None) -> dict[str, float]:
    """Median milliseconds per forward of each model on ``x`` (interleaved runs; fewer when over the budget:
    see :func:`time_models`)."""
    return time_models(models, x, runs=runs, warmup=warmup, budget_s=budget_s, per_model_s=per_model_s).ms
