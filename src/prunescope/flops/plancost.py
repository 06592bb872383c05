"""Effective MACs of many pruning plans on one trace, in about a millisecond each.

A search over pruning plans (``prunescope report``: the uniform bisection, the knapsack's options, the
neighbours of the best plan) needs the effective MACs of hundreds of plans. Counting each one from scratch
(:func:`prunescope.flops.flops_report` with ``effective=True``: validate the masks, build a removal plan with
its protection rules, walk every op) costs tens of milliseconds on a small CNN and seconds on a BERT.

Everything that does not depend on the masks is done once here: the channel engine, the mask-independent
protection of the removal plan (model outputs, layers shrink does not narrow, parameter-derived tensors), the
list of counted op nodes with their dense counts. A plan is then a boolean vector over the engine's atoms
(which output channels its masks zero: the union of the per-set vectors, computed once per set and pruning
level), and its count is

``Σ_node round(dense(node) · scale(node))``

with ``scale`` the factor of :func:`prunescope.flops.effective.node_scales` — for a conv/linear call the pairs
of kept (input, output) channels over the dense pairs, bilinear in the kept counts; for other counted ops the
fraction of channel positions alive — after the removal decision of :func:`prunescope.narrow.plan_removal`
(a class goes when every voter is masked; the mask-dependent protection: grouped convolutions, GroupNorm
divisibility, SDPA's head_dim) is re-run on the vector. The same factors, the same decision and the same
rounding as the effective counter, so the two give the same number (tested against
``flops_report(..., effective=True)`` on random plans of a resnet18, a residual CNN with shared sets and a
BERT with head and MLP units).

The removal decision is not additive over sets (a removed channel may reach a layer as a constant that cannot
be folded, a grouped layer may need equal counts per group), so it is re-run per plan; its costly part, the
walk of :func:`prunescope.topology.values.value_states`, restarts from the nearest removal vector seen before
(:class:`prunescope.topology.values.IncrementalStates`): a plan search's plans differ in a set or two, and only
the ops touching those sets' layers (or reading a state that changed) are visited again (tested equal to full
walks and counts along neighbour walks). :meth:`PlanCost.removal_plan` gives the whole removal plan of a
vector the same way, for ``as_pruned(..., plan=)``.

>>> import torch
>>> from torch import nn
>>> from prunescope.graph import trace
>>> net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
>>> cost = PlanCost(net, trace(net, torch.ones(1, 3, 2, 2)))
>>> mask = torch.ones(4, 3, 1, 1); mask[:2] = 0          # remove 2 of conv 0's 4 filters
>>> cost.dense, cost.macs(cost.masked_atoms({'0': {'weight': mask}}))
(80, 40)
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from torch import nn

from ..graph import ModelGraph, OpNode
from ..removal.plan import Planner, RemovalPlan, assemble_plan, decide_removal, masked_atoms
from ..topology.values import IncrementalStates
from .counter import _build, _op_cost
from .effective import node_scales

__all__ = ["PlanCost"]


class PlanCost:
    """Effective MACs (default mode: convolutions, linear layers, matrix products, attention) of masks on one
    traced model, with the mask-independent work done once (see the module docs)."""

    def __init__(self, model: nn.Module, graph: ModelGraph) -> None:
        self.graph = graph
        self._planner = Planner(graph, {})
        self.ca = self._planner.ca
        self._planner.static_protection()
        self._planner.states = IncrementalStates(self.ca, self._planner.const_ids)  # walks restart nearby
        self._prot0 = self._planner.prot.copy()
        self._reasons0 = dict(self._planner.reasons)
        counted: list[OpNode] = []

        def record(node: OpNode) -> tuple[float, None]:
            counted.append(node)
            return 1.0, None

        rep = _build(graph, model, {}, "default", {}, record)  # the counter's own choice of counted ops
        self._counted = [(node, _op_cost(node, "default")[0]) for node in counted]
        self.dense = int(rep.total_flops)
        self._index: dict[int, np.ndarray] = {}  # atom array id -> positions into the alive vector (node_scales)

    @property
    def n_atoms(self) -> int:
        return len(self.ca.root)

    def masked_atoms(self, masks: Mapping[str, Any]) -> np.ndarray:
        """Per engine atom: is its filter all zeros in ``masks`` (NNI layout)? Vectors of disjoint layers
        combine by ``|``."""
        return masked_atoms(self.ca, masks, [])

    def removed(self, masked: np.ndarray) -> np.ndarray:
        """Per engine atom: removed by the removal plan of masks whose masked atoms are ``masked`` (the
        decision of :func:`prunescope.narrow.plan_removal`, mask-independent protection reused)."""
        pl = self._planner
        pl.masked = np.asarray(masked, dtype=bool)
        pl.prot = self._prot0.copy()
        pl.reasons = dict(self._reasons0)
        if not pl.masked.any():
            return decide_removal(self.ca, pl.masked, pl.prot)
        return pl.decide(static=False)

    def removal_plan(self, masked: np.ndarray) -> RemovalPlan:
        """The :class:`~prunescope.removal.plan.RemovalPlan` of masks whose masked atoms are ``masked`` (what
        ``plan_removal(graph, masks, check_pins=False)`` builds, with the mask-independent work reused): pass it
        as ``as_pruned(..., plan=)`` to measure many plans without planning each from scratch."""
        pl = self._planner
        pl.masked = np.asarray(masked, dtype=bool)
        pl.prot = self._prot0.copy()
        pl.reasons = dict(self._reasons0)
        return assemble_plan(pl, pl.decide(static=False), check_pins=False)

    def macs(self, masked: np.ndarray) -> int:
        """The effective MACs of masks whose masked atoms are ``masked`` (equal to
        ``flops_report(model, x, masks=masks, effective=True).total_flops``)."""
        atom_removed = self.removed(masked)
        if not atom_removed.any():
            return self.dense
        scale = node_scales(self.ca, atom_removed, self._index)
        return int(sum(int(round(n * scale(node)[0])) for node, n in self._counted))
