"""Fused expert parameters in the removal plan: masks, the equal-count rule, and per-expert cuts.

A fused expert layer (:mod:`prunescope.topology.moe`) is one 3-D parameter ``(E, ., .)`` holding every expert's
weight: output channel ``e · N + j`` of the layer is row ``j`` of expert ``e`` (along ``weight_out_dim``, axis 1
or 2 of the parameter), input column ``e · K + k`` is column ``k`` of expert ``e`` (the other axis).

* **Masks** are keyed by the parameter's qualified name and have its shape
  (``{'layers.0.mlp.experts.gate_up_proj': {'weight': mask}}``, no bias); an expert's channel is masked when
  its whole row (all ``K`` entries of expert ``e``, row ``j``) is zero.
* **Equal counts.** The narrowed parameter must stay rectangular, ``(E, N', K')`` with the same ``N'`` and ``K'``
  for every expert. The kernels (``_grouped_mm``) take one ``(E, K, N)`` tensor and there is no per-expert
  width in any Hugging Face expert module, so when the decided removal would leave experts with different
  numbers of units the plan keeps all of the layer's masked units, with the reason (like unequal groups of a
  grouped convolution). Remove the same number of units from every expert.
* **Cuts** select, per expert, its own kept rows/columns (:class:`ExpertCut`); the experts stay in order and
  the expert axis is never cut (the router's channels, the number of experts, are not pruned).
* **Attributes**: none. The ``grouped_mm`` forward reads the width from the tensors (``chunk(2)``); the
  ``intermediate_dim``-like attributes set in ``__init__`` are not read by the forward, so they stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import MaskError, ShrinkError
from ..graph import TensorInfo
from ..masks.layers import expert_param_shape  # noqa: F401  (public here before it moved down to masks)

if TYPE_CHECKING:
    from .plan import Planner, RemovalPlan

__all__ = ["ExpertCut", "expert_filter_keep", "expert_protection", "expert_cuts", "expert_param_shape"]


def expert_filter_keep(mask: torch.Tensor, li: Any) -> np.ndarray:
    """Per output channel ``e · N + j`` of a fused layer: does the mask keep any weight of expert e's row j?"""
    m = mask.detach().to("cpu") != 0
    if m.dim() != 3 or m.shape[0] != li.experts:
        raise MaskError(f"mask of fused expert layer {li.name!r} has shape {tuple(m.shape)}; it must have the "
                        f"parameter's shape ({li.experts} experts first)")
    m = m.movedim(li.weight_out_dim, 1)  # (E, N, K)
    return m.reshape(m.shape[0], m.shape[1], -1).any(dim=2).reshape(-1).numpy()


def expert_protection(pl: Planner, atom_removed: np.ndarray) -> bool:
    """Keep the masked units of fused layers whose experts would keep unequal numbers of units."""
    changed = False
    for name, li in pl.ca.layers.items():
        if li.kind != "experts":
            continue
        out_keep, ins = pl.layer_keeps(atom_removed, name)
        oc = out_keep.reshape(li.experts, -1).sum(1)
        if len(set(oc.tolist())) > 1 or (oc == 0).any():
            changed |= pl.protect(pl.ca.layer_atoms(name),
                                  f"fused experts '{name}' ({li.experts} experts) would keep unequal output channels "
                                  f"per expert {sorted(set(oc.tolist()))}; remove the same number from every expert")
        for in_keep in ins[:1]:
            ic = in_keep.reshape(li.experts, -1).sum(1)
            if len(set(ic.tolist())) > 1 or (ic == 0).any():
                changed |= pl.protect(li.inputs[0], f"fused experts '{name}' ({li.experts} experts) would keep "
                                      f"unequal input columns per expert {sorted(set(ic.tolist()))}")
    return changed


@dataclass
class ExpertCut:
    """How a fused expert parameter narrows: ``keep[axis]`` is ``(E, size)``, a bool row per expert (axis 1 or 2;
    every row keeps the same count). Same interface as :class:`~prunescope.removal.plan.Cut`."""

    name: str
    shape: tuple[int, ...]
    keep: dict[int, np.ndarray]

    def new_shape(self) -> tuple[int, ...]:
        s = list(self.shape)
        for ax, k in self.keep.items():
            s[ax] = int(k[0].sum())
        return tuple(s)

    def changes(self) -> bool:
        return self.new_shape() != tuple(self.shape)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        parts = []
        for e in range(t.shape[0]):
            x = t[e]
            for ax, k in sorted(self.keep.items()):
                idx = torch.as_tensor(np.nonzero(k[e])[0], dtype=torch.long, device=t.device)
                x = x.index_select(ax - 1, idx)
            parts.append(x)
        return torch.stack(parts, 0).contiguous()

    def merge(self, axis: int, keep: np.ndarray, where: str) -> None:
        old = self.keep.get(axis)
        if old is not None and not np.array_equal(old, keep):
            raise ShrinkError(f"tensor '{self.name}' would be narrowed differently along axis {axis} by two uses "
                              f"({where})", self.name)
        self.keep[axis] = keep


def expert_cuts(plan: RemovalPlan, pl: Planner) -> None:
    """Add the :class:`ExpertCut` of every fused layer that loses units or input columns."""
    g, ca = plan.graph, plan.atoms
    for name, li in ca.layers.items():
        if li.kind != "experts":
            continue
        out_keep, ins = pl.layer_keeps(plan.atom_removed, name)
        in_keep = ins[0] if ins else np.ones(li.experts * li.in_channels, bool)
        for more in ins[1:]:
            if not np.array_equal(more, in_keep):
                raise ShrinkError(f"layer '{name}' is called on inputs that lose different channels", name)
        if out_keep.all() and in_keep.all():
            continue
        shape = next((t.shape for t in g.tensors if t.name == name and t.kind == "param"), None)
        if shape is None:
            raise ShrinkError(f"fused expert layer '{name}' is not a stored parameter", name)
        ok, ik = out_keep.reshape(li.experts, -1), in_keep.reshape(li.experts, -1)
        if len(set(ok.sum(1).tolist())) > 1 or len(set(ik.sum(1).tolist())) > 1:
            raise ShrinkError(f"fused expert layer '{name}' would keep unequal units per expert", name)
        cut = plan.cuts.get(name)
        if cut is None:
            cut = ExpertCut(name, tuple(shape), {})
            plan.cuts[name] = cut  # type: ignore[assignment]
        if not isinstance(cut, ExpertCut):
            raise ShrinkError(f"fused expert parameter '{name}' is also narrowed as an ordinary tensor", name)
        out_ax = li.weight_out_dim
        if not ok.all():
            cut.merge(out_ax, ok, name)
        if not ik.all():
            cut.merge(3 - out_ax, ik, name)


def derived_param_shapes(plan: RemovalPlan) -> dict[int, tuple[int, ...]]:
    """``{tensor id: new shape}`` for tensors computed from a narrowed fused expert parameter by shape ops
    (``gate_up_proj.transpose(-2, -1)``, ``gate_up_proj[expert_ids]``, ``.to(dtype)``): each op is re-run on a
    meta tensor of the new shape."""
    out: dict[int, tuple[int, ...]] = {}
    for t in plan.graph.tensors:
        c = plan.cuts.get(t.name) if t.name and t.kind == "param" else None
        if isinstance(c, ExpertCut) and c.changes():
            out[t.id] = c.new_shape()
    if not out:
        return out
    from torch.utils import _pytree as pytree

    for node in plan.graph.nodes:
        src = [t for t in node.inputs if t.id in out]
        if len(src) != 1 or len(node.outputs) != 1:
            continue

        def meta(v: Any) -> Any:  # the narrowed source; other tensors (expert indices) as recorded
            if not isinstance(v, TensorInfo):
                return v
            return torch.empty(out.get(v.id, v.shape), dtype=v.dtype, device="meta")

        args, kwargs = pytree.tree_map(meta, (node.args, node.kwargs))
        try:
            res = node.func(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that cannot be replayed on meta: leave its shape to the check
            continue
        if isinstance(res, torch.Tensor):
            out[node.outputs[0].id] = tuple(res.shape)
    return out
