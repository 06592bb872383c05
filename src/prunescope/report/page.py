"""summary.json, the HTML page and its charts, and writing the report folder."""

from __future__ import annotations

import html
import json
import os
import time
from typing import Any

from ..flops.counter import atomic_write_text
from .output import ReportFolder
from .steps import Run

__all__ = ["FILES", "write_folder"]

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
    rows = rows[:60]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    ax.barh([y + 0.2 for y in ys], [b for _, b, _ in rows], height=0.4, label="dense", color="#9aa5b1")
    ax.barh([y - 0.2 for y in ys], [a for _, _, a in rows], height=0.4, label="pruned (shrunk)", color="#2b6cb0")
    ax.set_yticks(ys)
    ax.set_yticklabels([n.replace("$", r"\$") for n, _, _ in rows], fontsize=7)
    for t in ax.get_yticklabels():
        t.set_parse_math(False)  # module names are text: '$' must never start mathtext
    ax.set_xlabel("MACs")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("MACs per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def page(r: Run, s: dict[str, Any], pngs: list[tuple[str, str | None]]) -> str:
    from .html import render_html, table_html

    ship, base, search = r.shipped, r.baseline, r.search
    assert ship is not None and search is not None and r.chosen is not None
    final = s["metric_final"]
    cards = [("MACs", f"{r.dense.total_flops:,} → {ship.flops:,}"),
             ("Params", f"{r.dense.total_params:,} → {ship.params:,}"),
             (r.metric_name, f"{r.metric_before:.4f} → {final:.4f}"),
             ("CPU latency (ms)", f"{r.latency_dense_ms:.2f} → {ship.latency_ms:.2f}")]
    vs_rows = [("dense", r.dense.total_flops, r.dense.total_params, f"{r.latency_dense_ms:.3f}",
                f"{r.metric_before:.4f}", "")]
    vs_rows.append(("plan (shrunk)", ship.flops, ship.params, f"{ship.latency_ms:.3f}", f"{ship.metric:.4f}",
                    ", ".join(f"{k.replace('+', ', ')}: {v:g}" for k, v in ship.plan.items())))
    if base is not None:
        vs_rows.append(("uniform (shrunk)", base.flops, base.params, f"{base.latency_ms:.3f}",
                        f"{base.metric:.4f}", ", ".join(f"{v:g}" for v in sorted(set(base.plan.values())))))
    errs = [abs(c.predicted - c.measured) for c in search.measured
            if c.predicted is not None and c.measured is not None]
    def m4(v: float | None) -> str:
        return "–" if v is None else f"{v:.4f}"

    cand_rows = [(c.order + 1, c.source, c.macs, f"{c.predicted:.4f}", f"{c.measured:.4f}", m4(c.as_pruned),
                  m4(c.reconstructed), m4(c.finetuned),
                  ", ".join(f"{k.replace('+', ', ')}: {v:g}" for k, v in c.plan.items()))
                 for c in search.measured]
    rec_rows = [("shrunk", f"{ship.metric:.4f}", "")] + [(st, f"{v:.4f}", f"{t:.1f}") for st, v, t in r.recovery]
    sens_rows = [(k.replace("+", ", "), *[f"{v:.4f}" for _, v in sorted(c.items())]) for k, c in r.sens.items()]
    dep_rows = [(i + 1, ", ".join(st), r.n_units("+".join(st)) if "+".join(st) in r.keys else "",
                 "yes" if "+".join(st) in r.keys else r.excluded.get("+".join(st), "single"))
                for i, st in enumerate(r.cd.sets)]
    after = {(row.name, row.call_number): row.flops for row in ship.report.rows}
    flops_rows = [(row.name, row.module_type, row.flops, after.get((row.name, row.call_number), 0), row.params)
                  for row in r.dense.rows]
    how = (f"<p>Every number here describes shrunk models (channels physically removed). The plan was chosen "
           f"by measuring {len(search.measured)} candidate plans that all meet the target (uniform, the additive "
           f"knapsack optimum, and a local search around the best); the best measured is shipped. Its prediction "
           f"({r.chosen.predicted:.4f}) was {html.escape(PREDICTION)}; it was off by "
           f"{abs(r.chosen.predicted - ship.metric):.4f} (mean over all candidates: "
           f"{sum(errs) / max(1, len(errs)):.4f}). Latency: median of interleaved CPU runs on the example input. "
           f"<code>pruned.pt</code> holds the final model "
           f"({' → '.join(['shrunk'] + [st for st, _, _ in r.recovery])}); load it with "
           f"<code>prunescope.load_pruned(model, 'pruned.pt')</code>.</p>")
    sections = [
        ("Plan vs uniform", (f'<p class="warn">{html.escape(r.note)}</p>' if r.note else "") + how
         + table_html(["Model", "MACs", "Params", "CPU latency (ms)", r.metric_name, "Sparsities"], vs_rows,
                      "plan")),
        ("Recovery", table_html(["Step", r.metric_name, "Seconds"], rec_rows, "recovery")),
        ("Candidate plans (in measurement order)",
         (f"<p>Chosen by the {r.plan_metric} metric (“Measured”); as pruned = the shrunk model before any "
          "recovery, reconstructed = after the least-squares refit, fine-tuned = after the full recovery (the "
          "shipped plan and the uniform baseline only).</p>")
         + table_html(["#", "Source", "MACs", "Predicted", "Measured", "As pruned", "Reconstructed", "Fine-tuned",
                       "Sparsities"], cand_rows, "candidates")),
        ("Sensitivity", table_html(["Dependency set", *[str(x) for x in r.sa.sparsities]], sens_rows,
                                   "sensitivity")),
        ("Dependency sets", table_html(["Set", "Layers", "Units", "Prunable"], dep_rows, "dependencies")),
        ("FLOPs per layer (MACs)", table_html(["Layer", "Type", "MACs", "MACs shrunk", "Params"], flops_rows,
                                               "flops")),
    ]
    return render_html(f"prunescope report: {r.model_name}",
                       f"target {r.flops_target:.0%} of dense MACs; MACs are multiply-accumulates; "
                       f"{time.strftime('%Y-%m-%d %H:%M')}; run {s['run_id']}", cards, sections, pngs)


def write_folder(r: Run, folder: ReportFolder, tmp: str) -> dict[str, str]:
    from ..masks import save_masks
    from ..shrink import save_pruned

    assert r.shipped is not None and r.final is not None
    p = {k: os.path.join(tmp, v) for k, v in FILES.items()}
    r.dense.to_csv(p["flops"])
    r.cd.export(p["dependencies"])
    r.sa.export(p["sensitivity_csv"])
    made: dict[str, str | None] = {}
    try:
        r.sa.plot(p["sensitivity_png"], title=f"Sensitivity of {r.model_name} ({r.metric_name})")
        made["sensitivity_png"] = p["sensitivity_png"]
    except ImportError:
        made["sensitivity_png"] = None
    made["macs_png"] = macs_chart(r, p["macs_png"])
    save_masks(r.shipped.masks, p["masks"])
    save_pruned(r.final, p["pruned"])
    config_list = [{"sparsity": v, "op_names": list(k.split("+"))} for k, v in r.shipped.plan.items()]
    atomic_write_text(p["plan"], json.dumps(config_list, indent=2) + "\n")
    s = summary(r, folder.run_id)
    r.summary = s
    atomic_write_text(p["report"], page(r, s, [("MACs per layer: dense vs pruned", made["macs_png"]),
                                               ("Sensitivity curves", made["sensitivity_png"])]))
    atomic_write_text(p["summary"], json.dumps(s, indent=2) + "\n")
    return {k: folder.final(v) for k, v in FILES.items() if made.get(k, "x") is not None}
