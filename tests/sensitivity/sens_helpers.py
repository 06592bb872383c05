"""Helpers for the sensitivity tests: state fingerprints and counting / failing validation functions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

NNI_DATA = Path(__file__).resolve().parents[1] / "data" / "nni"


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    """Raw bytes of every parameter and buffer (bit-identical comparison, -0.0 and NaN included)."""
    return {k: v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()]


class Counting:
    """Picklable val function: calls ``metric``; raises ``exc`` on call number ``fail_at`` (1-based)."""

    def __init__(self, metric, fail_at: int | None = None, exc: BaseException | None = None,
                 returns=None) -> None:
        self.metric = metric
        self.fail_at = fail_at
        self.exc = exc
        self.returns = returns
        self.calls = 0

    def __call__(self, model: nn.Module):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            if self.exc is not None:
                model.train()  # also flip the mode: it must be put back
                raise self.exc
            return self.returns
        return self.metric(model)


def zero_filters(model: nn.Module) -> tuple[int, ...]:
    """Number of all-zero output filters of every Conv layer: identifies which layer is pruned how far."""
    return tuple(int((m.weight.detach().flatten(1).abs().sum(1) == 0).sum())
                 for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))


class BadAt:
    """Picklable val function returning ``returns`` when the conv filters zeroed are exactly ``zeros``."""

    def __init__(self, metric, zeros: tuple[int, ...], returns=float("nan")) -> None:
        self.metric, self.zeros, self.returns = metric, tuple(zeros), returns

    def __call__(self, model: nn.Module):
        return self.returns if zero_filters(model) == self.zeros else self.metric(model)


class Slow:
    """Picklable val function that waits ``seconds`` (``time.sleep``: the evaluation waits on something else,
    an accelerator or a remote service) and then returns ``sens_models.<metric>(model)``."""

    def __init__(self, metric: str, seconds: float, log: str | None = None) -> None:
        self.metric, self.seconds, self.log = metric, seconds, log

    def __call__(self, model: nn.Module) -> float:
        import os
        import time

        import sens_models

        if self.log is not None:  # one line per evaluation, appended atomically: which layer, how far pruned
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{os.getpid()} {','.join(map(str, zero_filters(model)))}\n".encode())
            finally:
                os.close(fd)
        time.sleep(self.seconds)
        return getattr(sens_models, self.metric)(model)


_LAYER_JOB_CACHE: dict[str, tuple] = {}


def layer_job(job, digest: str, data: bytes) -> list[float]:
    """The previous design, for the benchmark: one job sweeps a whole layer (``engine.run_job``)."""
    import pickle

    from prunescope.sensitivity.jobs import run_job

    if digest not in _LAYER_JOB_CACHE:
        _LAYER_JOB_CACHE.clear()
        _LAYER_JOB_CACHE[digest] = pickle.loads(data)
    model, val, args, kwargs = _LAYER_JOB_CACHE[digest]
    torch.set_num_threads(1)
    return run_job(model, val, args, kwargs, job).values


CALLS: list[int] = []


def counted_loss(model: nn.Module) -> float:
    """``sens_models.loss`` that records each call in ``CALLS`` (for CLI tests, which load it by name)."""
    import sens_models

    CALLS.append(1)
    return sens_models.loss(model)


def string_metric(model: nn.Module) -> str:
    """A broken val function: returns the metric as text."""
    return "0.5"


class RaiseAt:
    """Picklable val function raising ``exc`` when the conv filters zeroed are exactly ``zeros``."""

    def __init__(self, metric, zeros: tuple[int, ...], exc: BaseException) -> None:
        self.metric, self.zeros, self.exc = metric, tuple(zeros), exc

    def __call__(self, model: nn.Module):
        if zero_filters(model) == self.zeros:
            raise self.exc
        return self.metric(model)
