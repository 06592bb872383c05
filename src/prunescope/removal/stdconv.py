"""Weight-standardised convolutions (timm ``StdConv2d``, ``ScaledStdConv2d`` and their ``Same`` variants): a conv
whose weight is computed from one stored weight as

    F.batch_norm(W.reshape(1, C_out, -1), None, None, weight=a, bias=b, training=True, eps=eps).reshape_as(W)

— every output filter standardised over its fan-in (``C_in / groups · k``), then scaled (and shifted) by a
per-filter affine ``a`` (``b``) computed from stored per-filter parameters alone (``gain * scale``).

Shrink narrows such a layer exactly like a plain convolution, on the stored tensors:

* an output channel removed: its row of ``W`` and its entry of the per-filter parameters (``gain``, ``bias``)
  go; every other filter is standardised as before;
* an input channel removed: its columns of ``W`` go, so the narrowed layer standardises each filter over its
  **kept** fan-in (mean and variance over fewer elements). A float the module computed at construction from
  the dense fan-in (``ScaledStdConv2d.scale = gamma / sqrt(fan_in)``) is **kept as it is**: it is part of what
  the narrowed module computes, like any other trained constant, and updating it would change the kept
  filters' magnitude for no reason of the removal.

:func:`prunescope.as_pruned` and the as-pruned sensitivity sweep compute what the narrowed layer computes: the
recipe's ``batch_norm`` call is replaced, inside the layer's forward, by the standardisation of every filter
over its kept columns (:func:`restandardise`, through :class:`prunescope.removal.zeros.NormEmulation`); the
removed columns' weights are zero there. Only this recipe is recognised (:func:`std_weights`); any other
computed weight (a parametrization, a weight norm, ...) stays protected by the removal plan.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..graph import ModelGraph, OpNode, TensorInfo
from ..ops import CONV_OPS, CONV_TRANSPOSE_OPS
from ..ops import arg as _arg

__all__ = ["StdWeight", "std_weights", "std_fan_keep", "restandardise", "STD_WEIGHT_AXIS"]

#: marks a weight standardisation in a :class:`~prunescope.removal.zeros.NormEmulation` target: its axis is
#: ``(STD_WEIGHT_AXIS, groups)`` and its ``keep()`` the keep of every input channel of the convolution
STD_WEIGHT_AXIS = "std_weight"

_RESHAPES = frozenset({"reshape", "view"})
_BACK = frozenset({"reshape", "view", "reshape_as", "view_as"})
# ops that keep a per-filter vector per filter (order preserved when at most one axis is longer than 1)
_PER_FILTER = frozenset("view reshape unsqueeze squeeze flatten contiguous clone to float half double bfloat16 "
                        "type_as mul div add sub __mul__ __rmul__ __truediv__ __add__ __radd__ __sub__ true_divide "
                        "neg sqrt rsqrt exp abs".split())


@dataclass(frozen=True, eq=False)
class StdWeight:
    """One recognised weight standardisation: the conv call ``conv`` (node index) reads the standardised
    ``weight`` (the stored parameter), ``out`` filters of ``fan`` elements each; ``affine``: every stored
    per-filter parameter the standardisation's weight/bias is computed from, with its per-filter axis; ``bn``:
    the node index of the recipe's ``batch_norm``; ``module``: the module that runs it; ``groups``: of the
    convolution."""

    conv: int
    weight: TensorInfo
    out: int
    fan: int
    groups: int
    affine: tuple[tuple[TensorInfo, int], ...]
    bn: int
    module: str
    per_filter: tuple[int, ...] = ()  # nodes computing the per-filter affine (cost scales with kept filters)
    per_element: tuple[int, ...] = ()  # nodes over the whole weight (cost scales with kept filter elements)


def _stored(t: Any, stored: set[str]) -> bool:
    return isinstance(t, TensorInfo) and t.kind == "param" and bool(t.name) and t.name in stored


def _per_filter_source(g: ModelGraph, t: TensorInfo, out: int, stored: set[str]
                       ) -> tuple[list[tuple[TensorInfo, int]], list[int]] | None:
    """The stored per-filter parameters ``t`` (``out`` values, one per filter) is computed from, elementwise with
    numbers, and the axis of each that is per filter; None when ``t`` is anything else."""
    found: list[tuple[TensorInfo, int]] = []
    nodes: list[int] = []
    frontier, seen = [t], 0
    while frontier:
        cur = frontier.pop()
        seen += 1
        if seen > 16 or cur.numel() != out or sum(s > 1 for s in cur.shape) > 1:
            return None
        if cur.kind == "param":
            if not _stored(cur, stored):
                return None
            big = [i for i, s in enumerate(cur.shape) if s > 1]
            found.append((cur, big[0] if big else 0))
            continue
        node = g.producer(cur)
        if node is None or node.name not in _PER_FILTER or len(node.outputs) != 1:
            return None
        tensors = [i for i in node.inputs if i.kind != "const" or i.numel() != 1]
        if not tensors:
            return None
        if any(not isinstance(a, (TensorInfo, int, float, bool, torch.dtype, str)) and a is not None
               for a in node.args[1:]):
            return None
        nodes.append(node.index)
        frontier.extend(tensors)
    return found, nodes


_CACHE: weakref.WeakKeyDictionary[ModelGraph, dict[int, StdWeight]] = weakref.WeakKeyDictionary()


def std_weights(graph: ModelGraph) -> dict[int, StdWeight]:
    """``{conv node index: StdWeight}`` of every convolution call whose weight is a recognised weight
    standardisation of one stored parameter (see the module docs); other computed weights are not here.
    Found once per graph (cached while the graph lives)."""
    hit = _CACHE.get(graph)
    if hit is None:
        hit = _CACHE[graph] = _find(graph)
    return hit


def _find(graph: ModelGraph) -> dict[int, StdWeight]:
    g = graph
    stored = {n for n, _ in g.model.named_parameters(remove_duplicate=False)}
    out: dict[int, StdWeight] = {}
    for node in g.nodes:
        if node.name not in CONV_OPS or node.name in CONV_TRANSPOSE_OPS:
            continue
        hit = _recognise(g, node, stored)
        if hit is not None:
            out[node.index] = hit
    return out


def _recognise(g: ModelGraph, node: OpNode, stored: set[str]) -> StdWeight | None:
    w = _arg(node, 1, "weight")
    if not isinstance(w, TensorInfo) or w.kind != "op":
        return None
    back = g.producer(w)
    if back is None or back.name not in _BACK or not back.inputs:
        return None
    y = back.inputs[0]
    bn = g.producer(y)
    if bn is None or bn.name != "batch_norm" or not bn.inputs or bn.inputs[0].id == y.id:
        return None
    if bn.outputs[0].id != y.id or not bool(_arg(bn, 5, "training", False)):
        return None
    if _arg(bn, 1, "running_mean") is not None or _arg(bn, 2, "running_var") is not None:
        return None
    r = bn.inputs[0]
    fwd = g.producer(r)
    if fwd is None or fwd.name not in _RESHAPES or not fwd.inputs:
        return None
    src = fwd.inputs[0]
    if not _stored(src, stored) or src.ndim < 3 or tuple(src.shape) != tuple(w.shape):
        return None
    c_out = src.shape[0]
    fan = src.numel() // max(1, c_out)
    if tuple(r.shape) != (1, c_out, fan) or tuple(y.shape) != (1, c_out, fan):
        return None
    if back.name in ("reshape_as", "view_as"):
        other = back.inputs[1] if len(back.inputs) > 1 else None
        if other is None or other.id != src.id:
            return None
    affine: list[tuple[TensorInfo, int]] = []
    per_filter: list[int] = []
    for pos, key in ((3, "weight"), (4, "bias")):
        a = _arg(bn, pos, key)
        if a is None:
            continue
        if not isinstance(a, TensorInfo):
            return None
        found = _per_filter_source(g, a, c_out, stored)
        if found is None:
            return None
        affine.extend(found[0])
        per_filter.extend(found[1])
    groups = _arg(node, 6, "groups", 1)
    if not isinstance(groups, int):
        return None
    uniq = {t.id: (t, ax) for t, ax in affine}
    return StdWeight(node.index, src, c_out, fan, groups, tuple(uniq.values()), bn.index, bn.module,
                     tuple(dict.fromkeys(per_filter)), (fwd.index, bn.index, back.index))


def std_fan_keep(in_keep: torch.Tensor, groups: int, out: int, fan: int) -> torch.Tensor | None:
    """``(out, fan)`` bool: which fan-in elements of each filter stay when the convolution keeps input channels
    ``in_keep`` (filter ``r`` belongs to group ``r // (out / groups)`` and reads that group's channels); None when
    the sizes do not fit a convolution's weight."""
    k = in_keep.reshape(-1).to(torch.bool)
    if groups < 1 or k.numel() % groups or out % groups:
        return None
    cpg = k.numel() // groups
    if cpg == 0 or fan % cpg:
        return None
    per_group = k.reshape(groups, cpg).repeat_interleave(fan // cpg, dim=1)  # (groups, fan)
    return per_group.repeat_interleave(out // groups, dim=0)


def restandardise(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], in_keep: torch.Tensor,
                  groups: int) -> torch.Tensor:
    """What the narrowed layer's weight standardisation computes, at full width: every filter (row of the
    ``(1, C_out, fan)`` input) standardised by the same call over the elements of its kept input channels
    (``in_keep``, per input channel of the convolution; ``groups`` of it), zeros at the removed ones."""
    x = args[0]
    keep = std_fan_keep(torch.as_tensor(in_keep, device=x.device), groups, x.shape[1], x.shape[2]) \
        if x.ndim == 3 else None
    if keep is None:
        raise ValueError(f"weight standardisation of shape {tuple(x.shape)} does not fit {in_keep.numel()} input "
                         f"channels in {groups} groups")
    if bool(keep.all()):
        return func(*args, **kwargs)
    n = int(keep[0].sum())  # the same count in every filter (the plan keeps equal channels per group)
    if n == 0:
        return torch.zeros_like(x)
    idx = torch.nonzero(keep)[:, 1].reshape(keep.shape[0], n)  # (C_out, kept): the kept columns of each filter
    yk = func(x[0].gather(1, idx).unsqueeze(0), *args[1:], **kwargs)
    return x.new_zeros(x.shape[1:]).scatter(1, idx, yk[0]).unsqueeze(0)
