"""FLOPs counting speed: prunescope vs a plain forward pass, and vs fvcore/ptflops/thop/NNI when installed.

Targets (issue 2): counting with real tensors ≤ 1.5× a plain forward pass (resnet50, vit_b_16, CPU), and the
whole torchvision zoo on the meta device in under a minute.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # zoo_helpers: the zoo tests' model builder
QUICK = os.environ.get("PRUNESCOPE_BENCH_QUICK") == "1"  # bench/run_all.py --quick: small inputs, to prove it runs


def _best(fn, repeat: int = 9) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


PEERS = ("fvcore", "ptflops", "thop")


def _peers(model, x):
    out = {}
    try:
        from fvcore.nn import FlopCountAnalysis  # type: ignore

        out["fvcore"] = lambda: FlopCountAnalysis(model, x).unsupported_ops_warnings(False).total()
    except ImportError:
        pass
    try:
        from ptflops import get_model_complexity_info  # type: ignore

        out["ptflops"] = lambda: get_model_complexity_info(model, tuple(x.shape[1:]), print_per_layer_stat=False,
                                                           as_strings=False)
    except ImportError:
        pass
    try:
        import thop  # type: ignore

        out["thop"] = lambda: thop.profile(model, inputs=(x,), verbose=False)
    except ImportError:
        pass
    return out


NNI_SNIPPET = """
import sys, time, statistics, torch, torchvision, warnings
warnings.filterwarnings('ignore')
from nni.compression.pytorch.utils import count_flops_params
name = sys.argv[1]
m = torchvision.models.get_model(name).eval()
x = torch.randn(1, 3, 224, 224)
count_flops_params(m, x, verbose=False)
ts = []
for _ in range(5):
    t = time.perf_counter(); count_flops_params(m, x, verbose=False); ts.append(time.perf_counter() - t)
print(statistics.median(ts))
"""


def _nni_time(name: str) -> float | None:
    py = os.environ.get("NNI_PYTHON", "/work/nni-venv/bin/python")
    if not os.path.exists(py):
        return None
    try:
        r = subprocess.run([py, "-c", NNI_SNIPPET, name], capture_output=True, text=True, timeout=600)
        return float(r.stdout.strip().splitlines()[-1])
    except Exception:
        return None


def main() -> None:
    import logging

    import torchvision

    logging.disable(logging.WARNING)  # fvcore logs every uncalled submodule

    from prunescope.flops import flops_report

    torch.set_num_threads(2)
    repeat = 3 if QUICK else 9
    print(f"== FLOPs counting (CPU, batch 1, 224x224; median of {repeat}) ==")
    print(f"{'model':<10} {'forward s':>10} {'prunescope s':>13} {'ratio':>6}   peers (s, ratio to forward)")
    missing = [p for p in PEERS if p not in _peers(torch.nn.Identity(), torch.ones(1))]
    if missing:
        print(f"(skipped, not installed: {', '.join(missing)})")
    for name in ("resnet18",) if QUICK else ("resnet50", "vit_b_16"):
        model = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, 224, 224)

        def fwd(model=model, x=x):
            with torch.no_grad():
                model(x)

        t_fwd = _best(fwd, repeat)
        t_ps = _best(lambda model=model, x=x: flops_report(model, x), repeat)
        peers = []
        for pname, fn in _peers(model, x).items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    t = _best(fn, 3)
                    peers.append(f"{pname} {t:.3f} ({t / t_fwd:.2f}x)")
                except Exception as e:  # a peer failing on a model is a finding, not a crash
                    peers.append(f"{pname} failed: {type(e).__name__}")
        t_nni = _nni_time(name)
        peers.append(f"NNI 2.10.1 {t_nni:.3f} ({t_nni / t_fwd:.2f}x)" if t_nni else "NNI not installed")
        print(f"{name:<10} {t_fwd:>10.3f} {t_ps:>13.3f} {t_ps / t_fwd:>5.2f}x   " + "; ".join(peers))

    print("\n== whole torchvision classification zoo on the meta device ==")
    from zoo_helpers import NAMES, zoo_model  # type: ignore

    names = NAMES[:5] if QUICK else NAMES
    t_build = t_count = 0.0
    for name in names:
        t = time.perf_counter()
        model, size, _ = zoo_model(name)
        t_build += time.perf_counter() - t
        t = time.perf_counter()
        flops_report(model, torch.ones(1, 3, size, size, device="meta"))
        t_count += time.perf_counter() - t
    print(f"{len(names)} models: counting {t_count:.1f} s (+ {t_build:.1f} s building them on meta); "
          f"target < 60 s")


if __name__ == "__main__":
    main()
