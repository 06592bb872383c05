"""``prunescope report [MODEL --input-size ... --val pkg.mod:evaluate] --out DIR [--flops-target 0.5] [--workers N]``

With no MODEL: an embedded example trained on scikit-learn's bundled digits, chosen with ``--example``:
``digits`` (the default, a small residual CNN) or ``vit-digits`` (a tiny Vision Transformer whose pruning
units are attention heads and MLP units).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..examples import EXAMPLES, load_example
from .common import CLIError, load_model, load_object, parse_size


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="full analysis ending in a verified pruning plan (the main job)",
                       description="FLOPs, topology, sensitivity and a pruning plan that meets a FLOPs target, "
                                   "verified by measuring the pruned model. Without MODEL it analyses an "
                                   "embedded example trained on scikit-learn's digits (--example; default: a "
                                   "residual CNN).")
    p.add_argument("model", nargs="?", default=None,
                   help="torchvision model name or package.module:callable (default: an embedded example)")
    p.add_argument("--example", choices=sorted(EXAMPLES), default=None,
                   help="embedded example to analyse without MODEL: " + "; ".join(
                       f"{k}: {v.description}" for k, v in sorted(EXAMPLES.items())) + " (default: digits)")
    p.add_argument("--input-size", default=None, help="example input size, e.g. 1,3,224,224 (needed with MODEL)")
    p.add_argument("--val", default=None, help="package.module:evaluate, called as evaluate(model) -> metric")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--flops-target", type=float, default=0.5,
                   help="fraction of the dense (effective) MACs to keep, in (0, 1] (default 0.5)")
    p.add_argument("--sparsities", default=None, help="sparsities to measure, e.g. 0.25,0.5,0.75 "
                                                      "(default 0.1..0.9)")
    p.add_argument("--workers", type=int, default=None, help="run the sensitivity sweep in N processes")
    p.add_argument("--lower-is-better", action="store_true", help="the metric is a loss (lower is better)")
    p.add_argument("--plan-evals", type=int, default=16,
                   help="candidate plans measured to choose the plan (one evaluation each; default 16)")
    p.add_argument("--calibrate", default=None,
                   help="package.module:batches -- BatchNorm re-estimation of the pruned model on these inputs "
                        "(an iterable, or a function returning one; the embedded default uses its training split)")
    p.add_argument("--finetune", default=None,
                   help="package.module:fn -- fn(model) fine-tunes the pruned model in place (the embedded default "
                        "ships one: a few epochs on its training split)")
    p.add_argument("--no-recovery", action="store_true",
                   help="ship the shrunk model without the embedded default's calibration and fine-tuning")
    p.add_argument("--no-finetune", action="store_true",
                   help="ship without fine-tuning: the reconstructed model (least squares from the calibration "
                        "inputs) is what ships")
    p.add_argument("--score", choices=("l1", "activation", "reconstruction"), default=None,
                   help="how units are ranked: l1 (weight norm), or by what removing them costs on the calibration "
                        "inputs: activation (|W|*||X||, Wanda-sp/FLAP) or reconstruction (greedy least-squares "
                        "refit error, ThiNet); default: activation when the report reconstructs, else l1")
    p.add_argument("--as-pruned-sweep", action="store_true",
                   help="measure the sensitivity sweep as pruned even when reconstructing (faster; the plan "
                        "search and the shipped model are still reconstructed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _sparsities(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"malformed --sparsities {text!r}") from None


def _user_job(a: argparse.Namespace) -> dict[str, Any]:
    """MODEL, --val and --input-size: the report's arguments for the user's own model."""
    if a.example:
        raise CLIError("--example is for the embedded examples; it does not go with MODEL")
    if not a.val or not a.input_size:
        raise CLIError("MODEL needs --input-size and --val package.module:evaluate")
    model = load_model(a.model)
    val = load_object(a.val, "validation function")
    if not callable(val):
        raise CLIError(f"--val {a.val!r} is not callable")
    return {"model": model, "val_func": val, "dummy_input": torch.ones(parse_size(a.input_size)),
            "model_name": a.model, "metric_name": a.val.rpartition(":")[2], "calibrate": None, "finetune": None}


def _run(a: argparse.Namespace) -> int:
    from ..report import run_report  # here, not at the top: every other command would pay for importing it

    if a.model is None:
        if a.val or a.input_size:
            raise CLIError("--val and --input-size go with MODEL; without MODEL the embedded default is used")
        ex = EXAMPLES[a.example or "digits"]
        print(f"prunescope report: embedded example {ex.name} -- {ex.description} "
              f"(weights cached in {ex.module.cache_dir()})")
        got = load_example(ex.name, recovery=not a.no_recovery, finetune=not a.no_finetune)
        job = {"model": got.model, "val_func": got.evaluate, "dummy_input": got.dummy_input,
               "model_name": got.model_name, "metric_name": got.metric_name, "calibrate": got.calibrate,
               "finetune": got.finetune}
    else:
        job = _user_job(a)
    if a.calibrate:
        job["calibrate"] = load_object(a.calibrate, "calibration batches")
    if a.finetune:
        job["finetune"] = load_object(a.finetune, "fine-tuning function")
        if not callable(job["finetune"]):
            raise CLIError(f"--finetune {a.finetune!r} is not callable")
    if a.no_recovery:
        job["calibrate"] = job["finetune"] = None
    if a.no_finetune:
        job["finetune"] = None
    if a.score not in (None, "l1") and job["calibrate"] is None:
        raise CLIError(f"--score {a.score} ranks units by what removing them costs on calibration inputs, and "
                       "there are none" + (" (--no-recovery drops the example's)" if a.no_recovery else "")
                       + ": give --calibrate package.module:batches, or use --score l1")
    metric = job["metric_name"]
    res = run_report(job.pop("model"), job.pop("val_func"), job.pop("dummy_input"), a.out,
                     flops_target=a.flops_target, sparsities=_sparsities(a.sparsities), workers=a.workers,
                     higher_is_better=not a.lower_is_better, progress=not a.no_progress and sys.stderr.isatty(),
                     plan_evals=a.plan_evals, score=a.score, reconstruct_sweep=not a.as_pruned_sweep, **job)
    assert res.stages is not None
    s = res.stages.summary
    uniform = s.uniform_metric_measured if s.uniform_metric_measured is not None else float("nan")
    print()
    print(f"  MACs    {s.flops_before:>12,} -> {s.flops_after:>12,}  "
          f"({s.flops_after / max(1, s.flops_before):.1%}, target {s.flops_target:.0%})")
    print(f"  params  {s.params_before:>12,} -> {s.params_after:>12,}")
    print(f"  {metric:<7} {s.metric_before:>12.4f} -> {s.metric_after_measured:>12.4f}  "
          f"(shrunk, as pruned; predicted ({s.plan_metric}) {s.metric_after_predicted:.4f}; uniform baseline "
          f"{uniform:.4f})")
    print(f"  chosen  by {s.plan_metric} models; sweep measured {s.sweep_metric} models; units ranked by "
          f"{s.unit_score}")
    if s.recovery_steps:
        kept = [st.label for st in s.recovery_steps if st.kept]
        undone = [st.label for st in s.recovery_steps if not st.kept]
        print(f"  final   {s.metric_final:>12.4f}  " + ("after " + ", ".join(kept) if kept else "no recovery step kept")
              + (f" ({', '.join(undone)} undone: it lowered {s.metric})" if undone else ""))
    print(f"  latency {s.latency_before_ms:>10.3f}ms -> {s.latency_after_ms:>10.3f}ms  (CPU, median)")
    if s.note:
        print(f"  note: {s.note}")
    print(f"  report: {res.files['report']}")
    return 0 if s.target_met else 3
