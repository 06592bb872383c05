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
5. **Verify** — the plan's masks are applied and the real metric measured next to the prediction.

Predicted loss of a plan = the sum of the measured drops of its sets (each measured with the other sets
intact), the usual additive assumption of sensitivity-based allocation; the measured metric shows how far
it holds.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from ..flops.counter import atomic_write_text

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
    """Run the whole analysis and write the report folder (see the module docs). The model is left as it was."""
    from ..flops import flops_report
    from ..graph import trace
    from ..masks import apply_masks, fix_mask_conflict, save_masks
    from ..masks.pruners import group_masks
    from ..plan import Option, max_saving, solve
    from ..sensitivity import SensitivityAnalysis
    from ..topology import ChannelDependency, GroupDependency
    from .html import render_html, table_html

    if not 0 < flops_target <= 1:
        raise ValueError(f"--flops-target must be in (0, 1], got {flops_target}")
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    files = {k: os.path.join(out, v) for k, v in {
        "report": "report.html", "sensitivity_csv": "sensitivity.csv", "sensitivity_png": "sensitivity.png",
        "flops": "flops.csv", "dependencies": "dependencies.csv", "plan": "plan.json", "masks": "masks.pth",
        "summary": "summary.json"}.items()}
    t0 = time.perf_counter()
    sign = 1.0 if higher_is_better else -1.0
    modules = dict(model.named_modules())

    # 1. cost
    graph = trace(model, dummy_input)
    dense = flops_report(model, dummy_input, graph=graph)
    dense.to_csv(files["flops"])
    metric_before = float(val_func(model))
    _say(console, f"[1/5] cost     {dense.total_flops:,} MACs, {dense.total_params:,} params, "
                  f"{metric_name} {metric_before:.4f}")

    # 2. topology
    cd = ChannelDependency(model, dummy_input, traced_model=graph, include_linear=True)
    cd.export(files["dependencies"])
    gd = GroupDependency(model, dummy_input, traced_model=graph)
    sets, excluded, group_lcm = prunable_sets(model, graph, dummy_input)
    _say(console, f"[2/5] topology {len(cd.sets)} dependency sets, {len(sets)} prunable, "
                  f"{sum(1 for v in gd.dependency.values() if v > 1)} group constraints, {len(excluded)} left alone")

    # 3. sensitivity, one curve per prunable set
    layer_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    sa = SensitivityAnalysis(model, val_func, sparsities=sparsities, prune_type="l1", layer_types=layer_types,
                             group_dependencies=True, dummy_input=dummy_input, workers=workers, progress=progress)
    keys = ["+".join(s) for s in sets]
    sens = sa.analysis(val_args=[model], specified_layers=[s[0] for s in sets]) if sets else {}
    sens = {k: v for k, v in sens.items() if k in keys}
    sa.export(files["sensitivity_csv"])
    try:
        sa.plot(files["sensitivity_png"], title=f"Sensitivity of {model_name} ({metric_name})")
    except ImportError:
        files.pop("sensitivity_png")
    _say(console, f"[3/5] sensitivity {len(sens)} sets x {len(sa.sparsities)} sparsities "
                  f"({sum(len(v) for v in sens.values()) + 1} evaluations)")

    # 4. plan: options = (sparsity, effective saving of that set alone, predicted loss)
    base_eff = dense  # with no mask removed, the effective count is the dense count
    target_macs = int(math.floor(flops_target * base_eff.total_flops))
    options: dict[str, list[Option]] = {}
    masks_of: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for members, key in zip(sets, keys):
        mods = [modules[m] for m in members]
        lcm = max(group_lcm.get(m, 1) for m in members)
        opts = []
        for s, metric in sorted(sens.get(key, {}).items()):
            ms = dict(zip(members, group_masks(mods, float(s), "l1")))
            pruned = int((~ms[members[0]]["weight"].reshape(mods[0].weight.shape[0], -1).bool().any(1)).sum())
            if lcm > 1 and pruned % lcm:
                continue  # would break a grouped convolution's divisibility
            eff = flops_report(model, dummy_input, graph=graph, masks=ms, effective=True)
            saving = base_eff.total_flops - eff.total_flops
            loss = max(0.0, sign * (metric_before - float(metric)))
            masks_of[(key, float(s))] = ms
            opts.append(Option(float(s), saving, loss))
        if opts:
            options[key] = opts
    required = base_eff.total_flops - target_macs
    plan: dict[str, Option] | None = {}
    final_masks: dict[str, Any] = {}
    achieved = base_eff
    note = ""
    for _ in range(20):
        plan = solve(options, required)
        if plan is None:
            best = max_saving(options)
            note = (f"cannot reach the FLOPs target {flops_target:.0%}: pruning every prunable set at its highest "
                    f"measured sparsity saves {best:,} of {base_eff.total_flops:,} MACs "
                    f"(keeps {1 - best / max(1, base_eff.total_flops):.1%}); {len(excluded)} sets are left alone "
                    "(unsafe or model outputs). Lower the target or add higher sparsities.")
            plan = {k: max(v, key=lambda o: o.saving) for k, v in options.items()}
        merged: dict[str, Any] = {}
        for key, opt in plan.items():
            merged.update(masks_of[(key, opt.sparsity)])
        final_masks = dict(fix_mask_conflict(merged, model, dummy_input, traced=graph)) if merged else {}
        achieved = flops_report(model, dummy_input, graph=graph, masks=final_masks, effective=True)
        if achieved.total_flops <= target_macs or note:
            break
        required += achieved.total_flops - target_macs  # savings were not additive: tighten and re-solve
    assert plan is not None
    predicted = metric_before - sign * sum(o.loss for o in plan.values())
    _say(console, f"[4/5] plan     {len(plan)} sets pruned, {achieved.total_flops:,} MACs "
                  f"({achieved.total_flops / max(1, base_eff.total_flops):.1%} of dense, target {flops_target:.0%})"
                  + (f" -- {note}" if note else ""))

    # 5. verify
    with apply_masks(model, final_masks):
        metric_after = float(val_func(model))
    _say(console, f"[5/5] verify   {metric_name}: before {metric_before:.4f}, predicted {predicted:.4f}, "
                  f"measured {metric_after:.4f}")

    save_masks(final_masks, files["masks"])
    config_list = [{"sparsity": opt.sparsity, "op_names": list(key.split("+"))} for key, opt in plan.items()]
    atomic_write_text(files["plan"], json.dumps(config_list, indent=2) + "\n")
    summary = {
        "model": model_name,
        "metric": metric_name,
        "flops_unit": "MACs",
        "flops_target": flops_target,
        "flops_before": base_eff.total_flops,
        "flops_after": achieved.total_flops,
        "params_before": base_eff.total_params,
        "params_after": achieved.total_params,
        "metric_before": metric_before,
        "metric_after_predicted": predicted,
        "metric_after_measured": metric_after,
        "target_met": achieved.total_flops <= target_macs,
        "note": note,
        "plan": {k: o.sparsity for k, o in plan.items()},
        "excluded_sets": excluded,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_text(files["summary"], json.dumps(summary, indent=2) + "\n")

    # the HTML page
    cards = [("MACs", f"{base_eff.total_flops:,} → {achieved.total_flops:,}"),
             ("Params", f"{base_eff.total_params:,} → {achieved.total_params:,}"),
             (metric_name, f"{metric_before:.4f} → {metric_after:.4f}"),
             ("Predicted", f"{predicted:.4f}")]
    after = {(r.name, r.call_number): r.flops for r in achieved.rows}
    flops_rows = [(r.name, r.module_type, r.flops, after.get((r.name, r.call_number), r.flops), r.params)
                  for r in dense.rows]
    dep_rows = [(i + 1, ", ".join(s), "yes" if "+".join(s) in keys else excluded.get("+".join(s), "single"))
                for i, s in enumerate(cd.sets)]
    plan_rows = [(k.replace("+", ", "), o.sparsity, o.saving, o.loss) for k, o in plan.items()]
    sens_rows = [(k.replace("+", ", "), *[f"{v:.4f}" for _, v in sorted(c.items())]) for k, c in sens.items()]
    sections = [
        ("Plan", (f'<p class="warn">{note}</p>' if note else "")
         + table_html(["Dependency set", "Sparsity", "MACs saved (alone)", "Predicted loss"], plan_rows, "plan")),
        ("Sensitivity", table_html(["Dependency set", *[str(s) for s in sa.sparsities]], sens_rows, "sensitivity")),
        ("Dependency sets", table_html(["Set", "Layers", "Prunable"], dep_rows, "dependencies")),
        ("FLOPs per layer (MACs)", table_html(["Layer", "Type", "MACs", "MACs after plan", "Params"], flops_rows,
                                               "flops")),
    ]
    page = render_html(f"prunescope report: {model_name}",
                       f"target {flops_target:.0%} of dense MACs; MACs are multiply-accumulates; "
                       f"{time.strftime('%Y-%m-%d %H:%M')}", cards, sections,
                       [("Sensitivity curves", files.get("sensitivity_png"))])
    atomic_write_text(files["report"], page)
    return ReportResult(summary, files, {k: o.sparsity for k, o in plan.items()})

