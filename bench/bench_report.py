"""The report's own time (everything but the user's evaluations) vs the number of sets and candidate plans.

``prunescope report`` = trace + counts, topology, sensitivity sweep, plan search, verification, folder. With a
trivial evaluation (one forward on a small input, compared with the dense output) nearly all of the time left
is prunescope's own work. Models: torchvision resnet18 / resnet50 on 1x3x64x64 and a BERT-base-shaped
classifier (12 layers, 12 heads, hidden 768, MLP 3072; sequence 16), random weights, sparsities 0.25/0.5/0.75.

"before" is the old code path of the plan step, run in the same process: every candidate plan's masks made
conflict-free by ``fix_mask_conflict`` of the whole plan and counted from scratch by
``flops_report(..., effective=True)``; "after" is the shipped path (per-set masks and masked atoms computed once,
:class:`prunescope.flops.plancost.PlanCost`). Every run reports the whole report's own time per step, then
counts the plans its search counted once more by both paths, cold caches: all of them by the new path, a
sample by the old one (extrapolated: the old path takes minutes to hours on resnet50/BERT), and checks the
counts are equal. ``--before`` also runs the whole report on the old path.

    python bench/bench_report.py                 # resnet18, resnet50, bert-base; plan_evals 16
    python bench/bench_report.py --models resnet18 --evals 8,16,32 --before

Measured (2026-12-06, a 2-core machine shared with six other jobs, load average 7-9: absolute seconds are
several times those of an idle machine; before = commit a5198af, after = this code, run back to back, the same
plans chosen on resnet18 and BERT-base), the report's own time in seconds per step (user evaluations excluded):

    model      plans counted   cost  topology  sweep   plan  verify  folder   own total
    resnet18   before   236    0.14    0.44     1.26   4.07   2.40    2.16      10.5
               after     53    0.12    0.38     0.70   1.23   1.91    1.66       6.1
    resnet50   before  6827    0.29    1.34    25.32 166.24   5.33    4.14     202.7
               after    375    0.30    1.00     1.37   9.97   5.90    3.23      21.8
    bert-base  before   640    0.46    1.66    44.99  42.40  11.52    7.96     109.2
               after     52    0.62    2.09     3.29  14.02  12.04    5.47      37.7

Where the time went before (cProfile): the sweep's as-pruned zero points (``follower_zero_map`` per group, a
class-member scan per channel position: 18 s resnet50, 150 s BERT under the profiler) -> one walk for all
groups (``follower_zero_maps``); the plan step counted every neighbour of every move (~1,400 on resnet50, each
a removal decision whose value-state walk is ~20 ms) -> neighbours ranked by prediction first and counted only
up to the one measured next, the value-state walk restarted from the nearest vector seen (``IncrementalStates``),
predictions vectorised. What is left after: the plan step's per-measurement work (applying the masks: validating
and snapshotting every masked weight, ~0.5 s per plan on BERT-base here), verify's latency timing and two
``shrink`` calls, and the page (plots).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from typing import Any, Iterator

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from prunescope.report import steps as report_steps  # noqa: E402


def build(name: str) -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(0)
    if name.startswith("resnet"):
        import torchvision

        return getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 64, 64), None
    import transformers

    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, max_position_embeddings=64, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    return model, {"input_ids": torch.randint(0, 1000, (1, 16))}, "logits"


def old_masks_for(self: Any, plan: dict[str, float]) -> dict[str, Any]:
    """The plan step before: raw group masks of every set, one ``fix_mask_conflict`` of the whole plan."""
    from prunescope.masks import fix_mask_conflict
    from prunescope.masks.pruners import group_masks

    key = tuple(sorted((k, v) for k, v in plan.items() if v > 0))
    hit = self._masks_cache.get(key)
    if hit is not None:
        return hit
    merged: dict[str, Any] = {}
    for k, s in key:
        members = k.split("+")
        merged.update(zip(members, group_masks([self.modules[m] for m in members], float(s), "l1",
                                               units=self.units.get(k))))
    out = dict(fix_mask_conflict(merged, self.model, self.x, traced=self.graph)) if merged else {}
    self._masks_cache[key] = out
    return out


def old_macs_of(self: Any, plan: dict[str, float]) -> int:
    """The plan step before: a count from scratch per plan."""
    from prunescope.flops import flops_report

    masks = self.masks_for(plan)
    if not masks:
        return int(self.dense.total_flops)
    return int(flops_report(self.model, self.x, graph=self.graph, masks=masks, effective=True).total_flops)


@contextlib.contextmanager
def old_path() -> Iterator[None]:
    run = report_steps.Run
    saved = run.masks_for, run.macs_of
    run.masks_for, run.macs_of = old_masks_for, old_macs_of  # type: ignore[method-assign]
    try:
        yield
    finally:
        run.masks_for, run.macs_of = saved  # type: ignore[method-assign]


def trivial_val(model: torch.nn.Module, x: Any, field: str | None, clock: dict[str, float]) -> Any:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    ref = getattr(out, field) if field else out

    def val(m: torch.nn.Module) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            o = m(**x) if isinstance(x, dict) else m(x)
        v = -float((getattr(o, field) if field else o).sub(ref).abs().mean())
        clock["eval"] += time.perf_counter() - t
        clock["n"] += 1
        return v

    return val


def one(name: str, plan_evals: int, before: bool, sample: int) -> dict[str, Any]:
    """The whole report (its steps and the folder), own time per step; then the plan step's counting on the
    same plans by both paths (the old one on a sample, extrapolated to all of them)."""
    from prunescope.report.output import ReportFolder
    from prunescope.report.page import FILES, write_folder

    model, x, field = build(name)
    clock = {"eval": 0.0, "n": 0}
    val = trivial_val(model, x, field, clock)
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d, (old_path() if before else contextlib.nullcontext()):
        folder = ReportFolder(os.path.join(d, "r"), tuple(FILES.values()))
        r = report_steps.Run(model, val, x, 0.5, [0.25, 0.5, 0.75], None, 1.0, name, "agreement", False, None,
                             plan_evals=plan_evals)
        for step in report_steps.STEPS:
            t, e = time.perf_counter(), clock["eval"]
            step(r)
            steps[step.__name__.replace("step_", "")] = round(time.perf_counter() - t - (clock["eval"] - e), 2)
        t = time.perf_counter()
        with folder as tmp:
            write_folder(r, folder, tmp)
        steps["folder"] = round(time.perf_counter() - t, 2)
    wall = time.perf_counter() - t0
    assert r.search is not None
    plans = [dict(c.plan) for c in r.search.candidates.values() if c.plan]
    row = {"model": name, "path": "before" if before else "after", "plan_evals": plan_evals, "sets": len(r.keys),
           "counted_plans": len(plans), "candidates": len(r.search.measured), "wall": wall,
           "evals_s": clock["eval"], "n_evals": clock["n"], "own": wall - clock["eval"], "plan": r.chosen.plan,
           "steps": steps, "chosen": (r.chosen.source, r.chosen.macs, r.chosen.measured)}
    # the counting alone, cold caches, the same plans: new path on all, old path on a sample
    fresh = report_steps.Run(model, lambda m: 0.0, x, 0.5, None, None, 1.0, name, "m", False, None)
    report_steps.step_cost(fresh)
    report_steps.step_topology(fresh)
    t = time.perf_counter()
    new = [fresh.macs_of(p) for p in plans]
    row["count_new_s"] = time.perf_counter() - t
    picked = plans[:: max(1, len(plans) // sample)][:sample]
    t = time.perf_counter()
    old = [old_macs_of_fresh(fresh, p) for p in picked]
    per = (time.perf_counter() - t) / max(1, len(picked))
    row["count_old_per_plan_s"] = per
    row["count_old_s_extrapolated"] = per * len(plans)
    row["count_equal"] = all(fresh.macs_of(p) == o for p, o in zip(picked, old))
    assert new  # every plan counted by the new path
    return row


def old_macs_of_fresh(r: Any, plan: dict[str, float]) -> int:
    """The old count of one plan, no cache: raw group masks, the whole-plan conflict fix, a count from scratch."""
    from prunescope.flops import flops_report
    from prunescope.masks import fix_mask_conflict
    from prunescope.masks.pruners import group_masks

    merged: dict[str, Any] = {}
    for k, s in plan.items():
        members = k.split("+")
        merged.update(zip(members, group_masks([r.modules[m] for m in members], float(s), "l1",
                                               units=r.units.get(k))))
    masks = dict(fix_mask_conflict(merged, r.model, r.x, traced=r.graph))
    return int(flops_report(r.model, r.x, graph=r.graph, masks=masks, effective=True).total_flops)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50,bert-base")
    p.add_argument("--evals", default="16", help="plan_evals values (candidate plans measured)")
    p.add_argument("--before", action="store_true",
                   help="also run the whole report on the old code path (minutes to hours on resnet50/BERT)")
    p.add_argument("--sample", type=int, default=8, help="plans counted by the old path (extrapolated)")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    for name in a.models.split(","):
        for ev in [int(v) for v in a.evals.split(",")]:
            for before in ([True, False] if a.before else [False]):
                r = one(name, ev, before, a.sample)
                print(f"{r['model']:<10} {r['path']:<6} sets {r['sets']:>3} plan_evals {r['plan_evals']:>3}: "
                      f"{r['counted_plans']} plans counted, {r['candidates']} measured; wall {r['wall']:6.1f} s, "
                      f"{r['n_evals']} evaluations {r['evals_s']:5.1f} s, own {r['own']:6.1f} s; own per step (s) "
                      f"{r['steps']}; chosen {r['chosen']}", flush=True)
                print(f"{'':<10} counting those {r['counted_plans']} plans: before "
                      f"{r['count_old_s_extrapolated']:7.1f} s "
                      f"({r['count_old_per_plan_s'] * 1e3:.0f} ms/plan on {a.sample}, extrapolated), after "
                      f"{r['count_new_s']:5.2f} s ({r['count_new_s'] / max(1, r['counted_plans']) * 1e3:.1f} "
                      f"ms/plan, cold caches); equal counts: {r['count_equal']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
