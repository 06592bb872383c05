"""The prune → evaluate → restore loop: a whole layer in order (serial), or one evaluation (workers).

* :func:`run_job` sweeps one job (one layer, or one channel-dependency group) through its sparsities in
  order, applying the nested masks incrementally: the serial path, NNI's order and call count.
* :func:`run_eval` is one evaluation ``(layer, sparsity index)`` on its own: it applies the same chain of
  nested masks from the unpruned weights up to that index, evaluates once and restores. Worker processes,
  thread pools and Dask run it (through :func:`prunescope.sensitivity.parallel.remote_eval`); since the
  masks are recomputed deterministically, its value is the one the serial sweep gets, bit for bit.

Masks are applied in one place, :func:`prune_step`. Everything a job or an evaluation changes on the
model is undone in ``finally`` - also when ``val_func`` raises or the user presses Ctrl-C:

* the weight and bias of the pruned layer(s) are snapshotted (``clone``) before the first mask and copied
  back bit for bit afterwards; nothing else of the model's parameters is copied;
* every buffer of the model is snapshotted and restored too (BatchNorm running statistics change when
  ``val_func`` runs the model in training mode; NNI restores them after each layer as well). Buffers are
  small next to the weights (BatchNorm: two numbers per channel); pass ``restore_buffers=False`` to skip;
* the ``training`` flag of every module is put back;
* no hooks or wrappers are installed: masks are multiplied into the weights in place (exactly NNI's
  ``weight.data.mul_(mask)``), so there is nothing to remove.

A parameter outside the pruned layer(s) that ``val_func`` changes in place (an optimiser step: its version
counter moves) cannot be restored without a full copy; that is reported as :class:`ModelStateError`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PrunescopeError
from ..masks.pruners import group_masks
from ..removal.zeros import zero_hooks

EARLY_STOP_MODES = ("minimize", "maximize", "dropped", "raised")


class MetricError(PrunescopeError, ValueError):
    """``val_func`` returned NaN, an infinity or something that is not a number."""


class ModelStateError(PrunescopeError, RuntimeError):
    """``val_func`` changed model state that the analysis does not snapshot (e.g. trained other layers)."""


@dataclass(frozen=True)
class Job:
    """A serial layer sweep: ``sparsities`` in order on the layer(s) ``members``, reported under ``key``.

    ``done`` maps sparsity indices to values already known (from a checkpoint): their masks are still
    applied (masks are nested, each computed from the already-pruned weights) but ``val_func`` is not
    called again.
    """

    key: str
    members: tuple[str, ...]
    sparsities: tuple[float, ...]
    real_sparsities: tuple[float, ...]
    prune_type: str
    ori_metric: float
    early_stop_mode: str | None = None
    early_stop_value: float | None = None
    prune: bool = True
    done: Mapping[int, float] = field(default_factory=dict)
    restore_buffers: bool = True
    zero_after: tuple = ()  # as-pruned semantics: prunescope.removal.zeros.follower_zero_map points
    units: tuple | None = None  # unit pruning: per member, the unit id of each output channel
    chunks: tuple | None = None  # grouped convolutions: the chunk of every unit (units go equally per chunk)


@dataclass(frozen=True)
class Eval:
    """One evaluation: the layer(s) ``members`` pruned by the nested masks of ``chain`` (the real
    sparsities of indices ``0 .. index``), ``val_func`` called once. ``index == -1`` is the baseline
    (nothing pruned). ``threads`` sets torch's thread count first (worker processes use one)."""

    key: str
    members: tuple[str, ...]
    index: int
    sparsity: float | None
    chain: tuple[float, ...]
    prune_type: str
    prune: bool = True
    restore_buffers: bool = True
    device: str | None = None
    threads: int | None = None
    zero_after: tuple = ()  # as-pruned semantics: prunescope.removal.zeros.follower_zero_map points
    units: tuple | None = None  # unit pruning: per member, the unit id of each output channel
    chunks: tuple | None = None  # grouped convolutions: the chunk of every unit (units go equally per chunk)


@dataclass
class JobResult:
    """What a job produced: ``values[i]`` belongs to ``sparsities[i]``; ``error`` if it ended in one."""

    key: str
    values: list[float] = field(default_factory=list)
    stopped: bool = False
    error: BaseException | None = None


def coerce_metric(value: Any, layer: str, sparsity: float | None, where: str | None = None) -> float:
    """``val_func``'s return value as a finite Python float (tensors, numpy scalars and ints accepted).

    Errors say which evaluation returned it: ``where`` if given, else the layer and sparsity.

    >>> coerce_metric(torch.tensor(0.5), "conv1", 0.25)
    0.5
    """
    if where is None:
        where = "the unpruned model (baseline)" if sparsity is None else f"layer {layer!r} at sparsity {sparsity}"
    raw = value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise MetricError(f"val_func returned a tensor of shape {tuple(value.shape)} for {where}; "
                              "expected a single number")
        value = value.item()
    elif hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar / 0-d array
        try:
            value = value.item()
        except (ValueError, TypeError):
            raise MetricError(f"val_func returned {raw!r} for {where}; expected a single number") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MetricError(f"val_func returned {raw!r} ({type(raw).__name__}) for {where}; expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise MetricError(f"val_func returned {value} for {where}; the metric must be finite")
    return value


def need_to_stop(mode: str | None, threshold: float | None, ori: float, cur: float) -> bool:
    """NNI's early-stop rule: strict comparisons, checked after each evaluation.

    >>> need_to_stop("dropped", 0.1, 0.9, 0.8), need_to_stop("dropped", 0.1, 0.9, 0.79)
    (False, True)
    """
    if mode is None:
        return False
    assert threshold is not None
    if mode == "minimize":
        return cur < threshold
    if mode == "maximize":
        return cur > threshold
    if mode == "dropped":
        return cur < ori - threshold
    if mode == "raised":
        return cur > ori + threshold
    return False


class _StateGuard:
    """Snapshot what a job may change; restore it bit for bit on exit, whatever happened."""

    def __init__(self, model: nn.Module, modules: Sequence[nn.Module], restore_buffers: bool) -> None:
        self.model = model
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()
        for m in modules:
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    self.tensors.append((t, t.detach().clone()))
        if restore_buffers:
            for b in model.buffers():
                if id(b) not in seen:
                    seen.add(id(b))
                    self.tensors.append((b, b.detach().clone()))
        self.watched = [(n, p, p._version) for n, p in model.named_parameters() if id(p) not in seen]
        self.modes = [(m, m.training) for m in model.modules()]

    def check(self, where: str) -> None:
        changed = [n for n, p, v in self.watched if p._version != v]
        if changed:
            shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
            raise ModelStateError(
                f"val_func modified parameter(s) {shown} in place while evaluating {where}; a sensitivity "
                "sweep only restores the layer being pruned, so val_func must not train the model")

    def restore(self) -> None:
        with torch.no_grad():
            for t, snap in self.tensors:
                t.copy_(snap)
        for m, mode in self.modes:
            m.training = mode


def _zero_hooks(model: nn.Module, points: tuple) -> list[Any]:
    """As-pruned semantics: zero a pruned channel after its normalisation too (removed again on exit)."""
    if not points:
        return []
    return zero_hooks(model, points)


def prune_step(modules: Sequence[nn.Module], real_sparsity: float, prune_type: str,
               units: Sequence[Sequence[int]] | None = None, chunks: Sequence[int] | None = None) -> None:
    """Apply one step of the nested masks: compute masks at ``real_sparsity`` from the layers' current
    (already pruned) weights and multiply them in place, as NNI's ``weight.data.mul_(mask)``.

    ``units``: prune whole units (per member, the unit id of each output channel; see
    :mod:`prunescope.masks.units`), ``real_sparsity`` being a fraction of the units; ``chunks``: the chunk of
    every unit on grouped convolutions (as many units go from every chunk, see
    :func:`prunescope.masks.pruners.group_masks`).
    This is the one place where the sweep prunes; every execution mode goes through it.
    """
    masks = group_masks(modules, real_sparsity, prune_type, units=units, chunks=chunks)
    with torch.no_grad():
        for m, mask in zip(modules, masks):
            m.weight.mul_(mask["weight"])
            if mask.get("bias") is not None and getattr(m, "bias", None) is not None:
                m.bias.mul_(mask["bias"])
    del masks  # free the masks before val_func runs: only the snapshot stays


def run_job(model: nn.Module, val_func: Callable[..., Any], val_args: Sequence[Any],
            val_kwargs: dict[str, Any], job: Job,
            on_result: Callable[[Job, int, float], None] | None = None) -> JobResult:
    """Sweep one job on ``model`` (NNI semantics) and return its values; the model is restored on exit.

    ``on_result(job, i, value)`` is called after every *new* evaluation (checkpointing, progress).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    >>> x = torch.ones(1, 1, 5, 5)
    >>> job = Job("0", ("0",), (0.5,), (0.5,), "l1", ori_metric=0.0)
    >>> res = run_job(net, lambda m: m(x).abs().sum().item(), [net], {}, job)
    >>> len(res.values), res.stopped
    (1, False)
    """
    modules = [model.get_submodule(n) for n in job.members]
    result = JobResult(job.key)
    guard = _StateGuard(model, modules, job.restore_buffers)
    hooks = _zero_hooks(model, job.zero_after)
    try:
        for i, (s, real) in enumerate(zip(job.sparsities, job.real_sparsities)):
            if job.prune:
                prune_step(modules, real, job.prune_type, job.units, job.chunks)
            if i in job.done:
                value = job.done[i]
            else:
                value = coerce_metric(val_func(*val_args, **val_kwargs), job.key, s)
                guard.check(f"{job.key!r} at sparsity {s}")
                if on_result is not None:
                    on_result(job, i, value)
            result.values.append(value)
            if need_to_stop(job.early_stop_mode, job.early_stop_value, job.ori_metric, value):
                result.stopped = True
                break
    finally:
        for h in hooks:
            h.remove()
        guard.restore()
    return result


def run_eval(model: nn.Module, val_func: Callable[..., Any], val_args: Sequence[Any],
             val_kwargs: dict[str, Any], ev: Eval) -> float:
    """One evaluation on ``model``: prune ``ev.members`` by the chain of nested masks, call ``val_func``
    once, restore the model. Returns the metric as a finite float.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    >>> x = torch.ones(1, 1, 5, 5)
    >>> ev = Eval("0", ("0",), 1, 0.5, (0.25, 0.5), "l1")
    >>> v = run_eval(net, lambda m: m(x).abs().sum().item(), [net], {}, ev)
    >>> type(v)
    <class 'float'>
    """
    if ev.threads is not None and torch.get_num_threads() != ev.threads:
        torch.set_num_threads(ev.threads)
    modules = [model.get_submodule(n) for n in ev.members]
    guard = _StateGuard(model, modules, ev.restore_buffers)
    where = "the unpruned model (baseline)" if ev.index < 0 else f"{ev.key!r} at sparsity {ev.sparsity}"
    hooks = _zero_hooks(model, ev.zero_after)
    try:
        if ev.prune:
            for real in ev.chain:
                prune_step(modules, real, ev.prune_type, ev.units, ev.chunks)
        value = coerce_metric(val_func(*val_args, **val_kwargs), ev.key, ev.sparsity)
        guard.check(where)
    finally:
        for h in hooks:
            h.remove()
        guard.restore()
    return value
