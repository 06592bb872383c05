"""Benchmark: prunescope ChannelDependency vs NNI 2.10.1's, in the same run; plus the torchvision zoo.

``python bench/bench_topology.py`` (or ``bench/run_all.py topology``). NNI runs in its own interpreter
(``NNI_PYTHON``, default ``/work/nni-venv/bin/python``) through a subprocess, timed inside that process
around ``ChannelDependency(model, x)`` only (model construction and imports excluded, like ours; ours
includes the trace). Each figure is the best of ``REPEAT`` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import torch
import torchvision

QUICK = os.environ.get("PRUNESCOPE_BENCH_QUICK") == "1"  # bench/run_all.py --quick: small inputs, to prove it runs
MODELS = ("resnet18",) if QUICK else ("resnet50", "densenet121")
REPEAT = 1 if QUICK else 3
NNI_PYTHON = os.environ.get("NNI_PYTHON", "/work/nni-venv/bin/python")

_NNI_SCRIPT = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch, torchvision
from nni.compression.pytorch.utils import ChannelDependency
torch.set_num_threads(int(sys.argv[3]))
model = torchvision.models.get_model(sys.argv[1], weights=None).eval()
x = torch.ones(1, 3, 224, 224)
best = float("inf")
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    ChannelDependency(model, x)
    best = min(best, time.perf_counter() - t)
print(json.dumps({"seconds": best}))
"""


def ours(name: str, device: str = "cpu") -> float:
    from prunescope.topology import ChannelDependency

    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.ones(1, 3, 224, 224)
    best = float("inf")
    for _ in range(REPEAT):
        t = time.perf_counter()
        ChannelDependency(model, x)
        best = min(best, time.perf_counter() - t)
    return best


def nni(name: str) -> float | None:
    if not os.path.exists(NNI_PYTHON):
        return None
    res = subprocess.run([NNI_PYTHON, "-c", _NNI_SCRIPT, name, str(REPEAT), str(torch.get_num_threads())],
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        print(f"  NNI failed on {name}: {res.stderr.strip().splitlines()[-1:]}")
        return None
    return float(json.loads(res.stdout.strip().splitlines()[-1])["seconds"])


def zoo() -> tuple[float, int, float, str]:
    from prunescope.commands.common import build_on_meta
    from prunescope.graph import trace
    from prunescope.removal import not_safe_to_prune
    from prunescope.topology import ChannelDependency, GroupDependency

    names = torchvision.models.list_models(module=torchvision.models)[: 5 if QUICK else None]
    t0 = time.perf_counter()
    worst, worst_name = 0.0, ""
    for name in names:
        kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = build_on_meta(lambda name=name, kw=kw: torchvision.models.get_model(name, weights=None, **kw)).eval()
        s = 299 if name == "inception_v3" else 224
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = trace(model, torch.ones(1, 3, s, s, device="meta"))
            ChannelDependency(traced_model=g, include_linear=True)
            GroupDependency(traced_model=g)
            not_safe_to_prune(None, None, traced_model=g)
        dt = time.perf_counter() - t
        if dt > worst:
            worst, worst_name = dt, name
    return time.perf_counter() - t0, len(names), worst, worst_name


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {REPEAT}")
    print(f"{'model':<14}{'prunescope s':>14}{'NNI 2.10.1 s':>14}{'speed-up':>10}")
    for name in MODELS:
        a = ours(name)
        b = nni(name)
        if b is None:
            print(f"{name:<14}{a:>14.3f}  {'NNI not installed' if not os.path.exists(NNI_PYTHON) else 'n/a':>12}")
        else:
            print(f"{name:<14}{a:>14.3f}{b:>14.3f}{b / a:>9.1f}x")
    total, n, worst, worst_name = zoo()
    print(f"torchvision zoo on meta ({n} models, trace + channel/group/unsafe analyses, incl. building): "
          f"{total:.1f} s; slowest model {worst_name} {worst:.2f} s")


if __name__ == "__main__":
    main()
    sys.exit(0)
