"""The report's own time (everything but the user's evaluations) vs the number of sets and candidate plans.

``prunescope report`` = trace + counts, topology, sensitivity sweep, plan search, verification, folder. With a
trivial evaluation (one forward on a small input, compared with the dense output) nearly all of the time left
is prunescope's own work. Models: torchvision resnet18 / resnet50 on 1x3x64x64 and a BERT-base-shaped
classifier (12 layers, 12 heads, hidden 768, MLP 3072; sequence 16), random weights, sparsities 0.25/0.5/0.75.

"before" is the old code path of the plan step, run in the same process: every candidate plan's masks made
conflict-free by ``fix_mask_conflict`` of the whole plan and counted from scratch by
``flops_report(..., effective=True)``; "after" is the shipped path (per-set masks and masked atoms computed once,
:class:`prunescope.flops.plancost.PlanCost`). Both choose the same plan (checked).

    python bench/bench_report.py                 # resnet18, resnet50, bert-base; plan_evals 16 before/after
    python bench/bench_report.py --models resnet18 --evals 8,16,32 --no-before
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

from prunescope.report import run_report  # noqa: E402
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


def one(name: str, plan_evals: int, before: bool) -> dict[str, Any]:
    model, x, field = build(name)
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    ref = getattr(out, field) if field else out
    steps: list[tuple[str, float, float]] = []  # (step line, wall seconds, evaluation seconds)
    clock = {"t": time.perf_counter(), "eval": 0.0, "n": 0}

    def val(m: torch.nn.Module) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            o = m(**x) if isinstance(x, dict) else m(x)
        v = -float((getattr(o, field) if field else o).sub(ref).abs().mean())
        clock["eval"] += time.perf_counter() - t
        clock["n"] += 1
        return v

    def console(line: str) -> None:
        now = time.perf_counter()
        steps.append((line.split()[1] if line.startswith("[") else line[:20], now - clock["t"], clock["eval"]))
        clock["t"], clock["eval"] = now, 0.0

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d, (old_path() if before else contextlib.nullcontext()):
        res = run_report(model, val, x, os.path.join(d, "r"), sparsities=[0.25, 0.5, 0.75], plan_evals=plan_evals,
                         progress=False, console=console)
        wall = time.perf_counter() - t0
    s = res.summary
    evals = sum(e for _, _, e in steps) + clock["eval"]
    return {"model": name, "path": "before" if before else "after", "plan_evals": plan_evals,
            "sets": len(s["set_units"]), "candidates": len(s["plan_candidates"]), "wall": wall, "evals_s": evals,
            "n_evals": clock["n"], "own": wall - evals, "plan": s["plan"],
            "steps": {**{k: round(w - e, 2) for k, w, e in steps},
                      "folder": round(wall - sum(w for _, w, _ in steps) - clock["eval"], 2)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50,bert-base")
    p.add_argument("--evals", default="16", help="plan_evals values (candidate plans measured)")
    p.add_argument("--no-before", action="store_true", help="skip the old code path")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    rows = []
    for name in a.models.split(","):
        for ev in [int(v) for v in a.evals.split(",")]:
            for before in ([True, False] if not a.no_before else [False]):
                r = one(name, ev, before)
                rows.append(r)
                print(f"{r['model']:<10} {r['path']:<6} sets {r['sets']:>3} plan_evals {r['plan_evals']:>3} "
                      f"candidates {r['candidates']:>3}: wall {r['wall']:7.1f} s, evaluations {r['n_evals']:>4} "
                      f"({r['evals_s']:6.1f} s), own {r['own']:7.1f} s; own per step (s): {r['steps']}", flush=True)
    for name in a.models.split(","):
        for ev in [int(v) for v in a.evals.split(",")]:
            b = [r for r in rows if r["model"] == name and r["plan_evals"] == ev]
            if len(b) == 2:
                old, new = b
                same = "same plan" if old["plan"] == new["plan"] else "DIFFERENT PLANS"
                print(f"{name} plan_evals {ev}: own time {old['own']:.1f} s -> {new['own']:.1f} s "
                      f"({old['own'] / max(new['own'], 1e-9):.1f}x; plan step {old['steps'].get('plan')} -> "
                      f"{new['steps'].get('plan')} s), {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
