"""CPU latency of models measured side by side: interleaved runs, median per model.

Interleaving (A, B, A, B, ...) exposes every model to the same machine load, so the ratio of two medians is
meaningful even on a busy machine. Models run in eval mode without autograd; their modes come back as they were.

>>> import torch
>>> ms = measure_latency({'a': torch.nn.Linear(8, 8)}, torch.ones(1, 8), runs=3, warmup=1)
>>> sorted(ms) == ['a'] and ms['a'] > 0
True
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Mapping

import torch
from torch import nn

from ..graph import make_inputs, preserved_training

__all__ = ["measure_latency"]


def measure_latency(models: Mapping[str, nn.Module], x: Any, *, runs: int = 15, warmup: int = 2,
                    budget_s: float | None = 20.0) -> dict[str, float]:
    """Median milliseconds per forward of each model on ``x`` (interleaved runs; fewer when over ``budget_s``)."""
    items = list(models.items())
    inputs = {name: make_inputs(m, x) for name, m in items}
    times: dict[str, list[float]] = {name: [] for name, _ in items}
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
            if budget_s is not None and r >= warmup + 2 and time.perf_counter() - start > budget_s:
                break
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}
