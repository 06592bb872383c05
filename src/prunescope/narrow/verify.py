"""The safety net of :func:`~prunescope.narrow.shrink`: the model it returns computes what the as-pruned masked
model computes, or no model is returned.

:func:`verify_shrunk` runs the original model under :func:`~prunescope.narrow.as_pruned` (the same
conflict-free masks and the same removal plan) and the shrunk copy on the dummy input — eval mode, no
autograd, the same random seed for both — and compares every floating-point output tensor
(``|shrunk - as_pruned| <= tol * (|as_pruned| + scale)``, ``scale`` the largest magnitude of that output,
``tol`` = 1e-4 in float32/float64, 16 machine epsilons in lower precisions). On a difference both models are run
again with forward hooks on every module, and the first module (in the order the modules finish) whose
output differs on the kept channels is named in the :class:`~prunescope.narrow.ShrinkError`, with the ops it
ran and the layers whose removed channels reach it.

Meta tensors carry no values: the comparison is skipped there (the shapes are still checked by ``shrink``).
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import ShrinkError
from ..graph import ModelGraph
from ..removal.narrow import run_eval
from ..removal.plan import RemovalPlan, axis_positions

__all__ = ["verify_shrunk", "run_eval", "tolerance"]


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the comparison for outputs of ``dtype``."""
    if dtype in (torch.float32, torch.float64):
        return 1e-4
    return float(16 * torch.finfo(dtype).eps)


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _difference(ref: torch.Tensor, got: torch.Tensor, tol: float) -> float | None:
    """The largest difference relative to ``ref``'s scale when it exceeds the tolerance, else None."""
    if not ref.is_floating_point() or ref.device.type == "meta" or got.device.type == "meta":
        return None
    if tuple(ref.shape) != tuple(got.shape):
        return float("inf")
    if ref.numel() == 0:
        return None
    r = ref.detach().float()
    g = got.detach().float().to(r.device)
    nan_r, nan_g = torch.isnan(r), torch.isnan(g)
    if not torch.equal(nan_r, nan_g):
        return float("inf")
    r, g = r.masked_fill(nan_r, 0.0), g.masked_fill(nan_g, 0.0)
    finite = torch.isfinite(r)
    if not torch.equal(finite, torch.isfinite(g)) or not torch.equal(r[~finite], g[~finite]):
        return float("inf")
    r, g = r.masked_fill(~finite, 0.0), g.masked_fill(~finite, 0.0)
    scale = float(r.abs().max())
    diff = (g - r).abs()
    if bool((diff <= tol * (r.abs() + scale)).all()):
        return None
    return float(diff.max()) / max(scale, torch.finfo(torch.float32).tiny)


def verify_shrunk(model: nn.Module, small: nn.Module, dummy_input: Any, plan: RemovalPlan, small_out: Any,
                  reference: Callable[[], ContextManager[nn.Module]]) -> bool:
    """Raise :class:`ShrinkError` unless ``small_out`` (the shrunk model's output on ``dummy_input``) equals the
    output of ``model`` run inside ``reference()`` (the as-pruned masked model). Returns False when the values
    could not be compared (meta tensors), True when they were and agree."""
    outs = _leaves(small_out)
    if any(t.device.type == "meta" for t in outs) or any(p.device.type == "meta" for p in model.parameters()):
        return False
    with reference() as ref_model:
        ref = _leaves(run_eval(ref_model, dummy_input))
    worst: tuple[float, int] | None = None
    for i, (r, s) in enumerate(zip(ref, outs)):
        d = _difference(r, s, tolerance(r.dtype)) if r.is_floating_point() else None
        if d is not None and (worst is None or d > worst[0]):
            worst = (d, i)
    if len(ref) != len(outs):
        worst = (float("inf"), min(len(ref), len(outs)))
    if worst is None:
        return True
    where = _first_divergence(model, small, dummy_input, plan, reference)
    msg = (f"the shrunk model computes another function than the as-pruned masked model: output {worst[1]} "
           f"differs by up to {worst[0]:.3g} of its scale (tolerance {tolerance(outs[0].dtype):g}); ")
    if where is None:
        raise ShrinkError(msg + "no single module's output explains it. shrink refuses to return a model that "
                          "is silently different")
    name, kind, ops, layers, d, fed = where
    mod = f"module '{name}' ({kind})" if name else f"the model's own forward ({kind})"
    lay = ", ".join(f"'{x}'" for x in layers[:6]) + (" ..." if len(layers) > 6 else "") if layers else "none"
    why = (f"; the as-pruned model feeds it nonzero values (up to {fed:.3g}) on those removed channels, e.g. a "
           "constant like sigmoid(0) = 0.5 made from a zeroed channel, which the shrunk model drops" if fed > 0
           else "")
    raise ShrinkError(msg + f"they first diverge at {mod}, ops {', '.join(ops) or '?'} (differs by {d:.3g} of "
                      f"its scale), which reads removed channels of layers {lay}{why}. Those channels cannot "
                      "go without changing what it computes: keep them (drop these layers' masks) or change "
                      "the module. shrink refuses to return a model that is silently different",
                      name or None, ",".join(ops) or None)


# ------------------------------------------------------------------------------------------------ localisation
def _run_recorded(model: nn.Module, dummy_input: Any,
                  sink: Callable[[str, int, list[torch.Tensor], list[torch.Tensor]], None]) -> None:
    """Run ``model`` once (:func:`run_eval`) with ``sink(module, call number, outputs, inputs)`` called after every
    module call; the hooks are removed afterwards, also on exceptions."""
    counts: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        def hook(_m: nn.Module, args: Any, out: Any, name: str = name) -> None:
            counts[name] = counts.get(name, 0) + 1
            sink(name, counts[name], _leaves(out), _leaves(args))

        handles.append(mod.register_forward_hook(hook))
    try:
        run_eval(model, dummy_input)
    finally:
        for h in handles:
            h.remove()


def _kept(t: torch.Tensor, info: Any, ci: Any, plan: RemovalPlan, want: tuple[int, ...]) -> torch.Tensor | None:
    """``t`` (a tensor of the original model) restricted to the positions the shrunk model keeps."""
    if ci is None or tuple(t.shape) == want:
        return t if tuple(t.shape) == want else None
    if t.ndim != info.ndim:
        return None
    for axis in ci.axes:
        _, gone, _ = axis_positions(ci, axis, plan.atom_removed)
        if gone.size != t.shape[axis] or not gone.any():
            continue
        idx = torch.as_tensor(np.nonzero(~gone)[0], dtype=torch.long, device=t.device)
        t = t.index_select(axis, idx)
    return t if tuple(t.shape) == want else None


def _layers_reaching(plan: RemovalPlan, infos: list[Any]) -> list[str]:
    ca = plan.atoms
    out: list[str] = []
    for info in infos:
        ci = ca.info(info)
        if ci is None:
            continue
        a = ci.atoms.reshape(-1)
        a = a[a >= 0]
        for atom in np.unique(a[plan.atom_removed[a]]).tolist():
            layer = ca.atom_name(int(atom))[0]
            if layer not in out:
                out.append(layer)
    return out


def _first_divergence(model: nn.Module, small: nn.Module, dummy_input: Any, plan: RemovalPlan,
                      reference: Callable[[], ContextManager[nn.Module]]
                      ) -> tuple[str, str, list[str], list[str], float, float] | None:
    """``(module, type, ops, layers, difference, nonzero input on removed channels)`` of the first module whose
    output differs on kept channels."""
    g: ModelGraph = plan.graph
    ca = plan.atoms
    calls = {(c.name, c.call_number): c for c in g.calls}
    ref: dict[tuple[str, int], list[torch.Tensor]] = {}
    ref_in: dict[tuple[str, int], list[torch.Tensor]] = {}
    found: list[tuple[tuple[str, int], float]] = []

    def keep_ref(name: str, k: int, outs: list[torch.Tensor], ins: list[torch.Tensor]) -> None:
        ref[(name, k)] = [o.detach().clone() for o in outs]
        ref_in[(name, k)] = [t.detach().clone() for t in ins]

    def compare(name: str, k: int, outs: list[torch.Tensor], _ins: list[torch.Tensor]) -> None:
        if found or (name, k) not in ref:
            return
        call = calls.get((name, k))
        infos = call.outputs if call is not None else []
        for j, (r, s) in enumerate(zip(ref[(name, k)], outs)):
            if not r.is_floating_point():
                continue
            info = infos[j] if j < len(infos) and tuple(infos[j].shape) == tuple(r.shape) else None
            sel = _kept(r, info, ca.info(info) if info is not None else None, plan, tuple(s.shape))
            if sel is None:
                continue
            d = _difference(sel, s, tolerance(r.dtype))
            if d is not None:
                found.append(((name, k), d))
                return

    with reference() as ref_model:
        _run_recorded(ref_model, dummy_input, keep_ref)
    _run_recorded(small, dummy_input, compare)
    if not found:
        return None
    (name, k), d = found[0]
    call = calls.get((name, k))
    mod = dict(model.named_modules()).get(name)
    kind = type(mod).__name__ if mod is not None else "?"
    if call is None:
        return name, kind, [], [], d, 0.0
    ops: list[str] = []
    for i in call.ops:
        n = g.nodes[i].name
        if n not in ops:
            ops.append(n)
    if not ops:
        ops = list(dict.fromkeys(n.name for n in g.ops_in(call)))
    return (name, kind, ops[:8], _layers_reaching(plan, list(call.inputs) + list(call.outputs)), d,
            _nonzero_removed(ref_in.get((name, k), []), call.inputs, plan))


def _nonzero_removed(values: list[torch.Tensor], infos: list[Any], plan: RemovalPlan) -> float:
    """The largest magnitude the as-pruned model feeds the module on removed channels (0: they read zero)."""
    worst = 0.0
    for v, info in zip(values, infos):
        ci = plan.atoms.info(info)
        if ci is None or not v.is_floating_point() or tuple(v.shape) != tuple(info.shape):
            continue
        for axis in ci.axes:
            _, gone, _ = axis_positions(ci, axis, plan.atom_removed)
            if gone.any() and gone.size == v.shape[axis]:
                idx = torch.as_tensor(np.nonzero(gone)[0], dtype=torch.long, device=v.device)
                worst = max(worst, float(v.index_select(axis, idx).abs().max()))
    return worst
