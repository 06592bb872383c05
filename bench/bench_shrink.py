"""Benchmark: shrinking to a working smaller model — prunescope vs Torch-Pruning 1.6.1 vs NNI 2.10.1's
ModelSpeedup, on the same torchvision models at the same sparsity, in the same run; and real CPU speed.

``python bench/bench_shrink.py [--models a,b] [--timeout 120] [--tools prunescope,torch_pruning,nni]``
(or ``bench/run_all.py shrink``). Every tool gets the same task: random weights, 30% of the filters of every
Conv2d/Linear except the classifier, then the smaller model, which must run and keep the output shape. Each
(tool, model) runs in its own process (``bench/shrink_worker.py``, one torch thread), timed inside it from the
built model to the smaller model; a run past ``--timeout`` seconds counts as a failure. Torch-Pruning must be
installed in this interpreter (``pip install torch-pruning==1.6.1``; it is never a dependency of prunescope);
NNI runs in ``NNI_PYTHON`` (default ``/work/nni-venv/bin/python``). The tools resolve residual ties
differently (prunescope: NNI's union rule on per-layer L1 masks; Torch-Pruning: 30% of every dependency group),
so the MACs they keep differ: the table prints them (prunescope's counter, same formulas for all; NNI's venv
has no prunescope, so its column shows none). prunescope follows its documented workflow: the layers
``not_safe_to_prune`` reports are excluded like the classifier (``--tools prunescope_strict`` masks them too;
shrink then refuses those models by name).

Then: resnet50 with half of every prunable dependency set removed (the report's sets), shrunk; CPU latency
(median of interleaved runs, batch 8 at 224x224) against the dense model, next to the MACs ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NNI_PYTHON = os.environ.get("NNI_PYTHON", "/work/nni-venv/bin/python")
MODELS = (
    "alexnet vgg11_bn resnet18 resnet50 resnext50_32x4d wide_resnet50_2 densenet121 googlenet inception_v3 "
    "squeezenet1_0 squeezenet1_1 mobilenet_v2 mobilenet_v3_small mobilenet_v3_large mnasnet0_5 mnasnet1_0 "
    "shufflenet_v2_x0_5 shufflenet_v2_x1_0 shufflenet_v2_x1_5 efficientnet_b0 efficientnet_b1 efficientnet_v2_s "
    "regnet_x_400mf regnet_y_400mf regnet_x_800mf regnet_y_800mf regnet_y_1_6gf convnext_tiny convnext_small "
    "swin_t swin_s swin_v2_t maxvit_t vit_b_16 vit_b_32 resnet34 resnet101 densenet169 vgg16 "
    "wide_resnet101_2 resnext101_32x8d"
).split()


def run_one(tool: str, model: str, timeout: float) -> dict:
    py = NNI_PYTHON if tool == "nni" else sys.executable
    try:
        p = subprocess.run([py, os.path.join(HERE, "shrink_worker.py"), tool, model], capture_output=True,
                           text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return {"tool": tool, "model": model, "ok": False, "seconds": timeout, "error": f"> {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"tool": tool, "model": model, "ok": False, "seconds": float("nan"), "error": tail[:160]}
    return json.loads(lines[-1])


def latency_check() -> None:
    import warnings

    import torch
    import torchvision

    from prunescope.flops import flops_report
    from prunescope.graph import trace
    from prunescope.masks.pruners import group_masks
    from prunescope.narrow import shrink
    from prunescope.narrow.latency import measure_latency
    from prunescope.report import prunable_sets

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(8, 3, 224, 224)
    g = trace(model, x)
    sets, _, _ = prunable_sets(model, g, x)
    mods = dict(model.named_modules())
    masks: dict = {}
    for s in sets:
        masks.update(zip(s, group_masks([mods[m] for m in s], 0.5, "l1")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = shrink(model, masks, x, graph=g)
    macs = flops_report(small, x).total_flops / flops_report(model, x, graph=g).total_flops
    ms = measure_latency({"dense": model, "shrunk": small}, x, runs=9, budget_s=120)
    print(f"\nresnet50, half of every prunable set removed ({len(sets)} sets), batch 8, {torch.get_num_threads()} "
          f"threads: MACs ratio {macs:.3f}, CPU latency {ms['dense']:.0f} ms -> {ms['shrunk']:.0f} ms, "
          f"latency ratio {ms['shrunk'] / ms['dense']:.3f} (latency ratio / MACs ratio = "
          f"{ms['shrunk'] / ms['dense'] / macs:.2f})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tools", default="prunescope,torch_pruning,nni")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--no-latency", action="store_true")
    a = ap.parse_args(argv if argv is not None else [])
    tools = [t for t in a.tools.split(",") if t]
    if "nni" in tools and not os.path.exists(NNI_PYTHON):
        print(f"(NNI skipped: no interpreter at {NNI_PYTHON}; set NNI_PYTHON)")
        tools.remove("nni")
    if "torch_pruning" in tools:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("(Torch-Pruning skipped: pip install torch-pruning==1.6.1 into this interpreter)")
            tools.remove("torch_pruning")
    models = [m for m in a.models.split(",") if m]
    results: dict[str, list[dict]] = {t: [] for t in tools}
    print(f"{'model':<22}" + "".join(f"{t:>28}" for t in tools))
    for m in models:
        row = []
        for t in tools:
            r = run_one(t, m, a.timeout)
            results[t].append(r)
            macs = f"{r['macs_ratio']:.2f}" if "macs_ratio" in r else "  - "
            cell = f"ok {r['seconds']:6.2f}s {macs}" if r["ok"] else f"FAIL {str(r.get('error', ''))[:20]}"
            row.append(f"{cell:>28}")
        print(f"{m:<22}" + "".join(row), flush=True)
    print()
    base = None
    for t in tools:
        ok = [r for r in results[t] if r["ok"]]
        secs = [r["seconds"] for r in ok]
        med = statistics.median(secs) if secs else float("nan")
        base = med if t == "torch_pruning" else base
        print(f"{t:<14} shrinks {len(ok)}/{len(models)} to a working model; median {med:.2f} s, "
              f"max {max(secs) if secs else float('nan'):.2f} s")
        for r in results[t]:
            if not r["ok"]:
                print(f"    {r['model']}: {r.get('error')}")
    if base:
        ours = [r["seconds"] for r in results.get("prunescope", []) if r["ok"]]
        if ours:
            print(f"prunescope median / Torch-Pruning median = {statistics.median(ours) / base:.2f}; prunescope max "
                  f"/ Torch-Pruning median = {max(ours) / base:.2f}")
    if not a.no_latency:
        latency_check()


if __name__ == "__main__":
    main(sys.argv[1:])
