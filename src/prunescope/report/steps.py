"""The report's former step interface, kept for code written against it (``bench/bench_report.py`` and
``tests/report/test_plancost.py`` build a :class:`Run` and call :data:`STEPS`): each step runs one stage of
:mod:`prunescope.report.stages` and keeps its record on the :class:`Run`. New code calls the stages
(:func:`prunescope.report.run_report` shows the order)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from torch import nn

from .context import Context
from .plans import PlanMasks
from .records import Choice, DenseCost, Recovery, Stages, Summary, Sweep, Topology, Verification
from .search import Candidate, PlanSearch
from .stages import choose, dense_cost, recover, summarize, sweep, topology, verify

__all__ = ["Run", "STEPS"]


class Run:
    """The records of one report run, filled by :data:`STEPS` in order (the stages' records under their names,
    the per-set caches as :attr:`plans`). Its attributes are those of :class:`~prunescope.report.records.Stages`,
    so :func:`prunescope.report.page.write_folder` writes it."""

    def __init__(self, model: nn.Module, val_func: Callable[[nn.Module], Any], x: Any, flops_target: float,
                 sparsities: Sequence[float] | None, workers: int | None, sign: float, model_name: str,
                 metric_name: str, progress: bool, console: Callable[[str], None] | None, plan_evals: int = 16,
                 calibrate: Callable[[], Iterable[Any]] | Iterable[Any] | None = None,
                 finetune: Callable[..., Any] | None = None, reconstruct: bool = True,
                 calibration_samples: int = 512) -> None:
        self.ctx = Context(model, val_func, x, flops_target=float(flops_target), sign=sign, model_name=model_name,
                           metric_name=metric_name, console=console, progress=progress, calibrate=calibrate,
                           finetune=finetune, reconstruct=reconstruct, calibration_samples=calibration_samples)
        self.sparsities, self.workers, self.plan_evals = sparsities, workers, plan_evals
        self.dense: DenseCost | None = None
        self.topology: Topology | None = None
        self.plans: PlanMasks | None = None
        self.sweep: Sweep | None = None
        self.choice: Choice | None = None
        self.verification: Verification | None = None
        self.recovery: Recovery | None = None
        self._summary: Summary | None = None

    @property
    def model(self) -> nn.Module:
        return self.ctx.model

    @property
    def x(self) -> Any:
        return self.ctx.x

    @property
    def graph(self) -> Any:
        assert self.dense is not None
        return self.dense.graph

    @property
    def cost(self) -> Any:
        """The :class:`~prunescope.flops.plancost.PlanCost` of :attr:`plans`."""
        assert self.plans is not None
        return self.plans.cost

    def set_atoms(self, key: str, sparsity: float) -> Any:
        assert self.plans is not None
        return self.plans.set_atoms(key, sparsity)

    @property
    def excluded(self) -> dict[str, str]:
        assert self.topology is not None
        return dict(self.topology.excluded)

    @property
    def keys(self) -> list[str]:
        assert self.topology is not None
        return self.topology.names

    @property
    def units(self) -> dict[str, list[list[int]] | None]:
        assert self.topology is not None
        return {s.name: s.unit_lists() for s in self.topology.sets}

    def constrained(self, key: str) -> bool:
        assert self.plans is not None
        return self.plans.constrained(key)

    def masks_for(self, plan: dict[str, float]) -> dict[str, Any]:
        assert self.plans is not None
        return self.plans.masks_for(plan)

    def removal_plan(self, plan: dict[str, float]) -> Any:
        assert self.plans is not None
        return self.plans.removal_plan(plan)

    def macs_of(self, plan: dict[str, float]) -> int:
        assert self.plans is not None
        return self.plans.macs_of(plan)

    @property
    def search(self) -> PlanSearch | None:
        return self.choice.search if self.choice is not None else None

    @property
    def chosen(self) -> Candidate | None:
        return self.choice.chosen if self.choice is not None else None

    @property
    def summary(self) -> Summary:
        if self._summary is None:
            assert self.dense and self.topology and self.sweep and self.choice and self.verification
            assert self.recovery is not None
            self._summary = summarize(self.ctx, self.dense, self.topology, self.sweep, self.choice,
                                      self.verification, self.recovery, "")
        return self._summary

    @property
    def final_model(self) -> nn.Module:
        assert self.recovery is not None
        return self.recovery.plan.shipped.model

    def stages(self) -> Stages:
        assert self.dense and self.topology and self.sweep and self.choice and self.verification
        assert self.recovery is not None
        return Stages(self.dense, self.topology, self.sweep, self.choice, self.verification, self.recovery,
                      self.summary)


def step_cost(r: Run) -> None:
    r.dense = dense_cost(r.ctx)


def step_topology(r: Run) -> None:
    assert r.dense is not None
    r.topology = topology(r.ctx, r.dense)
    r.plans = PlanMasks(r.model, r.x, r.dense, r.topology)


def step_sensitivity(r: Run) -> None:
    assert r.dense is not None and r.topology is not None
    r.sweep = sweep(r.ctx, r.dense, r.topology, r.sparsities, r.workers)


def step_plan(r: Run) -> None:
    assert r.dense is not None and r.topology is not None and r.sweep is not None and r.plans is not None
    r.choice = choose(r.ctx, r.dense, r.topology, r.sweep, r.plans, r.plan_evals)


def step_verify(r: Run) -> None:
    assert r.dense is not None and r.plans is not None and r.choice is not None
    r.verification = verify(r.ctx, r.dense, r.plans, r.choice)


def step_recover(r: Run) -> None:
    assert r.verification is not None
    r.recovery = recover(r.ctx, r.verification)


STEPS = (step_cost, step_topology, step_sensitivity, step_plan, step_verify, step_recover)
