"""The stages of ``prunescope report``, in order (see the package docs): each takes the records of the stages
before it (and the shared :class:`~prunescope.report.context.Context`) and returns its own record.

    dense_cost -> topology -> sweep -> choose -> verify -> recover -> summarize
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..flops import flops_report
from ..graph import ModelGraph, trace
from ..knapsack import Option, solve
from ..masks.pruners import transposed_linear_types
from ..masks.units import is_trivial
from ..narrow import as_pruned, reconstruct, shrink
from ..narrow.latency import time_models
from ..narrow.prunable import Prunable
from ..narrow.prunable import prunable_sets as _prunable_sets
from ..sensitivity import SensitivityAnalysis
from ..sensitivity.analysis import parse_sparsities
from ..topology import ChannelDependency, GroupDependency
from .context import Context, borrowed
from .plans import PlanMasks
from .records import (
    CandidateRecord,
    Choice,
    DenseCost,
    PlanMetrics,
    PrunableSet,
    Recovered,
    Recovery,
    RecoveryStep,
    Shipped,
    Summary,
    Sweep,
    Topology,
    Verification,
    plan_key,
)
from .recovery import recalibrate_bn
from .search import Candidate, PlanSearch

__all__ = ["dense_cost", "topology", "plan_masks",
           "sweep", "choose", "verify", "recover", "summarize", "report_layer_types",
           "report_prunable",
           "proxy_fit", "PREDICTION", "SPARSITY_UNIT", "LATENCY_BUDGET_S"]

PREDICTION = ("predicted before its own measurement as a first-order step from the nearest plan Q measured before "
              "it: measured(Q) − Σ_k w_k · (l_k(plan) − l_k(Q)), l_k = set k's single-set loss from the sweep, w_k "
              "= per-set interaction factors fitted by least squares on the plans measured so far (the first "
              "plan: the additive prediction)")
#: the verification's latency timing: at most this many seconds per model timed (and at least 3 runs each), so
#: that a large model's timing stays short; the page says when it cut the runs
LATENCY_BUDGET_S = 0.25
SPARSITY_UNIT = ("a fraction of each set's pruning units (channel-engine classes: a channel of every member, an "
                 "attention head or kv group, an MLP unit)")


def report_layer_types() -> tuple[type[nn.Module], ...]:
    """The layer types the report prunes: convolutions, Linear, and Hugging Face ``Conv1D`` (GPT-2's
    transposed linear) when ``transformers`` is loaded."""
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *transposed_linear_types())


def _report_layer(m: nn.Module | None) -> bool:
    return m is not None and isinstance(m, report_layer_types())


def report_prunable(model: nn.Module, graph: ModelGraph, x: Any) -> Prunable:
    """The prunable sets as the report sees them: :func:`prunescope.narrow.prunable.prunable_sets` with members
    limited to :func:`report_layer_types` (computed once per report, in :func:`topology`)."""
    return _prunable_sets(model, graph, x, layer_ok=_report_layer)


# ---------------------------------------------------------------------------------------------- 1. dense cost
def dense_cost(ctx: Context) -> DenseCost:
    """Trace the model once (every later stage reuses the trace), count its MACs/params, measure its metric."""
    with ctx.steps("cost", ["tracing", "counting MACs", "the dense model's metric"]) as step:
        step()
        graph = trace(ctx.model, ctx.x)
        step()
        rep = flops_report(ctx.model, ctx.x, graph=graph)
        step()
        metric = ctx.evaluate(ctx.model, "the dense model")
    ctx.say(f"[1/6] cost     {rep.total_flops:,} MACs, {rep.total_params:,} params, {ctx.metric_name} {metric:.4f}")
    return DenseCost(graph, rep, metric, ctx.device)


# ---------------------------------------------------------------------------------------------- 2. topology
def topology(ctx: Context, dense: DenseCost) -> Topology:
    """Dependency sets (conv + linear, group constraints) and which of them may be pruned
    (:func:`prunescope.narrow.prunable.prunable_sets`, members limited to :func:`report_layer_types`)."""
    with ctx.steps("topology", ["dependency sets", "group constraints", "prunable sets (shrink probe)"]) as step:
        step()
        cd = ChannelDependency(ctx.model, ctx.x, traced_model=dense.graph, include_linear=True)
        step()
        gd = GroupDependency(ctx.model, ctx.x, traced_model=dense.graph)
        step()
        p = report_prunable(ctx.model, dense.graph, ctx.x)
    numbers = {tuple(st): i + 1 for i, st in enumerate(cd.sets)}
    sets = []
    for members in p.sets:
        name = "+".join(members)
        units = p.units[name]
        trivial = is_trivial(units)
        n = int(len(units[0])) if trivial else int(max(int(u.max()) for u in units if len(u)) + 1)
        sets.append(PrunableSet(tuple(members), n, max(p.groups.get(m, 1) for m in members),
                                None if trivial else tuple(tuple(int(v) for v in u) for u in units),
                                numbers.get(tuple(members))))
    topo = Topology(tuple(tuple(st) for st in cd.sets), tuple(sets), dict(p.excluded), cd, gd, p)
    ctx.say(f"[2/6] topology {len(cd.sets)} dependency sets, {len(sets)} prunable, "
            f"{topo.group_constraints} group constraints, {len(p.excluded)} left alone")
    return topo


# ---------------------------------------------------------------------------------------------- 3. sweep
def plan_masks(ctx: Context, dense: DenseCost, topo: Topology) -> PlanMasks:
    """The masks of every plan, units ranked by ``ctx.score`` (a data-aware score from the reconstruction's
    calibration inputs): what the sweep, the plan search, the verification and the shipped model all use."""
    return PlanMasks(ctx.model, ctx.x, dense, topo, score=ctx.score,
                     calibration=ctx.fit_batches() if ctx.score != "l1" else None)


def sweep(ctx: Context, dense: DenseCost, topo: Topology, sparsities: Sequence[float] | None = None,
          workers: int | None = None, plans: PlanMasks | None = None) -> Sweep:
    """Every prunable set pruned alone at each sparsity, measured as the plan search will measure it.

    As pruned with L1 units (no calibration inputs, or ``reconstruct_sweep=False``): NNI's
    :class:`~prunescope.SensitivityAnalysis` (the same units in every member; workers, its CSV). When the report
    reconstructs, or ranks units by a data-aware score, every point is the plan search's own masks of that set
    alone (:meth:`PlanMasks.set_masks`) measured on the model the search measures: the reconstructed one
    (shrunk, the layers that lost channels refit to the dense model: the set's members and their readers), or
    as pruned. Sparsities that remove the same unit count are measured once; none removed is the dense metric."""
    if ctx.sweep_metric == "as-pruned" and ctx.score == "l1":
        sa = SensitivityAnalysis(ctx.model, ctx.val_func, sparsities=sparsities, prune_type="l1",
                                 layer_types=report_layer_types(), group_dependencies=True, dummy_input=ctx.x,
                                 workers=workers, progress=ctx.progress, as_pruned=True, graph=dense.graph,
                                 prunable=topo.prunable)  # computed once, by the topology stage
        with borrowed(ctx.model, ctx.state()):  # the snapshot every lending of the report compares against
            got = sa.analysis(val_args=[ctx.model], specified_layers=[s.members[0] for s in topo.sets]) \
                if topo.sets else {}
        names = set(topo.names)
        curves = {k: v for k, v in got.items() if k in names}
        ctx.say(f"[3/6] sensitivity {len(curves)} sets x {len(sa.sparsities)} sparsities "
                f"({sum(len(v) for v in curves.values()) + 1} evaluations, as pruned, L1 units)")
        return Sweep(tuple(float(s) for s in sa.sparsities), curves, sa, "as-pruned", "l1", sa.ori_metric)
    plans = plans if plans is not None else plan_masks(ctx, dense, topo)
    levels = parse_sparsities(sparsities)
    curves: dict[str, dict[float, float]] = {}
    seen: dict[tuple[str, int], float] = {}
    rebuilt = ctx.sweep_metric == "reconstructed"
    bar = ctx.bar(len(topo.sets) * len(levels), "sensitivity", "point")
    evaluations = 0
    t0 = time.perf_counter()
    try:
        for st in topo.sets:
            curve = curves[st.name] = {}
            for sp in levels:
                count = int(st.n_units * sp)
                hit = seen.get((st.name, count))
                if hit is None:
                    if count == 0:
                        hit = dense.metric  # nothing removed: the dense model
                    else:
                        bar.set_postfix_str(f"{st.label} @ {sp}", refresh=False)
                        hit = _sweep_point(ctx, dense, plans, st.name, sp, rebuilt)
                        evaluations += 1
                    seen[(st.name, count)] = hit
                curve[sp] = hit
                bar.update(1)
    finally:
        bar.close()
    what = ("reconstructed models (shrunk, refit by least squares from "
            f"{ctx.fit_inputs()} unlabeled inputs)" if rebuilt else "as-pruned models")
    unused = "; workers are not used by this sweep" if workers else ""
    ctx.say(f"[3/6] sensitivity {len(curves)} sets x {len(levels)} sparsities ({evaluations} evaluations of "
            f"{what}, {_SCORE_NAMES[plans.score]} units, {time.perf_counter() - t0:.1f} s{unused})")
    return Sweep(tuple(levels), curves, None, ctx.sweep_metric, plans.score, dense.metric)


_SCORE_NAMES = {"l1": "L1", "activation": "activation-weighted (|W|·‖X‖)",
                "reconstruction": "reconstruction-error (greedy refit)"}


def _sweep_point(ctx: Context, dense: DenseCost, plans: PlanMasks, name: str, sparsity: float, rebuilt: bool
                 ) -> float:
    """Set ``name`` alone at ``sparsity``: its plan masks, measured reconstructed (``rebuilt``) or as pruned."""
    plan = {name: sparsity}
    masks = plans.masks_for(plan)
    if rebuilt:
        return ctx.evaluate(_rebuilt(ctx, dense, masks), f"the reconstructed model of set {name} at {sparsity}")
    return _as_pruned_metric(ctx, dense, plans, plan, masks, f"set {name} at sparsity {sparsity}")


def _as_pruned_metric(ctx: Context, dense: DenseCost, plans: PlanMasks, plan: dict[str, float],
                      masks: dict[str, Any], what: str) -> float:
    """The user's model evaluated with ``plan``'s masks applied as pruned: ``masks`` from
    :meth:`PlanMasks.masks_for` (conflict-free, so no fix), the removal plan from PlanCost's planner."""
    return ctx.evaluate(ctx.model, what,
                        within=lambda: as_pruned(ctx.model, masks, plan=plans.removal_plan(plan) if masks else None,
                                                 graph=dense.graph, fix_conflicts=False))


# ---------------------------------------------------------------------------------------------- 4. choice
def _rebuilt(ctx: Context, dense: DenseCost, masks: dict[str, Any]) -> nn.Module:
    """The plan's shipped model before fine-tuning: shrunk, and refit by least squares when reconstructing."""
    if not masks:
        return copy.deepcopy(ctx.model)
    if not ctx.reconstructing:
        return shrink(ctx.model, masks, ctx.x, graph=dense.graph, fix_conflicts=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-layer notes of the refit; the metric says how it went
        return reconstruct(ctx.model, masks, ctx.x, ctx.fit_batches(), graph=dense.graph, fix_conflicts=False)


def _grid(sweep_: Sweep, topo: Topology) -> dict[str, list[float]]:
    """Per set, the sweep's sparsities that remove a distinct, non-zero unit count its group constraint allows."""
    grid: dict[str, list[float]] = {}
    for s in topo.sets:
        levels, counts = [], set()
        for sp in sorted(sweep_.curves.get(s.name, {})):
            pruned = int(s.n_units * float(sp))  # NNI's rule: int(n * sparsity) filters (units)
            if s.group_lcm > 1 and pruned % s.group_lcm:
                continue  # would break a grouped convolution's divisibility
            if pruned == 0 or pruned in counts:
                continue  # the same masks as a lower level (few units, e.g. 4 heads): one option per count
            counts.add(pruned)
            levels.append(float(sp))
        grid[s.name] = levels
    return grid


def _loss_of(ctx: Context, dense: DenseCost, sweep_: Sweep) -> Callable[[str, float], float]:
    def loss(name: str, s: float) -> float:
        """The single-set loss at ``s``: measured on the sweep's grid, linear in between (0 at sparsity 0)."""
        curve = sorted((float(k), max(0.0, ctx.sign * (dense.metric - float(v))))
                       for k, v in sweep_.curves[name].items())
        pts = [(0.0, 0.0), *curve]
        for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
            if s0 <= s <= s1:
                return l0 + (l1 - l0) * (s - s0) / (s1 - s0) if s1 > s0 else l1
        return pts[-1][1]

    return loss


def _common(topo: Topology) -> Callable[[float], dict[str, float]]:
    def common(s: float) -> dict[str, float]:
        """Every set at sparsity ``s``, rounded down to a unit count its group constraint allows."""
        plan = {}
        for st in topo.sets:
            k = int(st.n_units * s)
            k -= k % st.group_lcm
            if k > 0:
                plan[st.name] = round(k / st.n_units + 1e-9, 6) if st.group_lcm > 1 else s
        return plan

    return common


def knapsack_plan(search: PlanSearch, plans: Any, names: list[str], dense_macs: int, target: int,
              fallback: bool) -> Candidate | None:
    """The additive optimum: exact knapsack over single-set savings and losses, re-solved with a tighter budget
    until the exact count of the conflict-free masks meets the target. When no re-solve meets the exact count:
    ``None`` if not ``fallback`` (the uniform plan meets the target: the search starts from it), else the
    heaviest plan; the heaviest plan too when even the largest savings cannot reach the target (the caller
    checks whether it meets the target).

    Savings of several sets do not add up exactly (a set's removed input channels are also counted in the
    other set's savings), so a plan whose additive saving ``A`` reaches the requirement ``R`` may miss the
    target by ``miss = c.macs - target``. The requirement grows by the miss, as many times as it takes to pass
    ``A``: the plan just tried stays the optimum for every requirement up to ``A``, so a smaller step returns it
    again. The re-solves are the ones one step at a time would reach, without the repeats."""
    options: dict[str, list[Option]] = {}
    for name in names:
        opts = [Option(float(s), dense_macs - plans.macs_of({name: s}), search.loss(name, s))
                for s in search.grid.get(name, ())]
        if opts:
            options[name] = opts
    required = dense_macs - target
    for _ in range(20):
        plan = solve(options, required)
        if plan is None:
            return _heaviest(search, options, "heaviest (target not reachable)")
        c = search.candidate({k: o.sparsity for k, o in plan.items()}, "knapsack (additive)")
        if search.feasible(c):
            return c
        additive = sum(o.saving for o in plan.values())
        miss = c.macs - target  # > 0: savings were not additive; tighten by the miss and re-solve,
        required += miss * max(1, -(-(additive + 1 - required) // miss))  # skipping the steps that repeat c
    if not fallback:
        return None
    return _heaviest(search, options, "heaviest (no knapsack plan met the exact count)")


def _heaviest(search: PlanSearch, options: dict[str, list[Option]], source: str) -> Candidate:
    """Every prunable set at its highest measured sparsity (the plan's exact count: savings do not add up)."""
    return search.candidate({k: max(v, key=lambda o: o.saving).sparsity for k, v in options.items()}, source)


def _infeasible(ctx: Context, c: Candidate, dense_macs: int, topo: Topology) -> str:
    return infeasible_reason(ctx.flops_target, c, dense_macs, len(topo.excluded))


def infeasible_reason(flops_target: float, c: Candidate, dense_macs: int, n_excluded: int) -> str:
    """Why the target cannot be met, with the heaviest plan ``c``'s exact count."""
    return (f"cannot reach the FLOPs target {flops_target:.0%}: pruning every prunable set at its "
            f"highest measured sparsity keeps {c.macs:,} of {dense_macs:,} MACs ({c.macs / max(1, dense_macs):.1%}, "
            f"saves {dense_macs - c.macs:,}); {n_excluded} sets are left alone "
            "(unsafe or model outputs). Lower the target or add higher sparsities.")


def choose(ctx: Context, dense: DenseCost, topo: Topology, sweep_: Sweep, plans: PlanMasks,
           plan_evals: int = 16) -> Choice:
    """The plan: the uniform plan and the knapsack optimum, then a local search around the best measured plan
    (:class:`~prunescope.report.search.PlanSearch`), every candidate measured as it would ship."""
    target = int(math.floor(ctx.flops_target * dense.macs))
    metrics: dict[Any, PlanMetrics] = {}

    def measure(plan: dict[str, float]) -> float:
        """The metric the plan is chosen by: the reconstructed model's when reconstructing, else the masked
        model's as pruned (equal to the shrunk model's output). The as-pruned metric is measured either way."""
        masks = plans.masks_for(plan)
        ap = _as_pruned_metric(ctx, dense, plans, plan, masks, f"plan {plan}")
        rec = ctx.evaluate(_rebuilt(ctx, dense, masks), f"the reconstructed model of plan {plan}") \
            if ctx.reconstructing else None
        metrics[plan_key(plan)] = PlanMetrics(ap, rec)
        return rec if rec is not None else ap

    names = topo.names
    search = PlanSearch(names, _grid(sweep_, topo), _loss_of(ctx, dense, sweep_), plans.macs_of, measure,
                        dense.metric, ctx.sign, target, budget=max(2, plan_evals))
    bar = ctx.bar(search.budget, "plan search", "plan")

    def shown(c: Candidate) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{c.source[:40]}: {c.measured:.4f}", refresh=False)

    search.on_measure = shown
    search.on_count = lambda n: bar.set_postfix_str(f"{n} plans counted", refresh=n % 10 == 0)
    uniform = knapsack = None
    infeasible, notes = None, []
    try:
        if not names:
            notes.append(f"nothing to prune: no prunable dependency set ({len(topo.excluded)} left alone: unsafe or "
                         "model outputs); the model is shipped unpruned")
            chosen = search.run_measure(search.candidate({}, "unpruned (nothing prunable)"))
        else:
            uniform = search.uniform(_common(topo))
            knapsack = knapsack_plan(search, plans, names, dense.macs, target, fallback=uniform is None)
            if knapsack is not None and not search.feasible(knapsack):  # the target cannot be met
                infeasible = _infeasible(ctx, knapsack, dense.macs, topo)
                chosen = search.run_measure(knapsack)
            else:
                best = search.run([c for c in (uniform, knapsack) if c is not None])
                assert best is not None
                chosen = best
                if knapsack is None:
                    notes.append("no knapsack plan: 20 re-solves with a tighter budget all missed the exact MACs "
                                 "target (the sets' savings overlap); the plan was searched from the uniform plan")
    finally:
        bar.close()
    for cand in search.measured:
        got = metrics.get(plan_key(cand.plan))
        if got is not None:
            cand.as_pruned, cand.reconstructed = got.as_pruned, got.reconstructed
    choice = Choice(chosen, knapsack, uniform, search, metrics, target, infeasible, tuple(notes))
    note = " ".join(([infeasible] if infeasible else []) + notes)
    if not names:
        ctx.say(f"[4/6] plan     -- {note}")
    else:
        ctx.say(f"[4/6] plan     {len(chosen.plan)} sets pruned, {chosen.macs:,} MACs "
                f"({chosen.macs / max(1, dense.macs):.1%} of dense, target {ctx.flops_target:.0%}); "
                f"{len(search.measured)} candidate plans measured, best: {chosen.source}"
                + (f" -- {note}" if note else ""))
    return choice


# ---------------------------------------------------------------------------------------------- 5. verify
def _ship(ctx: Context, dense: DenseCost, plans: PlanMasks, choice: Choice, plan: dict[str, float]) -> Shipped:
    """Shrink the plan's model (and reconstruct it when reconstructing) and measure it (metric, counts)."""
    masks = plans.masks_for(plan)
    t = time.perf_counter()
    small = _rebuilt(ctx, dense, masks)
    seconds = time.perf_counter() - t
    rep = flops_report(small, ctx.x)
    if not ctx.reconstructing:
        return Shipped(dict(plan), masks, small, rep.total_flops, rep.total_params,
                       ctx.evaluate(small, f"the shrunk model of plan {plan}"), rep)
    known = choice.metrics.get(plan_key(plan))
    if known is not None:
        ap = known.as_pruned
    else:
        ap = ctx.evaluate(ctx.model, f"plan {plan}", within=lambda: as_pruned(ctx.model, masks, graph=dense.graph))
    rec = ctx.evaluate(small, f"the reconstructed model of plan {plan}")
    return Shipped(dict(plan), masks, small, rep.total_flops, rep.total_params, float(ap), rep,
                   reconstructed=rec, reconstruct_seconds=seconds)


def verify(ctx: Context, dense: DenseCost, plans: PlanMasks, choice: Choice) -> Verification:
    """The chosen plan and the uniform baseline as physically smaller models: counts checked against the
    effective count, metrics measured, CPU latency next to the dense model's (interleaved runs, at most
    :data:`LATENCY_BUDGET_S` per model). A plan equal to the uniform one is shrunk, measured and timed once."""
    bar = ctx.bar(3, "verify")
    notes: list[str] = []
    try:
        bar.set_postfix_str("the plan's model", refresh=True)
        ship = _ship(ctx, dense, plans, choice, choice.chosen.plan)
        bar.update(1)
        eff = flops_report(ctx.model, ctx.x, graph=dense.graph, masks=ship.masks, effective=True) \
            if ship.masks else dense.report
        if (ship.flops, ship.params) != (eff.total_flops, eff.total_params):
            notes.append(f"the shrunk model counts {ship.flops:,} MACs / {ship.params:,} params, the effective "
                         f"count said {eff.total_flops:,} / {eff.total_params:,}")
        if choice.chosen.macs != eff.total_flops:  # the search's per-set count (PlanCost) against a fresh count
            notes.append(f"the plan search counted {choice.chosen.macs:,} MACs for this plan, the effective count "
                         f"of its masks says {eff.total_flops:,}")
        bar.set_postfix_str("the uniform baseline's model", refresh=True)
        same = choice.uniform is not None and plan_key(choice.uniform.plan) == plan_key(choice.chosen.plan)
        if same:  # the plan is the uniform one: the same shrunk model, measured once; a copy of its own to recover
            base = dataclasses.replace(ship, model=copy.deepcopy(ship.model))
        else:
            base = _ship(ctx, dense, plans, choice, choice.uniform.plan) if choice.uniform is not None else None
        bar.update(1)
        bar.set_postfix_str("latency", refresh=True)
        models = {"dense": ctx.model, "plan": ship.model}
        if base is not None and not same:
            models["uniform"] = base.model
        lat = time_models(models, ctx.x, runs=15, warmup=1, per_model_s=LATENCY_BUDGET_S)
        ms = lat.ms
        bar.update(1)
    finally:
        bar.close()
    ship = _with_latency(ship, ms["plan"])
    base = _with_latency(base, ms["plan"] if same else ms["uniform"]) if base is not None else None
    v = Verification(ship, base, ms["dense"], ctx.fit_inputs(), tuple(notes), lat.runs,
                     LATENCY_BUDGET_S if lat.capped else None)
    chosen = choice.chosen
    if ctx.reconstructing:
        uni = (f"; uniform {choice.uniform.source.split()[-1]}: {base.metric:.4f} -> {base.reconstructed:.4f} at "
               f"{base.flops:,} MACs" if base is not None and choice.uniform is not None else "")
        ctx.say(f"[5/6] verify   {ctx.metric_name} (shrunk models, as pruned -> reconstructed from "
                f"{v.calibration_inputs} unlabeled inputs): before {dense.metric:.4f}, "
                f"plan {ship.metric:.4f} -> {ship.reconstructed:.4f} (predicted {chosen.predicted:.4f}){uni}; "
                f"CPU latency {ms['dense']:.2f} -> {ms['plan']:.2f} ms")
    else:
        uni = (f"; uniform {choice.uniform.source.split()[-1]}: {base.metric:.4f} at {base.flops:,} MACs"
               if base is not None and choice.uniform is not None else "")
        ctx.say(f"[5/6] verify   {ctx.metric_name} (shrunk models): before {dense.metric:.4f}, plan predicted "
                f"{chosen.predicted:.4f}, measured {ship.metric:.4f}{uni}; CPU latency {ms['dense']:.2f} -> "
                f"{ms['plan']:.2f} ms")
    return v


def _with_latency(s: Shipped, ms: float) -> Shipped:
    return dataclasses.replace(s, latency_ms=ms)


# ---------------------------------------------------------------------------------------------- 6. recover
def _run_finetune(ctx: Context, model: nn.Module, what: str) -> None:
    """``finetune(model)``; a function that takes ``log`` gets the console for its progress lines."""
    fn = ctx.finetune
    assert fn is not None
    try:
        takes_log = "log" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or a callable without a signature
        takes_log = False
    ctx.say(f"  fine-tuning the {what} ...")
    if takes_log and ctx.console is not None:
        fn(model, log=ctx.console)  # type: ignore[call-arg]
    else:
        fn(model)


def _recover_one(ctx: Context, ship: Shipped, what: str) -> tuple[Recovered, list[str]]:
    """The recovery of one shipped model, in order: least-squares reconstruction (done when it was built) ->
    BatchNorm re-estimation (only without reconstruction: the refit already targets the dense model's
    statistics) -> fine-tuning; each step measured. Returns the record and the parts of the console line."""
    steps: list[RecoveryStep] = []
    parts = []
    if ship.reconstructed is not None:
        n = ctx.fit_inputs()
        steps.append(RecoveryStep("reconstruct", f"least-squares reconstruction ({n} unlabeled inputs)",
                                  ship.reconstructed, ship.reconstruct_seconds))
        parts.append(f"reconstructed {ship.reconstructed:.4f}")
    elif ctx.calibrate is not None:
        t = time.perf_counter()
        before = _snapshot(ship.model)
        n = recalibrate_bn(ship.model, ctx.calibration())
        if n:
            value = ctx.evaluate(ship.model, f"the {what} after BatchNorm re-estimation")
            steps.append(_keep_or_undo(ctx, ship, steps, before, RecoveryStep(
                "batchnorm", f"BatchNorm re-estimation ({n} batches)", value, time.perf_counter() - t)))
            parts.append(f"calibrated {value:.4f}" + ("" if steps[-1].kept else " (worse: undone)"))
        else:  # no BatchNorm (e.g. LayerNorm only): nothing was re-estimated, no step to report
            parts.append("no BatchNorm to re-estimate")
    if ctx.finetune is not None:
        t = time.perf_counter()
        before = _snapshot(ship.model)
        _run_finetune(ctx, ship.model, what)
        value = ctx.evaluate(ship.model, f"the {what} after fine-tuning")
        steps.append(_keep_or_undo(ctx, ship, steps, before,
                                   RecoveryStep("finetune", "fine-tuning", value, time.perf_counter() - t)))
        parts.append(f"fine-tuned {value:.4f}" + ("" if steps[-1].kept else " (worse: undone)"))
    return Recovered(ship, tuple(steps)), parts


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (a recovery step that lowers the metric is undone from it)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _keep_or_undo(ctx: Context, ship: Shipped, steps: list[RecoveryStep], before: dict[str, torch.Tensor],
                  step: RecoveryStep) -> RecoveryStep:
    """``step`` as measured, or, when it made the metric worse than the model before it, the same step marked
    not kept and the model's tensors put back: what ships is the best of the models the recovery measured in
    order, each on the user's validation function (the step stays on the page and in ``summary.json``)."""
    prev = next((s.metric for s in reversed(steps) if s.kept), ship.metric)
    if ctx.sign * (step.metric - prev) >= 0:
        return step
    ship.model.load_state_dict(before)
    ctx.say(f"  {step.label} lowered {ctx.metric_name} ({prev:.4f} -> {step.metric:.4f}): undone, the model "
            "before it ships")
    return dataclasses.replace(step, kept=False)


def recover(ctx: Context, v: Verification) -> Recovery:
    """Recovery of the shrunk model (reconstruction, BatchNorm re-estimation, fine-tuning), each measured; the
    result is shipped. The uniform baseline gets the same recovery, so the comparison holds after it too."""
    if ctx.calibrate is None and ctx.finetune is None:
        ctx.say("[6/6] recover  (no --calibrate / --finetune given: the shrunk model is shipped as it is)")
        return Recovery(Recovered(v.shipped), Recovered(v.baseline) if v.baseline is not None else None)
    plan, parts = _recover_one(ctx, v.shipped, "shrunk model")
    base = None
    uni = ""
    if v.baseline is not None:
        base, _ = _recover_one(ctx, v.baseline, "uniform baseline")
        uni = f"; uniform after the same recovery {base.final:.4f}"
    ctx.say(f"[6/6] recover  {ctx.metric_name}: shrunk {v.shipped.metric:.4f}, " + ", ".join(parts)
            + f" ({sum(s.seconds for s in plan.steps):.1f} s){uni}")
    return Recovery(plan, base)


# ---------------------------------------------------------------------------------------------- 7. summary
def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); ``None`` below 3 pairs or for a constant side."""
    if len(a) < 3:
        return None

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else round(cov / (va * vb) ** 0.5, 4)


def proxy_fit(rows: Sequence[CandidateRecord], sign: float) -> dict[str, Any]:
    """How well the metric the plan was chosen by predicted the final one, over the measured candidates:
    the search's prediction against the measured (chosen-by) metric over all of them, and the chosen-by metric
    (and the as-pruned one) against the final metric (after the full recovery) over those recovered with
    fine-tuning. ``proxy_final_same_order``: do the chosen-by and the final metric order those candidates
    alike (every pair)?

    >>> r = [CandidateRecord({}, "a", 1, 0.9, 0.8, 0.5, 0.8, 0.85), CandidateRecord({}, "b", 1, 0.7, 0.7, 0.6, 0.7,
    ...      0.8), CandidateRecord({}, "c", 1, 0.6, 0.75, 0.4, 0.75, None)]
    >>> f = proxy_fit(r, 1.0)
    >>> f["proxy_candidates"], f["proxy_prediction_spearman"], f["proxy_final_candidates"], f["proxy_final_mae"]
    (3, 0.5, 2, 0.075)
    >>> f["proxy_final_same_order"], f["proxy_as_pruned_final_mae"]
    (True, 0.275)
    """
    pred = [(c.predicted, c.measured) for c in rows if c.predicted is not None and c.measured is not None]
    fin = [(c.measured, c.as_pruned, c.finetuned) for c in rows if c.measured is not None and c.finetuned is not None]

    def mae(pairs: list[tuple[Any, Any]]) -> float | None:
        good = [(a, b) for a, b in pairs if a is not None and b is not None]
        return round(sum(abs(a - b) for a, b in good) / len(good), 6) if good else None

    same = None
    if len(fin) >= 2:
        same = all(sign * (a[0] - b[0]) * sign * (a[2] - b[2]) >= 0 for i, a in enumerate(fin) for b in fin[i + 1:])
    return {"proxy_candidates": len(pred),
            "proxy_prediction_mae": mae(pred),
            "proxy_prediction_spearman": _spearman([p for p, _ in pred], [m for _, m in pred]),
            "proxy_final_candidates": len(fin),
            "proxy_final_mae": mae([(m, f) for m, _, f in fin]),
            "proxy_as_pruned_final_mae": mae([(a, f) for _, a, f in fin]),
            "proxy_final_same_order": same}


def summarize(ctx: Context, dense: DenseCost, topo: Topology, sweep_: Sweep, choice: Choice, v: Verification,
              rec: Recovery, run_id: str) -> Summary:
    """Every number of the report, each describing one named model: what the page, ``summary.json`` and the
    CLI read."""
    ship, base = v.shipped, v.baseline
    chosen = choice.chosen
    finals: dict[int, float | None] = {id(chosen): rec.plan.metric_after("finetune")}
    if choice.uniform is not None and rec.baseline is not None:
        finals[id(choice.uniform)] = rec.baseline.metric_after("finetune")
    rows = tuple(CandidateRecord(dict(c.plan), c.source, c.macs, c.predicted, c.measured,
                                 *_plan_metrics(choice, c), finals.get(id(c))) for c in choice.measured)
    fit = proxy_fit(rows, ctx.sign)
    return Summary(
        run_id=run_id, model=ctx.model_name, metric=ctx.metric_name, flops_unit="MACs",
        flops_target=ctx.flops_target, flops_before=dense.macs, flops_after=ship.flops, params_before=dense.params,
        params_after=ship.params, metric_before=dense.metric, metric_after_predicted=chosen.predicted,
        metric_after_measured=ship.metric, metric_after_reconstructed=ship.reconstructed,
        plan_metric=ctx.plan_metric, metric_after_calibrated=rec.plan.metric_after("batchnorm"),
        metric_after_finetuned=rec.plan.metric_after("finetune"), metric_final=rec.plan.final,
        recovery_steps=rec.plan.steps, latency_before_ms=v.latency_dense_ms, latency_after_ms=ship.latency_ms,
        latency_device=dense.device,
        measured_on="shrunk models (channels physically removed); pruned.pt holds the final model",
        prediction_method=PREDICTION, plan_source=chosen.source, plan_candidates=rows,
        target_met=ship.flops <= choice.target_macs,
        note=" ".join(([choice.infeasible] if choice.infeasible else []) + list(choice.notes) + list(v.notes)),
        plan=dict(chosen.plan),
        uniform_plan=dict(base.plan) if base is not None else None,
        uniform_flops_after=base.flops if base is not None else None,
        uniform_params_after=base.params if base is not None else None,
        uniform_latency_ms=base.latency_ms if base is not None else None,
        uniform_metric_measured=base.metric if base is not None else None,
        uniform_metric_reconstructed=base.reconstructed if base is not None else None,
        uniform_metric_final=rec.baseline.final if rec.baseline is not None else None,
        uniform_recovery_steps=rec.baseline.steps if rec.baseline is not None else None,
        sensitivity_semantics=sweep_.semantics, sweep_metric=sweep_.metric, unit_score=sweep_.score,
        excluded_sets=dict(topo.excluded),
        set_units={s.name: s.n_units for s in topo.sets}, sparsity_unit=SPARSITY_UNIT,
        seconds=time.perf_counter() - ctx.t0, proxy_metric=ctx.plan_metric, **fit,
        plan_order=chosen.order, prunable_sets=len(topo.sets), higher_is_better=ctx.sign > 0,
        graph_ops=len(dense.graph.nodes), recovery_label=rec.plan.label, calibration_inputs=v.calibration_inputs,
        latency_runs=v.latency_runs, latency_budget_s=v.latency_budget_s)


def _plan_metrics(choice: Choice, c: Candidate) -> tuple[float | None, float | None]:
    got = choice.metrics.get(plan_key(c.plan))
    return (got.as_pruned, got.reconstructed) if got is not None else (None, None)
