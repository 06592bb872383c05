"""Unit masks: whole pruning units (channels, heads, kv groups, MLP units) of the sets that may be pruned.

The units and their scores are the masks layer's (:mod:`prunescope.masks.units`: the channel engine's classes,
L1/L2/FPGM, activation-weighted and reconstruction-aware scores); which sets may be pruned is the one
definition of :func:`prunescope.narrow.prunable.prunable_sets` (a set shrink narrows as asked), so these entry
points sit above it, in the layer of ``shrink``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..graph import trace
from ..masks.pruners import PRUNE_TYPES, group_masks
from ..masks.units import (
    activation_masks,
    check_sparsity,
    input_channel_norms,
    reconstruction_set_masks,
    unit_scores_from_consumers,
)
from ..topology.heads import HeadDependency
from .prunable import prunable_sets

__all__ = ["unit_masks", "head_masks"]


@torch.no_grad()
def unit_masks(model: nn.Module, dummy_input: Any, sparsity: float, *, layers: Iterable[str] | None = None,
               prune_type: str = "l1", consumers: bool = False, graph: Any = None,
               calibration: Iterable[Any] | None = None) -> dict[str, dict[str, Any]]:
    """Masks that prune ``int(n_units * sparsity)`` whole units of every dependency set (see the module docs);
    ``0 <= sparsity < 1`` (anything else, NaN included, is a :class:`~prunescope.errors.ConfigError`).

    ``layers``: prune the sets that contain one of these layers (default: every set that may be pruned, the one
    definition of :func:`prunescope.narrow.prunable.prunable_sets`: no unsafe layer, no channel reaching the
    model output, units removable group by group of the grouped convolutions, and a set that
    :func:`~prunescope.narrow.shrink` narrows as asked). A named layer whose set may not be pruned is an error
    naming the reason. On a grouped convolution the same number of units goes from every group. Returns NNI's
    mask layout ``{layer: {'weight', 'bias'}}`` for every member of the pruned sets; the masks remove whole
    engine classes, equally per group, so :func:`prunescope.masks.fix_mask_conflict` leaves them as they are
    and ``shrink`` removes every masked channel. ``prune_type``: ``'l1'`` (default), ``'l2'`` or ``'fpgm'``;
    ``consumers=True`` adds the consumer columns' norms to the unit scores. ``prune_type='activation'`` (needs
    ``calibration``, an iterable of unlabeled input batches) scores a unit by what its removal costs on those
    inputs: the activation-weighted norm of Wanda-sp/FLAP, ``Σ |W[:, c]| · ‖X_c‖₂`` over the consumer columns
    ``c`` that read the unit (see :mod:`prunescope.masks.units`; sets of grouped convolutions, whose units
    are chosen group by group, keep L1 scores). ``prune_type='reconstruction'`` (needs ``calibration``) chooses
    the units the least-squares refit of :func:`prunescope.narrow.reconstruct` recovers best: greedily, the units
    whose removal, with the consumers' remaining input columns refit, adds the least output error on those
    inputs (ThiNet's criterion with the refit, see :mod:`prunescope.masks.units`; under a second on the digits CNN,
    about a minute of CPU on a resnet18 at 224x224: O(d³) per consumer of d input columns, every consumer's
    d x d Gram held at once, 2.3 GB there). The model is not modified.
    """
    return _unit_masks(model, dummy_input, sparsity, layers, prune_type, consumers, graph, calibration,
                       strict=True, where="unit_masks")


def _unit_masks(model: nn.Module, dummy_input: Any, sparsity: float, layers: Iterable[str] | None,
                prune_type: str, consumers: bool, graph: Any, calibration: Iterable[Any] | None, strict: bool,
                where: str) -> dict[str, dict[str, Any]]:
    """:func:`unit_masks`; ``strict=False`` skips the named layers' sets that may not be pruned."""
    sparsity = check_sparsity(sparsity, where)
    norms = None
    if prune_type == "activation":
        if calibration is None:
            raise ConfigError("unit pruning with prune_type='activation' needs calibration= (input batches)")
        norms = input_channel_norms(model, calibration)
    elif prune_type == "reconstruction":
        if calibration is None:
            raise ConfigError("unit pruning with prune_type='reconstruction' needs calibration= (input batches)")
    elif prune_type not in PRUNE_TYPES or prune_type == "level":
        raise ConfigError(f"unit pruning needs a filter prune type ('l1', 'l2', 'fpgm', 'activation', "
                          f"'reconstruction'), got {prune_type!r}")
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
    chosen = [s for s in p.sets if wanted is None or any(m in wanted for m in s)]
    if not chosen:
        _say_why_none(p.excluded, wanted, where)
    by_refit: dict[str, list[dict[str, Any]]] = {}
    if prune_type == "reconstruction":
        by_refit = reconstruction_set_masks(p, model, [s for s in chosen if p.chunks.get("+".join(s)) is None],
                                             calibration, sparsity)  # type: ignore[arg-type]
    out: dict[str, dict[str, Any]] = {}
    for s in chosen:
        key = "+".join(s)
        units = p.units[key]
        chunk = p.chunks.get(key)
        if norms is not None and chunk is None:
            out.update(zip(s, activation_masks(p.atoms, model, [modules[m] for m in s], s, units, norms, sparsity)))
            continue
        if key in by_refit:
            out.update(zip(s, by_refit[key]))
            continue
        extra = unit_scores_from_consumers(p.atoms, model, s, units, prune_type) if consumers else None
        kind = "l1" if prune_type in ("activation", "reconstruction") else prune_type
        masks = group_masks([modules[m] for m in s], sparsity, kind, units=[u.tolist() for u in units],
                            extra_scores=extra, chunks=None if chunk is None else chunk.tolist())
        out.update(zip(s, masks))
    return out


def _say_why_none(excluded: dict[str, str], wanted: list[str] | None, where: str) -> None:
    """No set to prune: say so with the reasons (an empty dict alone reads as "nothing to prune here")."""
    left = {k: why for k, why in excluded.items() if wanted is None or any(m in wanted for m in k.split("+"))}
    if not left:
        return
    shown = "; ".join(f"{k}: {why}" for k, why in list(left.items())[:3])
    more = f"; and {len(left) - 3} more" if len(left) > 3 else ""
    level = 5 if where == "unit_masks" else 4  # the user's line (unit_masks has no_grad's wrapper in between)
    warnings.warn(f"{where}: no dependency set may be pruned, so no masks are returned ({len(left)} left alone: "
                  f"{shown}{more})", stacklevel=level)


def head_masks(model: nn.Module, dummy_input: Any, sparsity: float, *, prune_type: str = "l1",
               consumers: bool = True, graph: Any = None, calibration: Iterable[Any] | None = None
               ) -> dict[str, dict[str, Any]]:
    """Masks that prune ``int(units * sparsity)`` whole heads (whole kv groups under GQA; ``0 <= sparsity < 1``)
    of every attention :class:`~prunescope.topology.HeadDependency` finds, scored by the norm of their q/k/v rows
    and (default) output-projection columns (``prune_type='activation'`` with ``calibration``: by the
    activation-weighted norm of the output-projection columns; ``'reconstruction'``: by the refit error of
    the output projection, see :func:`unit_masks`). Attentions whose heads
    :func:`~prunescope.narrow.shrink` cannot remove (see :func:`unit_masks`) are left out. MLP units:
    :func:`unit_masks` with ``layers=[the MLP's first layer]``.

    >>> import torch
    >>> from prunescope import head_masks
    >>> from prunescope.examples.vit_digits import DigitsViT
    >>> torch.manual_seed(0) and None
    >>> masks = head_masks(DigitsViT(), torch.ones(1, 1, 8, 8), 0.5)
    >>> sorted(masks)[:3], int(masks["blocks.0.attn.q"]["bias"].sum())   # 2 of 4 heads of 16 channels stay
    (['blocks.0.attn.k', 'blocks.0.attn.q', 'blocks.0.attn.v'], 32)
    """
    sparsity = check_sparsity(sparsity, "head_masks")
    g = graph if graph is not None else trace(model, dummy_input)
    layers = [n for a in HeadDependency(model, dummy_input, traced_model=g).attentions for n in (a.q, a.k, a.v)]
    if not layers:
        return {}
    return _unit_masks(model, dummy_input, sparsity, layers, prune_type, consumers, g, calibration, strict=False,
                       where="head_masks")
