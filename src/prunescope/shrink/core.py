"""``shrink``: the physically narrowed model, and ``as_pruned``: the masked model with as-pruned semantics."""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..graph import ModelGraph, check_graph_of, trace
from .fold import apply_folds
from .plan import RemovalPlan, ShrinkError, check_not_empty, masked_atoms, pin_error, pinned_removals, plan_removal
from .verify import run_eval, verify_shrunk

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


def conflict_message(who: str, changed: list[Any]) -> str:
    """The warning of ``shrink`` and ``as_pruned`` when the masks' conflicts were fixed first."""
    return (f"{who}: the masks had {len(changed)} conflicts and were fixed first (union policy): "
            + "; ".join(f"{', '.join(c.members)}: {c.reason}" for c in changed[:3])
            + (" ..." if len(changed) > 3 else ""))


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


def _unfixed_conflicts(plan: RemovalPlan, masks: Mapping[str, Any]) -> dict[str, tuple[int, list[str]]]:
    """``{layer: (n, tied layers)}``: ``n`` masked output channels of ``layer`` that stay only because layers
    tied to them (same engine class: a residual add, a concatenation, ...) keep theirs — conflicting masks that
    were not fixed. Layers whose masked channels are protected for a reason (``plan.protected``) are left out."""
    ca = plan.atoms
    masked = masked_atoms(ca, masks, [])
    out: dict[str, tuple[int, list[str]]] = {}
    for name in ca.layers:
        if name in plan.protected:
            continue
        atoms = ca.layer_atoms(name)
        stay = masked[atoms] & ~plan.removed[name]
        if not stay.any():
            continue
        tied = {a for c in np.unique(ca.root[atoms[stay]]).tolist() for a in np.nonzero(ca.root == c)[0].tolist()}
        keepers = sorted({ca.atom_name(a)[0] for a in tied if not masked[a]} - {name})
        out[name] = (int(stay.sum()), keepers)
    return out


def _apply_plan(small: nn.Module, plan: RemovalPlan) -> None:
    apply_folds(small, plan, zero_points(plan))  # constants of removed channels into biases (shrink/fold.py)
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
           verify: bool = True, calibration: Iterable[Any] | None = None) -> Any:
    """A physically narrower copy of ``model`` in which every removed channel is gone.

    ``masks``: NNI's layout ``{layer: {'weight': tensor, 'bias': tensor or None}}`` (or a mask file's
    contents), 1 = keep. They are made conflict-free first with :func:`~prunescope.masks.fix_mask_conflict`
    (union policy; a :class:`ShrinkWarning` says what changed); with ``fix_conflicts=False`` masked channels that
    a tied layer keeps stay, and a :class:`ShrinkWarning` names the layers. ``graph``: a trace of ``model`` (or
    of a copy of the same structure; another model's is a :class:`~prunescope.errors.ConfigError`). Which
    channels go is the :mod:`removal plan <prunescope.shrink.plan>` that the effective counter reads too, so
    ``count_flops_params(small, x) == count_flops_params(model, x, masks=m, effective=True)``.

    The copy keeps the user's classes, module names and forward code: modules are narrowed in place
    (parameters, buffers and the attributes the forward reads), so the result traces, counts and prunes
    again. Its output equals the as-pruned masked model's (:func:`as_pruned`: a removed channel is also zero
    after its normalisation, and a LayerNorm/GroupNorm/RMSNorm over channels normalises over the kept ones).
    ``model`` is not modified (weights, hooks, training flags; also on exceptions). A removed channel of a
    layer that ``not_safe_to_prune`` reports raises :class:`ShrinkError` naming the layer and the op that
    pins it.

    The safety net: ``check`` runs the copy once (eval mode, no autograd) and compares output shapes (a
    failure raises :class:`ShrinkError` naming the op); ``verify`` (default) also runs ``model`` as pruned
    (:func:`as_pruned`, the same masks and plan) and compares every floating-point output
    (:mod:`~prunescope.shrink.verify`: rtol 1e-4 in float32 with an atol relative to the output's scale): a
    difference raises :class:`ShrinkError` naming the module where the two first diverge, the ops it runs and
    the layers whose removed channels reach it; no model is returned then. It costs one more forward pass of
    ``model`` on ``dummy_input``. On meta tensors (no values) only the shapes are compared.

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

    from ..masks.io import check_structure

    check_graph_of(graph, model, "shrink")
    masks = check_structure(masks, "shrink masks")  # None, a list ... are refused; bool masks become 0/1
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
    if not fix_conflicts and (conflicts := _unfixed_conflicts(plan, masks)):
        warnings.warn(_conflict_note(conflicts), ShrinkWarning, stacklevel=2)
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
    if check or verify:
        out = _check_runs(small, dummy_input, [tuple(t.shape) for t in g.outputs])
        if verify:
            verify_shrunk(model, small, dummy_input, plan, out,
                          lambda: as_pruned(model, masks, plan=plan, fix_conflicts=False))
    result = ShrinkResult(plan, masks, changed)
    if calibration is not None:  # post-training reconstruction (issue 17)
        from .reconstruct import refit

        result.reconstruction = refit(model, small, plan, calibration)
    return (small, result) if return_result else small


def _conflict_note(conflicts: dict[str, tuple[int, list[str]]]) -> str:
    shown = "; ".join(f"'{k}': {n} masked channels stay, kept by {', '.join(repr(t) for t in tied) or 'tied layers'}"
                      for k, (n, tied) in list(conflicts.items())[:3])
    return (f"shrink: fix_conflicts=False and the masks conflict: masked channels of {len(conflicts)} layer(s) stay "
            f"because layers tied to them keep theirs ({shown}{' ...' if len(conflicts) > 3 else ''}); mask the "
            "tied layers alike or let shrink fix the conflicts (fix_conflicts=True, union policy)")


def _positional_removal(plan: RemovalPlan) -> bool:
    """Does a removed channel reach an op that selects channels by position (``x[:, a:b]``, ``roll``, ...)?"""
    from ..topology.probe import positional_inputs

    return any((~plan.alive(ci.atoms)).any() for _, ci in positional_inputs(plan.graph, plan.atoms))


def _check_runs(small: nn.Module, dummy_input: Any, want: list[tuple[int, ...]]) -> Any:
    """Run the shrunk copy once (eval mode, no autograd, seeded) and return its output; on failure trace it to
    name the op that failed."""
    from torch.utils import _pytree as pytree

    from ..errors import TraceError

    try:
        out = run_eval(small, dummy_input)
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
    return out


# ---------------------------------------------------------------------------------------------------- as-pruned
_NORMS = frozenset(("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"))


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


def _site(graph: ModelGraph, node: Any, ci: Any) -> tuple[str, int, int] | None:
    """``(op, occurrence, channel axis from the end)`` of a norm call that normalises *across* its single channel
    axis (LayerNorm/RMSNorm with the channels among the normalised dims, GroupNorm), else None (BatchNorm,
    InstanceNorm and a LayerNorm over other dims treat every channel alone: zeroing the channel is exact).
    ``occurrence``: the call's index among the norm calls run inside its module's call (children included)."""
    from ..topology.base import arg

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
    calls = [n.index for n in graph.ops_in(graph.calls[node.call]) if n.name in _NORMS]
    return node.name, calls.index(node.index), a - x.ndim


def _renorm(name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], axis: int,
            keep: torch.Tensor) -> torch.Tensor:
    """What the narrowed norm computes, at full width: the norm over the kept channels of its input with the
    kept parameters (GroupNorm: the same group count), zeros at removed positions."""
    import torch.nn.functional as F

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


class _NormEmulation:
    """Forward pre/post hooks on one module: while it runs, a function mode replaces its norm calls number
    ``j`` of ``targets = {j: (op, axis, keep())}`` by :func:`_renorm` (the mode is active only inside the
    module's forward and is removed by the post hook, which runs also when the forward raises)."""

    def __init__(self, targets: dict[int, tuple[str, int, Any]]) -> None:
        self.targets = targets
        self.stack: list[Any] = []

    def pre(self, _mod: nn.Module, _args: Any) -> None:
        from torch.overrides import TorchFunctionMode

        from ..graph import _op_name

        targets = self.targets

        class Mode(TorchFunctionMode):
            count = 0

            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                kwargs = kwargs or {}
                name = _op_name(func)
                if name not in _NORMS:
                    return func(*args, **kwargs)
                j = self.count
                self.count += 1
                t = targets.get(j)
                if t is None or t[0] != name or not args or not isinstance(args[0], torch.Tensor):
                    return func(*args, **kwargs)
                keep = t[2]()
                if keep is None:
                    return func(*args, **kwargs)
                return _renorm(name, func, tuple(args), kwargs, t[1], keep)

        mode = Mode()
        mode.__enter__()
        self.stack.append(mode)

    def post(self, _mod: nn.Module, _args: Any, _out: Any) -> None:
        if self.stack:
            self.stack.pop().__exit__(None, None, None)

    def register(self, mod: nn.Module) -> list[Any]:
        return [mod.register_forward_pre_hook(self.pre), mod.register_forward_hook(self.post, always_call=True)]


def norm_sites(plan: RemovalPlan) -> dict[str, dict[int, tuple[str, int, np.ndarray]]]:
    """``{module: {occurrence: (op, axis from the end, keep)}}``: the norm calls that normalise across channels
    the plan removes (:func:`as_pruned` emulates the narrowed norm there)."""
    g, ca = plan.graph, plan.atoms
    out: dict[str, dict[int, tuple[str, int, np.ndarray]]] = {}
    for node in g.nodes:
        if node.name not in _NORMS or not node.module or node.module not in g.modules:
            continue
        ci = ca.info(node.inputs[0])
        site = _site(g, node, ci)
        if site is None:
            continue
        keep = plan.alive(ci.atoms)
        if not keep.all():
            out.setdefault(node.module, {}).setdefault(site[1], (site[0], site[2], keep))
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
        if node.name not in _NORMS or not node.module:
            continue
        o = node.outputs[0]
        ci = ca.info(o)
        if ci is None or len(ci.axes) != 1 or _site(g, node, ca.info(node.inputs[0])) is not None:
            continue
        keep = plan.alive(ci.atoms)
        if not keep.all() and node.module not in out:
            out[node.module] = (ci.axes[0] - o.ndim, keep)
    return out


def _constant(keep: torch.Tensor) -> Any:
    return lambda: keep


@contextmanager
def as_pruned(model: nn.Module, masks: Mapping[str, Any], dummy_input: Any = None, *,
              graph: ModelGraph | None = None, plan: RemovalPlan | None = None,
              fix_conflicts: bool = True) -> Iterator[nn.Module]:
    """Apply ``masks`` with as-pruned semantics: the masked model computes what :func:`shrink` ships.

    The masks are prepared exactly as :func:`shrink` prepares them: made conflict-free first
    (:func:`~prunescope.masks.fix_mask_conflict`, union policy, with the same :class:`ShrinkWarning`) unless
    ``fix_conflicts=False`` (the caller's masks are conflict-free already) or a removal ``plan`` of them is
    given; the removal plan decides which channels go. A removed channel is then zero everywhere downstream,
    also after its normalisation (the constant ``β − γ·μ/σ`` an eval-mode BatchNorm makes of a zeroed channel
    is gone, as physical pruning removes it), and a LayerNorm / GroupNorm / RMSNorm that normalises across
    removed channels normalises over the kept channels only, with the kept parameters (GroupNorm: the same
    group count), as the narrowed module does. Measured without building the smaller model. Weights come back
    bit for bit and the temporary forward hooks are removed, also on exceptions.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> m = torch.ones(8, 3, 3, 3); m[:3] = 0
    >>> x = torch.randn(1, 3, 8, 8)
    >>> masks = {'0': {'weight': m, 'bias': torch.tensor([0.] * 3 + [1.] * 5)}}
    >>> with as_pruned(net, masks, x):
    ...     y = net(x)
    >>> torch.allclose(y, shrink(net, masks, x)(x), atol=1e-5)
    True
    """
    from ..errors import ConfigError
    from ..masks import apply_masks
    from ..masks.io import check_structure

    check_graph_of(plan.graph if plan is not None else graph, model, "as_pruned")
    masks = check_structure(masks, "as_pruned masks")
    if plan is None:
        if graph is None:
            if dummy_input is None:
                raise ConfigError("as_pruned needs dummy_input (or graph= / plan=) to find which channels go")
            graph = trace(model, dummy_input)
        masks, changed = prepare_masks(model, masks, dummy_input, graph, fix_conflicts)
        if changed:
            warnings.warn(conflict_message("as_pruned", changed), ShrinkWarning, stacklevel=3)
        plan = plan_removal(graph, masks, check_pins=False)
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, (axis, keep) in zero_points(plan).items():
            mod = modules.get(name)
            if mod is not None:
                handles.append(mod.register_forward_hook(_zero_hook(axis, torch.as_tensor(keep))))
        for name, sites in norm_sites(plan).items():
            mod = modules.get(name)
            if mod is not None:
                targets = {j: (op, axis, _constant(torch.as_tensor(keep))) for j, (op, axis, keep) in sites.items()}
                handles.extend(_NormEmulation(targets).register(mod))
        with apply_masks(model, masks):
            yield model
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------- as-pruned sensitivity support
# (module name, axis from the end, layer name, per-channel filter index of that layer or -1, norm site or None);
# the norm site ``(op, occurrence)`` marks a norm across channels: emulated, not zeroed (see :func:`_site`)
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
    from ..topology import channel_atoms

    ca = channel_atoms(graph)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for a in np.argsort(ca.root, kind="stable").tolist():  # members of each class, in atom order
        by_class.setdefault(int(ca.root[a]), []).append(ca.atom_name(a))
    # per norm call (first call of a module per group only): layer -> (first position, rank there, index)
    norms: list[tuple[Any, Any, dict[str, tuple[int, int, np.ndarray]]]] = []
    for node in graph.nodes:
        if node.name not in _NORMS or not node.module:
            continue
        o = node.outputs[0]
        ci = ca.info(o)
        if ci is None or len(ci.axes) != 1:
            continue
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
        norms.append((node, ci, table))
    sites: dict[int, Any] = {}
    out: dict[str, tuple[ZeroPoint, ...]] = {}
    for key, layers in groups.items():
        wanted = set(layers)
        points: list[ZeroPoint] = []
        seen: set[str] = set()
        for node, ci, table in norms:
            if node.module in seen:
                continue
            found = [(p, rank, name) for name, (p, rank, _) in table.items() if name in wanted]
            if not found:
                continue
            layer_of = min(found)[2]
            seen.add(node.module)
            if node.index not in sites:
                sites[node.index] = _site(graph, node, ca.info(node.inputs[0]))
            site = sites[node.index]
            points.append((node.module, ci.axes[0] - node.outputs[0].ndim, layer_of, table[layer_of][2].copy(),
                           site[:2] if site else None))
        out[key] = tuple(points)
    return out


def _alive_fn(lay: nn.Module, index: torch.Tensor) -> Any:
    """``keep()`` per position of a :func:`follower_zero_map` point, read from the layer's current weight."""
    from ..masks.layers import filter_matrix, weight_of

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
            handles.extend(_NormEmulation({site[1]: (site[0], axis, keep_fn)}).register(mod))
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
