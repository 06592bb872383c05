"""The steps of ``prunescope report``, each a function of the shared :class:`Run` (see the package docs)."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from ..flops.plancost import PlanCost
from .search import Candidate, PlanSearch

__all__ = ["Run", "STEPS"]


@dataclass
class Shipped:
    """One shrunk model and what was measured on it. ``metric``: the shrunk model as pruned (before any
    recovery); ``reconstructed``: after the least-squares reconstruction (None: not reconstructed); ``model``:
    the model that ships (reconstructed when it was, then recovered in place by fine-tuning)."""

    plan: dict[str, float]
    masks: dict[str, Any]
    model: nn.Module
    flops: int
    params: int
    metric: float
    report: Any = None
    latency_ms: float = float("nan")
    reconstructed: float | None = None
    reconstruct_seconds: float = 0.0
    recovery: list[tuple[str, float, float]] = field(default_factory=list)  # (step, metric, seconds)

    @property
    def final(self) -> float:
        """The metric of the model as it ships (after every recovery step)."""
        return self.recovery[-1][1] if self.recovery else self.metric


@dataclass
class Run:
    """What the steps share."""

    model: nn.Module
    val_func: Callable[[nn.Module], Any]
    x: Any
    flops_target: float
    sparsities: Sequence[float] | None
    workers: int | None
    sign: float
    model_name: str
    metric_name: str
    progress: bool
    console: Callable[[str], None] | None
    plan_evals: int = 16
    calibrate: Callable[[], Iterable[Any]] | Iterable[Any] | None = None
    finetune: Callable[[nn.Module], Any] | None = None
    reconstruct: bool = True  # with calibration inputs: the plan is chosen and shipped reconstructed
    calibration_samples: int = 512  # inputs the reconstruction fits on (the first batches up to this many)
    _calibration: list[Any] | None = None
    metrics: dict[tuple, dict[str, float | None]] = field(default_factory=dict)  # plan key -> as_pruned, reconstructed
    t0: float = field(default_factory=time.perf_counter)
    graph: Any = None
    dense: Any = None
    metric_before: float = 0.0
    cd: Any = None
    gd: Any = None
    sets: list[tuple[str, ...]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    group_lcm: dict[str, int] = field(default_factory=dict)
    units: dict[str, list[list[int]] | None] = field(default_factory=dict)  # key -> per member, unit per channel
    sa: Any = None
    sens: dict[str, dict[float, float]] = field(default_factory=dict)
    search: PlanSearch | None = None
    chosen: Candidate | None = None
    knapsack: Candidate | None = None
    uniform: Candidate | None = None
    note: str = ""
    shipped: Shipped | None = None
    baseline: Shipped | None = None
    recovery: list[tuple[str, float, float]] = field(default_factory=list)  # (step, metric, seconds)
    latency_dense_ms: float = float("nan")
    final: nn.Module | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    cost: Any = None  # PlanCost: effective MACs of a plan from its sets' masked atoms
    _masks_cache: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    _macs_cache: dict[tuple, int] = field(default_factory=dict)
    _set_masks: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    _set_atoms: dict[tuple[str, int], Any] = field(default_factory=dict)
    _scores: dict[str, tuple[Any, list[Any]]] = field(default_factory=dict)
    _modules: dict[str, nn.Module] | None = None
    _state: list[Any] | None = None  # snapshot of the user's model, taken once (see report.borrowed)

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console(text)

    @property
    def dense_device(self) -> str:
        p = next(self.model.parameters(), None)
        return p.device.type if p is not None else "cpu"

    @property
    def target_macs(self) -> int:
        return int(math.floor(self.flops_target * self.dense.total_flops))

    def evaluate(self, model: nn.Module, what: str) -> float:
        """``val_func(model)`` as a finite float; the user's model is borrowed and given back exactly."""
        from ..sensitivity.engine import coerce_metric
        from . import borrowed

        if model is self.model:
            if self._state is None:
                from . import snapshot

                self._state = snapshot(model)  # once: each lending compares against it, copies back what changed
            with borrowed(model, self._state):
                value = self.val_func(model)
        else:
            value = self.val_func(model)
        return coerce_metric(value, "", None, where=what)

    # -- plans -> masks -> counts / metrics
    @property
    def modules(self) -> dict[str, nn.Module]:
        if self._modules is None:
            self._modules = dict(self.model.named_modules())
        return self._modules

    def constrained(self, key: str) -> bool:
        """Does a member of set ``key`` carry a group constraint (grouped convolutions it feeds or is)? Then the
        conflict fix may change its masks."""
        return any(int(self.gd.dependency.get(m, 1)) > 1 or int(getattr(self.gd, "min_groups", {}).get(m, 1)) > 1
                   for m in key.split("+"))

    def unit_scores(self, key: str) -> tuple[Any, list[Any]]:
        """Set ``key``'s unit scores (float64, summed over the members, as :func:`group_masks` sums them) and,
        per member, the unit of each output channel; computed once per set."""
        import torch

        from ..masks.pruners import filter_scores

        hit = self._scores.get(key)
        if hit is None:
            members = [self.modules[m] for m in key.split("+")]
            u = self.units.get(key)
            ids = [torch.as_tensor(x, dtype=torch.long) for x in u] if u is not None else \
                [torch.arange(self.n_units(key))] * len(members)
            scores = torch.zeros(self.n_units(key), dtype=torch.float64)
            for m, i in zip(members, ids):
                scores.index_add_(0, i, filter_scores(m, "l1").detach().to("cpu", torch.float64))
            hit = self._scores[key] = (scores, ids)
        return hit

    def set_masks(self, key: str, s: float) -> dict[str, Any]:
        """Set ``key`` pruned at sparsity ``s`` on its own: its conflict-free masks (``group_masks`` by L1;
        the conflict fix only where a group constraint can change them). Cached per set and unit count
        (``int(n_units * s)``: sparsities that remove the same number of units give the same masks)."""
        from ..masks import fix_masks_with
        from ..masks.pruners import group_masks

        state = (key, int(self.n_units(key) * float(s)))
        hit = self._set_masks.get(state)
        if hit is None:
            members = key.split("+")
            out = dict(zip(members, group_masks([self.modules[m] for m in members], float(s), "l1",
                                                units=self.units.get(key))))
            if self.constrained(key):
                out = dict(fix_masks_with(out, self.model, self.cd.dependency_sets, self.gd.dependency,
                                          getattr(self.gd, "min_groups", {}), classes=self.cd.atoms.layer_classes))
            hit = self._set_masks[state] = out
        return hit

    def set_atoms(self, key: str, s: float) -> Any:
        """The engine atoms :meth:`set_masks` zeroes, without building masks: the ``int(n_units * s)`` units of
        lowest score go (``group_masks``' selection rule on the scores of :meth:`unit_scores`); a set with a group
        constraint reads them off its conflict-fixed masks."""
        import numpy as np

        from ..masks.pruners import select_lowest

        n = self.n_units(key)
        state = (key, int(n * float(s)))
        hit = self._set_atoms.get(state)
        if hit is None:
            if self.constrained(key):
                hit = self.cost.masked_atoms(self.set_masks(key, s))
            else:
                scores, ids = self.unit_scores(key)
                gone = (~select_lowest(scores, state[1], "l1")).numpy()
                hit = np.zeros(self.cost.n_atoms, dtype=bool)
                for m, i in zip(key.split("+"), ids):
                    li = self.cost.ca.layers.get(m)
                    if li is not None:
                        hit[li.atom_start: li.atom_start + li.out_channels] = gone[i.numpy()]
            self._set_atoms[state] = hit
        return hit

    def masks_for(self, plan: dict[str, float]) -> dict[str, Any]:
        """Conflict-free masks of a plan: each set's units (engine classes: channels, heads, kv groups) by the
        summed L1 norm of their members' filters, ``int(n_units * sparsity)`` units removed.

        The conflict fix acts per dependency set (and per layer for group constraints), so the masks of a plan
        are the union of its sets' own conflict-free masks (:meth:`set_masks`; equal to ``fix_mask_conflict``
        of the whole plan's masks, tested)."""
        from ..masks import fix_mask_conflict
        from ..masks.pruners import group_masks

        key = tuple(sorted((k, v) for k, v in plan.items() if v > 0))
        hit = self._masks_cache.get(key)
        if hit is not None:
            return hit
        merged: dict[str, Any] = {}
        overlap = False
        for k, s in key:
            part = self.set_masks(k, s)
            overlap |= bool(merged.keys() & part.keys())
            merged.update(part)
        if overlap:  # sets whose fixes touch the same layer (not seen): fix the whole plan's masks at once
            merged = {}
            for k, s in key:
                members = k.split("+")
                merged.update(zip(members, group_masks([self.modules[m] for m in members], float(s), "l1",
                                                       units=self.units.get(k))))
            merged = dict(fix_mask_conflict(merged, self.model, self.x, traced=self.graph))
        self._masks_cache[key] = merged
        return merged

    def n_units(self, key: str) -> int:
        """How many pruning units set ``key`` has (its channel count when a unit is one channel of each member)."""
        u = self.units.get(key)
        if u is not None:
            return max(max(x) for x in u if x) + 1
        from ..masks.layers import num_filters

        return num_filters(self.modules[key.split("+")[0]])

    def masked_of(self, plan: dict[str, float]) -> Any:
        """Per engine atom: masked by the plan's masks (the union of its sets' :meth:`set_atoms`)."""
        import numpy as np

        masked = np.zeros(self.cost.n_atoms, dtype=bool)
        for k, s in plan.items():
            if s > 0:
                masked |= self.set_atoms(k, s)
        return masked

    def removal_plan(self, plan: dict[str, float]) -> Any:
        """The removal plan of :meth:`masks_for` (PlanCost's planner: no planning from scratch per plan)."""
        return self.cost.removal_plan(self.masked_of(plan))

    def macs_of(self, plan: dict[str, float]) -> int:
        """The plan's exact effective MACs from its sets' masked atoms (:class:`prunescope.flops.plancost.PlanCost`:
        about a millisecond, no count from scratch)."""
        import numpy as np

        key = tuple(sorted((k, v) for k, v in plan.items() if v > 0))
        if not key:
            return int(self.dense.total_flops)
        hit = self._macs_cache.get(key)
        if hit is None:
            masked = np.zeros(self.cost.n_atoms, dtype=bool)
            for k, s in key:
                masked |= self.set_atoms(k, s)
            hit = self._macs_cache[key] = self.cost.macs(masked)
        return hit

    @property
    def reconstructing(self) -> bool:
        """Plans are measured and shipped reconstructed (calibration inputs given and ``reconstruct``)."""
        return self.reconstruct and self.calibrate is not None

    @property
    def plan_metric(self) -> str:
        return "reconstructed" if self.reconstructing else "as-pruned"

    def calibration(self) -> list[Any]:
        """The calibration batches, read once (``calibrate`` may be a function returning them)."""
        if self._calibration is None:
            from ..errors import ConfigError

            got = self.calibrate() if callable(self.calibrate) else self.calibrate
            try:
                self._calibration = list(got) if got is not None else []
            except TypeError:
                raise ConfigError(f"calibrate must be an iterable of input batches (or a function returning one), "
                                  f"got {type(got).__name__}") from None
        return self._calibration

    def fit_batches(self) -> list[Any]:
        """The first calibration batches, up to ``calibration_samples`` inputs: what every reconstruction fits on
        (the same inputs for every candidate plan and the shipped model)."""
        out, n = [], 0
        for b in self.calibration():
            if n >= self.calibration_samples:
                break
            out.append(b)
            n += _batch_len(b)
        return out

    def rebuilt(self, masks: dict[str, Any]) -> nn.Module:
        """The plan's shipped model before fine-tuning: shrunk, and refit by least squares when reconstructing."""
        import warnings

        from ..narrow import reconstruct, shrink

        if not masks:
            return copy.deepcopy(self.model)
        if not self.reconstructing:
            return shrink(self.model, masks, self.x, graph=self.graph, fix_conflicts=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-layer notes of the refit; the metric says how it went
            return reconstruct(self.model, masks, self.x, self.fit_batches(), graph=self.graph, fix_conflicts=False)

    def measure_plan(self, plan: dict[str, float]) -> float:
        """The metric the plan is chosen by: the reconstructed model's when reconstructing, else the masked model's
        as pruned (equal to the shrunk model's output). The as-pruned metric is measured either way (one more
        evaluation) and kept in :attr:`metrics`."""
        from ..narrow import as_pruned

        key = tuple(sorted((k, v) for k, v in plan.items() if v > 0))
        masks = self.masks_for(plan)
        with as_pruned(self.model, masks, plan=self.removal_plan(plan) if masks else None, graph=self.graph,
                       fix_conflicts=False):  # masks_for: conflict-free; the plan from PlanCost's planner
            ap = self.evaluate(self.model, f"plan {plan}")
        rec = None
        if self.reconstructing:
            rec = self.evaluate(self.rebuilt(masks), f"the reconstructed model of plan {plan}")
        self.metrics[key] = {"as_pruned": ap, "reconstructed": rec}
        return rec if rec is not None else ap

    def ship(self, plan: dict[str, float]) -> Shipped:
        """Shrink the plan's model (and reconstruct it when reconstructing) and measure it (metric, counts)."""
        from ..flops import flops_report
        from ..narrow import as_pruned

        key = tuple(sorted((k, v) for k, v in plan.items() if v > 0))
        masks = self.masks_for(plan)
        t = time.perf_counter()
        small = self.rebuilt(masks)
        seconds = time.perf_counter() - t
        rep = flops_report(small, self.x)
        if not self.reconstructing:
            return Shipped(dict(plan), masks, small, rep.total_flops, rep.total_params,
                           self.evaluate(small, f"the shrunk model of plan {plan}"), rep)
        ap = (self.metrics.get(key) or {}).get("as_pruned")
        if ap is None:
            with as_pruned(self.model, masks, graph=self.graph):
                ap = self.evaluate(self.model, f"plan {plan}")
        rec = self.evaluate(small, f"the reconstructed model of plan {plan}")
        return Shipped(dict(plan), masks, small, rep.total_flops, rep.total_params, float(ap), rep,
                       reconstructed=rec, reconstruct_seconds=seconds)


def step_cost(r: Run) -> None:
    from ..flops import flops_report
    from ..graph import trace

    r.graph = trace(r.model, r.x)
    r.dense = flops_report(r.model, r.x, graph=r.graph)
    r.metric_before = r.evaluate(r.model, "the dense model")
    r.say(f"[1/6] cost     {r.dense.total_flops:,} MACs, {r.dense.total_params:,} params, "
          f"{r.metric_name} {r.metric_before:.4f}")


def step_topology(r: Run) -> None:
    from ..topology import ChannelDependency, GroupDependency
    from . import prunable_sets

    r.cd = ChannelDependency(r.model, r.x, traced_model=r.graph, include_linear=True)
    r.gd = GroupDependency(r.model, r.x, traced_model=r.graph)
    r.sets, r.excluded, r.group_lcm = prunable_sets(r.model, r.graph, r.x)
    r.keys = ["+".join(s) for s in r.sets]
    r.cost = PlanCost(r.model, r.graph)
    from ..masks.units import channel_units, is_trivial

    for key, members in zip(r.keys, r.sets):
        units = channel_units(r.cd.atoms, members)
        r.units[key] = None if units is None or is_trivial(units) else [u.tolist() for u in units]
    r.say(f"[2/6] topology {len(r.cd.sets)} dependency sets, {len(r.sets)} prunable, "
          f"{sum(1 for v in r.gd.dependency.values() if v > 1)} group constraints, {len(r.excluded)} left alone")


def step_sensitivity(r: Run) -> None:
    from ..sensitivity import SensitivityAnalysis
    from . import borrowed, report_layer_types

    layer_types = report_layer_types()
    r.sa = SensitivityAnalysis(r.model, r.val_func, sparsities=r.sparsities, prune_type="l1",
                               layer_types=layer_types, group_dependencies=True, dummy_input=r.x,
                               workers=r.workers, progress=r.progress, as_pruned=True, graph=r.graph)
    with borrowed(r.model):
        sens = r.sa.analysis(val_args=[r.model], specified_layers=[s[0] for s in r.sets]) if r.sets else {}
    r.sens = {k: v for k, v in sens.items() if k in r.keys}
    r.say(f"[3/6] sensitivity {len(r.sens)} sets x {len(r.sa.sparsities)} sparsities "
          f"({sum(len(v) for v in r.sens.values()) + 1} evaluations)")


def _knapsack(r: Run, search: PlanSearch) -> Candidate | None:
    """The additive optimum: exact knapsack over single-set savings and losses, re-solved with a tighter budget
    until the exact count of the conflict-free masks meets the target.

    Savings of several sets do not add up exactly (a set's removed input channels are also counted in the
    other set's savings), so a plan whose additive saving ``A`` reaches the requirement ``R`` may miss the
    target by ``miss = c.macs - target``. The requirement grows by the miss, as many times as it takes to pass
    ``A``: the plan just tried stays the optimum for every requirement up to ``A``, so a smaller step returns it
    again (one step at a time repeated it until the 20 tries ran out). The re-solves are the ones one step at a
    time would reach, without the repeats. When no re-solve meets the exact target: ``None`` if the
    uniform plan meets it (the search starts from that), else the heaviest plan (with the note when it misses
    the target too)."""
    from ..plan import Option, solve

    base = r.dense.total_flops
    options: dict[str, list[Option]] = {}
    for key in r.keys:
        opts = []
        for s in search.grid.get(key, ()):
            opts.append(Option(float(s), base - r.macs_of({key: s}), search.loss(key, s)))
        if opts:
            options[key] = opts
    required = base - r.target_macs
    for _ in range(20):
        plan = solve(options, required)
        if plan is None:
            return _heaviest(r, search, options, "heaviest (target not reachable)")
        c = search.candidate({k: o.sparsity for k, o in plan.items()}, "knapsack (additive)")
        if search.feasible(c):
            return c
        additive = sum(o.saving for o in plan.values())
        miss = c.macs - r.target_macs  # > 0: savings were not additive; tighten by the miss and re-solve,
        required += miss * max(1, -(-(additive + 1 - required) // miss))  # skipping the steps that repeat c
    if r.uniform is not None:
        return None  # the uniform plan meets the target: the search starts from it
    return _heaviest(r, search, options, "heaviest (no knapsack plan met the exact count)")


def _heaviest(r: Run, search: PlanSearch, options: dict[str, Any], source: str) -> Candidate:
    """Every prunable set at its highest measured sparsity, with the note that the target cannot be reached
    (the plan's exact count: single-set savings do not add up)."""
    base = r.dense.total_flops
    c = search.candidate({k: max(v, key=lambda o: o.saving).sparsity for k, v in options.items()}, source)
    if search.feasible(c):
        return c
    r.note = (f"cannot reach the FLOPs target {r.flops_target:.0%}: pruning every prunable set at its "
              f"highest measured sparsity keeps {c.macs:,} of {base:,} MACs ({c.macs / max(1, base):.1%}, "
              f"saves {base - c.macs:,}); {len(r.excluded)} sets are left alone "
              "(unsafe or model outputs). Lower the target or add higher sparsities.")
    return c


def step_plan(r: Run) -> None:
    grid: dict[str, list[float]] = {}
    for members, key in zip(r.sets, r.keys):
        lcm = max(r.group_lcm.get(m, 1) for m in members)
        n = r.n_units(key)
        levels = []
        counts: set[int] = set()
        for s in sorted(r.sens.get(key, {})):
            pruned = int(n * float(s))  # NNI's rule: int(n * sparsity) filters (units)
            if lcm > 1 and pruned % lcm:
                continue  # would break a grouped convolution's divisibility
            if pruned == 0 or pruned in counts:
                continue  # the same masks as a lower level (few units, e.g. 4 heads): one option per count
            counts.add(pruned)
            levels.append(float(s))
        grid[key] = levels

    def loss(key: str, s: float) -> float:
        """The single-set loss at ``s``: measured on the sweep's grid, linear in between (0 at sparsity 0)."""
        curve = sorted((float(k), max(0.0, r.sign * (r.metric_before - float(v)))) for k, v in r.sens[key].items())
        pts = [(0.0, 0.0), *curve]
        for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
            if s0 <= s <= s1:
                return l0 + (l1 - l0) * (s - s0) / (s1 - s0) if s1 > s0 else l1
        return pts[-1][1]

    def common(s: float) -> dict[str, float]:
        """Every set at sparsity ``s``, rounded down to a filter count its group constraint allows."""
        plan = {}
        for members, key in zip(r.sets, r.keys):
            lcm = max(r.group_lcm.get(m, 1) for m in members)
            n = r.n_units(key)
            k = int(n * s)
            k -= k % lcm
            if k > 0:
                plan[key] = round(k / n + 1e-9, 6) if lcm > 1 else s
        return plan

    search = PlanSearch(r.keys, grid, loss, r.macs_of, r.measure_plan, r.metric_before, r.sign, r.target_macs,
                        budget=max(2, r.plan_evals))
    r.search = search
    from tqdm.auto import tqdm

    bar = tqdm(total=search.budget, desc="plan search", unit="plan", disable=not r.progress, leave=False)

    def shown(c: Candidate) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{c.source[:40]}: {c.measured:.4f}", refresh=False)

    search.on_measure = shown
    search.on_count = lambda n: bar.set_postfix_str(f"{n} plans counted", refresh=n % 10 == 0)
    try:
        _search(r, search, common)
    finally:
        bar.close()
    for cand in search.measured:
        got = r.metrics.get(tuple(sorted((k, v) for k, v in cand.plan.items() if v > 0)), {})
        cand.as_pruned, cand.reconstructed = got.get("as_pruned"), got.get("reconstructed")
    c = r.chosen
    assert c is not None
    if not r.keys:
        r.say(f"[4/6] plan     -- {r.note}")
        return
    r.say(f"[4/6] plan     {len(c.plan)} sets pruned, {c.macs:,} MACs "
          f"({c.macs / max(1, r.dense.total_flops):.1%} of dense, target {r.flops_target:.0%}); "
          f"{len(search.measured)} candidate plans measured, best: {c.source}"
          + (f" -- {r.note}" if r.note else ""))


def _search(r: Run, search: PlanSearch, common: Callable[[float], dict[str, float]]) -> None:
    if not r.keys:
        r.note = (f"nothing to prune: no prunable dependency set ({len(r.excluded)} left alone: unsafe or model "
                  "outputs); the model is shipped unpruned")
        r.chosen = search.candidate({}, "unpruned (nothing prunable)")
        search.run_measure(r.chosen)
        return
    r.uniform = search.uniform(common)
    r.knapsack = _knapsack(r, search)
    if r.note:  # the target cannot be met: ship the heaviest plan, no search
        r.chosen = r.knapsack
        if r.chosen is not None:
            search.run_measure(r.chosen)
    else:
        r.chosen = search.run([c for c in (r.uniform, r.knapsack) if c is not None])
        if r.knapsack is None:
            r.note = ("no knapsack plan: 20 re-solves with a tighter budget all missed the exact MACs target (the "
                      "sets' savings overlap); the plan was searched from the uniform plan")


def step_verify(r: Run) -> None:
    from tqdm.auto import tqdm

    assert r.chosen is not None
    bar = tqdm(total=3, desc="verify", unit="step", disable=not r.progress, leave=False)
    try:
        _verify(r, bar)
    finally:
        bar.close()


def _verify(r: Run, bar: Any) -> None:
    from ..flops import flops_report
    from ..narrow.latency import measure_latency

    assert r.chosen is not None
    bar.set_postfix_str("the plan's model", refresh=True)
    r.shipped = ship = r.ship(r.chosen.plan)
    bar.update(1)
    eff = flops_report(r.model, r.x, graph=r.graph, masks=ship.masks, effective=True) if ship.masks else r.dense
    if (ship.flops, ship.params) != (eff.total_flops, eff.total_params):
        r.note = (r.note + " " if r.note else "") + (
            f"the shrunk model counts {ship.flops:,} MACs / {ship.params:,} params, the effective count said "
            f"{eff.total_flops:,} / {eff.total_params:,}")
    if r.chosen.macs != eff.total_flops:  # the search's per-set count (PlanCost) against a count from scratch
        r.note = (r.note + " " if r.note else "") + (
            f"the plan search counted {r.chosen.macs:,} MACs for this plan, the effective count of its masks "
            f"says {eff.total_flops:,}")
    bar.set_postfix_str("the uniform baseline's model", refresh=True)
    if r.uniform is not None:
        r.baseline = r.ship(r.uniform.plan)
    bar.update(1)
    bar.set_postfix_str("latency", refresh=True)
    models = {"dense": r.model, "plan": ship.model}
    if r.baseline is not None:
        models["uniform"] = r.baseline.model
    ms = measure_latency(models, r.x)
    r.latency_dense_ms = ms["dense"]
    ship.latency_ms = ms["plan"]
    if r.baseline is not None:
        r.baseline.latency_ms = ms["uniform"]
    bar.update(1)
    if r.reconstructing:
        base = r.baseline
        uni = (f"; uniform {r.uniform.source.split()[-1]}: {base.metric:.4f} -> {base.reconstructed:.4f} at "
               f"{base.flops:,} MACs" if base is not None and r.uniform is not None else "")
        r.say(f"[5/6] verify   {r.metric_name} (shrunk models, as pruned -> reconstructed from "
              f"{sum(_batch_len(b) for b in r.fit_batches())} unlabeled inputs): before {r.metric_before:.4f}, "
              f"plan {ship.metric:.4f} -> {ship.reconstructed:.4f} (predicted {r.chosen.predicted:.4f}){uni}; "
              f"CPU latency {ms['dense']:.2f} -> {ms['plan']:.2f} ms")
        return
    uni = (f"; uniform {r.uniform.source.split()[-1]}: {r.baseline.metric:.4f} at {r.baseline.flops:,} MACs"
           if r.baseline is not None and r.uniform is not None else "")
    r.say(f"[5/6] verify   {r.metric_name} (shrunk models): before {r.metric_before:.4f}, plan predicted "
          f"{r.chosen.predicted:.4f}, measured {ship.metric:.4f}{uni}; CPU latency {ms['dense']:.2f} -> "
          f"{ms['plan']:.2f} ms")


def _batch_len(b: Any) -> int:
    t = b if hasattr(b, "shape") else next((v for v in (b.values() if isinstance(b, dict) else b)
                                            if hasattr(v, "shape")), None)
    return int(t.shape[0]) if t is not None and len(t.shape) else 1


def _recover(r: Run, ship: Shipped, what: str) -> list[str]:
    """The recovery of one shipped model, in order: least-squares reconstruction (done when it was built, see
    :meth:`Run.ship`) -> BatchNorm re-estimation (only without reconstruction: the refit already targets the
    dense model's statistics) -> fine-tuning; each step measured into ``ship.recovery``. Returns the parts of
    the console line."""
    from .recovery import recalibrate_bn

    parts = []
    if ship.reconstructed is not None:
        n = sum(_batch_len(b) for b in r.fit_batches())
        ship.recovery.append((f"least-squares reconstruction ({n} unlabeled inputs)", ship.reconstructed,
                              ship.reconstruct_seconds))
        parts.append(f"reconstructed {ship.reconstructed:.4f}")
    elif r.calibrate is not None:
        t = time.perf_counter()
        n = recalibrate_bn(ship.model, r.calibration())
        if n:
            value = r.evaluate(ship.model, f"the {what} after BatchNorm re-estimation")
            ship.recovery.append((f"BatchNorm re-estimation ({n} batches)", value, time.perf_counter() - t))
            parts.append(f"calibrated {value:.4f}")
        else:  # no BatchNorm (e.g. LayerNorm only): nothing was re-estimated, no step to report
            parts.append("no BatchNorm to re-estimate")
    if r.finetune is not None:
        t = time.perf_counter()
        r.finetune(ship.model)
        value = r.evaluate(ship.model, f"the {what} after fine-tuning")
        ship.recovery.append(("fine-tuning", value, time.perf_counter() - t))
        parts.append(f"fine-tuned {value:.4f}")
    return parts


def step_recover(r: Run) -> None:
    """Recovery of the shrunk model (reconstruction, BatchNorm re-estimation, fine-tuning), each measured; the
    result is shipped. The uniform baseline gets the same recovery, so the comparison holds after it too."""
    assert r.shipped is not None
    r.final = r.shipped.model
    r.recovery = r.shipped.recovery
    if r.calibrate is None and r.finetune is None:
        r.say("[6/6] recover  (no --calibrate / --finetune given: the shrunk model is shipped as it is)")
        return
    parts = _recover(r, r.shipped, "shrunk model")
    uni = ""
    if r.baseline is not None:
        _recover(r, r.baseline, "uniform baseline")
        uni = f"; uniform after the same recovery {r.baseline.final:.4f}"
    for c, sh in ((r.chosen, r.shipped), (r.uniform, r.baseline)):
        if c is not None and sh is not None:
            c.finetuned = next((v for st, v, _ in sh.recovery if st == "fine-tuning"), None)
    r.say(f"[6/6] recover  {r.metric_name}: shrunk {r.shipped.metric:.4f}, " + ", ".join(parts)
          + f" ({sum(s for _, _, s in r.recovery):.1f} s){uni}")


STEPS = (step_cost, step_topology, step_sensitivity, step_plan, step_verify, step_recover)
