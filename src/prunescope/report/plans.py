"""Plans -> masks -> exact effective MACs, cached per set and pruning level (:class:`PlanMasks`).

A plan maps set names to sparsities. Its masks are the union of its sets' own conflict-free masks (the conflict
fix acts per dependency set, and per layer for group constraints), so they are computed once per set and unit
count; its effective MACs come from the sets' masked channel atoms, combined by
:class:`prunescope.flops.plancost.PlanCost` (about a millisecond a plan, no count from scratch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..flops.plancost import PlanCost
from ..masks import fix_mask_conflict, fix_masks_with
from ..masks.pruners import filter_scores, group_masks, select_lowest
from ..masks.units import activation_masks, input_channel_norms, reconstruction_set_masks
from .records import DenseCost, PlanKey, PrunableSet, Topology, plan_key

__all__ = ["PlanMasks", "UNIT_SCORES"]

#: how the report ranks a set's units: by weight norm, or by what removing them costs on the calibration inputs
UNIT_SCORES = ("l1", "activation", "reconstruction")


@dataclass
class PlanMasks:
    """The masks and exact effective MACs of any plan over ``topology``'s prunable sets (NNI's
    ``int(n_units * sparsity)`` units removed), cached per set and unit count.

    ``score``: how the units are ranked, ``'l1'`` (the weight norm of their rows, default) or from the
    ``calibration`` batches (:func:`prunescope.unit_masks`' data-aware types): ``'activation'`` (Wanda-sp/FLAP's
    ``Σ |W[:, c]| · ‖X_c‖`` over the consumer columns that read a unit) or ``'reconstruction'`` (ThiNet's greedy
    choice of the units the consumers' least-squares refit recovers best). Sets with a group constraint keep L1
    (their units go group by group), as in ``unit_masks``."""

    model: nn.Module
    x: Any
    dense: DenseCost
    topology: Topology
    score: str = "l1"
    calibration: Sequence[Any] | None = None
    cost: PlanCost = field(init=False)
    _modules: dict[str, nn.Module] = field(init=False)
    _scores: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = field(default_factory=dict, init=False)
    _set_masks: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict, init=False)
    _set_atoms: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, init=False)
    _masks: dict[PlanKey, dict[str, Any]] = field(default_factory=dict, init=False)
    _macs: dict[PlanKey, int] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.cost = PlanCost(self.model, self.dense.graph)
        self._modules = dict(self.model.named_modules())
        self._by_name = {s.name: s for s in self.topology.sets}
        if self.score not in UNIT_SCORES:
            raise ConfigError(f"unknown unit score {self.score!r}; expected one of {', '.join(UNIT_SCORES)}")
        if self.score != "l1" and not self.calibration:
            raise ConfigError(f"the unit score {self.score!r} ranks units by what removing them costs on "
                              "calibration inputs; none were given (use 'l1', or give calibration batches)")
        if self.score != "l1" and self.topology.prunable is None:
            raise ConfigError(f"the unit score {self.score!r} needs the topology's prunable sets (units, engine)")
        self._norms: dict[str, torch.Tensor] | None = None

    def data_aware(self, name: str) -> bool:
        """Are set ``name``'s units ranked from the calibration inputs (not L1)?"""
        return self.score != "l1" and not self.constrained(name)

    def constrained(self, name: str) -> bool:
        """Does a member of set ``name`` carry a group constraint (grouped convolutions it feeds or is)? Then the
        conflict fix may change its masks."""
        gd = self.topology.groups
        return any(int(gd.dependency.get(m, 1)) > 1 or int(getattr(gd, "min_groups", {}).get(m, 1)) > 1
                   for m in self._by_name[name].members)

    def unit_scores(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Set ``name``'s unit scores (float64, summed over the members, as ``group_masks`` sums them) and, per
        member, the unit of each output channel; computed once per set."""
        hit = self._scores.get(name)
        if hit is None:
            s = self._by_name[name]
            members = [self._modules[m] for m in s.members]
            ids = [torch.as_tensor(u, dtype=torch.long) for u in s.units] if s.units is not None else \
                [torch.arange(s.n_units)] * len(members)
            scores = torch.zeros(s.n_units, dtype=torch.float64)
            for m, i in zip(members, ids):
                scores.index_add_(0, i, filter_scores(m, "l1").detach().to("cpu", torch.float64))
            hit = self._scores[name] = (scores, ids)
        return hit

    def _group_masks(self, s: PrunableSet, sparsity: float) -> dict[str, Any]:
        mods = [self._modules[m] for m in s.members]
        if self.data_aware(s.name):
            p = self.topology.prunable
            assert p is not None and self.calibration is not None
            units = p.units[s.name]
            if self.score == "activation":
                if self._norms is None:  # one pass over the calibration inputs for every set
                    self._norms = input_channel_norms(self.model, self.calibration)
                return dict(zip(s.members, activation_masks(p.atoms, self.model, mods, s.members, units, self._norms,
                                                            float(sparsity))))
            return dict(zip(s.members, reconstruction_set_masks(p, self.model, [s.members], self.calibration,
                                                                float(sparsity))[s.name]))
        return dict(zip(s.members, group_masks(mods, float(sparsity), "l1", units=s.unit_lists())))

    def set_masks(self, name: str, sparsity: float) -> dict[str, Any]:
        """Set ``name`` pruned at ``sparsity`` on its own: its conflict-free masks (``group_masks`` by L1, or by
        the data-aware :attr:`score`; the conflict fix only where a group constraint can change them). Cached per
        set and unit count (``int(n_units * sparsity)``: sparsities that remove the same number of units give the
        same masks)."""
        s = self._by_name[name]
        state = (name, int(s.n_units * float(sparsity)))
        hit = self._set_masks.get(state)
        if hit is None:
            out = self._group_masks(s, sparsity)
            if self.constrained(name):
                cd, gd = self.topology.channels, self.topology.groups
                out = dict(fix_masks_with(out, self.model, cd.dependency_sets, gd.dependency,
                                          getattr(gd, "min_groups", {}), classes=cd.atoms.layer_classes))
            hit = self._set_masks[state] = out
        return hit

    def set_atoms(self, name: str, sparsity: float) -> np.ndarray:
        """The engine atoms :meth:`set_masks` zeroes, without building masks: the ``int(n_units * sparsity)``
        units of lowest score go (``group_masks``' selection rule on :meth:`unit_scores`); a set with a group
        constraint, or ranked by a data-aware :attr:`score`, reads them off its (conflict-fixed) masks."""
        s = self._by_name[name]
        state = (name, int(s.n_units * float(sparsity)))
        hit = self._set_atoms.get(state)
        if hit is None:
            if self.constrained(name) or self.data_aware(name):
                hit = self.cost.masked_atoms(self.set_masks(name, sparsity))
            else:
                scores, ids = self.unit_scores(name)
                gone = (~select_lowest(scores, state[1], "l1")).numpy()
                hit = np.zeros(self.cost.n_atoms, dtype=bool)
                for m, i in zip(s.members, ids):
                    li = self.cost.ca.layers.get(m)
                    if li is not None:
                        hit[li.atom_start: li.atom_start + li.out_channels] = gone[i.numpy()]
            self._set_atoms[state] = hit
        return hit

    def masks_for(self, plan: dict[str, float]) -> dict[str, Any]:
        """Conflict-free masks of a plan: the union of its sets' :meth:`set_masks` (equal to ``fix_mask_conflict``
        of the whole plan's masks, tested); sets whose fixes touch the same layer are fixed together."""
        key = plan_key(plan)
        hit = self._masks.get(key)
        if hit is not None:
            return hit
        merged: dict[str, Any] = {}
        overlap = False
        for name, sparsity in key:
            part = self.set_masks(name, sparsity)
            overlap |= bool(merged.keys() & part.keys())
            merged.update(part)
        if overlap:  # sets whose fixes touch the same layer (not seen): fix the whole plan's masks at once
            merged = {}
            for name, sparsity in key:
                merged.update(self._group_masks(self._by_name[name], sparsity))
            merged = dict(fix_mask_conflict(merged, self.model, self.x, traced=self.dense.graph))
        self._masks[key] = merged
        return merged

    def masked_of(self, plan: dict[str, float]) -> np.ndarray:
        """Per engine atom: masked by the plan's masks (the union of its sets' :meth:`set_atoms`)."""
        masked = np.zeros(self.cost.n_atoms, dtype=bool)
        for name, sparsity in plan_key(plan):
            masked |= self.set_atoms(name, sparsity)
        return masked

    def removal_plan(self, plan: dict[str, float]) -> Any:
        """The removal plan of :meth:`masks_for` (PlanCost's planner: no planning from scratch per plan)."""
        return self.cost.removal_plan(self.masked_of(plan))

    def macs_of(self, plan: dict[str, float]) -> int:
        """The plan's exact effective MACs from its sets' masked atoms (:class:`PlanCost`: about a millisecond,
        no count from scratch)."""
        key = plan_key(plan)
        if not key:
            return self.dense.macs
        hit = self._macs.get(key)
        if hit is None:
            hit = self._macs[key] = self.cost.macs(self.masked_of(plan))
        return hit
