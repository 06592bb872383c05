"""Unit pruning: masks that remove whole pruning units (attention heads, kv groups, MLP units, channels).

A transformer's pruning unit spans several layers: a head is ``head_dim`` rows of ``q``, ``k`` and ``v`` (and
the ``head_dim`` input columns of the output projection that read it), a kv group under grouped-query
attention is one key/value head with all the query heads that read it, a gated-MLP unit is a ``gate`` row, an
``up`` row and a ``down`` column. Channel-level masks (one layer's L1 norms) cut across them, and the conflict
fixer then keeps the union: almost no whole head goes.

Here a **unit is one class of the channel engine** (:func:`prunescope.topology.channel_atoms`): the output
channels that must go together. For a dependency set (layers sharing classes) the units are the classes of
its members' output channels, so a head, a kv group and a convolution channel tied across a residual add are
all handled by one rule:

* score of a unit = the sum of its channels' filter scores over all members (``l1``: sum of ``|w|`` of the
  producing rows; ``l2``: sum of the rows' L2 norms; ``fpgm``: sum of each row's FPGM score in its layer);
  with ``consumers=True`` the L1 norm (``l2``: the L2 norm) of the consumer input columns that read the unit
  is added (a head's output-projection columns, a ``down`` column). The default scores the producing rows
  only, the rule of NNI v2's dependency-aware pruners, so that
* ``int(n_units * sparsity)`` units with the lowest scores are pruned (NNI's selection: ``<= threshold`` for
  l1/l2, stable order for fpgm). For a convolution set whose classes are one channel of every member this is
  exactly :func:`prunescope.masks.pruners.group_masks` (NNI's rule), bit for bit.

Example
-------
>>> import torch
>>> from torch import nn
>>> import torch.nn.functional as F
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
...         self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
...     def forward(self, x):
...         b, n, _ = x.shape
...         q, k, v = (p(x).view(b, n, -1, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
...         x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
...         return x + self.fc2(F.relu(self.fc1(x)))
>>> torch.manual_seed(0) and None
>>> model = Block()
>>> masks = unit_masks(model, torch.ones(1, 5, 16), 0.5, layers=["q", "fc1"])
>>> sorted(masks)
['fc1', 'k', 'q', 'v']
>>> keep = masks["q"]["weight"][:, 0].view(4, 4).bool()  # 4 heads of 4 channels: 2 whole heads go
>>> keep.all(1).sum().item(), (keep.sum(1) % 4).tolist()
(2, [0, 0, 0, 0])
>>> int(masks["fc1"]["bias"].sum())                    # 16 of the 32 MLP units stay
16
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from .layers import in_channel_matrix, weight_of
from .pruners import PRUNE_TYPES, group_masks, is_filter_layer

__all__ = ["channel_units", "unit_masks", "head_masks", "unit_scores_from_consumers"]


def channel_units(ca: Any, members: Sequence[str]) -> list[np.ndarray] | None:
    """Per member of a dependency set, the unit id of every output channel (``0 .. U-1``, in order of first
    appearance), the units being the channel engine's classes. ``None`` when a member is not a layer of the
    engine (it cannot be scored by unit)."""
    if any(m not in ca.layers for m in members):
        return None
    ids: dict[int, int] = {}
    out = []
    for m in members:
        cls = ca.layer_classes(m)
        out.append(np.array([ids.setdefault(int(c), len(ids)) for c in cls], dtype=np.int64))
    return out


def is_trivial(units: Sequence[np.ndarray]) -> bool:
    """Every unit is one channel of every member (``units[k] == range(n)``): today's channel rule applies."""
    return all(len(u) == len(units[0]) and np.array_equal(u, np.arange(len(u))) for u in units)


@torch.no_grad()
def unit_scores_from_consumers(ca: Any, model: nn.Module, members: Sequence[str], units: Sequence[np.ndarray],
                               prune_type: str = "l1") -> torch.Tensor:
    """Per unit, the norm of the consumer input columns that read it (L1; L2 for ``l2``), summed over every
    layer that reads a member's channels (grouped convolutions are skipped: a column there is not one unit)."""
    cls_unit: dict[int, int] = {}
    for m, u in zip(members, units):
        for c, uid in zip(ca.layer_classes(m).tolist(), u.tolist()):
            cls_unit[int(c)] = int(uid)
    n_units = int(max((int(u.max()) for u in units if len(u)), default=-1)) + 1
    total = torch.zeros(n_units, dtype=torch.float64)
    modules = dict(model.named_modules())
    for name, li in ca.layers.items():
        mod = modules.get(name)
        w = weight_of(mod) if mod is not None else None
        if w is None or not li.inputs or li.groups != 1 or not is_filter_layer(mod):
            continue
        cols = li.inputs[0]
        valid = cols >= 0
        if not valid.any():
            continue
        col_cls = np.where(valid, ca.atom_class(np.maximum(cols, 0)), -1)
        col_unit = np.array([cls_unit.get(int(c), -1) for c in col_cls], dtype=np.int64)
        if (col_unit < 0).all():
            continue
        mat = in_channel_matrix(mod, w.detach()).to(torch.float64)
        if mat.shape[0] != len(col_unit):
            continue
        per_col = mat.abs().sum(1) if prune_type != "l2" else torch.sqrt((mat ** 2).sum(1))
        sel = torch.from_numpy(col_unit >= 0)
        total.index_add_(0, torch.from_numpy(col_unit[col_unit >= 0]), per_col[sel].cpu())
    return total


@torch.no_grad()
def unit_masks(model: nn.Module, dummy_input: Any, sparsity: float, *, layers: Iterable[str] | None = None,
               prune_type: str = "l1", consumers: bool = False, graph: Any = None) -> dict[str, dict[str, Any]]:
    """Masks that prune ``int(n_units * sparsity)`` whole units of every dependency set (see the module docs).

    ``layers``: prune the sets that contain one of these layers (default: every set that may be pruned, the one
    definition of :func:`prunescope.shrink.prunable.prunable_sets`: no unsafe layer, no channel reaching the
    model output, units removable group by group of the grouped convolutions, and a set that
    :func:`~prunescope.shrink.shrink` narrows as asked). A named layer whose set may not be pruned is an error
    naming the reason. On a grouped convolution the same number of units goes from every group. Returns NNI's
    mask layout ``{layer: {'weight', 'bias'}}`` for every member of the pruned sets; the masks remove whole
    engine classes, equally per group, so :func:`prunescope.masks.fix_mask_conflict` leaves them as they are
    and ``shrink`` removes every masked channel. ``prune_type``: ``'l1'`` (default), ``'l2'`` or ``'fpgm'``;
    ``consumers=True`` adds the consumer columns' norms to the unit scores. The model is not modified.
    """
    return _unit_masks(model, dummy_input, sparsity, layers, prune_type, consumers, graph, strict=True)


def _unit_masks(model: nn.Module, dummy_input: Any, sparsity: float, layers: Iterable[str] | None,
                prune_type: str, consumers: bool, graph: Any, strict: bool) -> dict[str, dict[str, Any]]:
    """:func:`unit_masks`; ``strict=False`` skips the named layers' sets that may not be pruned."""
    if prune_type not in PRUNE_TYPES or prune_type == "level":
        raise ConfigError(f"unit pruning needs a filter prune type ('l1', 'l2', 'fpgm'), got {prune_type!r}")
    from ..graph import trace
    from ..shrink.prunable import prunable_sets  # the removal layer owns "prunable"; it imports this module

    g = graph if graph is not None else trace(model, dummy_input)
    p = prunable_sets(model, g, dummy_input)
    wanted = None if layers is None else list(layers)
    if wanted is not None:
        known = {m for s in p.sets for m in s} | {m for k in p.excluded for m in k.split("+")}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise ConfigError(f"layers {missing} are not conv/linear layers of any dependency set")
        for key, why in p.excluded.items():
            if strict and any(m in wanted for m in key.split("+")):
                raise ConfigError(f"dependency set {key} may not be pruned: {why}")
    modules = dict(model.named_modules())
    out: dict[str, dict[str, Any]] = {}
    for s in p.sets:
        key = "+".join(s)
        if wanted is not None and not any(m in wanted for m in s):
            continue
        units = p.units[key]
        extra = unit_scores_from_consumers(p.atoms, model, s, units, prune_type) if consumers else None
        chunk = p.chunks.get(key)
        masks = group_masks([modules[m] for m in s], sparsity, prune_type, units=[u.tolist() for u in units],
                            extra_scores=extra, chunks=None if chunk is None else chunk.tolist())
        out.update(zip(s, masks))
    return out


def head_masks(model: nn.Module, dummy_input: Any, sparsity: float, *, prune_type: str = "l1",
               consumers: bool = True, graph: Any = None) -> dict[str, dict[str, Any]]:
    """Masks that prune ``int(units * sparsity)`` whole heads (whole kv groups under GQA) of every attention
    :class:`~prunescope.topology.HeadDependency` finds, scored by the norm of their q/k/v rows and (default)
    output-projection columns. Attentions whose heads :func:`~prunescope.shrink.shrink` cannot remove (see
    :func:`unit_masks`) are left out. MLP units: :func:`unit_masks` with ``layers=[the MLP's first layer]``.

    >>> import torch
    >>> from prunescope.masks.units import head_masks
    >>> from prunescope.examples.vit_digits import DigitsViT
    >>> torch.manual_seed(0) and None
    >>> masks = head_masks(DigitsViT(), torch.ones(1, 1, 8, 8), 0.5)
    >>> sorted(masks)[:3], int(masks["blocks.0.attn.q"]["bias"].sum())   # 2 of 4 heads of 16 channels stay
    (['blocks.0.attn.k', 'blocks.0.attn.q', 'blocks.0.attn.v'], 32)
    """
    from ..graph import trace
    from ..topology.heads import HeadDependency

    g = graph if graph is not None else trace(model, dummy_input)
    layers = [n for a in HeadDependency(model, dummy_input, traced_model=g).attentions for n in (a.q, a.k, a.v)]
    if not layers:
        return {}
    return _unit_masks(model, dummy_input, sparsity, layers, prune_type, consumers, g, strict=False)
