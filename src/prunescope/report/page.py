"""summary.json, the HTML page and its charts, and writing the report folder."""

from __future__ import annotations

import html
import json
import math
import os
import time
from typing import Any

from ..flops.counter import atomic_write_text
from ..sensitivity.report import plot as plot_sensitivity
from .output import ReportFolder
from .steps import Run

__all__ = ["FILES", "write_folder", "decision_sentence", "latency_note"]

FILES = {"report": "report.html", "sensitivity_csv": "sensitivity.csv", "sensitivity_png": "sensitivity.png",
         "macs_png": "macs_per_layer.png", "flops": "flops.csv", "dependencies": "dependencies.csv",
         "plan": "plan.json", "masks": "masks.pth", "pruned": "pruned.pt", "summary": "summary.json"}

PREDICTION = ("predicted before its own measurement as a first-order step from the nearest plan Q measured before "
              "it: measured(Q) − Σ_k w_k · (l_k(plan) − l_k(Q)), l_k = set k's single-set loss from the sweep, w_k "
              "= per-set interaction factors fitted by least squares on the plans measured so far (the first "
              "plan: the additive prediction)")


def summary(r: Run, run_id: str) -> dict[str, Any]:
    ship, base, chosen = r.shipped, r.baseline, r.chosen
    assert ship is not None and chosen is not None and r.search is not None
    final_metric = ship.final
    cal = next((v for s, v, _ in r.recovery if s.startswith("BatchNorm")), None)
    ft = next((v for s, v, _ in r.recovery if s == "fine-tuning"), None)
    out: dict[str, Any] = {
        "run_id": run_id,
        "model": r.model_name,
        "metric": r.metric_name,
        "flops_unit": "MACs",
        "flops_target": r.flops_target,
        "flops_before": r.dense.total_flops,
        "flops_after": ship.flops,
        "params_before": r.dense.total_params,
        "params_after": ship.params,
        "metric_before": r.metric_before,
        "metric_after_predicted": chosen.predicted,
        "metric_after_measured": ship.metric,
        "metric_after_reconstructed": ship.reconstructed,
        "plan_metric": r.plan_metric,
        "metric_after_calibrated": cal,
        "metric_after_finetuned": ft,
        "metric_final": final_metric,
        "recovery_steps": [{"step": s, "metric": v, "seconds": round(t, 2)} for s, v, t in r.recovery],
        "latency_before_ms": round(r.latency_dense_ms, 4),
        "latency_after_ms": round(ship.latency_ms, 4),
        "latency_device": str(r.dense_device),
        "measured_on": "shrunk models (channels physically removed); pruned.pt holds the final model",
        "prediction_method": PREDICTION,
        "plan_source": chosen.source,
        "plan_candidates": [
            {"plan": c.plan, "source": c.source, "flops": c.macs, "predicted": c.predicted, "measured": c.measured,
             "as_pruned": c.as_pruned, "reconstructed": c.reconstructed, "finetuned": c.finetuned}
            for c in r.search.measured],
        "target_met": ship.flops <= r.target_macs,
        "note": r.note,
        "plan": dict(chosen.plan),
        "uniform_plan": dict(base.plan) if base is not None else None,
        "uniform_flops_after": base.flops if base is not None else None,
        "uniform_params_after": base.params if base is not None else None,
        "uniform_latency_ms": round(base.latency_ms, 4) if base is not None else None,
        "uniform_metric_measured": base.metric if base is not None else None,
        "uniform_metric_reconstructed": base.reconstructed if base is not None else None,
        "uniform_metric_final": base.final if base is not None else None,
        "uniform_recovery_steps": [{"step": st, "metric": v, "seconds": round(t, 2)} for st, v, t in base.recovery]
        if base is not None else None,
        "sensitivity_semantics": "as pruned" if r.sa.as_pruned else "masked (NNI)",
        "excluded_sets": r.excluded,
        "set_units": {k: r.n_units(k) for k in r.keys},
        "sparsity_unit": "a fraction of each set's pruning units (channel-engine classes: a channel of every "
                         "member, an attention head or kv group, an MLP unit)",
        "seconds": round(time.perf_counter() - r.t0, 2),
    }
    return out


def set_label(r: Run, key: str) -> str:
    """``set 3: conv1 +2``: a dependency set as the legend and the tables name it (its number in the
    dependency-set table, its first layer, how many more)."""
    members = key.split("+")
    number = next((i + 1 for i, st in enumerate(r.cd.sets) if "+".join(st) == key), None)
    head = f"set {number}: " if number is not None else ""
    return head + members[0] + (f" +{len(members) - 1}" if len(members) > 1 else "")


def sensitivity_chart(r: Run, path: str) -> str | None:
    """One curve per prunable set (as pruned = shrunk, before recovery), styles that never repeat for 320 sets,
    the legend outside the axes; ``None`` without matplotlib."""
    try:
        plot_sensitivity({set_label(r, k): v for k, v in r.sens.items()}, path, baseline=r.metric_before,
                         title=f"Sensitivity of {r.model_name} ({r.metric_name}, one set pruned at a time, "
                               "as pruned)", xlabel="sparsity of the set (fraction of its pruning units)")
    except ImportError:
        return None
    return path


def macs_chart(r: Run, path: str) -> str | None:
    """Horizontal bars: MACs per layer, dense vs shipped (labels are literal text, never mathtext)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    assert r.shipped is not None
    after = {(row.name, row.call_number): row.flops for row in r.shipped.report.rows}
    rows = [(row.name if row.call_number == 1 else f"{row.name} #{row.call_number}", row.flops,
             after.get((row.name, row.call_number), 0)) for row in r.dense.rows if row.flops > 0]
    shown = rows[:60]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(shown) + 1.4))
    ys = list(range(len(shown)))[::-1]
    ax.barh([y + 0.2 for y in ys], [b for _, b, _ in shown], height=0.4, label="dense model", color="#9aa5b1")
    ax.barh([y - 0.2 for y in ys], [a for _, _, a in shown], height=0.4, label="shipped model (shrunk)",
            color="#2b6cb0")
    ax.set_yticks(ys)
    ax.set_yticklabels([n.replace("$", r"\$") for n, _, _ in shown], fontsize=7)
    for t in ax.get_yticklabels():
        t.set_parse_math(False)  # module names are text: '$' must never start mathtext
    ax.set_xlabel("MACs")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    ax.set_title("MACs per layer" + (f" (the first 60 of {len(rows)} layers; all in the table below)"
                                     if len(rows) > 60 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def shipped_label(r: Run) -> str:
    """What the shipped model is: ``shrunk, then BatchNorm re-estimation (11 batches) and fine-tuning``."""
    steps = [st for st, _, _ in r.recovery]
    return "shrunk, then " + " and ".join(steps) if steps else "shrunk, no recovery"


def decision_sentence(r: Run) -> str:
    """The page's first sentence: which plan ships, its MACs, the metric of the shipped model, and the uniform
    plan at the same budget, each number saying which model it describes."""
    ship, base, chosen = r.shipped, r.baseline, r.chosen
    assert ship is not None and chosen is not None
    dense = r.dense.total_flops
    final = r.recovery[-1][1] if r.recovery else ship.metric
    m = r.metric_name
    head = ("" if ship.flops <= r.target_macs else
            f"The FLOPs target ({r.flops_target:.0%} of the dense MACs) is not met ({r.note}); the closest plan: ")
    plan = (f"{len(ship.plan)} of {len(r.keys)} prunable sets pruned at sparsities "
            f"{_range(list(ship.plan.values()))}" if ship.plan else "no set pruned")
    text = (f"{head}Ship candidate #{chosen.order + 1} ({chosen.source}; {plan}): {ship.flops:,} MACs, "
            f"{ship.flops / max(1, dense):.1%} of the dense model's {dense:,} (target {r.flops_target:.0%}), "
            f"{m} {final:.4f} for the shipped model ({shipped_label(r)}) against {r.metric_before:.4f} for the "
            f"dense model")
    if base is None:
        return text + "; no uniform plan meets the budget, so there is no uniform baseline."
    uni = _range(list(base.plan.values()))
    recovered = bool(ship.recovery) and bool(base.recovery)
    mine, theirs = (ship.final, base.final) if recovered else (ship.metric, base.metric)
    how = f"after the same recovery ({shipped_label(r)})" if recovered else "shrunk, before recovery"
    better = r.sign * (mine - theirs)
    text += (f"; at the same budget the uniform plan (every set at sparsity {uni}, {base.flops:,} MACs) measures "
             f"{theirs:.4f} against {mine:.4f} for this plan, both {how} ("
             + (f"{abs(better):.4f} better" if better > 0 else "no better" if better == 0 else
                f"{abs(better):.4f} worse") + ")")
    if r.recovery and not recovered:
        text += " (the uniform model is not recovered, so the two are not compared after recovery)"
    return text + "."


def latency_note(r: Run) -> str:
    """What the measured latencies say, and, when latency does not follow the MACs, why: writing latency =
    fixed + k * MACs for the dense and the shipped model (two measurements, two unknowns) splits the dense
    forward into the part that scales with MACs and a fixed cost of running its ops -- measured, not assumed."""
    ship = r.shipped
    assert ship is not None
    dense_ms, ship_ms = r.latency_dense_ms, ship.latency_ms
    macs_d, macs_s = r.dense.total_flops, ship.flops
    if not all(math.isfinite(t) and t > 0 for t in (dense_ms, ship_ms)) or macs_d <= 0:
        return ""
    lat_ratio, mac_ratio = ship_ms / dense_ms, macs_s / macs_d
    text = (f"CPU latency (median of interleaved runs on the example input): dense model {dense_ms:.3f} ms, "
            f"shipped model {ship_ms:.3f} ms ({lat_ratio:.0%} of dense) for {mac_ratio:.0%} of the MACs.")
    if mac_ratio >= 1 or lat_ratio <= 1 - 0.5 * (1 - mac_ratio):
        return text + f" Latency falls with the MACs (latency ratio / MACs ratio = {lat_ratio / mac_ratio:.2f})."
    k = max(0.0, (dense_ms - ship_ms) / (macs_d - macs_s))  # ms per MAC; a slower pruned model is noise: 0
    scaling = k * macs_d
    fixed = dense_ms - scaling
    n_ops = len(r.graph.nodes) if r.graph is not None else 0
    per_op = f" ({fixed * 1e3 / n_ops:.1f} µs per op)" if n_ops else ""
    split = (f"puts {scaling:.3f} ms ({scaling / dense_ms:.0%}) of the dense forward in work that scales with the "
             f"MACs and {fixed:.3f} ms" if k > 0 else f"finds no part that scales with the MACs: all {dense_ms:.3f} ms "
             "are")
    return text + (
        f" Latency does not follow the MACs here{' (it does not move: within 5%)' if abs(1 - lat_ratio) < 0.05 else ''}"
        f": writing latency = fixed cost + k × MACs for the two measured models {split} in a fixed cost of "
        f"running its {n_ops} recorded tensor ops{per_op}: dispatch, allocation and memory traffic per op, which "
        f"removing channels does not reduce (the shrunk model runs the same ops on narrower tensors). Pruning "
        f"saves time where the MAC-proportional part is large: bigger inputs, batches or models.")


def page(r: Run, s: dict[str, Any], pngs: list[tuple[str, str | None]]) -> str:
    from .html import render_html, table_html

    ship, base, search = r.shipped, r.baseline, r.search
    assert ship is not None and search is not None and r.chosen is not None
    final = s["metric_final"]
    shipped = shipped_label(r)
    cards = [("MACs\ndense → shipped", f"{r.dense.total_flops:,} → {ship.flops:,}"),
             ("Params\ndense → shipped", f"{r.dense.total_params:,} → {ship.params:,}"),
             (f"{r.metric_name}\ndense → shipped ({shipped})", f"{r.metric_before:.4f} → {final:.4f}"),
             ("CPU latency (ms)\ndense → shipped", f"{r.latency_dense_ms:.2f} → {ship.latency_ms:.2f}")]
    sparsities = ", ".join(f"{k.replace('+', ', ')}: {v:g}" for k, v in ship.plan.items())
    vs_rows = [("dense", r.dense.total_flops, r.dense.total_params, f"{r.latency_dense_ms:.3f}",
                f"{r.metric_before:.4f}", "")]
    vs_rows.append(("plan, shrunk (= as pruned), before recovery", ship.flops, ship.params,
                    f"{ship.latency_ms:.3f}", f"{ship.metric:.4f}", sparsities))
    if r.recovery:
        vs_rows.append((f"plan, shipped ({shipped})", ship.flops, ship.params, f"{ship.latency_ms:.3f}",
                        f"{final:.4f}", "the same model, recovered"))
    if base is not None:
        uni_sp = ", ".join(f"{v:g}" for v in sorted(set(base.plan.values())))
        vs_rows.append(("uniform, shrunk (= as pruned), before recovery" if base.recovery else
                        "uniform, shrunk (= as pruned), not recovered", base.flops, base.params,
                        f"{base.latency_ms:.3f}", f"{base.metric:.4f}", uni_sp))
        if base.recovery:
            vs_rows.append((f"uniform, after the same recovery ({shipped})", base.flops, base.params,
                            f"{base.latency_ms:.3f}", f"{base.final:.4f}", uni_sp))
    errs = [abs(c.predicted - c.measured) for c in search.measured
            if c.predicted is not None and c.measured is not None]

    def m4(v: float | None) -> str:
        return "–" if v is None else f"{v:.4f}"

    cand_rows = [(c.order + 1, c.source + (" — shipped" if c is r.chosen else ""), c.macs, f"{c.predicted:.4f}",
                  f"{c.measured:.4f}", m4(c.as_pruned), m4(c.reconstructed), m4(c.finetuned),
                  ", ".join(f"{k.replace('+', ', ')}: {v:g}" for k, v in c.plan.items()))
                 for c in search.measured]
    chosen_rows = {i for i, c in enumerate(search.measured) if c is r.chosen}
    rec_rows = [("plan, shrunk (before recovery)", f"{ship.metric:.4f}", "")] + [
        (f"after {st}", f"{v:.4f}", f"{t:.1f}") for st, v, t in r.recovery]
    sens_rows = [(set_label(r, k), *[f"{v:.4f}" for _, v in sorted(c.items())]) for k, c in r.sens.items()]
    dep_rows = [(i + 1, ", ".join(st), r.n_units("+".join(st)) if "+".join(st) in r.keys else "",
                 "yes" if "+".join(st) in r.keys else r.excluded.get("+".join(st), "single"))
                for i, st in enumerate(r.cd.sets)]
    after = {(row.name, row.call_number): row.flops for row in ship.report.rows}
    flops_rows = [(row.name, row.module_type, row.flops, after.get((row.name, row.call_number), 0), row.params)
                  for row in r.dense.rows]
    how = (f"<p>Models on this page: the <b>dense</b> model you passed in; <b>shrunk</b> models (channels "
           f"physically removed by <code>prunescope.shrink</code>; their metric equals the as-pruned masked "
           f"model's), measured before any recovery; and the <b>shipped</b> model ({html.escape(shipped)}), "
           f"which <code>pruned.pt</code> holds (load it with <code>prunescope.load_pruned(model, "
           f"'pruned.pt')</code>). The plan was chosen by measuring {len(search.measured)} candidate plans that all "
           f"meet the target (uniform, the additive knapsack optimum, and a local search around the best) as "
           f"{html.escape(r.plan_metric)} models; the best measured is shipped (highlighted below). Its prediction "
           f"({r.chosen.predicted:.4f}) was {html.escape(PREDICTION)}; it was off by "
           f"{abs(r.chosen.predicted - ship.metric):.4f} (mean over all candidates: "
           f"{sum(errs) / max(1, len(errs)):.4f}).</p>")
    lat = latency_note(r)
    sections = [
        ("Plan vs uniform", (f'<p class="warn">{html.escape(r.note)}</p>' if r.note else "") + how
         + table_html(["Model", "MACs", "Params", "CPU latency (ms)", f"{r.metric_name} (of this row's model)",
                       "Sparsities"], vs_rows, "plan")
         + (f'<p id="latency">{html.escape(lat)}</p>' if lat else "")),
        ("Recovery of the shipped plan", table_html(["Model", r.metric_name, "Seconds"], rec_rows, "recovery")),
        ("Candidate plans (in measurement order; the shipped one highlighted)",
         (f"<p>Chosen by the {html.escape(r.plan_metric)} metric (“Measured”); as pruned = the shrunk model before "
          "any recovery, reconstructed = after the least-squares refit, fine-tuned = after the full recovery (the "
          "shipped plan and the uniform baseline only).</p>")
         + table_html(["#", "Source", "MACs (shrunk)", f"Predicted {r.metric_name} ({r.plan_metric})",
                       f"Measured {r.metric_name} ({r.plan_metric})", "As pruned", "Reconstructed", "Fine-tuned",
                       "Sparsities"], cand_rows, "candidates", highlight=chosen_rows)),
        ("Sensitivity",
         f"<p>{html.escape(r.metric_name)} of the model with one dependency set pruned at a time at each sparsity, "
         f"as pruned (= the shrunk model's), before recovery; dense: {r.metric_before:.4f}.</p>"
         + table_html(["Dependency set", *[str(x) for x in r.sa.sparsities]], sens_rows, "sensitivity")),
        ("Dependency sets", table_html(["Set", "Layers", "Units", "Prunable"], dep_rows, "dependencies")),
        ("FLOPs per layer (MACs)", table_html(["Layer", "Type", "MACs (dense)", "MACs (shipped, shrunk)",
                                               "Params (dense)"], flops_rows, "flops")),
    ]
    lead = f'<p class="decision" id="decision">{html.escape(decision_sentence(r))}</p>'
    return render_html(f"prunescope report: {r.model_name}",
                       f"target {r.flops_target:.0%} of dense MACs; MACs are multiply-accumulates; "
                       f"{time.strftime('%Y-%m-%d %H:%M')}; run {s['run_id']}", cards, sections, pngs, lead=lead)


def write_folder(r: Run, folder: ReportFolder, tmp: str) -> dict[str, str]:
    from ..masks import save_masks
    from ..narrow import save_pruned

    assert r.shipped is not None and r.final is not None
    p = {k: os.path.join(tmp, v) for k, v in FILES.items()}
    r.dense.to_csv(p["flops"])
    r.cd.export(p["dependencies"])
    r.sa.export(p["sensitivity_csv"])
    made: dict[str, str | None] = {}
    made["sensitivity_png"] = sensitivity_chart(r, p["sensitivity_png"])
    made["macs_png"] = macs_chart(r, p["macs_png"])
    save_masks(r.shipped.masks, p["masks"])
    save_pruned(r.final, p["pruned"])
    config_list = [{"sparsity": v, "op_names": list(k.split("+"))} for k, v in r.shipped.plan.items()]
    atomic_write_text(p["plan"], json.dumps(config_list, indent=2) + "\n")
    s = summary(r, folder.run_id)
    r.summary = s
    atomic_write_text(p["report"], page(r, s, [("MACs per layer: dense vs shipped", made["macs_png"]),
                                               ("Sensitivity curves", made["sensitivity_png"])]))
    atomic_write_text(p["summary"], json.dumps(s, indent=2) + "\n")
    return {k: folder.final(v) for k, v in FILES.items() if made.get(k, "x") is not None}
