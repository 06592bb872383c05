"""Make masks consistent with a model's channel and group dependencies (NNI's ``fix_mask_conflict``).

What it does, step by step (NNI 2.10.1's behaviour unless marked *beyond NNI*):

1. **Group conflicts** (``GroupDependency``): for every masked layer with a group constraint ``g`` (the lcm
   of the groups of the grouped convs it feeds), split its filters into ``g`` equal contiguous chunks and
   un-prune, in each chunk, the pruned filters after the first ``min`` (``min`` = fewest pruned filters in
   any chunk). Chunks of ``min_groups`` size that are entirely pruned are exempt (whole groups may go).
   Layers whose mask is fine-grained (a filter partly kept) are left alone.
2. **Channel conflicts** (``ChannelDependency``): for every dependency set with more than one member, all
   members get the same kept channels. Members without a mask count as "all channels kept". Masks are
   rewritten as structured (whole filters) and the bias mask becomes the merged channel vector.

   Policies (*beyond NNI*; ``'union'`` is NNI's and the default):

   * ``'union'``: a channel is kept if any member keeps it (safe; prunes less).
   * ``'intersection'``: a channel is kept only if every *masked* member keeps it (prunes more). Unmasked
     members of a set that loses channels get a mask added.
   * ``'l1'``: re-select the set's channels by the L1 norm of each filter summed over the members, pruning
     ``int(n * mean sparsity of the members)`` channels with NNI's threshold rule (ties prune more).
     Unmasked members count as sparsity 0 and get a mask added when the set loses channels.

3. *Beyond NNI*: steps 1 and 2 repeat until neither changes anything (NNI runs each once, so the channel
   step can break what the group step fixed). Repeats after the first merge with ``'union'`` (they only
   un-prune), so the loop always ends. ``max_iter=1`` gives NNI's single pass.

Other differences from NNI, on purpose:

* The caller's dict is not changed unless ``inplace=True`` (NNI always mutates it).
* ``ConvTranspose1d/2d/3d`` (a filter = one output channel, dim 1 of its weight), ``Linear``, Conv1d/3d and
  BatchNorm members work; NNI raises ``RuntimeError`` for a masked ConvTranspose2d.
* Bias masks always follow the weight masks (NNI's group step never restores the bias: its
  ``hasattr(dict, 'bias')`` check is always False).
* Channels are merged per *channel class* from the topology engine (``ChannelDependency.atoms``): channels
  of any members that the model ties together are kept or pruned together. For ordinary sets (residual
  adds) this is exactly NNI's position-by-position merge; it also handles partial ties that NNI's sets
  cannot express (channel shuffle / ``cat`` + ``chunk`` in shufflenet, where members of one set have
  different widths and NNI fails with a bare ``AssertionError``). The ``'l1'`` policy ranks classes.
  A member that no mask can narrow (``nn.MultiheadAttention``) keeps its tied channels.
* A dependency set with a fine-grained (unstructured) member is **skipped** and reported in
  ``.skipped``: its masks are left as they are. NNI turns such masks into whole-filter masks, silently
  undoing most of the unstructured pruning.
* Problems raise :class:`~prunescope.errors.MaskError` naming the layer or set (NNI: bare ``assert``).
* The result reports what changed: :class:`FixedMasks` (a plain ``dict`` of NNI's layout) with
  ``.changed`` and ``.skipped`` lists of :class:`ConflictChange`.
* Masks are taken to prune output channels (filters), as every filter pruner does. NNI also detects
  input-channel masks (more all-zero input channels than filters) and then uses
  ``InputChannelDependency``; here such masks raise :class:`MaskError` instead of being fixed wrongly.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, MaskError
from ..graph import trace
from ..topology import ChannelDependency, GroupDependency
from .files import check_structure, load_masks, validate_masks
from .layers import (
    CONV_TYPES,
    CONVT_TYPES,
    bias_of,
    expand_filters,
    filter_keep,
    filter_matrix,
    has_filters,
    in_channel_matrix,
    is_structured,
    num_filters,
    weight_of,
)

__all__ = ["POLICIES", "ConflictChange", "FixedMasks", "fix_mask_conflict"]

POLICIES = ("union", "intersection", "l1")
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class ConflictChange:
    """One dependency set (or grouped layer) whose masks the fixer changed, or skipped.

    ``kind`` is ``'group'`` or ``'channel'``; ``members`` the layer names; ``kept_before`` the number of
    kept channels of each member before (``None`` for a member without a mask); ``kept_after`` the number
    kept by every member afterwards (per layer for ``'group'``); ``reason`` says why, in words.
    """

    kind: str
    members: tuple[str, ...]
    reason: str
    kept_before: dict[str, int | None] = field(default_factory=dict)
    kept_after: int | None = None


class FixedMasks(dict):  # type: ignore[type-arg]
    """The fixed masks: a plain dict ``{name: {'weight', 'bias'}}`` plus ``.changed`` and ``.skipped``."""

    changed: list[ConflictChange]
    skipped: list[ConflictChange]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed = []
        self.skipped = []

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled as a plain OrderedDict, so ``torch.save(fixed, path)`` gives a file that loads with
        # ``weights_only=True`` (load_masks, NNI) without naming this class
        return (OrderedDict, (list(self.items()),))


def _kept(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Bool vector of kept output channels (NNI: a channel is kept if its mask is non-zero anywhere)."""
    return filter_keep(module, mask)


def _write(module: nn.Module, entry: dict[str, torch.Tensor | None] | None, keep: torch.Tensor,
           ref: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """A structured mask for ``module`` keeping ``keep``; bias follows the weight."""
    like = entry["weight"] if entry is not None and entry["weight"] is not None else None
    w = weight_of(module)
    assert w is not None
    if like is None:
        like = torch.ones(w.shape, dtype=ref.dtype, device=ref.device)
    weight = expand_filters(module, keep, like)
    b = bias_of(module)
    bias = None
    if b is not None:
        old = entry["bias"] if entry is not None else None
        dtype = old.dtype if old is not None else like.dtype
        dev = old.device if old is not None else like.device
        bias = keep.to(device=dev, dtype=dtype)
    return {"weight": weight, "bias": bias}


def _check_output_channel_masks(masks: Mapping[str, Any], modules: Mapping[str, nn.Module]) -> None:
    """NNI's prune-dim detection over conv masks; input-channel masks are refused with a clear error."""
    pruned_out = pruned_in = 0
    for name, m in masks.items():
        module = modules[name]
        if not isinstance(module, CONV_TYPES + CONVT_TYPES):
            continue
        w = m["weight"]
        if not bool(w.any()):
            continue  # an all-zero mask (ties can prune every filter) says nothing about the axis
        pruned_out += int((filter_matrix(module, w).abs().sum(dim=1) == 0).sum())
        pruned_in += int((in_channel_matrix(module, w).abs().sum(dim=1) == 0).sum())
    if pruned_in > pruned_out:
        raise MaskError(
            "masks prune input channels (dim 1) rather than filters; fix_mask_conflict fixes filter "
            "(output-channel) masks only"
        )


def _group_step(work: dict, modules: Mapping[str, nn.Module], group_dep: Mapping[str, int],
                min_groups: Mapping[str, int], changes: list[ConflictChange]) -> bool:
    changed = False
    for layer, gmax in group_dep.items():
        if layer not in work:
            continue
        module = modules[layer]
        mask = work[layer]["weight"]
        if not has_filters(module) or not is_structured(module, mask):
            continue  # fine-grained: left alone (NNI logs and skips)
        keep = _kept(module, mask)
        n = keep.numel()
        gmax = int(gmax)
        gmin = int(min_groups.get(layer, 1) or 1)
        if gmax < 1 or n % gmax:
            raise MaskError(f"layer {layer!r}: {n} filters cannot be split into {gmax} equal groups "
                            "(the group constraint of the grouped convolutions it feeds)")
        if gmin < 1 or n % gmin:
            raise MaskError(f"layer {layer!r}: {n} filters cannot be split into {gmin} equal groups")
        pruned = (~keep).view(gmax, n // gmax)
        mini = int(pruned.sum(dim=1).min())
        need = torch.zeros(n, dtype=torch.bool, device=keep.device)
        for g in range(gmax):
            idx = torch.nonzero(pruned[g]).flatten()[mini:] + g * (n // gmax)
            need[idx] = True
        whole = (~keep).view(gmin, n // gmin).all(dim=1)  # entirely pruned min-group chunks are exempt
        need &= ~whole.repeat_interleave(n // gmin)
        if bool(need.any()):
            before = int(keep.sum())
            new_keep = keep | need
            work[layer] = _write(module, work[layer], new_keep, mask)
            changes.append(ConflictChange(
                "group", (layer,),
                f"un-pruned {int(need.sum())} filter(s) so that each of {gmax} groups prunes {mini}",
                {layer: before}, int(new_keep.sum())))
            changed = True
        elif work[layer]["bias"] is not None and bias_of(module) is not None:
            b = work[layer]["bias"]
            if not torch.equal(b != 0, keep.to(b.device)):
                work[layer] = _write(module, work[layer], keep, mask)
    return changed


def _scores_l1(module: nn.Module) -> torch.Tensor:
    w = weight_of(module)
    assert w is not None
    return filter_matrix(module, w.detach().abs()).sum(dim=1).double().cpu()


def _channel_step(work: dict, modules: Mapping[str, nn.Module], sets: Iterable[Iterable[str]], policy: str,
                  changes: list[ConflictChange], skipped: list[ConflictChange] | None,
                  classes: Callable[[str], np.ndarray] | None = None) -> bool:
    """Give every member of a set the same channels.

    ``classes(name)`` (from the topology's channel engine) gives a class id per output channel: channels
    with the same id must be kept or pruned together. Without it, channel ``i`` of every member is tied to
    channel ``i`` of the others (NNI's model), which needs equal channel counts. With it, partial ties work
    too (channel shuffle, ``cat`` then ``chunk``, depthwise convs), and the merge is per class.
    """
    order = {name: i for i, name in enumerate(modules)}
    changed = False
    for dset in sets:
        members = sorted(set(dset), key=lambda n: order.get(n, len(order)))
        if len(members) < 2:
            continue
        for name in members:
            if name not in modules:
                raise MaskError(f"dependency set {members}: layer {name!r} is not in the model")
            if name in work and not has_filters(modules[name]):
                raise MaskError(f"dependency set {members}: layer {name!r} ({type(modules[name]).__name__}) "
                                "has no output channels that a mask can prune")
        masked = [n for n in members if n in work]
        if not masked:
            continue
        fine = [n for n in masked if not is_structured(modules[n], work[n]["weight"])]
        if fine:
            if skipped is not None:
                skipped.append(ConflictChange("channel", tuple(members),
                                              f"fine-grained mask(s) on {fine}: left as they are"))
            continue
        # a member whose channels no mask can remove (e.g. nn.MultiheadAttention) pins its channels
        pinned = [n for n in members if n not in work and not has_filters(modules[n])]
        vecs: dict[str, np.ndarray | None] = {
            n: (_kept(modules[n], work[n]["weight"]).cpu().numpy() if n in work else None) for n in members}
        if classes is None:
            sizes = {n: (v.size if v is not None else num_filters(modules[n]))
                     for n, v in vecs.items() if n not in pinned}
            if len(set(sizes.values())) > 1:
                raise MaskError(f"dependency set {members}: members have different channel counts {sizes}; "
                                "they cannot keep the same channels")
            n_ch = next(iter(sizes.values()))
            cls = {n: np.arange(n_ch) for n in members}
        else:
            cls = {n: np.asarray(classes(n)) for n in members}
            for n, v in vecs.items():
                if v is not None and v.size != cls[n].size:
                    raise MaskError(f"layer {n!r}: its mask has {v.size} filters but the traced model "
                                    f"produced {cls[n].size} channels")
        uniq, inv_all = np.unique(np.concatenate([cls[n] for n in members]), return_inverse=True)
        inv: dict[str, np.ndarray] = {}
        start = 0
        for n in members:
            inv[n] = inv_all[start:start + cls[n].size]
            start += cls[n].size
        k = uniq.size
        full = {n: (v if v is not None else np.ones(cls[n].size, dtype=bool)) for n, v in vecs.items()}
        if policy == "union":
            merged = np.zeros(k, dtype=bool)
            for n in members:
                np.logical_or.at(merged, inv[n], full[n])
        elif policy == "intersection":
            merged = np.ones(k, dtype=bool)
            for n in masked:
                np.logical_and.at(merged, inv[n], full[n])
        else:  # 'l1': re-select classes by summed filter L1 norm, to the members' mean sparsity
            sparsity = sum(float((~full[n]).sum()) / full[n].size for n in members) / len(members)
            num_prune = int(k * sparsity)
            merged = np.ones(k, dtype=bool)
            if k >= 2 and num_prune >= 1:
                score = np.zeros(k, dtype=np.float64)
                for n in members:
                    if n not in pinned:
                        np.add.at(score, inv[n], _scores_l1(modules[n]).numpy())
                st = torch.from_numpy(score)
                threshold = torch.topk(st, num_prune, largest=False)[0].max()
                merged = (st > threshold).numpy()
        for n in pinned:
            merged[inv[n]] = True
        new = {n: merged[inv[n]] for n in members}
        if all(np.array_equal(new[n], full[n]) for n in members):
            for n in masked:  # already consistent; still make the bias follow the weight
                b = work[n]["bias"]
                keep = torch.from_numpy(new[n].copy())
                if bias_of(modules[n]) is not None and (b is None or not torch.equal((b != 0).cpu(), keep)):
                    work[n] = _write(modules[n], work[n], keep, work[n]["weight"])
            continue
        ref = work[masked[0]]["weight"]
        for n in members:
            if n in work or not bool(new[n].all()):
                work[n] = _write(modules[n], work.get(n), torch.from_numpy(new[n].copy()), ref)
        kept = {n: int(new[n].sum()) for n in members}
        same = len(set(kept.values())) == 1
        why = f"{policy}: " + (f"every member now keeps the same {kept[members[0]]} channels" if same
                               else f"tied channels now kept or pruned together (kept: {kept})")
        if pinned:
            why += f"; {pinned} cannot be masked, so their channels stay"
        changes.append(ConflictChange(
            "channel", tuple(members), why,
            {n: (int(v.sum()) if v is not None else None) for n, v in vecs.items()},
            kept[members[0]] if same else None))
        changed = True
    return changed


def _fix(masks: Mapping[str, Any], model: nn.Module, channel_sets: Iterable[Iterable[str]],
         group_dependency: Mapping[str, int] | None, min_groups: Mapping[str, int] | None, policy: str,
         inplace: bool, max_iter: int, classes: Callable[[str], np.ndarray] | None = None,
         ) -> tuple[dict, list[ConflictChange], list[ConflictChange]]:
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be a positive integer, got {max_iter!r}")
    checked = validate_masks(masks, model, "fix_mask_conflict")
    if not checked:
        raise MaskError("fix_mask_conflict: the masks are empty")
    modules = dict(model.named_modules())
    # a fused expert parameter (removal/expert_cuts.py) is not a module: its units lie in its one tensor, so it is in
    # no dependency set and its mask passes through unchanged (the removal plan applies its equal-count rule)
    _check_output_channel_masks({n: e for n, e in checked.items() if n in modules}, modules)
    if inplace:
        if not isinstance(masks, dict):
            raise ConfigError("inplace=True needs a dict of masks")
        work: dict = masks
        for n, e in checked.items():  # normalise a missing 'bias' key
            if not isinstance(work[n], dict) or "bias" not in work[n]:
                work[n] = e
    else:
        work = {n: {"weight": e["weight"].clone(), "bias": None if e["bias"] is None else e["bias"].clone()}
                for n, e in checked.items()}
    sets = [list(s) for s in channel_sets]
    changes: list[ConflictChange] = []
    skipped: list[ConflictChange] = []
    gdep = dict(group_dependency or {})
    gmin = dict(min_groups or {})
    for it in range(max_iter):
        _group_step(work, modules, gdep, gmin, changes)
        # later passes only un-prune (union), so the loop ends
        if not _channel_step(work, modules, sets, policy if it == 0 else "union", changes,
                             skipped if it == 0 else None, classes):
            break  # the group step left its constraint satisfied and the channel step changed nothing
    else:
        if _group_step(dict(work), modules, gdep, gmin, []):  # a check on a copy: is a group still broken?
            warnings.warn(f"fix_mask_conflict: after {max_iter} pass(es) the channel fix left group constraints "
                          "broken (NNI's single pass does this too); raise max_iter to settle them",
                          stacklevel=3)
    return work, changes, skipped


def fix_masks_with(masks: Mapping[str, Any], model: nn.Module, channel_sets: Iterable[Iterable[str]],
                   group_dependency: Mapping[str, int] | None = None, min_groups: Mapping[str, int] | None = None,
                   *, policy: str = "union", inplace: bool = False, max_iter: int = 10,
                   classes: Callable[[str], np.ndarray] | None = None) -> dict:
    """The fixer on given dependencies (no tracing): the engine behind :func:`fix_mask_conflict`.

    ``channel_sets`` are sets of layer names that must keep the same output channels;
    ``group_dependency`` maps a layer to the number of equal groups its filters form, ``min_groups`` to the
    group count whose entirely pruned chunks are exempt; ``classes(layer)`` (the channel engine's
    ``layer_classes``, as :func:`fix_mask_conflict` passes it) ties channels per class instead of by index.
    Returns a :class:`FixedMasks`, or the caller's dict when ``inplace=True``.

    >>> import torch
    >>> net = torch.nn.ModuleDict({'a': torch.nn.Conv2d(1, 4, 1), 'b': torch.nn.Conv2d(1, 4, 1)})
    >>> keep = lambda *k: {'weight': torch.tensor(k, dtype=torch.float).view(4, 1, 1, 1),
    ...                    'bias': torch.tensor(k, dtype=torch.float)}
    >>> out = fix_masks_with({'a': keep(1, 1, 0, 0), 'b': keep(0, 1, 1, 0)}, net, [{'a', 'b'}])
    >>> out['a']['bias'].tolist(), [c.members for c in out.changed]
    ([1.0, 1.0, 1.0, 0.0], [('a', 'b')])
    """
    work, changes, skipped = _fix(masks, model, channel_sets, group_dependency, min_groups, policy, inplace,
                                  max_iter, classes)
    if inplace:
        return work
    out = FixedMasks(work)
    out.changed, out.skipped = changes, skipped
    return out


def fix_mask_conflict(masks: Mapping[str, Any] | str | os.PathLike[str], model: nn.Module, dummy_input: Any = None,
                      traced: Any = None, *, policy: str = "union", inplace: bool = False, max_iter: int = 10,
                      return_report: bool = False) -> Any:
    """Fix mask conflicts for channel and group dependencies (NNI-compatible signature and result).

    ``masks`` is a dict ``{name: {'weight': tensor, 'bias': tensor or None}}`` or the path of a mask file
    (loaded safely). ``traced`` may be a :class:`prunescope.graph.ModelGraph` from
    :func:`prunescope.graph.trace`, so one trace serves several analyses. Returns a dict of the same
    layout: a :class:`FixedMasks` with ``.changed``/``.skipped`` reports, or the caller's own dict when
    ``inplace=True``. With ``return_report=True`` returns ``(masks, changed, skipped)``. See the module
    docstring for policies and every difference from NNI.

    >>> import torch, torchvision
    >>> from prunescope.masks import L1FilterPruner
    >>> torch.manual_seed(0) and None
    >>> net = torchvision.models.resnet18()
    >>> cfg = [{'sparsity': 0.5, 'op_types': ['Conv2d']}, {'sparsity': 0.2, 'op_names': ['conv1']}]
    >>> masks = L1FilterPruner(net, cfg).compute_masks()
    >>> fixed = fix_mask_conflict(masks, net, torch.ones(1, 3, 64, 64))
    >>> [c.members for c in fixed.changed][0]
    ('conv1', 'layer1.0.conv2', 'layer1.1.conv2')
    """
    if isinstance(masks, (str, os.PathLike)):
        masks = load_masks(masks)
        inplace = False
    else:
        masks = masks if inplace else check_structure(masks, "fix_mask_conflict")
    if traced is None:
        if dummy_input is None:
            raise ConfigError("fix_mask_conflict needs dummy_input (or a traced graph) to find dependencies")
        traced = trace(model, dummy_input)
    modules = dict(model.named_modules())
    # NNI's channel prune type: 'Batchnorm' when every mask is on a BatchNorm layer, else 'Filter'
    bn_only = all(isinstance(modules.get(n), _BN_TYPES) for n in masks)
    chan = ChannelDependency(model, dummy_input, traced_model=traced,
                             prune_type="Batchnorm" if bn_only else "Filter", include_linear=True)
    group = GroupDependency(model, dummy_input, traced_model=traced)
    atoms = getattr(chan, "atoms", None)
    classes = None
    if atoms is not None and not bn_only and hasattr(atoms, "layer_classes"):
        classes = atoms.layer_classes
    work, changes, skipped = _fix(masks, model, chan.dependency_sets, group.dependency,
                                  getattr(group, "min_groups", {}), policy, inplace, max_iter, classes)
    if not inplace:
        work = FixedMasks(work)
        work.changed, work.skipped = changes, skipped
    return (work, changes, skipped) if return_report else work
