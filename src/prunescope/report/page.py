"""The HTML page, its charts and the report folder, written from the stages' records (:class:`Stages`); every
number on the page is read from the :class:`~prunescope.report.records.Summary` or a stage's record, none is
computed here."""

from __future__ import annotations

import html
import json
import math
import os
import time

from ..flops.counter import atomic_write_text
from ..masks import save_masks
from ..narrow import save_pruned
from ..sensitivity.results import plot as plot_sensitivity
from .html import render_html, table_html
from .output import ReportFolder
from .records import Stages, Summary, Topology
from .stages import PREDICTION

__all__ = ["FILES", "write_folder", "decision_sentence", "latency_note", "proxy_sentence"]

FILES = {"report": "report.html", "sensitivity_csv": "sensitivity.csv", "sensitivity_png": "sensitivity.png",
         "macs_png": "macs_per_layer.png", "flops": "flops.csv", "dependencies": "dependencies.csv",
         "plan": "plan.json", "masks": "masks.pth", "pruned": "pruned.pt", "summary": "summary.json"}

_SCORES = {"l1": "the L1 norm of their weights", "activation": "their activation-weighted norm |W|·‖X‖ on the "
           "calibration inputs (Wanda-sp/FLAP)", "reconstruction": "the output error their removal leaves after "
           "the consumers' least-squares refit on the calibration inputs (ThiNet, greedy)"}


def _sweep_what(s: Summary) -> str:
    """Which model every sweep point measured."""
    if s.sweep_metric == "reconstructed":
        return (f"reconstructed (the shrunk model with the layers that lost channels refit by least squares from "
                f"{s.calibration_inputs} unlabeled inputs: the model the plan search measures and ships)")
    return "as pruned (= the shrunk model's), before recovery"


def sensitivity_chart(st: Stages, path: str) -> str | None:
    """One curve per prunable set (as pruned = shrunk, before recovery, or reconstructed), styles that never
    repeat for 320 sets, the legend outside the axes; ``None`` without matplotlib."""
    s = st.summary
    what = "reconstructed" if s.sweep_metric == "reconstructed" else "as pruned"
    try:
        plot_sensitivity({st.topology.get(k).label: v for k, v in st.sweep.curves.items()}, path,
                         baseline=s.metric_before,
                         title=f"Sensitivity of {s.model} ({s.metric}, one set pruned at a time, {what})",
                         xlabel="sparsity of the set (fraction of its pruning units)")
    except ImportError:
        return None
    return path


def macs_chart(st: Stages, path: str) -> str | None:
    """Horizontal bars: MACs per layer, dense vs shipped (labels are literal text, never mathtext)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shipped = st.verification.shipped.report
    assert shipped is not None
    after = {(row.name, row.call_number): row.flops for row in shipped.rows}
    rows = [(row.name if row.call_number == 1 else f"{row.name} #{row.call_number}", row.flops,
             after.get((row.name, row.call_number), 0)) for row in st.dense.report.rows if row.flops > 0]
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
    fig.savefig(path, dpi=90, bbox_inches="tight")  # the tight box takes in the labels: no tight_layout pass too
    plt.close(fig)
    return path


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def decision_sentence(s: Summary) -> str:
    """The page's first sentence: which plan ships, its MACs, the metric of the shipped model, and the uniform
    plan at the same budget, each number saying which model it describes."""
    dense = s.flops_before
    head = ("" if s.target_met else
            f"The FLOPs target ({s.flops_target:.0%} of the dense MACs) is not met ({s.note}); the closest plan: ")
    plan = (f"{len(s.plan)} of {s.prunable_sets} prunable sets pruned at sparsities "
            f"{_range(list(s.plan.values()))}" if s.plan else "no set pruned")
    text = (f"{head}Ship candidate #{s.plan_order + 1} ({s.plan_source}; {plan}): {s.flops_after:,} MACs, "
            f"{s.flops_after / max(1, dense):.1%} of the dense model's {dense:,} (target {s.flops_target:.0%}), "
            f"{s.metric} {s.metric_final:.4f} for the shipped model ({s.recovery_label}) against "
            f"{s.metric_before:.4f} for the dense model")
    if s.uniform_plan is None:
        return text + "; no uniform plan meets the budget, so there is no uniform baseline."
    uni = _range(list(s.uniform_plan.values()))
    recovered = bool(s.recovery_steps) and bool(s.uniform_recovery_steps)
    mine, theirs = ((s.metric_final, s.uniform_metric_final) if recovered else
                    (s.metric_after_measured, s.uniform_metric_measured))
    assert mine is not None and theirs is not None
    how = f"after the same recovery ({s.recovery_label})" if recovered else "shrunk, before recovery"
    better = s.sign * (mine - theirs)
    text += (f"; at the same budget the uniform plan (every set at sparsity {uni}, {s.uniform_flops_after:,} MACs) "
             f"measures {theirs:.4f} against {mine:.4f} for this plan, both {how} ("
             + (f"{abs(better):.4f} better" if better > 0 else "no better" if better == 0 else
                f"{abs(better):.4f} worse") + ")")
    if s.recovery_steps and not recovered:
        text += " (the uniform model is not recovered, so the two are not compared after recovery)"
    return text + "."


def proxy_sentence(s: Summary) -> str:
    """How well the metric the plan was chosen by predicted the final metric, over the candidates measured
    (the ``proxy_*`` fields of the summary)."""
    if not s.proxy_candidates:
        return ""
    rho = s.proxy_prediction_spearman
    text = (f"How well the proxy predicted: over the {s.proxy_candidates} candidate plans measured, the search's "
            f"prediction was off the measured {s.proxy_metric} {s.metric} by {s.proxy_prediction_mae:.4f} on "
            f"average (Spearman rank correlation "
            + (f"{rho:.2f})" if rho is not None else "not defined: fewer than 3 plans or constant values)"))
    if not s.proxy_final_candidates:
        return text + (f"; no candidate was fine-tuned, so the {s.proxy_metric} {s.metric} the plan was chosen by "
                       "is the final one.")
    order = ("ordered them as the final metric does" if s.proxy_final_same_order else
             "ordered them differently from the final metric" if s.proxy_final_same_order is not None else "")
    ap = (f" (the as-pruned {s.metric}: off by {s.proxy_as_pruned_final_mae:.4f})"
          if s.proxy_as_pruned_final_mae is not None and s.proxy_metric != "as-pruned" else "")
    return text + (f"; over the {s.proxy_final_candidates} candidate(s) recovered with fine-tuning (the shipped "
                   f"plan and the uniform baseline), the {s.proxy_metric} {s.metric} the plan was chosen by was off "
                   f"the final (fine-tuned) {s.metric} by {s.proxy_final_mae:.4f} on average"
                   + (f" and {order}" if order else "") + ap + ".")


def latency_note(s: Summary) -> str:
    """What the measured latencies say, and, when latency does not follow the MACs, why: writing latency =
    fixed + k * MACs for the dense and the shipped model (two measurements, two unknowns) splits the dense
    forward into the part that scales with MACs and a fixed cost of running its ops -- measured, not assumed."""
    dense_ms, ship_ms = s.latency_before_ms, s.latency_after_ms
    macs_d, macs_s = s.flops_before, s.flops_after
    if not all(math.isfinite(t) and t > 0 for t in (dense_ms, ship_ms)) or macs_d <= 0:
        return ""
    lat_ratio, mac_ratio = ship_ms / dense_ms, macs_s / macs_d
    runs = f"median of {s.latency_runs} interleaved runs" if s.latency_runs else "median of interleaved runs"
    if s.latency_budget_s is not None:
        runs += f", timing capped at {s.latency_budget_s:g} s per model"
    text = (f"CPU latency ({runs} on the example input): dense model {dense_ms:.3f} ms, "
            f"shipped model {ship_ms:.3f} ms ({lat_ratio:.0%} of dense) for {mac_ratio:.0%} of the MACs.")
    if mac_ratio >= 1 or lat_ratio <= 1 - 0.5 * (1 - mac_ratio):
        return text + f" Latency falls with the MACs (latency ratio / MACs ratio = {lat_ratio / mac_ratio:.2f})."
    k = max(0.0, (dense_ms - ship_ms) / (macs_d - macs_s))  # ms per MAC; a slower pruned model is noise: 0
    scaling = k * macs_d
    fixed = dense_ms - scaling
    n_ops = s.graph_ops
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


def _sparsities(topo: Topology, plan: dict[str, float]) -> str:
    """``conv1, conv3: 0.5, conv2: 0.25``: a plan with each set's member layers."""
    return ", ".join(f"{', '.join(topo.get(k).members)}: {v:g}" for k, v in plan.items())


def page(st: Stages, pngs: list[tuple[str, str | None]]) -> str:
    """The HTML page: the decision sentence, cards, and the tables (see the README's report section)."""
    s, topo = st.summary, st.topology
    ship, base = st.verification.shipped, st.verification.baseline
    assert ship.report is not None
    shipped = s.recovery_label
    cards = [("MACs\ndense → shipped", f"{s.flops_before:,} → {s.flops_after:,}"),
             ("Params\ndense → shipped", f"{s.params_before:,} → {s.params_after:,}"),
             (f"{s.metric}\ndense → shipped ({shipped})", f"{s.metric_before:.4f} → {s.metric_final:.4f}"),
             ("CPU latency (ms)\ndense → shipped", f"{s.latency_before_ms:.2f} → {s.latency_after_ms:.2f}")]
    vs_rows = [("dense", s.flops_before, s.params_before, f"{s.latency_before_ms:.3f}", f"{s.metric_before:.4f}", "")]
    vs_rows.append(("plan, shrunk (= as pruned), before recovery", s.flops_after, s.params_after,
                    f"{s.latency_after_ms:.3f}", f"{s.metric_after_measured:.4f}", _sparsities(topo, s.plan)))
    if s.recovery_steps:
        vs_rows.append((f"plan, shipped ({shipped})", s.flops_after, s.params_after, f"{s.latency_after_ms:.3f}",
                        f"{s.metric_final:.4f}", "the same model, recovered"))
    if base is not None:
        uni_sp = ", ".join(f"{v:g}" for v in sorted(set(base.plan.values())))
        vs_rows.append(("uniform, shrunk (= as pruned), before recovery" if s.uniform_recovery_steps else
                        "uniform, shrunk (= as pruned), not recovered", s.uniform_flops_after, s.uniform_params_after,
                        f"{s.uniform_latency_ms:.3f}", f"{s.uniform_metric_measured:.4f}", uni_sp))
        if s.uniform_recovery_steps:
            vs_rows.append((f"uniform, after the same recovery ({shipped})", s.uniform_flops_after,
                            s.uniform_params_after, f"{s.uniform_latency_ms:.3f}", f"{s.uniform_metric_final:.4f}",
                            uni_sp))
    errs = [abs(c.predicted - c.measured) for c in s.plan_candidates
            if c.predicted is not None and c.measured is not None]

    def m4(v: float | None) -> str:
        return "–" if v is None else f"{v:.4f}"

    cand_rows = [(i + 1, c.source + (" — shipped" if i == s.plan_order else ""), c.flops, m4(c.predicted),
                  m4(c.measured), m4(c.as_pruned), m4(c.reconstructed), m4(c.finetuned), _sparsities(topo, c.plan))
                 for i, c in enumerate(s.plan_candidates)]
    chosen = s.plan_candidates[s.plan_order]
    rec_rows = [("plan, shrunk (before recovery)", f"{s.metric_after_measured:.4f}", "")] + [
        (f"after {r.label}" + ("" if r.kept else " (lowered the metric: undone, not shipped)"), f"{r.metric:.4f}",
         f"{r.seconds:.1f}") for r in s.recovery_steps]
    sens_rows = [(topo.get(k).label, *[f"{v:.4f}" for _, v in sorted(c.items())]) for k, c in st.sweep.curves.items()]
    prunable = {p.members: p for p in topo.sets}
    dep_rows = [(i + 1, ", ".join(ds), prunable[ds].n_units if ds in prunable else "",
                 "yes" if ds in prunable else s.excluded_sets.get("+".join(ds), "single"))
                for i, ds in enumerate(topo.dependency_sets)]
    after = {(row.name, row.call_number): row.flops for row in ship.report.rows}
    flops_rows = [(row.name, row.module_type, row.flops, after.get((row.name, row.call_number), 0), row.params)
                  for row in st.dense.report.rows]
    off = abs(chosen.predicted - chosen.measured) if chosen.predicted is not None and chosen.measured is not None \
        else float("nan")
    how = (f"<p>Models on this page: the <b>dense</b> model you passed in; <b>shrunk</b> models (channels "
           f"physically removed by <code>prunescope.shrink</code>; their metric equals the as-pruned masked "
           f"model's), measured before any recovery; and the <b>shipped</b> model ({html.escape(shipped)}), "
           f"which <code>pruned.pt</code> holds (load it with <code>prunescope.load_pruned(model, "
           f"'pruned.pt')</code>). The plan was chosen by measuring {len(s.plan_candidates)} candidate plans that "
           f"all meet the target (uniform, the additive knapsack optimum, and a local search around the best) as "
           f"{html.escape(s.plan_metric)} models; the best measured is shipped (highlighted below). Its prediction "
           f"({m4(s.metric_after_predicted)}) was {html.escape(PREDICTION)}; it was off its measured "
           f"{html.escape(s.plan_metric)} metric by {off:.4f} (mean over all candidates: "
           f"{sum(errs) / max(1, len(errs)):.4f}).</p>")
    lat = latency_note(s)
    proxy = proxy_sentence(s)
    sections = [
        ("Plan vs uniform", (f'<p class="warn">{html.escape(s.note)}</p>' if s.note else "") + how
         + table_html(["Model", "MACs", "Params", "CPU latency (ms)", f"{s.metric} (of this row's model)",
                       "Sparsities"], vs_rows, "plan")
         + (f'<p id="latency">{html.escape(lat)}</p>' if lat else "")),
        ("Recovery of the shipped plan", table_html(["Model", s.metric, "Seconds"], rec_rows, "recovery")),
        ("Candidate plans (in measurement order; the shipped one highlighted)",
         (f"<p>Chosen by the {html.escape(s.plan_metric)} metric (“Measured”); as pruned = the shrunk model before "
          "any recovery, reconstructed = after the least-squares refit, fine-tuned = after the full recovery (the "
          "shipped plan and the uniform baseline only).</p>")
         + table_html(["#", "Source", "MACs (shrunk)", f"Predicted {s.metric} ({s.plan_metric})",
                       f"Measured {s.metric} ({s.plan_metric})", "As pruned", "Reconstructed", "Fine-tuned",
                       "Sparsities"], cand_rows, "candidates", highlight={s.plan_order})
         + (f'<p id="proxy">{html.escape(proxy)}</p>' if proxy else "")),
        ("Sensitivity",
         f"<p>{html.escape(s.metric)} of the model with one dependency set pruned at a time at each sparsity, "
         f"{_sweep_what(s)}; units ranked by {html.escape(_SCORES.get(s.unit_score, s.unit_score))}; dense: "
         f"{s.metric_before:.4f}.</p>"
         + table_html(["Dependency set", *[str(x) for x in st.sweep.sparsities]], sens_rows,
                      "sensitivity")),
        ("Dependency sets", table_html(["Set", "Layers", "Units", "Prunable"], dep_rows, "dependencies")),
        ("FLOPs per layer (MACs)", table_html(["Layer", "Type", "MACs (dense)", "MACs (shipped, shrunk)",
                                               "Params (dense)"], flops_rows, "flops")),
    ]
    lead = f'<p class="decision" id="decision">{html.escape(decision_sentence(s))}</p>'
    return render_html(f"prunescope report: {s.model}",
                       f"target {s.flops_target:.0%} of dense MACs; MACs are multiply-accumulates; "
                       f"{time.strftime('%Y-%m-%d %H:%M')}; run {s.run_id}", cards, sections, pngs, lead=lead)


def write_folder(st: Stages, folder: ReportFolder, tmp: str) -> dict[str, str]:
    """Write every file of the report into ``tmp`` (the folder's temporary twin); returns their final paths."""
    p = {k: os.path.join(tmp, v) for k, v in FILES.items()}
    ship = st.verification.shipped
    st.dense.report.to_csv(p["flops"])
    st.topology.channels.export(p["dependencies"])
    st.sweep.export(p["sensitivity_csv"])
    made: dict[str, str | None] = {}
    made["sensitivity_png"] = sensitivity_chart(st, p["sensitivity_png"])
    made["macs_png"] = macs_chart(st, p["macs_png"])
    save_masks(ship.masks, p["masks"])
    save_pruned(st.final_model, p["pruned"])
    config_list = [{"sparsity": v, "op_names": list(st.topology.get(k).members)} for k, v in ship.plan.items()]
    atomic_write_text(p["plan"], json.dumps(config_list, indent=2) + "\n")
    atomic_write_text(p["report"], page(st, [("MACs per layer: dense vs shipped", made["macs_png"]),
                                             ("Sensitivity curves", made["sensitivity_png"])]))
    atomic_write_text(p["summary"], json.dumps(st.summary.to_json(), indent=2) + "\n")
    return {k: folder.final(v) for k, v in FILES.items() if made.get(k, "x") is not None}
