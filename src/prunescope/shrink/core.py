"""``shrink``: the physically narrowed model, and ``as_pruned``: the masked model with as-pruned semantics."""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..graph import ModelGraph, trace
from .plan import RemovalPlan, ShrinkError, check_not_empty, pin_error, pinned_removals, plan_removal

__all__ = ["shrink", "as_pruned", "ShrinkWarning", "ShrinkResult", "prepare_masks"]

# attributes the forward of torch's own modules reads, by class (isinstance, never by name)
_ATTRS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.GroupNorm, ("num_channels",)),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.PReLU, ("num_parameters",)),
    (nn.Embedding, ("embedding_dim",)),
)


def attr_names(mod: nn.Module) -> set[str]:
    """The size attributes of ``mod`` that shrink narrows (and save/load_pruned carry)."""
    from ..masks.layers import is_transposed_linear

    names: set[str] = set()
    for cls, ns in _ATTRS:
        if isinstance(mod, cls):
            names.update(ns)
    if is_transposed_linear(mod):
        names.update(("nf", "nx"))
    return names


class ShrinkWarning(UserWarning):
    """Masks were changed before shrinking (conflicts fixed) or some masked channels had to be kept."""


class ShrinkResult:
    """What :func:`shrink` did (``shrink(..., return_result=True)`` returns ``(model, result)``).

    ``plan``: the :class:`~prunescope.shrink.plan.RemovalPlan`; ``masks``: the conflict-free masks that were
    applied; ``fixed``: the conflict changes (``[]`` when the masks were already consistent); ``protected``:
    ``{layer: [reason]}`` for masked channels that had to stay; ``removed``: ``{layer: removed count}``.
    """

    def __init__(self, plan: RemovalPlan, masks: Mapping[str, Any], fixed: list[Any]) -> None:
        self.plan = plan
        self.masks = masks
        self.fixed = fixed
        self.protected = plan.protected
        self.removed = {k: int(v.sum()) for k, v in plan.removed.items() if v.any()}
        self.reconstruction: Any = None  # a ReconstructResult when shrink ran with calibration=

    def __repr__(self) -> str:
        return (f"ShrinkResult(removed={sum(self.removed.values())} channels in {len(self.removed)} layers, "
                f"conflicts fixed={len(self.fixed)}, protected={len(self.protected)})")


def _graph_of(model: nn.Module, dummy_input: Any, graph: ModelGraph | None) -> ModelGraph:
    """One trace of the model as it runs (meta inputs give a meta trace; nothing is computed then)."""
    if graph is not None:
        return graph
    return trace(model, dummy_input)


def prepare_masks(model: nn.Module, masks: Mapping[str, Any], dummy_input: Any, graph: ModelGraph,
                  fix: bool = True) -> tuple[dict[str, Any], list[Any]]:
    """Validated masks, conflict-fixed (union policy) unless ``fix=False``; returns ``(masks, changes)``."""
    from ..masks import fix_mask_conflict
    from ..masks.io import validate_masks

    if not fix or not masks:
        return dict(validate_masks(masks, model, "shrink masks")), []
    from ..errors import MaskError

    try:
        fixed = fix_mask_conflict(masks, model, dummy_input, traced=graph)  # validates the masks itself
    except MaskError as e:
        raise MaskError(str(e).replace("fix_mask_conflict", "shrink masks", 1)) from None
    return dict(fixed), list(getattr(fixed, "changed", []))


def _resolve(root: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = fqn.rpartition(".")
    return (root.get_submodule(mod_name) if mod_name else root), attr


def replace_tensors(root: nn.Module, new_by_id: Mapping[int, torch.Tensor]) -> None:
    """Put ``new_by_id[id(old)]`` wherever a module of ``root`` holds ``old`` as a parameter or buffer (a tensor
    shared by several modules is replaced everywhere, so it stays shared)."""
    for mod in root.modules():
        for store in (mod._parameters, mod._buffers):
            for k, v in list(store.items()):
                if v is not None and id(v) in new_by_id:
                    store[k] = new_by_id[id(v)]  # type: ignore[assignment]


def _apply_plan(small: nn.Module, plan: RemovalPlan) -> None:
    new_by_id: dict[int, torch.Tensor] = {}
    for fqn, cut in plan.cuts.items():
        mod, attr = _resolve(small, fqn)
        old = getattr(mod, attr)
        if not isinstance(old, torch.Tensor):
            raise ShrinkError(f"'{fqn}' is not a tensor of the model copy", fqn)
        if tuple(old.shape) != tuple(cut.shape):
            raise ShrinkError(f"'{fqn}' has shape {tuple(old.shape)}, the trace saw {cut.shape}", fqn)
        with torch.no_grad():
            new = cut.apply(old.detach())
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        new_by_id[id(old)] = new
    replace_tensors(small, new_by_id)
    for name, values in plan.attrs.items():
        try:
            mod = small.get_submodule(name) if name else small
        except AttributeError:
            continue
        allowed = attr_names(mod)
        for k, v in values.items():
            if k in allowed:
                setattr(mod, k, v)


def _mask_in_place(small: nn.Module, masks: Mapping[str, Any]) -> None:
    from ..masks.layers import bias_of, weight_of

    modules = dict(small.named_modules())
    with torch.no_grad():
        for name, m in masks.items():
            if name not in modules:  # a fused expert parameter (shrink/experts.py): masked as one tensor
                owner, attr = _resolve(small, name)
                getattr(owner, attr).mul_(m["weight"].to(device=getattr(owner, attr).device))
                continue
            mod = modules[name]
            for t, mk in ((weight_of(mod), m.get("weight")), (bias_of(mod), m.get("bias"))):
                if t is not None and mk is not None:
                    t.mul_(mk.to(device=t.device, dtype=t.dtype))


def shrink(model: nn.Module, masks: Mapping[str, Any], dummy_input: Any, *, fix_conflicts: bool = True,
           graph: ModelGraph | None = None, return_result: bool = False, check: bool = True,
           calibration: Iterable[Any] | None = None) -> Any:
    """A physically narrower copy of ``model`` in which every removed channel is gone.

    ``masks``: NNI's layout ``{layer: {'weight': tensor, 'bias': tensor or None}}`` (or a mask file's
    contents), 1 = keep. They are made conflict-free first with :func:`~prunescope.masks.fix_mask_conflict`
    (union policy; a :class:`ShrinkWarning` says what changed). Which channels go is the
    :mod:`removal plan <prunescope.shrink.plan>` that the effective counter reads too, so
    ``count_flops_params(small, x) == count_flops_params(model, x, masks=m, effective=True)``.

    The copy keeps the user's classes, module names and forward code: modules are narrowed in place
    (parameters, buffers and the attributes the forward reads), so the result traces, counts and prunes
    again. Its output equals the masked model's in which a removed channel is also zero after its
    normalisation (:func:`as_pruned`); a LayerNorm/GroupNorm that normalises across channels legitimately
    changes. ``model`` is not modified. A removed channel of a layer that ``not_safe_to_prune`` reports
    raises :class:`ShrinkError` naming the layer and the op that pins it; after narrowing the copy is run
    (on the meta device when possible) and a failure raises :class:`ShrinkError` naming the op.

    ``calibration``: an iterable of unlabeled input batches (shaped like ``dummy_input``); when given, every
    layer that lost channels is then refit by least squares to reproduce the dense model
    (:func:`prunescope.shrink.reconstruct.reconstruct`, default options; ``result.reconstruction`` says what
    was refit).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> m = torch.ones(8, 3, 3, 3); m[:3] = 0
    >>> small = shrink(net, {'0': {'weight': m, 'bias': torch.tensor([0.] * 3 + [1.] * 5)}}, torch.ones(1, 3, 8, 8))
    >>> small[0].out_channels, small[1].num_features, small[3].in_channels, net[0].out_channels
    (5, 5, 5, 8)
    """
    from torch.nn.utils import parametrize

    g = _graph_of(model, dummy_input, graph)
    modules = dict(model.named_modules())
    for name in masks:
        mod = modules.get(name)
        if mod is not None and parametrize.is_parametrized(mod):
            raise ShrinkError(f"layer '{name}' has parametrized tensors ({', '.join(mod.parametrizations.keys())}"
                              "): shrink narrows stored tensors; make them plain first with "
                              "torch.nn.utils.parametrize.remove_parametrizations", name)
    masks, changed = prepare_masks(model, masks, dummy_input, g, fix_conflicts)
    plan = plan_removal(g, masks, check_pins=False)
    check_not_empty(plan)
    pins = pinned_removals(plan)  # tried physically below: refused with the pin if the shapes do not follow
    if pins and _positional_removal(plan):
        raise pin_error(*pins[0])  # an offset/index would select other channels even with every size right
    if changed:
        warnings.warn(f"shrink: the masks had {len(changed)} conflicts and were fixed first (union policy): "
                      + "; ".join(f"{', '.join(c.members)}: {c.reason}" for c in changed[:3])
                      + (" ..." if len(changed) > 3 else ""), ShrinkWarning, stacklevel=2)
    if plan.protected:
        first = next(iter(plan.protected.items()))
        warnings.warn(f"shrink: masked channels of {len(plan.protected)} layers stay because they cannot be "
                      f"removed, e.g. '{first[0]}': {first[1][0]}", ShrinkWarning, stacklevel=2)
    small = copy.deepcopy(model)
    _mask_in_place(small, masks)
    _apply_plan(small, plan)
    from .attrs import fit_attributes

    try:
        fitted = fit_attributes(small, plan, dummy_input,
                                {n: attr_names(m) | set(plan.attrs.get(n, {})) for n, m in small.named_modules()},
                                force=bool(pins))
    except ShrinkError as e:
        if pins:
            raise pin_error(*pins[0]) from e
        raise
    for name, values in fitted.items():
        plan.attrs.setdefault(name, {}).update(values)
    if check:
        _check_runs(small, dummy_input, [tuple(t.shape) for t in g.outputs])
    result = ShrinkResult(plan, masks, changed)
    if calibration is not None:  # post-training reconstruction (issue 17)
        from .reconstruct import refit

        result.reconstruction = refit(model, small, plan, calibration)
    return (small, result) if return_result else small


def _positional_removal(plan: RemovalPlan) -> bool:
    """Does a removed channel reach an op that selects channels by position (``x[:, a:b]``, ``roll``, ...)?"""
    from ..topology.probe import positional_inputs

    return any((~plan.alive(ci.atoms)).any() for _, ci in positional_inputs(plan.graph, plan.atoms))


def _check_runs(small: nn.Module, dummy_input: Any, want: list[tuple[int, ...]]) -> None:
    """Run the shrunk copy once (eval mode, no autograd); on failure trace it to name the op that failed."""
    from torch.utils import _pytree as pytree

    from ..errors import TraceError
    from ..graph import make_inputs, preserved_training

    args, kw = make_inputs(small, dummy_input)
    try:
        with torch.no_grad(), preserved_training(small, False):
            out = small(*args, **kw)
    except Exception as first:  # noqa: BLE001 - re-run under the recorder to name the op
        try:
            trace(small, dummy_input)
        except TraceError as e:
            raise ShrinkError(f"the shrunk model no longer runs: {e}", getattr(e, "module", None),
                              getattr(e, "op", None)) from e
        raise ShrinkError(f"the shrunk model no longer runs: {type(first).__name__}: {first}") from first
    got = [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if got != want:
        raise ShrinkError(f"the shrunk model's output shapes {got} differ from the model's {want}")


# ---------------------------------------------------------------------------------------------------- as-pruned
def _zero_hook(axis: int, keep: torch.Tensor) -> Any:
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


def zero_points(plan: RemovalPlan) -> dict[str, tuple[int, np.ndarray]]:
    """``{module: (axis, keep)}``: where a removed channel must read zero in the as-pruned masked model."""
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
        if node.name not in ("batch_norm", "instance_norm", "group_norm", "layer_norm") or not node.module:
            continue
        o = node.outputs[0]
        ci = ca.info(o)
        if ci is None or len(ci.axes) != 1:
            continue
        keep = plan.alive(ci.atoms)
        if not keep.all() and node.module not in out:
            out[node.module] = (ci.axes[0] - o.ndim, keep)
    return out


@contextmanager
def as_pruned(model: nn.Module, masks: Mapping[str, Any], dummy_input: Any = None, *,
              graph: ModelGraph | None = None, plan: RemovalPlan | None = None) -> Iterator[nn.Module]:
    """Apply ``masks`` with as-pruned semantics: a removed channel is also zero after its normalisation.

    This is what the shrunk model computes (the constant ``β − γ·μ/σ`` an eval-mode BatchNorm makes of a
    zeroed channel is gone, as physical pruning removes it), measured without building the smaller model.
    Weights come back bit for bit and the temporary forward hooks are removed, also on exceptions.
    """
    from ..masks import apply_masks

    if plan is None:
        g = graph if graph is not None else trace(model, dummy_input)
        plan = plan_removal(g, masks, check_pins=False)
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, (axis, keep) in zero_points(plan).items():
            mod = modules.get(name)
            if mod is not None:
                handles.append(mod.register_forward_hook(_zero_hook(axis, torch.as_tensor(keep))))
        with apply_masks(model, masks):
            yield model
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------- as-pruned sensitivity support
ZeroPoint = tuple  # (module name, axis from the end, layer name, per-channel filter index of that layer or -1)


def follower_zero_map(graph: ModelGraph, layers: Iterable[str]) -> tuple[ZeroPoint, ...]:
    """Where the channels of ``layers`` are normalised: ``(norm module, axis, layer, index)`` per norm call.

    ``index[p]`` is the output channel of ``layer`` that sits at channel ``p`` of the norm's output (``-1``: a
    channel of no layer in ``layers``). With a filter of the layer all zero (pruned), :func:`zero_hooks` zeroes
    that channel after the norm, which is what physical removal does (the as-pruned semantics), without a plan.
    """
    from ..topology import channel_atoms

    ca = channel_atoms(graph)
    wanted = set(layers)
    out: list[ZeroPoint] = []
    seen: set[str] = set()
    for node in graph.nodes:
        if node.name not in ("batch_norm", "instance_norm", "group_norm", "layer_norm") or not node.module:
            continue
        o = node.outputs[0]
        ci = ca.info(o)
        if ci is None or len(ci.axes) != 1 or node.module in seen:
            continue
        atoms = ci.atoms.reshape(-1)
        idx = np.full(atoms.shape, -1, np.int64)
        layer_of: str | None = None
        for p, a in enumerate(atoms.tolist()):
            if a < 0:
                continue
            for name, ch in ca.class_members(a):
                if name in wanted and (layer_of is None or name == layer_of):
                    layer_of, idx[p] = name, ch
                    break
        if layer_of is not None:
            seen.add(node.module)
            out.append((node.module, ci.axes[0] - o.ndim, layer_of, idx))
    return tuple(out)


def zero_hooks(model: nn.Module, points: Iterable[ZeroPoint]) -> list[Any]:
    """Register the forward hooks of :func:`follower_zero_map` points; returns the handles (remove them)."""
    from ..masks.layers import filter_matrix, weight_of

    handles = []
    for module_name, axis, layer, idx in points:
        mod = model.get_submodule(module_name)
        lay = model.get_submodule(layer)
        index = torch.as_tensor(np.asarray(idx), dtype=torch.long)

        def hook(_m: nn.Module, _a: Any, out: Any, lay: nn.Module = lay, index: torch.Tensor = index,
                 axis: int = axis) -> Any:
            w = weight_of(lay)
            if not isinstance(out, torch.Tensor) or w is None:
                return out
            alive = filter_matrix(lay, w.detach()).ne(0).any(1)
            keep = torch.where(index >= 0, alive[index.clamp(min=0).to(alive.device)].cpu(), torch.ones_like(
                index, dtype=torch.bool))
            if keep.all():
                return out
            ax = out.ndim + axis
            if out.shape[ax] != keep.numel():
                return out
            shape = [1] * out.ndim
            shape[ax] = keep.numel()
            return out * keep.to(device=out.device, dtype=out.dtype).reshape(shape)

        handles.append(mod.register_forward_hook(hook))
    return handles
