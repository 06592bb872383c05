"""The typed records the stages of ``prunescope report`` pass on (see :mod:`prunescope.report`).

Each stage takes the records of the stages before it and returns its own; none reads a field another stage left
behind on a shared object. A dependency set is identified by the tuple of its members (:data:`SetKey`); its
``name`` (the members joined by ``+``) is the key of a plan in ``plan.json``, ``summary.json`` and
:class:`~prunescope.report.search.PlanSearch`, made in one place (:attr:`PrunableSet.name`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping

from torch import nn

from ..flops import FlopsReport
from ..graph import ModelGraph
from ..narrow.prunable import Prunable
from ..sensitivity import SensitivityAnalysis, results
from ..topology import ChannelDependency, GroupDependency
from .search import Candidate, PlanSearch

__all__ = ["SetKey", "PlanKey", "PrunableSet", "DenseCost", "Topology", "Sweep", "PlanMetrics", "Choice",
           "Shipped", "Verification", "RecoveryKind", "RecoveryStep", "Recovered", "Recovery", "CandidateRecord",
           "Summary", "Stages", "plan_key"]

SetKey = tuple[str, ...]  # a dependency set: its member layers, in ChannelDependency order
PlanKey = tuple[tuple[str, float], ...]  # a plan, sorted (set name, sparsity) pairs with sparsity > 0


def plan_key(plan: Mapping[str, float]) -> PlanKey:
    """A plan (set name -> sparsity) as a hashable key: the pruned sets, sorted."""
    return tuple(sorted((k, float(v)) for k, v in plan.items() if v > 0))


@dataclass(frozen=True)
class PrunableSet:
    """One dependency set the report may prune. ``units``: per member, the pruning unit of each output channel
    (``None``: one unit = one channel of every member); ``group_lcm``: the lcm of the group constraints of its
    members (removed unit counts must be multiples of it); ``number``: its row in the dependency-set table."""

    members: SetKey
    n_units: int
    group_lcm: int = 1
    units: tuple[tuple[int, ...], ...] | None = None
    number: int | None = None

    @property
    def name(self) -> str:
        """``conv1+conv3``: the set's key in a plan (``plan.json``, ``summary.json``)."""
        return "+".join(self.members)

    @property
    def label(self) -> str:
        """``set 3: conv1 +2``: the set as the legend and the tables name it."""
        head = f"set {self.number}: " if self.number is not None else ""
        return head + self.members[0] + (f" +{len(self.members) - 1}" if len(self.members) > 1 else "")

    def unit_lists(self) -> list[list[int]] | None:
        """``units`` as lists (the form :func:`prunescope.masks.pruners.group_masks` takes)."""
        return None if self.units is None else [list(u) for u in self.units]


@dataclass(frozen=True)
class DenseCost:
    """Stage 1: the dense model's trace, its MACs/params per layer and its metric."""

    graph: ModelGraph
    report: FlopsReport
    metric: float
    device: str

    @property
    def macs(self) -> int:
        return int(self.report.total_flops)

    @property
    def params(self) -> int:
        return int(self.report.total_params)

    total_flops = macs  # the FlopsReport names
    total_params = params


@dataclass(frozen=True)
class Topology:
    """Stage 2: every dependency set, the prunable ones and why the others are left alone."""

    dependency_sets: tuple[SetKey, ...]
    sets: tuple[PrunableSet, ...]
    excluded: Mapping[str, str]  # set name -> reason
    channels: ChannelDependency
    groups: GroupDependency
    prunable: Prunable | None = None  # the prunable sets with their units and the channel engine (unit scores)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sets]

    def get(self, name: str) -> PrunableSet:
        return next(s for s in self.sets if s.name == name)

    @property
    def group_constraints(self) -> int:
        return sum(1 for v in self.groups.dependency.values() if v > 1)


@dataclass(frozen=True)
class Sweep:
    """Stage 3: per prunable set, the metric with that set alone pruned at each sparsity. ``metric``: which model
    each point measured, ``'as-pruned'`` (the masked model = the shrunk one) or ``'reconstructed'`` (the shrunk
    model refit by least squares, as it ships); ``score``: how the units were ranked (``'l1'``, ``'activation'``,
    ``'reconstruction'``); ``analysis``: the NNI-compatible analysis that measured it (``None`` when the
    report's own loop measured the plan search's masks: a reconstructed or data-aware sweep)."""

    sparsities: tuple[float, ...]
    curves: Mapping[str, Mapping[float, float]]  # set name -> sparsity -> metric
    analysis: SensitivityAnalysis | None  # the NNI-compatible analysis (its CSV export)
    metric: str = "as-pruned"
    score: str = "l1"
    baseline: float | None = None

    @property
    def semantics(self) -> str:
        if self.metric == "reconstructed":
            return "reconstructed"
        return "as pruned" if self.analysis is None or self.analysis.as_pruned else "masked (NNI)"

    def export(self, path: str) -> None:
        """NNI's sensitivity CSV of the curves (the analysis' own export when it measured them)."""
        if self.analysis is not None:
            self.analysis.export(path)
        else:
            results.write_atomic(path, results.csv_bytes(list(self.sparsities), dict(self.curves)))


@dataclass(frozen=True)
class PlanMetrics:
    """A measured plan: the masked model as pruned, and the reconstructed shrunk model (None: not built)."""

    as_pruned: float
    reconstructed: float | None = None


@dataclass(frozen=True)
class Choice:
    """Stage 4: the plan search. ``infeasible``: why the FLOPs target cannot be met (then ``chosen`` is the
    heaviest plan); ``notes``: other things the reader should know (nothing prunable, no knapsack plan)."""

    chosen: Candidate
    knapsack: Candidate | None
    uniform: Candidate | None
    search: PlanSearch
    metrics: Mapping[PlanKey, PlanMetrics]
    target_macs: int
    infeasible: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def measured(self) -> list[Candidate]:
        return list(self.search.measured)


@dataclass(frozen=True)
class Shipped:
    """One shrunk model and what was measured on it. ``metric``: the shrunk model as pruned (before any
    recovery); ``reconstructed``: after the least-squares reconstruction (None: not reconstructed); ``model``:
    the model that ships (reconstructed when it was; fine-tuning later trains it in place)."""

    plan: dict[str, float]
    masks: dict[str, Any]
    model: nn.Module
    flops: int
    params: int
    metric: float
    report: FlopsReport | None = None
    latency_ms: float = float("nan")
    reconstructed: float | None = None
    reconstruct_seconds: float = 0.0


@dataclass(frozen=True)
class Verification:
    """Stage 5: the chosen plan and the uniform baseline as shrunk models, with latencies measured together
    (interleaved runs of the dense, plan and uniform models); ``notes``: counts that disagreed. ``latency_runs``:
    the timed runs each latency is the median of; ``latency_budget_s``: the per-model time budget when it cut the
    runs short (None when every run asked for was made)."""

    shipped: Shipped
    baseline: Shipped | None
    latency_dense_ms: float
    calibration_inputs: int = 0
    notes: tuple[str, ...] = ()
    latency_runs: int = 0
    latency_budget_s: float | None = None


RecoveryKind = Literal["reconstruct", "batchnorm", "finetune"]


@dataclass(frozen=True)
class RecoveryStep:
    """One measured recovery step: its kind, the label the page and ``summary.json`` show, the metric after it."""

    kind: RecoveryKind
    label: str
    metric: float
    seconds: float
    kept: bool = True  # False: the step made the metric worse and was undone (the model before it ships)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.label, "metric": self.metric, "seconds": round(self.seconds, 2), "kept": self.kept}


@dataclass(frozen=True)
class Recovered:
    """A shipped model and its recovery steps, in order."""

    shipped: Shipped
    steps: tuple[RecoveryStep, ...] = ()

    @property
    def final(self) -> float:
        """The metric of the model as it ships (after every recovery step it kept)."""
        kept = [s for s in self.steps if s.kept]
        return kept[-1].metric if kept else self.shipped.metric

    def metric_after(self, kind: RecoveryKind) -> float | None:
        return next((s.metric for s in self.steps if s.kind == kind), None)

    @property
    def label(self) -> str:
        """What the model is: ``shrunk, then BatchNorm re-estimation (11 batches) and fine-tuning``."""
        kept = [s.label for s in self.steps if s.kept]
        undone = [s.label for s in self.steps if not s.kept]
        text = "shrunk, then " + " and ".join(kept) if kept else "shrunk, no recovery"
        return text + (f" ({' and '.join(undone)} undone: it lowered the metric)" if undone else "")


@dataclass(frozen=True)
class Recovery:
    """Stage 6: the plan's recovery (its model is what ships) and the uniform baseline's, the same steps."""

    plan: Recovered
    baseline: Recovered | None


@dataclass(frozen=True)
class CandidateRecord:
    """One measured candidate plan as ``summary.json`` lists it."""

    plan: dict[str, float]
    source: str
    flops: int
    predicted: float | None
    measured: float | None
    as_pruned: float | None
    reconstructed: float | None
    finetuned: float | None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: Summary fields the page and the CLI read that ``summary.json`` leaves out (they are on the page itself)
_NOT_IN_JSON = {"plan_order", "prunable_sets", "higher_is_better", "graph_ops", "recovery_label",
                "calibration_inputs", "latency_runs", "latency_budget_s"}
#: Summary fields rounded in ``summary.json`` (to this many decimals), exact in the record
_ROUNDED = {"latency_before_ms": 4, "latency_after_ms": 4, "uniform_latency_ms": 4, "seconds": 2}


@dataclass(frozen=True)
class Summary:
    """What the report found, read by the page, ``summary.json`` (:meth:`to_json`) and the CLI. Every number
    describes one model, named by its field (see the keys of ``summary.json`` in the README)."""

    run_id: str
    model: str
    metric: str
    flops_unit: str
    flops_target: float
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    metric_before: float
    metric_after_predicted: float | None
    metric_after_measured: float
    metric_after_reconstructed: float | None
    plan_metric: str
    metric_after_calibrated: float | None
    metric_after_finetuned: float | None
    metric_final: float
    recovery_steps: tuple[RecoveryStep, ...]
    latency_before_ms: float
    latency_after_ms: float
    latency_device: str
    measured_on: str
    prediction_method: str
    plan_source: str
    plan_candidates: tuple[CandidateRecord, ...]
    target_met: bool
    note: str
    plan: dict[str, float]
    uniform_plan: dict[str, float] | None
    uniform_flops_after: int | None
    uniform_params_after: int | None
    uniform_latency_ms: float | None
    uniform_metric_measured: float | None
    uniform_metric_reconstructed: float | None
    uniform_metric_final: float | None
    uniform_recovery_steps: tuple[RecoveryStep, ...] | None
    sensitivity_semantics: str
    excluded_sets: dict[str, str]
    set_units: dict[str, int]
    sparsity_unit: str
    seconds: float
    sweep_metric: str = "as-pruned"  # what every sensitivity point measured: "as-pruned" or "reconstructed"
    unit_score: str = "l1"  # how units were ranked: "l1", "activation" or "reconstruction"
    # how well the metric the plan was chosen by predicted the final one (see prunescope.report.proxy_fit)
    proxy_metric: str = ""
    proxy_candidates: int = 0
    proxy_prediction_mae: float | None = None
    proxy_prediction_spearman: float | None = None
    proxy_final_candidates: int = 0
    proxy_final_mae: float | None = None
    proxy_as_pruned_final_mae: float | None = None
    proxy_final_same_order: bool | None = None
    # for the page and the CLI only
    plan_order: int = 0  # the shipped candidate's position in plan_candidates
    prunable_sets: int = 0
    higher_is_better: bool = True
    graph_ops: int = 0  # recorded tensor ops of the dense forward (the latency note)
    recovery_label: str = "shrunk, no recovery"  # what the shipped model is
    calibration_inputs: int = 0
    latency_runs: int = 0  # timed runs per latency median (the latency note)
    latency_budget_s: float | None = None  # the per-model timing budget, when it cut the runs short

    @property
    def sign(self) -> float:
        return 1.0 if self.higher_is_better else -1.0

    @property
    def target_macs(self) -> int:
        return int(math.floor(self.flops_target * self.flops_before))

    def to_json(self) -> dict[str, Any]:
        """``summary.json``: every field but the page-only ones, records as dicts, latencies and seconds rounded."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _NOT_IN_JSON:
                continue
            v = getattr(self, f.name)
            if f.name in _ROUNDED and v is not None:
                v = round(v, _ROUNDED[f.name])
            elif isinstance(v, tuple):
                v = [x.to_json() if hasattr(x, "to_json") else x for x in v]
            out[f.name] = v
        return out


@dataclass(frozen=True)
class Stages:
    """Every stage's record of one report: what the page and the folder are written from."""

    dense: DenseCost
    topology: Topology
    sweep: Sweep
    choice: Choice
    verification: Verification
    recovery: Recovery
    summary: Summary

    @property
    def final_model(self) -> nn.Module:
        """The model that ships (``pruned.pt``): the plan's shrunk model after its recovery."""
        return self.recovery.plan.shipped.model
