"""Folding the constants that removed channels leave into the bias of the layer that reads them.

In the as-pruned masked model a removed channel is zero where its layer writes it, but it can reach the next
layer as a non-zero *constant* (``sigmoid(0) = 0.5``, ``relu(x) + 1``). Dropping the channel would drop that
constant's contribution ``W[:, j] * c_j``; the removal plan (:mod:`.plan`, value analysis in
:mod:`prunescope.topology.values`) keeps such channels unless the contribution is the same at every output
position, i.e. the layer is a Linear or a convolution without zero padding, and then lists a
:class:`~prunescope.removal.plan.Fold`. :func:`apply_folds` reads each ``c_j`` from one forward of the masked
copy with the as-pruned zeros (the value is independent of the input: it is checked to be the same for every
sample and position) and adds the contribution to the bias (created when the layer has none), before the
copy is narrowed. It also refuses removals the engine pins for their values (a mean over the channel axis):
those would narrow fine and compute something else.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import ShrinkError
from ..graph import model_device, preserved_training
from .plan import example_inputs, pin_error, value_pinned_removals

__all__ = ["apply_folds"]


def _zero_hook(axis: int, keep: np.ndarray) -> Any:
    k = torch.as_tensor(keep)

    def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor):
            return out
        ax = out.ndim + axis
        if not 0 <= ax < out.ndim or out.shape[ax] != k.numel():
            return out
        shape = [1] * out.ndim
        shape[ax] = k.numel()
        return out * k.to(device=out.device, dtype=out.dtype).reshape(shape)

    return hook


def _capture(store: dict[str, torch.Tensor], name: str) -> Any:
    def pre(_m: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], torch.Tensor):
            store.setdefault(name, args[0].detach())

    return pre


def apply_folds(small: nn.Module, plan: Any, points: Mapping[str, tuple[int, np.ndarray]]) -> None:
    """Fold the plan's constants into biases of ``small`` (the masked copy, not yet narrowed), in place.

    ``points``: the as-pruned zero points (``removal.zeros.zero_points(plan)``). Raises :class:`ShrinkError` for a
    removal the engine pins by value, or when a folded value is not constant (an analysis error: never a silently
    different model).
    """
    pinned = value_pinned_removals(plan)
    if pinned:
        raise pin_error(*pinned[0])
    if not plan.folds:
        return
    inputs = example_inputs(plan.graph, model_device(small))
    if inputs is None:  # the plan folds only when it could rebuild them
        raise ShrinkError("cannot rebuild the example input to read the constants to fold")
    args, kwargs = inputs
    modules = dict(small.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, (axis, keep) in points.items():
            if name in modules:
                handles.append(modules[name].register_forward_hook(_zero_hook(axis, keep)))
        for name in plan.folds:
            handles.append(modules[name].register_forward_pre_hook(_capture(seen, name)))
        with torch.no_grad(), preserved_training(small, False):
            small(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for name, fold in plan.folds.items():
        x = seen.get(name)
        if x is None:
            raise ShrinkError(f"layer '{name}' did not run on the example input: its folded constants are unknown",
                              name)
        _fold_one(small, plan, name, fold, x)


def _fold_one(small: nn.Module, plan: Any, name: str, fold: Any, x: torch.Tensor) -> None:
    mod = small.get_submodule(name)
    node = plan.graph.nodes[fold.node]
    w = mod.weight
    conv = isinstance(mod, nn.modules.conv._ConvNd)
    ax = (1 if x.ndim == w.ndim else 0) if conv else x.ndim - 1
    cols = torch.as_tensor(np.nonzero(fold.columns)[0], dtype=torch.long, device=x.device)
    vals = x.movedim(ax, 0).reshape(x.shape[ax], -1).index_select(0, cols).to(torch.float64)
    c = vals[:, 0]
    spread = (vals.amax(1) - vals.amin(1)).abs()
    # a meta copy (the prunable probe asks whether shrink narrows a set) has no values: the fold is made for its
    # shapes only (the bias created or updated); the shrink of real weights reads and checks the constants
    if not x.is_meta and (spread > 1e-5 * (1 + c.abs())).any():
        j = int(cols[int(spread.argmax())])
        raise ShrinkError(f"removed input channel {j} of layer '{name}' was expected to be constant in the as-pruned "
                          f"model, but varies by {float(spread.max()):.3g}: it cannot be folded", name, node.name)
    wd = w.detach().to(torch.float64)
    if node.name == "addmm":  # Hugging Face Conv1D: weight (in, out)
        delta = c @ wd.index_select(0, cols.to(w.device))
    elif conv:
        g = mod.groups
        out_ch, ipg = wd.shape[0], wd.shape[1]
        wsum = wd.reshape(out_ch, ipg, -1).sum(2)  # (out, in/g): a constant input meets the whole kernel
        full = torch.zeros(out_ch, ipg * g, dtype=torch.float64, device=w.device)
        opg = out_ch // g
        for k in range(g):
            full[k * opg:(k + 1) * opg, k * ipg:(k + 1) * ipg] = wsum[k * opg:(k + 1) * opg]
        delta = full.index_select(1, cols.to(w.device)) @ c.to(w.device)
    else:
        delta = wd.index_select(1, cols.to(w.device)) @ c.to(w.device)
    with torch.no_grad():
        if fold.bias is None:
            mod.bias = nn.Parameter(delta.to(w.dtype), requires_grad=w.requires_grad)
        else:
            owner_name, _, attr = fold.bias.rpartition(".")
            b = getattr(small.get_submodule(owner_name) if owner_name else small, attr)
            b.add_(delta.to(device=b.device, dtype=b.dtype))
