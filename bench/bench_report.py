"""The report's own time (everything but the user's evaluations), per stage, on resnet18/resnet50/BERT-base shapes.

``prunescope report`` = trace + counts, topology, sensitivity sweep, plan search, verification, recovery, folder.
With a trivial evaluation (one forward on a small input, compared with the dense output) nearly all of the time
left is prunescope's own work. Models: torchvision resnet18 / resnet50 on 1x3x64x64 and a BERT-base-shaped
classifier (12 layers, 12 heads, hidden 768, MLP 3072; sequence 16), random weights, sparsities 0.25/0.5/0.75.
The stages are called as :func:`prunescope.report.run_report` calls them (:mod:`prunescope.report.stages`).

``--baseline REV`` runs the same measurement on another commit's ``src/`` (``git archive``) and on this tree's,
each in a fresh subprocess, alternating per model, and prints this/baseline ratios per stage; it also checks that both
chose the same plan with the same counts and metrics (``summary.json`` minus timings and run id).
The plan step's counting is checked too: every plan the search counted, counted again by
:class:`prunescope.report.plans.PlanMasks` (cold caches) and, on a sample, from scratch (the masks of the whole
plan made conflict-free by ``fix_mask_conflict``, ``flops_report(..., effective=True)``); the counts must be equal.

    python bench/bench_report.py                          # resnet18, resnet50, bert-base; plan_evals 16
    python bench/bench_report.py --models bert-base --baseline 970ae91
    python bench/bench_report.py --models bert-base,resnet50 --baseline 3934f3f --repeat 3   # fastest of 3 each

Measured (2026-12-06, a 2-core machine shared with other jobs: absolute seconds vary with the load, the ratios
are of runs back to back), the report's own time in seconds per stage (user evaluations excluded):
see the README ("The report's own time") for the table of the latest run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("PRUNESCOPE_SRC") or os.path.join(HERE, "..", "src"))

from prunescope.flops import flops_report  # noqa: E402
from prunescope.masks import fix_mask_conflict  # noqa: E402
from prunescope.masks.pruners import group_masks  # noqa: E402
from prunescope.report import stages as S  # noqa: E402
from prunescope.report.context import Context  # noqa: E402
from prunescope.report.output import ReportFolder  # noqa: E402
from prunescope.report.page import FILES, write_folder  # noqa: E402
from prunescope.report.plans import PlanMasks  # noqa: E402
from prunescope.report.records import Stages  # noqa: E402

#: summary.json fields that differ between two runs of the same report (timings, the folder's run id)
VOLATILE = {"run_id", "seconds", "latency_before_ms", "latency_after_ms", "uniform_latency_ms"}


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


def one(name: str, plan_evals: int, sample: int, profile: str | None = None) -> dict[str, Any]:
    """The whole report (its stages and the folder), own time per stage; then the plan step's counting of the
    same plans checked against counts from scratch (a sample)."""
    model, x, field = build(name)
    before = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    clock = {"eval": 0.0, "n": 0}
    val = trivial_val(model, x, field, clock)
    steps: dict[str, float] = {}
    ctx = Context(model, val, x, flops_target=0.5, sign=1.0, model_name=name, metric_name="agreement",
                  console=None, progress=False)

    def timed(label: str, fn: Any, *args: Any) -> Any:
        t, e = time.perf_counter(), clock["eval"]
        out = fn(*args)
        steps[label] = round(steps.get(label, 0.0) + time.perf_counter() - t - (clock["eval"] - e), 2)
        return out

    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    dense = timed("cost", S.dense_cost, ctx)
    topo = timed("topology", S.topology, ctx, dense)
    swept = timed("sweep", S.sweep, ctx, dense, topo, [0.25, 0.5, 0.75], None)
    plans = timed("plan", PlanMasks, model, x, dense, topo)
    choice = timed("plan", S.choose, ctx, dense, topo, swept, plans, plan_evals)
    verified = timed("verify", S.verify, ctx, dense, plans, choice)
    recovered = timed("recover", S.recover, ctx, verified)
    summary = S.summarize(ctx, dense, topo, swept, choice, verified, recovered, "bench")
    with tempfile.TemporaryDirectory() as d:
        folder = ReportFolder(os.path.join(d, "r"), tuple(FILES.values()))
        t = time.perf_counter()
        with folder as tmp:
            write_folder(Stages(dense, topo, swept, choice, verified, recovered, summary), folder, tmp)
        steps["folder"] = round(time.perf_counter() - t, 2)
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    after = model.state_dict(keep_vars=True)
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "the report left the model modified"
    plans_counted = [dict(c.plan) for c in choice.search.candidates.values() if c.plan]
    row: dict[str, Any] = {
        "model": name, "plan_evals": plan_evals, "sets": len(topo.sets), "counted_plans": len(plans_counted),
        "candidates": len(choice.search.measured), "wall": wall, "evals_s": clock["eval"], "n_evals": clock["n"],
        "own": wall - clock["eval"], "steps": steps,
        "summary": {k: v for k, v in summary.to_json().items() if k not in VOLATILE}}
    # the counting alone, cold caches, the same plans; a sample counted from scratch
    fresh = PlanMasks(model, x, dense, topo)
    t = time.perf_counter()
    new = [fresh.macs_of(p) for p in plans_counted]
    row["count_new_s"] = time.perf_counter() - t
    picked = list(range(0, len(plans_counted), max(1, len(plans_counted) // sample)))[:sample]
    t = time.perf_counter()
    old = [count_from_scratch(fresh, plans_counted[i]) for i in picked]
    row["count_old_per_plan_s"] = (time.perf_counter() - t) / max(1, len(picked))
    row["count_equal"] = all(new[i] == o for i, o in zip(picked, old))
    return row


def count_from_scratch(pm: PlanMasks, plan: dict[str, float]) -> int:
    """One plan's count without the per-set caches: raw group masks, the whole-plan conflict fix, a count from
    scratch."""
    modules = dict(pm.model.named_modules())
    merged: dict[str, Any] = {}
    for k, s in plan.items():
        st = pm.topology.get(k)
        merged.update(zip(st.members, group_masks([modules[m] for m in st.members], float(s), "l1",
                                                  units=st.unit_lists())))
    masks = dict(fix_mask_conflict(merged, pm.model, pm.x, traced=pm.dense.graph))
    return int(flops_report(pm.model, pm.x, graph=pm.dense.graph, masks=masks, effective=True).total_flops)


def row_in_subprocess(src: str, name: str, plan_evals: int, sample: int) -> dict[str, Any]:
    """:func:`one` on the package under ``src`` in a fresh interpreter (both sides of a comparison start cold:
    no import or allocator warmed up by the other)."""
    env = dict(os.environ, PRUNESCOPE_SRC=src)
    out = subprocess.run([sys.executable, __file__, "--models", name, "--evals", str(plan_evals), "--sample",
                          str(sample), "--json"], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def extract(rev: str) -> str:
    """Commit ``rev``'s ``src/`` in a temporary folder (``git archive``)."""
    base = tempfile.mkdtemp(prefix="bench_report_base_")
    archive = subprocess.run(["git", "-C", os.path.join(HERE, ".."), "archive", rev, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
    return os.path.join(base, "src")


def fastest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of one side: every time its minimum over the runs (own time, wall, each stage),
    the rest from the first run; ``runs`` = how many; a summary that differs between runs is kept as ``None``
    (then never equal to the other side's)."""
    out = dict(rows[0])
    for k in ("wall", "evals_s", "own", "count_new_s", "count_old_per_plan_s"):
        out[k] = min(r[k] for r in rows)
    out["steps"] = {k: min(r["steps"].get(k, 0.0) for r in rows) for k in rows[0]["steps"]}
    out["runs"] = len(rows)
    out["count_equal"] = all(r["count_equal"] for r in rows)
    if any(r["summary"] != rows[0]["summary"] for r in rows):
        out["summary"] = None
    return out


def show(r: dict[str, Any], label: str) -> None:
    print(f"{r['model']:<10} {label:<8} sets {r['sets']:>3} plan_evals {r['plan_evals']:>3}: {r['counted_plans']} "
          f"plans counted, {r['candidates']} measured; wall {r['wall']:6.1f} s, {r['n_evals']} evaluations "
          f"{r['evals_s']:5.1f} s, own {r['own']:6.1f} s; own per stage (s) {r['steps']}"
          + (f" (each the fastest of {r['runs']} runs)" if r.get("runs", 1) > 1 else ""), flush=True)
    per = r["count_new_s"] / max(1, r["counted_plans"]) * 1e3
    print(f"{'':<19} counting: {r['count_new_s']:5.2f} s for all ({per:.1f} ms/plan, cold caches), from scratch "
          f"{r['count_old_per_plan_s'] * 1e3:.0f} ms/plan; equal counts: {r['count_equal']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50,bert-base")
    p.add_argument("--evals", default="16", help="plan_evals values (candidate plans measured)")
    p.add_argument("--baseline", metavar="REV", help="also measure commit REV's src/ (git archive), model by model")
    p.add_argument("--sample", type=int, default=4, help="plans counted from scratch to check the counts")
    p.add_argument("--profile", metavar="FILE", help="cProfile the report's stages into FILE.<model>")
    p.add_argument("--json", action="store_true", help="print each row as one JSON line (the --baseline worker)")
    p.add_argument("--repeat", type=int, default=1, help="with --baseline: runs per side, alternating; the table "
                   "shows each stage's fastest run (the least disturbed by the machine's load)")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    base_src = extract(a.baseline) if a.baseline else None
    if base_src is not None:
        atexit.register(shutil.rmtree, os.path.dirname(base_src), True)
    for name in a.models.split(","):
        for ev in [int(v) for v in a.evals.split(",")]:
            if base_src:
                bases, rs = [], []
                for _ in range(max(1, a.repeat)):
                    bases.append(row_in_subprocess(base_src, name, ev, a.sample))
                    rs.append(row_in_subprocess(os.path.join(HERE, "..", "src"), name, ev, a.sample))
                base, r = fastest(bases), fastest(rs)
            else:
                base, r = None, one(name, ev, a.sample, f"{a.profile}.{name}" if a.profile else None)
            if a.json:
                print(json.dumps(r), flush=True)
                continue
            if base is not None:
                show(base, a.baseline[:8])
            show(r, "this")
            if base is not None:
                ratios = {k: f"{v / max(base['steps'].get(k, 0.0), 1e-9):.2f}" for k, v in r["steps"].items()}
                same = base["summary"] == r["summary"]
                diff = [k for k in (r["summary"] or {}) if (base["summary"] or {}).get(k) != r["summary"][k]]
                print(f"{'':<19} this / {a.baseline[:8]}: own {r['own'] / base['own']:.2f} "
                      f"({base['own']:.1f} -> {r['own']:.1f} s); per stage {ratios}; same summary.json: {same}"
                      + ("" if same else f" (differs in {diff})"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
