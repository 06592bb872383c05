"""``prunescope report``: a full analysis of one model, ending in a verified pruning plan.

Steps (each prints one short line; the details go to the output folder):

1. **Cost** — FLOPs (MACs) and parameters per layer (:func:`prunescope.flops.flops_report`).
2. **Topology** — channel-dependency sets (Linear layers included), group constraints, unsafe layers.
3. **Sensitivity** — every prunable dependency set is pruned as one unit (L1 filter norm, the same channels
   in every member) at each sparsity, and the metric measured (:class:`~prunescope.SensitivityAnalysis`).
4. **Plan** — the per-set sparsities that keep at most ``flops_target`` of the dense effective MACs with the
   smallest predicted metric loss (an exact multiple-choice knapsack, :mod:`prunescope.plan`). The savings of
   each option are the *effective* MACs (input channels of the consumers included). Sets that contain an
   unsafe layer, or whose channels reach the model's output (the classifier), are left alone; grouped
   convolutions keep their divisibility. The plan's masks are made conflict-free, counted exactly, and the
   budget is tightened and the plan re-solved until the exact count meets the target.
5. **Verify** — the plan's masks are turned into the physically smaller model (:func:`prunescope.shrink`), the
   model a user ships; its metric, its dense MACs and parameters (equal to the effective count, checked) and
   its CPU latency next to the dense model's (median of interleaved runs) are measured, and it is written to
   ``pruned.pt`` (:func:`prunescope.load_pruned`).

Every number on the page and in ``summary.json`` describes that one shrunk model. Sensitivity is measured
"as pruned" (a removed channel is zero after its normalisation too, see :func:`prunescope.shrink.as_pruned`),
so prediction and measurement describe the same kind of model. Predicted loss of a plan = the sum of the
measured drops of its sets (each measured with the other sets intact), the usual additive assumption of
sensitivity-based allocation; the measured metric shows how far it holds.

The folder is written as a whole (:mod:`prunescope.report.output`): files of two runs never mix. The model
comes back exactly as it was (weights, buffers, training flags), also when ``val_func`` changes it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..flops.counter import atomic_write_text
from .output import ReportFolder

__all__ = ["ReportResult", "run_report", "prunable_sets"]


@dataclass
class ReportResult:
    summary: dict[str, Any]
    files: dict[str, str]
    plan: dict[str, float] = field(default_factory=dict)  # set key -> sparsity


def _say(console: Callable[[str], None] | None, text: str) -> None:
    if console is not None:
        console(text)


def output_layers(graph: Any) -> set[str]:
    """Layers whose output channels reach a model output (pruning them changes the output's shape)."""
    from ..topology import channel_atoms

    ca = channel_atoms(graph)
    names: set[str] = set()
    for t in graph.outputs:
        ci = ca.info(t)
        if ci is None:
            continue
        for a in set(int(v) for v in ci.atoms.reshape(-1) if v >= 0):
            for layer, _ in ca.class_members(a):
                names.add(layer)
    return names


def prunable_sets(model: nn.Module, graph: Any, x: Any) -> tuple[list[tuple[str, ...]], dict[str, str],
                                                                   dict[str, int]]:
    """Dependency sets (conv + linear) that may be pruned, and why the others may not.

    Returns ``(sets, excluded, group_constraint)``: ``excluded`` maps a set key to the reason,
    ``group_constraint`` maps a layer to its GroupDependency constraint (lcm of groups).
    """
    from ..topology import ChannelDependency, GroupDependency, not_safe_to_prune

    cd = ChannelDependency(model, x, traced_model=graph, include_linear=True)
    unsafe = not_safe_to_prune(model, x, traced_model=graph, with_reasons=True)
    assert isinstance(unsafe, dict)
    outs = output_layers(graph)
    gd = GroupDependency(model, x, traced_model=graph)
    modules = dict(model.named_modules())
    sets: list[tuple[str, ...]] = []
    excluded: dict[str, str] = {}
    for members in cd.sets:
        key = "+".join(members)
        bad = [m for m in members if m in unsafe]
        if bad:
            excluded[key] = f"{bad[0]} is unsafe to prune: {unsafe[bad[0]][0]}"
            continue
        if any(m in outs for m in members):
            excluded[key] = "its channels reach the model output"
            continue
        if any(not isinstance(modules.get(m), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) for m in members):
            excluded[key] = "a member is not a convolution or linear layer"
            continue
        widths = {modules[m].weight.shape[0] for m in members}
        if len(widths) > 1:
            excluded[key] = "members have different widths"
            continue
        sets.append(tuple(members))
    return sets, excluded, {k: int(v) for k, v in gd.dependency.items()}


FILES = {"report": "report.html", "sensitivity_csv": "sensitivity.csv", "sensitivity_png": "sensitivity.png",
         "flops": "flops.csv", "dependencies": "dependencies.csv", "plan": "plan.json", "masks": "masks.pth",
         "pruned": "pruned.pt", "summary": "summary.json"}


@contextlib.contextmanager
def borrowed(model: nn.Module) -> Iterator[nn.Module]:
    """Lend ``model`` to user code: parameters, buffers and training flags come back exactly afterwards."""
    state = [(t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())]
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, saved in state:
                if t.shape == saved.shape:
                    t.copy_(saved)
        for m, f in flags:
            m.training = f


@dataclass
class _Run:
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
    sa: Any = None
    sens: dict[str, dict[float, float]] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)
    achieved: Any = None
    note: str = ""
    predicted: float = 0.0
    small: nn.Module | None = None
    small_report: Any = None
    metric_after: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)
    fixed_conflicts: int = 0

    def say(self, text: str) -> None:
        _say(self.console, text)

    def evaluate(self, model: nn.Module, what: str) -> float:
        from ..sensitivity.engine import MetricError

        if model is self.model:
            with borrowed(model):
                value = self.val_func(model)
        else:
            value = self.val_func(model)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise MetricError(f"val_func returned {type(value).__name__} {value!r:.60} for {what}; expected a "
                              "number") from None
        if not math.isfinite(out):
            raise MetricError(f"val_func returned {out} for {what}; expected a finite number")
        return out


def _step_cost(r: _Run) -> None:
    from ..flops import flops_report
    from ..graph import trace

    r.graph = trace(r.model, r.x)
    r.dense = flops_report(r.model, r.x, graph=r.graph)
    r.metric_before = r.evaluate(r.model, "the dense model")
    r.say(f"[1/5] cost     {r.dense.total_flops:,} MACs, {r.dense.total_params:,} params, "
          f"{r.metric_name} {r.metric_before:.4f}")


def _step_topology(r: _Run) -> None:
    from ..topology import ChannelDependency, GroupDependency

    r.cd = ChannelDependency(r.model, r.x, traced_model=r.graph, include_linear=True)
    r.gd = GroupDependency(r.model, r.x, traced_model=r.graph)
    r.sets, r.excluded, r.group_lcm = prunable_sets(r.model, r.graph, r.x)
    r.keys = ["+".join(s) for s in r.sets]
    r.say(f"[2/5] topology {len(r.cd.sets)} dependency sets, {len(r.sets)} prunable, "
          f"{sum(1 for v in r.gd.dependency.values() if v > 1)} group constraints, {len(r.excluded)} left alone")


def _step_sensitivity(r: _Run) -> None:
    from ..sensitivity import SensitivityAnalysis

    layer_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    kw: dict[str, Any] = {}
    import inspect

    if "as_pruned" in inspect.signature(SensitivityAnalysis.__init__).parameters:
        kw["as_pruned"] = True
    r.sa = SensitivityAnalysis(r.model, r.val_func, sparsities=r.sparsities, prune_type="l1",
                               layer_types=layer_types, group_dependencies=True, dummy_input=r.x,
                               workers=r.workers, progress=r.progress, **kw)
    with borrowed(r.model):
        sens = r.sa.analysis(val_args=[r.model], specified_layers=[s[0] for s in r.sets]) if r.sets else {}
    r.sens = {k: v for k, v in sens.items() if k in r.keys}
    r.say(f"[3/5] sensitivity {len(r.sens)} sets x {len(r.sa.sparsities)} sparsities "
          f"({sum(len(v) for v in r.sens.values()) + 1} evaluations)")


def _step_plan(r: _Run) -> None:
    """Options = (sparsity, effective saving of that set alone, predicted loss); exact knapsack, re-solved
    with a tighter budget until the exact count of the conflict-free masks meets the target."""
    from ..flops import flops_report
    from ..masks import fix_mask_conflict
    from ..masks.pruners import group_masks
    from ..plan import Option, max_saving, solve

    modules = dict(r.model.named_modules())
    base = r.dense  # with no mask removed, the effective count is the dense count
    target_macs = int(math.floor(r.flops_target * base.total_flops))
    options: dict[str, list[Option]] = {}
    masks_of: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for members, key in zip(r.sets, r.keys):
        mods = [modules[m] for m in members]
        lcm = max(r.group_lcm.get(m, 1) for m in members)
        opts = []
        for s, metric in sorted(r.sens.get(key, {}).items()):
            ms = dict(zip(members, group_masks(mods, float(s), "l1")))
            pruned = int((~ms[members[0]]["weight"].reshape(mods[0].weight.shape[0], -1).bool().any(1)).sum())
            if lcm > 1 and pruned % lcm:
                continue  # would break a grouped convolution's divisibility
            eff = flops_report(r.model, r.x, graph=r.graph, masks=ms, effective=True)
            loss = max(0.0, r.sign * (r.metric_before - float(metric)))
            masks_of[(key, float(s))] = ms
            opts.append(Option(float(s), base.total_flops - eff.total_flops, loss))
        if opts:
            options[key] = opts
    required = base.total_flops - target_macs
    plan: dict[str, Option] | None = {}
    r.achieved = base
    for _ in range(20):
        plan = solve(options, required)
        if plan is None:
            best = max_saving(options)
            r.note = (f"cannot reach the FLOPs target {r.flops_target:.0%}: pruning every prunable set at its "
                      f"highest measured sparsity saves {best:,} of {base.total_flops:,} MACs "
                      f"(keeps {1 - best / max(1, base.total_flops):.1%}); {len(r.excluded)} sets are left alone "
                      "(unsafe or model outputs). Lower the target or add higher sparsities.")
            plan = {k: max(v, key=lambda o: o.saving) for k, v in options.items()}
        merged: dict[str, Any] = {}
        for key, opt in plan.items():
            merged.update(masks_of[(key, opt.sparsity)])
        fixed = fix_mask_conflict(merged, r.model, r.x, traced=r.graph) if merged else {}
        r.fixed_conflicts = len(getattr(fixed, "changed", []))
        r.masks = dict(fixed)
        r.achieved = flops_report(r.model, r.x, graph=r.graph, masks=r.masks, effective=True)
        if r.achieved.total_flops <= target_macs or r.note:
            break
        required += r.achieved.total_flops - target_macs  # savings were not additive: tighten and re-solve
    assert plan is not None
    r.plan = plan
    r.predicted = r.metric_before - r.sign * sum(o.loss for o in plan.values())
    r.say(f"[4/5] plan     {len(plan)} sets pruned, {r.achieved.total_flops:,} MACs "
          f"({r.achieved.total_flops / max(1, base.total_flops):.1%} of dense, target {r.flops_target:.0%})"
          + (f" -- {r.note}" if r.note else ""))


def _step_verify(r: _Run) -> None:
    """Build the shrunk model, measure its metric, count it dense, time it against the dense model."""
    from ..flops import flops_report
    from ..shrink import shrink
    from ..shrink.latency import measure_latency

    r.small = shrink(r.model, r.masks, r.x, graph=r.graph, fix_conflicts=False) if r.masks else \
        __import__("copy").deepcopy(r.model)
    r.small_report = flops_report(r.small, r.x)
    if (r.small_report.total_flops, r.small_report.total_params) != (r.achieved.total_flops,
                                                                        r.achieved.total_params):
        r.note = (r.note + " " if r.note else "") + (
            f"the shrunk model counts {r.small_report.total_flops:,} MACs / {r.small_report.total_params:,} "
            f"params, the effective count said {r.achieved.total_flops:,} / {r.achieved.total_params:,}")
    r.metric_after = r.evaluate(r.small, "the shrunk model")
    r.latency = measure_latency({"dense": r.model, "pruned": r.small}, r.x)
    r.say(f"[5/5] verify   {r.metric_name}: before {r.metric_before:.4f}, predicted {r.predicted:.4f}, "
          f"measured {r.metric_after:.4f} (shrunk model); CPU latency {r.latency['dense']:.2f} -> "
          f"{r.latency['pruned']:.2f} ms")


def _summary(r: _Run, run_id: str) -> dict[str, Any]:
    small = r.small_report
    return {
        "run_id": run_id,
        "model": r.model_name,
        "metric": r.metric_name,
        "flops_unit": "MACs",
        "flops_target": r.flops_target,
        "flops_before": r.dense.total_flops,
        "flops_after": small.total_flops,
        "params_before": r.dense.total_params,
        "params_after": small.total_params,
        "metric_before": r.metric_before,
        "metric_after_predicted": r.predicted,
        "metric_after_measured": r.metric_after,
        "latency_before_ms": round(r.latency["dense"], 4),
        "latency_after_ms": round(r.latency["pruned"], 4),
        "latency_device": "cpu" if next(r.model.parameters(), torch.empty(0)).device.type == "cpu" else
        str(next(r.model.parameters()).device),
        "measured_on": "the shrunk model (pruned.pt): channels physically removed",
        "sensitivity_semantics": "as pruned" if getattr(r.sa, "as_pruned", False) else "masked (NNI)",
        "target_met": small.total_flops <= int(math.floor(r.flops_target * r.dense.total_flops)),
        "note": r.note,
        "plan": {k: o.sparsity for k, o in r.plan.items()},
        "excluded_sets": r.excluded,
        "conflicts_fixed": r.fixed_conflicts,
        "seconds": round(time.perf_counter() - r.t0, 2),
    }


def _page(r: _Run, summary: dict[str, Any], png: str | None) -> str:
    from .html import render_html, table_html

    small = r.small_report
    cards = [("MACs", f"{r.dense.total_flops:,} → {small.total_flops:,}"),
             ("Params", f"{r.dense.total_params:,} → {small.total_params:,}"),
             (r.metric_name, f"{r.metric_before:.4f} → {r.metric_after:.4f}"),
             ("Predicted", f"{r.predicted:.4f}"),
             ("CPU latency (ms)", f"{r.latency['dense']:.2f} → {r.latency['pruned']:.2f}")]
    after = {(row.name, row.call_number): row.flops for row in small.rows}
    flops_rows = [(row.name, row.module_type, row.flops, after.get((row.name, row.call_number), 0), row.params)
                  for row in r.dense.rows]
    dep_rows = [(i + 1, ", ".join(s), "yes" if "+".join(s) in r.keys else r.excluded.get("+".join(s), "single"))
                for i, s in enumerate(r.cd.sets)]
    plan_rows = [(k.replace("+", ", "), o.sparsity, o.saving, o.loss) for k, o in r.plan.items()]
    sens_rows = [(k.replace("+", ", "), *[f"{v:.4f}" for _, v in sorted(c.items())]) for k, c in r.sens.items()]
    shipped = ("<p>Every number here describes one model: the shrunk model in <code>pruned.pt</code> (channels "
               "physically removed; load it with <code>prunescope.load_pruned(model, 'pruned.pt')</code>). "
               "Latency: median of interleaved CPU runs of the dense and the shrunk model on the example input."
               "</p>")
    sections = [
        ("Plan", (f'<p class="warn">{r.note}</p>' if r.note else "") + shipped
         + table_html(["Dependency set", "Sparsity", "MACs saved (alone)", "Predicted loss"], plan_rows, "plan")),
        ("Sensitivity", table_html(["Dependency set", *[str(s) for s in r.sa.sparsities]], sens_rows,
                                   "sensitivity")),
        ("Dependency sets", table_html(["Set", "Layers", "Prunable"], dep_rows, "dependencies")),
        ("FLOPs per layer (MACs)", table_html(["Layer", "Type", "MACs", "MACs shrunk", "Params"], flops_rows,
                                               "flops")),
    ]
    return render_html(f"prunescope report: {r.model_name}",
                       f"target {r.flops_target:.0%} of dense MACs; MACs are multiply-accumulates; "
                       f"{time.strftime('%Y-%m-%d %H:%M')}; run {summary['run_id']}", cards, sections,
                       [("Sensitivity curves", png)])


def _write(r: _Run, folder: ReportFolder, tmp: str) -> dict[str, str]:
    from ..masks import save_masks
    from ..shrink import save_pruned

    p = {k: os.path.join(tmp, v) for k, v in FILES.items()}
    r.dense.to_csv(p["flops"])
    r.cd.export(p["dependencies"])
    r.sa.export(p["sensitivity_csv"])
    png: str | None = p["sensitivity_png"]
    try:
        r.sa.plot(p["sensitivity_png"], title=f"Sensitivity of {r.model_name} ({r.metric_name})")
    except ImportError:
        png = None
    save_masks(r.masks, p["masks"])
    assert r.small is not None
    save_pruned(r.small, p["pruned"])
    config_list = [{"sparsity": opt.sparsity, "op_names": list(key.split("+"))} for key, opt in r.plan.items()]
    atomic_write_text(p["plan"], json.dumps(config_list, indent=2) + "\n")
    summary = _summary(r, folder.run_id)
    atomic_write_text(p["report"], _page(r, summary, png))
    atomic_write_text(p["summary"], json.dumps(summary, indent=2) + "\n")
    r.summary = summary  # type: ignore[attr-defined]
    return {k: folder.final(v) for k, v in FILES.items() if k != "sensitivity_png" or png is not None}


def run_report(
    model: nn.Module,
    val_func: Callable[[nn.Module], Any],
    dummy_input: Any,
    out_dir: str | os.PathLike[str],
    *,
    flops_target: float = 0.5,
    sparsities: Sequence[float] | None = None,
    workers: int | None = None,
    higher_is_better: bool = True,
    model_name: str = "model",
    metric_name: str = "metric",
    progress: bool = True,
    console: Callable[[str], None] | None = print,
) -> ReportResult:
    """Run the whole analysis and write the report folder (see the module docs). The model is left as it was.

    The steps are :func:`_step_cost`, :func:`_step_topology`, :func:`_step_sensitivity`, :func:`_step_plan`
    and :func:`_step_verify`; the folder is written last, as a whole.
    """
    from ..errors import ConfigError

    if not isinstance(flops_target, (int, float)) or not 0 < flops_target <= 1:
        raise ConfigError(f"--flops-target must be in (0, 1], got {flops_target}")
    folder = ReportFolder(out_dir)
    folder.check()  # before any work: a bad --out is reported at once
    r = _Run(model, val_func, dummy_input, float(flops_target), sparsities, workers,
             1.0 if higher_is_better else -1.0, model_name, metric_name, progress, console)
    for step in (_step_cost, _step_topology, _step_sensitivity, _step_plan, _step_verify):
        step(r)
    with folder as tmp:
        files = _write(r, folder, tmp)
    return ReportResult(r.summary, files, {k: o.sparsity for k, o in r.plan.items()})  # type: ignore[attr-defined]
