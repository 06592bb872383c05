"""``shrink``: the physically narrowed model, and ``as_pruned``: the masked model with as-pruned semantics."""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, MaskError, ShrinkError, ShrinkWarning
from ..graph import ModelGraph, check_graph_of, trace
from ..masks import apply_masks, fix_mask_conflict
from ..masks.files import check_structure, validate_masks
from ..removal.narrow import apply_plan, attr_names, check_runs, mask_in_place
from ..removal.plan import RemovalPlan, check_not_empty, masked_atoms, pin_error, pinned_removals, plan_removal
from ..removal.probe import positional_inputs
from ..removal.zeros import NormEmulation, const_keep, norm_sites, zero_hook, zero_points
from .attrs import fit_attributes
from .reconstruct import refit
from .verify import verify_shrunk

__all__ = ["shrink", "as_pruned", "reconstruct", "ShrinkWarning", "ShrinkResult", "prepare_masks"]

class ShrinkResult:
    """What :func:`shrink` did (``shrink(..., return_result=True)`` returns ``(model, result)``).

    ``plan``: the :class:`~prunescope.removal.plan.RemovalPlan`; ``masks``: the conflict-free masks that were
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
    if not fix or not masks:
        return dict(validate_masks(masks, model, "shrink masks")), []
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


def shrink(model: nn.Module, masks: Mapping[str, Any], dummy_input: Any, *, fix_conflicts: bool = True,
           graph: ModelGraph | None = None, return_result: bool = False, check: bool = True,
           verify: bool = True, calibration: Iterable[Any] | None = None) -> Any:
    """A physically narrower copy of ``model`` in which every removed channel is gone.

    ``masks``: NNI's layout ``{layer: {'weight': tensor, 'bias': tensor or None}}`` (or a mask file's
    contents), 1 = keep. They are made conflict-free first with :func:`~prunescope.masks.fix_mask_conflict`
    (union policy; a :class:`ShrinkWarning` says what changed); with ``fix_conflicts=False`` masked channels that
    a tied layer keeps stay, and a :class:`ShrinkWarning` names the layers. ``graph``: a trace of ``model`` (or
    of a copy of the same structure; another model's is a :class:`~prunescope.errors.ConfigError`). Which
    channels go is the :mod:`removal plan <prunescope.removal.plan>` that the effective counter reads too, so
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
    (:mod:`~prunescope.narrow.verify`: rtol 1e-4 in float32 with an atol relative to the output's scale): a
    difference raises :class:`ShrinkError` naming the module where the two first diverge, the ops it runs and
    the layers whose removed channels reach it; no model is returned then. It costs one more forward pass of
    ``model`` on ``dummy_input``. On meta tensors (no values) only the shapes are compared.

    ``calibration``: an iterable of unlabeled input batches (shaped like ``dummy_input``); when given, every
    layer that lost channels is then refit by least squares to reproduce the dense model
    (:func:`prunescope.narrow.reconstruct.reconstruct`, default options; ``result.reconstruction`` says what
    was refit).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> m = torch.ones(8, 3, 3, 3); m[:3] = 0
    >>> small = shrink(net, {'0': {'weight': m, 'bias': torch.tensor([0.] * 3 + [1.] * 5)}}, torch.ones(1, 3, 8, 8))
    >>> small[0].out_channels, small[1].num_features, small[3].in_channels, net[0].out_channels
    (5, 5, 5, 8)
    """
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
    mask_in_place(small, masks)
    apply_plan(small, plan)
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
        out = check_runs(small, dummy_input, [tuple(t.shape) for t in g.outputs])
        if verify:
            verify_shrunk(model, small, dummy_input, plan, out,
                          lambda: as_pruned(model, masks, plan=plan, fix_conflicts=False))
    result = ShrinkResult(plan, masks, changed)
    if calibration is not None:  # post-training reconstruction (issue 17)
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
    return any((~plan.alive(ci.atoms)).any() for _, ci in positional_inputs(plan.graph, plan.atoms))


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
    group count), as the narrowed module does; so does the weight standardisation of a convolution that loses
    input channels (timm's ``StdConv2d`` / ``ScaledStdConv2d``: each filter over its kept fan-in, the constructed
    ``scale`` unchanged, :mod:`prunescope.removal.stdconv`). Measured without building the smaller model.
    Weights come back bit for bit and the temporary forward hooks are removed, also on exceptions.

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
                handles.append(mod.register_forward_hook(zero_hook(axis, torch.as_tensor(keep))))
        for name, sites in norm_sites(plan).items():
            mod = modules.get(name)
            if mod is not None:
                targets = {j: (op, axis, const_keep(torch.as_tensor(keep))) for j, (op, axis, keep) in sites.items()}
                handles.extend(NormEmulation(targets).register(mod))
        with apply_masks(model, masks):
            yield model
    finally:
        for h in handles:
            h.remove()


def reconstruct(model: nn.Module, masks: Mapping[str, Any], dummy_input: Any, calibration: Iterable[Any], *,
                ridge: float | None = None, layers: str = "affected", bn: str = "keep", graph: ModelGraph | None = None,
                fix_conflicts: bool = True, return_result: bool = False, cache_mb: float = 1024.0,
                block_cache_mb: float = 4096.0) -> Any:
    """The shrunk model with every narrowed layer refit to reproduce the dense model (see the module docs).

    Same as ``shrink(model, masks, dummy_input, calibration=calibration)``. ``calibration``: an iterable of
    inputs shaped like ``dummy_input`` (a tensor or tuple per batch; no labels; a few hundred samples are
    enough). ``ridge``: the regulariser relative to the mean diagonal of ``XᵀX`` (towards the narrowed
    weight); ``None`` (default) chooses it per layer: by 4-fold cross-validation over the calibration
    samples from ``RIDGE_GRID`` where the layer has fewer than ``CV_ROWS_PER_UNKNOWN`` rows per unknown
    (a linear layer fitted on a few hundred inputs), else ``DEFAULT_RIDGE``. ``layers``: ``'affected'``
    (layers that lost channels) or ``'downstream'`` (also every later conv/linear layer). ``bn``: ``'keep'``
    or ``'recalibrate'`` (re-estimate BatchNorm statistics after the refit). ``return_result=True`` returns
    ``(model, ShrinkResult)`` with ``result.reconstruction`` a :class:`ReconstructResult`. ``cache_mb``: the
    dense model's targets of one block's layers (or of the layers outside the block chain) are kept for all
    batches when they fit in this many MiB (one dense run per batch instead of one per pass; ``0``: never).
    ``block_cache_mb``: the most the block chain's cached inputs may take (dense and shrunk, all batches;
    ``0``: no chain, whole-model runs for every pass, ``O(depth²)``). ``model`` is not modified.
    """
    small, result = shrink(model, masks, dummy_input, fix_conflicts=fix_conflicts, graph=graph, return_result=True)
    result.reconstruction = refit(model, small, result.plan, calibration, ridge=ridge, layers=layers, bn=bn,
                                  cache_mb=cache_mb, block_cache_mb=block_cache_mb)
    return (small, result) if return_result else small
