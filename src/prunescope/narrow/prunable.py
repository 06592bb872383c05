"""What may be pruned: the one definition that ``unit_masks``, ``head_masks``, the sweep and the report share.

A dependency set (layers whose output channels are tied, :class:`~prunescope.topology.ChannelDependency`) is
**prunable** when removing its units gives a model that :func:`~prunescope.narrow.shrink` builds as asked:

* no member is unsafe to prune (:func:`~prunescope.removal.not_safe_to_prune`), except where every pin on its
  channels is a size the forward writes (timm's ``reshape(B, N, 3, self.num_heads, self.head_dim)``): those go
  to the shrink trial below, which updates the attributes the sizes are read from or refuses with the pin;
  none of its channels reaches a model output, every member is a convolution or linear layer;
* its pruning units (the channel engine's classes, :func:`prunescope.masks.units.channel_units`) can be
  removed **per group** of the grouped convolutions its members feed or are (the ``GroupDependency``
  constraint): the channels of each member split into ``g`` equal contiguous chunks and every unit lies in one
  chunk, each chunk holding as many units as the others. Masks that remove the same number of units from every
  chunk are what :func:`~prunescope.masks.fix_mask_conflict` leaves as they are (:func:`unit_chunks`);
* ``shrink`` narrows it: the set's units removed (about half of each chunk, by position; a size-pinned set keeps
  a fraction no other set keeps, :func:`trial_counts`) from a ``meta`` copy of the
  model, ``shrink`` neither refuses (a pin, a size it cannot update, a forward that no longer runs) nor keeps a
  masked channel (a parameter concatenated along the channel axis, a weight that is computed). All candidate sets
  are tried at once; the sets of a refusal are found near the module its cause names (then by halving), and
  each set's own verdict is asked once.

Everything else is excluded with the reason, in words.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import ShrinkWarning
from ..graph import ModelGraph, meta_copy
from ..masks.layers import bias_of, expand_filters, num_filters
from ..masks.pruners import is_filter_layer
from ..masks.units import channel_units
from ..removal.narrow import check_runs
from ..removal.unsafe import not_safe_to_prune
from ..topology import ChannelDependency, GroupDependency, channel_atoms
from .core import shrink

__all__ = ["Prunable", "prunable_sets", "unit_chunks", "output_layers"]


@dataclass
class Prunable:
    """The prunable dependency sets of a model (see the module docs).

    ``sets``: member tuples, in ``ChannelDependency`` order; ``excluded``: ``{set key: reason}`` for the others
    (key = members joined by ``+``); ``groups``: ``{layer: GroupDependency constraint}``; ``units``: per set key,
    per member the unit id of every output channel; ``chunks``: per set key with a group constraint, the chunk
    of every unit (units are removed in equal numbers per chunk); ``atoms``: the channel engine.
    """

    sets: list[tuple[str, ...]]
    excluded: dict[str, str]
    groups: dict[str, int]
    units: dict[str, list[np.ndarray]] = field(default_factory=dict)
    chunks: dict[str, np.ndarray] = field(default_factory=dict)
    atoms: Any = None


def output_layers(graph: ModelGraph) -> set[str]:
    """Layers whose output channels reach a model output (pruning them changes the output's shape)."""
    ca = channel_atoms(graph)
    names: set[str] = set()
    for t in graph.outputs:
        ci = ca.info(t)
        if ci is None:
            continue
        for a in {int(v) for v in ci.atoms.reshape(-1) if v >= 0}:
            names.update(layer for layer, _ in ca.class_members(a))
    return names


def unit_chunks(units: list[np.ndarray], widths: list[int], constraints: list[int]) -> np.ndarray | None | str:
    """The chunk of every unit when each member's channels form ``constraints[k]`` equal contiguous groups
    (``None``: any choice of units keeps the groups equal), or a reason why the units cannot be removed group
    by group.

    A unit either lies in one group of a member, or holds as many channels of every group of it (ResNeSt's
    radix splits: one channel per group; removing it takes one from each). Chunks are the units with the same
    group in every member; removing as many units from every chunk keeps every member's groups equal when
    each chunk holds as many units and each group as many chunks.
    """
    n_units = int(max((int(u.max()) for u in units if len(u)), default=-1)) + 1
    keys: list[np.ndarray] = []
    for u, n, c in zip(units, widths, constraints):
        if c <= 1 or not len(u):
            continue
        if n % c:
            return f"{n} channels cannot be split into {c} equal groups"
        hist = np.zeros((n_units, c), np.int64)
        np.add.at(hist, (u, np.arange(n) * c // n), 1)
        used = hist.sum(1) > 0
        if ((hist[used] > 0).sum(1) == 1).all():
            grp = np.where(used, hist.argmax(1), -1)
            counts = np.bincount(grp[used], minlength=c)
            if len(set(counts.tolist())) > 1:
                return f"the groups hold unequal numbers of pruning units {sorted(set(counts.tolist()))}"
            keys.append(grp)
        elif not (hist[used] == hist[used][:, :1]).all():
            return "a pruning unit spans several groups of a grouped convolution unevenly"
    if not keys:
        return None
    key = np.stack(keys, 1)
    if (key < 0).any():
        return "a pruning unit is not in a group of the grouped convolution"
    _, chunk = np.unique(key, axis=0, return_inverse=True)
    chunk = chunk.reshape(-1).astype(np.int64)
    counts = np.bincount(chunk)
    if len(set(counts.tolist())) > 1:
        return f"the groups hold unequal numbers of pruning units {sorted(set(counts.tolist()))}"
    if counts[0] < 2:
        return "each group of the grouped convolution is one unit: removing one empties the group"
    return chunk


def _per_chunk(units: list[np.ndarray], chunk: np.ndarray | None) -> int:
    """How many units a set has (per chunk of its grouped convolutions)."""
    if chunk is not None:
        return int(np.bincount(chunk).min())
    return int(max((int(u.max()) for u in units if len(u)), default=-1)) + 1


def trial_counts(sizes: dict[str, int], pinned: set[str]) -> dict[str, int]:
    """How many units (per chunk) the shrink trial removes from each set of ``sizes`` (``{key: units per chunk}``).

    About half, but a set whose channels a written size pins (``pinned``) keeps a fraction of its units that no
    other set keeps where its units allow: a size the forward computes from another tensor's shape (torchvision
    MaxViT's ``reshape(B, G, P, D)`` with ``D`` the block input's width) then matches only when the two are
    truly one width, not because both were halved. Sets with fewer units choose first (they have fewer
    fractions to choose from); the other sets keep half unless a pinned set took that fraction.
    """
    used: set[Fraction] = set()

    def pick(n: int) -> int:  # the count closest to half whose fraction no pinned set keeps (else the closest)
        opts = sorted(range(1, n), key=lambda j: (abs(2 * j - n), j)) or [0]
        return next((j for j in opts if n and Fraction(j, n) not in used), opts[0])

    out: dict[str, int] = {}
    for k in sorted(pinned, key=lambda k: (sizes[k], k)):
        out[k] = pick(sizes[k])
        if sizes[k]:
            used.add(Fraction(out[k], sizes[k]))
    for k, n in sizes.items():
        if k not in pinned:
            out[k] = pick(n)
    return out


def _structural(modules: dict[str, nn.Module], members: list[str], units: list[np.ndarray],
                chunk: np.ndarray | None, count: int) -> dict[str, dict[str, Any]]:
    """Masks removing the first ``count`` units (of every chunk), chosen by position: what is removed does not
    change whether shrink narrows a set, and ``meta`` weights have no norms to rank."""
    n_units = int(max((int(u.max()) for u in units if len(u)), default=-1)) + 1
    gone = np.zeros(n_units, bool)
    if chunk is None:
        gone[:count] = True
    else:
        for k in np.unique(chunk):
            ids = np.nonzero(chunk == k)[0]
            gone[ids[:count]] = True
    out = {}
    for m, u in zip(members, units):
        mod = modules[m]
        keep = torch.from_numpy(~gone[u])
        out[m] = {"weight": expand_filters(mod, keep, torch.ones(tuple(mod.weight.shape))),
                  "bias": keep.float() if bias_of(mod) is not None else None}
    return out


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class _Narrower:
    """Runs ``shrink`` on a copy (``meta`` when the forward runs there) with the units of some sets removed."""

    def __init__(self, model: nn.Module, graph: ModelGraph, x: Any,
                 masks: dict[str, dict[str, dict[str, Any]]]):
        from torch.utils import _pytree as pytree

        self.graph, self.masks = graph, masks
        self.alone: dict[str, tuple[str | None, dict[str, list[str]], str]] = {}
        want = [tuple(t.shape) for t in graph.outputs]
        meta = meta_copy(model)
        xm = pytree.tree_map(lambda v: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v, x)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check_runs(meta, xm, want)
            self.model, self.x = meta, xm
        except Exception:  # noqa: BLE001 - a forward that reads values: narrow real copies
            self.model, self.x = model, x

    def refusal(self, keys: list[str]) -> tuple[str | None, dict[str, list[str]], str]:
        """``(why shrink refuses, {layer: why its masked channels stay}, where)`` with the units of ``keys``
        removed. ``where``: the refusal and the errors that caused it (a pinned removal is refused with the pin,
        the failure that decided it names the op and module where the narrowed shapes went wrong)."""
        if len(keys) == 1 and keys[0] in self.alone:
            return self.alone[keys[0]]
        masks: dict[str, Any] = {}
        for k in keys:
            masks.update(self.masks[k])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ShrinkWarning)
                _, res = shrink(self.model, masks, self.x, graph=self.graph, fix_conflicts=False,
                                return_result=True)
        except Exception as e:  # noqa: BLE001 - any refusal: the set is not offered, with the reason
            chain: list[str] = []
            cause: BaseException | None = e
            while cause is not None and len(chain) < 4:
                chain.append(_first_line(cause))
                cause = cause.__cause__
            out: tuple[str | None, dict[str, list[str]], str] = (chain[0], {}, " | ".join(chain))
        else:
            out = (None, dict(res.protected), "")
        if len(keys) == 1:  # a set's own verdict does not change: halving and the re-checks ask it again
            self.alone[keys[0]] = out
        return out

    def refused(self, keys: list[str], members: dict[str, list[str]]) -> dict[str, str]:
        """``{set key: reason}`` for the sets of ``keys`` that shrink does not narrow (found by halving)."""
        if not keys:
            return {}
        err, kept, where = self.refusal(keys)
        if err is None and not kept:
            return {}
        if len(keys) == 1:
            if err is not None:
                return {keys[0]: err}
            hit = [m for m in members[keys[0]] if m in kept]
            layer = hit[0] if hit else next(iter(kept))
            return {keys[0]: f"{layer}: {kept[layer][0]}"}
        if err is None:  # protected channels: the sets they belong to, each confirmed on its own
            hit = [k for k in keys if any(m in kept for m in members[k])] or keys
            out: dict[str, str] = {}
            for k in hit:
                out.update(self.refused([k], members))
            return out
        found = self._suspects(where, keys, members)
        if found:  # the sets where the narrowed forward broke; the others are tried again together
            return {**found, **self.refused([k for k in keys if k not in found], members)}
        half = len(keys) // 2
        return {**self.refused(keys[:half], members), **self.refused(keys[half:], members)}

    def _suspects(self, err: str, keys: list[str], members: dict[str, list[str]]) -> dict[str, str]:
        """The refusals among the sets with a member inside the module a refusal names (the innermost module
        around it that holds one) and among the same sets of the other blocks, each confirmed on its own: about
        one shrink per refused set instead of a halving search (MaxViT: 22 refused attentions among 70 sets).
        ``{}`` when none is refused alone."""
        hits = re.findall(r"in module '([^']+)'", err)  # the innermost cause names the op that went wrong
        if not hits:
            return {}
        parts = hits[-1].split(".")
        for depth in range(len(parts), 0, -1):
            scope = ".".join(parts[:depth])
            near = [k for k in keys if any(m == scope or m.startswith(scope + ".") for m in members[k])]
            if near:
                break
        else:
            return {}
        if len(near) == len(keys):
            return {}
        out: dict[str, str] = {}
        for k in near:
            out.update(self.refused([k], members))
        # the same layer in the model's other blocks (names equal up to their indices) is likely refused for the
        # same reason: each tried on its own now rather than found one failing union at a time
        kinds = {re.sub(r"\d+", "#", k) for k in out}
        for k in keys:
            if k not in out and k not in near and re.sub(r"\d+", "#", k) in kinds:
                out.update(self.refused([k], members))
        return out


def _size_pinned_only(ca: Any, layer: str) -> bool:
    """Is every pin on ``layer``'s channels a size the code writes (a head count, ``num_heads * head_dim``)?
    ``shrink`` tries such a removal physically (the attributes the forward reads updated, every planned shape
    checked) and refuses with the pin when the sizes do not follow; a stop or a value pin it never clears."""
    return not (set(np.unique(ca.layer_classes(layer)).tolist()) & ca.hard_classes)


def prunable_sets(model: nn.Module, graph: ModelGraph, x: Any, *,
                  layer_ok: Callable[[nn.Module | None], bool] | None = None) -> Prunable:
    """The dependency sets of ``model`` that may be pruned and why the others may not (see the module docs).

    ``graph``: the model's trace on ``x``. ``layer_ok``: which member modules count as a convolution or linear
    layer (default: the filter layers of :mod:`prunescope.masks.pruners`). The model is not modified.

    >>> import torch
    >>> from torch import nn
    >>> from prunescope.graph import trace
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
    ...                     nn.Conv2d(8, 4, 1))
    >>> x = torch.ones(1, 3, 8, 8)
    >>> p = prunable_sets(net, trace(net, x), x)
    >>> p.sets, p.chunks["0"].tolist(), p.excluded
    ([('0',), ('2',)], [0, 0, 0, 0, 1, 1, 1, 1], {'4': 'its channels reach the model output'})
    """
    ok = layer_ok if layer_ok is not None else (lambda m: m is not None and is_filter_layer(m))
    cd = ChannelDependency(model, x, traced_model=graph, include_linear=True)
    gd = GroupDependency(model, x, traced_model=graph)
    groups = {k: int(v) for k, v in gd.dependency.items()}
    unsafe = not_safe_to_prune(model, x, traced_model=graph, with_reasons=True)
    assert isinstance(unsafe, dict)
    outs = output_layers(graph)
    modules = dict(model.named_modules())
    result = Prunable([], {}, groups, atoms=cd.atoms)
    candidates: list[str] = []
    members_of: dict[str, list[str]] = {}
    masks: dict[str, dict[str, dict[str, Any]]] = {}
    shapes: dict[str, tuple[list[np.ndarray], np.ndarray | None]] = {}
    pinned: set[str] = set()
    for members in cd.sets:
        members = list(members)
        key = "+".join(members)
        bad = [m for m in members if m in unsafe and not _size_pinned_only(cd.atoms, m)]
        if bad:
            result.excluded[key] = f"{bad[0]} is unsafe to prune: {unsafe[bad[0]][0]}"
            continue
        if any(m in outs for m in members):
            result.excluded[key] = "its channels reach the model output"
            continue
        if any(not ok(modules.get(m)) for m in members):
            result.excluded[key] = "a member is not a convolution or linear layer"
            continue
        units = channel_units(cd.atoms, members)
        if units is None:
            widths = {num_filters(modules[m]) for m in members}
            if len(widths) > 1:
                result.excluded[key] = "members have different widths"
                continue
            units = [np.arange(widths.pop(), dtype=np.int64) for _ in members]
        cons = [groups.get(m, 1) for m in members]
        chunk = None
        if max(cons) > 1:
            got = unit_chunks(units, [num_filters(modules[m]) for m in members], cons)
            if isinstance(got, str):
                result.excluded[key] = f"its units cannot be removed group by group: {got}"
                continue
            chunk = got
            if chunk is not None:
                result.chunks[key] = chunk
        result.units[key] = units
        members_of[key] = members
        shapes[key] = (units, chunk)
        if any(m in unsafe for m in members):
            pinned.add(key)
        candidates.append(key)
    counts = trial_counts({k: _per_chunk(*shapes[k]) for k in candidates}, pinned)
    for key in candidates:
        masks[key] = _structural(modules, members_of[key], *shapes[key], counts[key])
    if candidates:
        narrower = _Narrower(model, graph, x, masks)
        refused: dict[str, str] = {}
        todo = list(candidates)
        for _ in range(3):  # sets that pass alone may still fail together: check the union again
            found = narrower.refused(todo, members_of)
            if not found:
                break
            refused.update(found)
            todo = [k for k in todo if k not in refused]
        for k, why in refused.items():
            result.excluded[k] = f"shrink cannot remove its channels: {why}"
            result.units.pop(k, None)
            result.chunks.pop(k, None)
    result.sets = [tuple(members_of[k]) for k in candidates if k not in result.excluded]
    return result
