"""As-pruned zeros: where a removed channel must read zero in the masked model (after its normalisation too),
and the norms across channels computed over the kept ones, as the narrowed model computes them (weight
standardisations too: over the kept input columns, :mod:`.stdconv`). Read by
:func:`prunescope.as_pruned` (from a removal plan) and by the as-pruned sensitivity sweep (from the layers'
current weights, without a plan)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..graph import ModelGraph
from ..masks.layers import filter_matrix, weight_of
from ..ops import NORM_AXIS, arg, op_name
from ..topology import channel_atoms
from .plan import RemovalPlan
from .stdconv import STD_WEIGHT_AXIS, restandardise, std_weights

__all__ = ["NORM_OPS", "const_keep", "zero_points", "norm_sites", "zero_hook", "NormEmulation", "ZeroPoint",
           "follower_zero_map", "follower_zero_maps", "zero_hooks"]

NORM_OPS = frozenset(NORM_AXIS)


def zero_hook(axis: int, keep: torch.Tensor) -> Any:
    def hook(_mod: nn.Module, _args: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor):
            return out
        ax = axis if axis >= 0 else out.ndim + axis
        if ax >= out.ndim or out.shape[ax] != keep.numel():
            return out
        shape = [1] * out.ndim
        shape[ax] = keep.numel()
        return out * keep.to(device=out.device, dtype=out.dtype).reshape(shape)

    return hook


def _site(graph: ModelGraph, node: Any, ci: Any) -> tuple[str, int, int] | None:
    """``(op, occurrence, channel axis from the end)`` of a norm call that normalises *across* its single channel
    axis (LayerNorm/RMSNorm with the channels among the normalised dims, GroupNorm), else None (BatchNorm,
    InstanceNorm and a LayerNorm over other dims treat every channel alone: zeroing the channel is exact).
    ``occurrence``: the call's index among the norm calls run inside its module's call (children included)."""
    if ci is None or len(ci.axes) != 1 or node.call is None or node.name not in ("layer_norm", "group_norm",
                                                                                  "rms_norm"):
        return None
    x = node.inputs[0]
    a = ci.axes[0]
    if node.name == "group_norm":
        if a != 1:
            return None
    else:
        ns = arg(node, 1, "normalized_shape")
        ns = [ns] if isinstance(ns, int) else list(ns) if ns is not None else []
        if a < x.ndim - len(ns):
            return None
    return node.name, _occurrence(graph, node), a - x.ndim


def _occurrence(graph: ModelGraph, node: Any) -> int:
    """The index of a norm call among the norm calls run inside its module's call (children included)."""
    calls = [n.index for n in graph.ops_in(graph.calls[node.call]) if n.name in NORM_OPS]
    return calls.index(node.index)


def _std_site(graph: ModelGraph, ca: Any, conv: Any, sw: Any) -> tuple[Any, Any] | None:
    """``(channel info of the conv's input, ((op, occurrence), axis))`` of a weight standardisation whose conv
    reads its channels on axis 1, else None. ``axis = (STD_WEIGHT_AXIS, groups)``: :class:`NormEmulation`
    standardises over the kept input channels there (:func:`~prunescope.removal.stdconv.restandardise`)."""
    bn = graph.nodes[sw.bn]
    x = conv.inputs[0] if conv.inputs else None
    ci = ca.info(x) if x is not None else None
    if ci is None or list(ci.axes) != [1] or bn.call is None or bn.module not in graph.modules:
        return None
    return ci, ((bn.name, _occurrence(graph, bn)), (STD_WEIGHT_AXIS, sw.groups))


def _renorm(name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], axis: int,
            keep: torch.Tensor) -> torch.Tensor:
    """What the narrowed norm computes, at full width: the norm over the kept channels of its input with the
    kept parameters (GroupNorm: the same group count), zeros at removed positions."""
    x = args[0]
    ax = axis % x.ndim
    keep = keep.to(device=x.device, dtype=torch.bool)
    if keep.numel() != x.shape[ax] or bool(keep.all()):
        return func(*args, **kwargs)
    idx = torch.nonzero(keep).reshape(-1)

    def get(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    def sel(t: Any, dim: int) -> Any:
        return t.index_select(dim, idx) if isinstance(t, torch.Tensor) else t

    def zeroed() -> torch.Tensor:  # cannot be narrowed (shrink keeps such channels): zero the removed ones
        shape = [1] * x.ndim
        shape[ax] = keep.numel()
        y = func(*args, **kwargs)
        return y * keep.to(y.dtype).reshape(shape)

    if idx.numel() == 0:
        return torch.zeros_like(func(*args, **kwargs))
    xk = x.index_select(ax, idx)
    if name == "group_norm":
        groups = get(1, "num_groups")
        if not isinstance(groups, int) or idx.numel() % groups:
            return zeroed()
        yk = F.group_norm(xk, groups, sel(get(2, "weight"), 0), sel(get(3, "bias"), 0), get(4, "eps", 1e-5))
    else:
        ns = get(1, "normalized_shape")
        ns = [ns] if isinstance(ns, int) else list(ns)
        pa = ax - (x.ndim - len(ns))
        if pa < 0:
            return zeroed()
        ns[pa] = int(idx.numel())
        if name == "layer_norm":
            yk = F.layer_norm(xk, ns, sel(get(2, "weight"), pa), sel(get(3, "bias"), pa), get(4, "eps", 1e-5))
        else:
            yk = F.rms_norm(xk, ns, sel(get(2, "weight"), pa), get(3, "eps"))
    return yk.new_zeros(x.shape).index_copy(ax, idx, yk)


class NormEmulation:
    """Forward pre/post hooks on one module: while it runs, a function mode replaces its norm calls number
    ``j`` of ``targets = {j: (op, axis, keep())}`` by :func:`_renorm` (the mode is active only inside the
    module's forward and is removed by the post hook, which runs also when the forward raises)."""

    def __init__(self, targets: dict[int, tuple[str, int, Any]]) -> None:
        self.targets = targets
        self.stack: list[Any] = []

    def pre(self, _mod: nn.Module, _args: Any) -> None:
        targets = self.targets

        class Mode(TorchFunctionMode):
            count = 0

            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                kwargs = kwargs or {}
                name = op_name(func)
                if name not in NORM_OPS:
                    return func(*args, **kwargs)
                j = self.count
                self.count += 1
                t = targets.get(j)
                if t is None or t[0] != name or not args or not isinstance(args[0], torch.Tensor):
                    return func(*args, **kwargs)
                keep = t[2]()
                if keep is None:
                    return func(*args, **kwargs)
                if isinstance(t[1], tuple) and t[1][0] == STD_WEIGHT_AXIS:  # a weight standardisation
                    return restandardise(func, tuple(args), kwargs, keep, t[1][1])
                return _renorm(name, func, tuple(args), kwargs, t[1], keep)

        mode = Mode()
        mode.__enter__()
        self.stack.append(mode)

    def post(self, _mod: nn.Module, _args: Any, _out: Any) -> None:
        if self.stack:
            self.stack.pop().__exit__(None, None, None)

    def register(self, mod: nn.Module) -> list[Any]:
        return [mod.register_forward_pre_hook(self.pre), mod.register_forward_hook(self.post, always_call=True)]


def norm_sites(plan: RemovalPlan) -> dict[str, dict[int, tuple[str, Any, np.ndarray]]]:
    """``{module: {occurrence: (op, axis from the end, keep)}}``: the norm calls that normalise across channels
    the plan removes (:func:`as_pruned` emulates the narrowed norm there), and the weight standardisations whose
    convolution loses input channels (axis ``(STD_WEIGHT_AXIS, groups)``, keep per input channel)."""
    g, ca = plan.graph, plan.atoms
    out: dict[str, dict[int, tuple[str, Any, np.ndarray]]] = {}
    for node in g.nodes:
        if node.name not in NORM_OPS or not node.module or node.module not in g.modules:
            continue
        ci = ca.info(node.inputs[0])
        site = _site(g, node, ci)
        if site is None:
            continue
        keep = plan.alive(ci.atoms)
        if not keep.all():
            out.setdefault(node.module, {}).setdefault(site[1], (site[0], site[2], keep))
    for sw in std_weights(g).values():  # weight standardisations over input columns the plan removes
        std = _std_site(g, ca, g.nodes[sw.conv], sw)
        if std is None:
            continue
        ci, ((op, occurrence), axis) = std
        keep = plan.alive(ci.atoms)
        if not keep.all():
            out.setdefault(g.nodes[sw.bn].module, {}).setdefault(occurrence, (op, axis, keep))
    return out


def zero_points(plan: RemovalPlan) -> dict[str, tuple[int, np.ndarray]]:
    """``{module: (axis, keep)}``: where a removed channel must read zero in the as-pruned masked model (norms
    across channels are not here: :func:`norm_sites`)."""
    g, ca = plan.graph, plan.atoms
    out: dict[str, tuple[int, np.ndarray]] = {}
    for name, rem in plan.removed.items():
        li = ca.layers[name]
        if not rem.any():
            continue
        for idx in li.nodes:  # every module that runs the layer's weight (a weight shared by two modules)
            node = g.nodes[idx]
            o = node.outputs[0]
            ci = ca.info(o)
            if node.module in g.modules and ci is not None and len(ci.axes) == 1 and node.module not in out:
                out[node.module] = (ci.axes[0] - o.ndim, ~rem)
    for node in g.nodes:
        if node.name not in NORM_OPS or not node.module:
            continue
        o = node.outputs[0]
        ci = ca.info(o)
        if ci is None or len(ci.axes) != 1 or _site(g, node, ca.info(node.inputs[0])) is not None:
            continue
        keep = plan.alive(ci.atoms)
        if not keep.all() and node.module not in out:
            out[node.module] = (ci.axes[0] - o.ndim, keep)
    return out


def const_keep(keep: torch.Tensor) -> Any:
    return lambda: keep


# (module name, axis from the end, layer name, per-channel filter index of that layer or -1, norm site or None);
# the norm site ``(op, occurrence)`` marks a norm across channels: emulated, not zeroed (see :func:`_site`); a
# weight standardisation has axis ``(STD_WEIGHT_AXIS, groups)`` and the index of its convolution's input channels
ZeroPoint = tuple


def follower_zero_map(graph: ModelGraph, layers: Iterable[str]) -> tuple[ZeroPoint, ...]:
    """Where the channels of ``layers`` are normalised: ``(norm module, axis, layer, index, site)`` per norm call.

    ``index[p]`` is the output channel of ``layer`` that sits at channel ``p`` of the norm's output (``-1``: a
    channel of no layer in ``layers``). With a filter of the layer all zero (pruned), :func:`zero_hooks` zeroes
    that channel after the norm, which is what physical removal does (the as-pruned semantics), without a plan;
    a norm that normalises across channels (``site`` not None) is computed over the kept channels instead, as
    the narrowed norm does. Many groups at once: :func:`follower_zero_maps`.
    """
    return follower_zero_maps(graph, {"": layers})[""]


def follower_zero_maps(graph: ModelGraph, groups: Mapping[str, Iterable[str]]) -> dict[str, tuple[ZeroPoint, ...]]:
    """:func:`follower_zero_map` of every group (``{key: layers}``) with one walk over the norm calls: per norm
    output, the channel of each layer at each position is read once (class members grouped once), then each
    group picks its layer (the first of its layers met, by position then atom order, as the single-group rule)."""
    ca = channel_atoms(graph)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for a in np.argsort(ca.root, kind="stable").tolist():  # members of each class, in atom order
        by_class.setdefault(int(ca.root[a]), []).append(ca.atom_name(a))
    # per norm call (first call of a module per group only): layer -> (first position, rank there, index); a
    # weight standardisation (removal/stdconv.py) reads the channels of its convolution's input
    std = {sw.bn: sw for sw in std_weights(graph).values()}
    norms: list[tuple[Any, Any, Any, dict[str, tuple[int, int, np.ndarray]]]] = []
    for node in graph.nodes:
        if node.name not in NORM_OPS or not node.module:
            continue
        if node.index in std:
            hit = _std_site(graph, ca, graph.nodes[std[node.index].conv], std[node.index])
            if hit is None:
                continue
            ci, (site, axis) = hit
        else:
            o = node.outputs[0]
            ci = ca.info(o)
            if ci is None or len(ci.axes) != 1:
                continue
            site, axis = None, ci.axes[0] - o.ndim
        atoms = ci.atoms.reshape(-1)
        table: dict[str, tuple[int, int, np.ndarray]] = {}
        for p, a in enumerate(atoms.tolist()):
            if a < 0:
                continue
            met: set[str] = set()
            for rank, (name, ch) in enumerate(by_class[int(ca.root[a])]):
                if name in met:
                    continue
                met.add(name)
                hit = table.get(name)
                if hit is None:
                    hit = table[name] = (p, rank, np.full(atoms.shape, -1, np.int64))
                hit[2][p] = ch
        norms.append((node, axis, site, table))
    sites: dict[int, Any] = {}
    out: dict[str, tuple[ZeroPoint, ...]] = {}
    for key, layers in groups.items():
        wanted = set(layers)
        points: list[ZeroPoint] = []
        seen: set[str] = set()
        for node, axis, std_site, table in norms:
            if node.module in seen:
                continue
            found = [(p, rank, name) for name, (p, rank, _) in table.items() if name in wanted]
            if not found:
                continue
            layer_of = min(found)[2]
            seen.add(node.module)
            if node.index not in sites:
                sites[node.index] = std_site or _site(graph, node, ca.info(node.inputs[0]))
            site = sites[node.index]
            points.append((node.module, axis, layer_of, table[layer_of][2].copy(), site[:2] if site else None))
        out[key] = tuple(points)
    return out


def _alive_fn(lay: nn.Module, index: torch.Tensor) -> Any:
    """``keep()`` per position of a :func:`follower_zero_map` point, read from the layer's current weight."""
    def keep() -> torch.Tensor | None:
        w = weight_of(lay)
        if w is None:
            return None
        alive = filter_matrix(lay, w.detach()).ne(0).any(1)
        return torch.where(index >= 0, alive[index.clamp(min=0).to(alive.device)].cpu(),
                           torch.ones_like(index, dtype=torch.bool))

    return keep


def zero_hooks(model: nn.Module, points: Iterable[ZeroPoint]) -> list[Any]:
    """Register the forward hooks of :func:`follower_zero_map` points; returns the handles (remove them)."""
    handles = []
    for point in points:
        module_name, axis, layer, idx = point[:4]
        site = point[4] if len(point) > 4 else None
        mod = model.get_submodule(module_name)
        keep_fn = _alive_fn(model.get_submodule(layer), torch.as_tensor(np.asarray(idx), dtype=torch.long))
        if site is not None:
            handles.extend(NormEmulation({site[1]: (site[0], axis, keep_fn)}).register(mod))
            continue

        def hook(_m: nn.Module, _a: Any, out: Any, keep_fn: Any = keep_fn, axis: int = axis) -> Any:
            if not isinstance(out, torch.Tensor):
                return out
            keep = keep_fn()
            if keep is None or keep.all():
                return out
            ax = out.ndim + axis
            if out.shape[ax] != keep.numel():
                return out
            shape = [1] * out.ndim
            shape[ax] = keep.numel()
            return out * keep.to(device=out.device, dtype=out.dtype).reshape(shape)

        handles.append(mod.register_forward_hook(hook))
    return handles
