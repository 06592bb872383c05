"""Sensitivity sweep benchmark: bookkeeping overhead, extra memory, workers speed-up; ours vs NNI 2.10.1.

``python bench/bench_sensitivity.py`` (or ``bench/run_all.py sensitivity``). NNI runs in a subprocess with
``$NNI_PYTHON`` (default ``/work/nni-venv/bin/python`` when it exists), on the same model and val function:
this file is also the NNI-side script (``--nni-child``), so it imports nothing from prunescope there.

1. **Overhead**: sweep wall time / summed time of the ``val_func`` calls (1.00 = nothing but evaluations).
2. **Extra memory held during evaluation**: bytes of live tensors that are neither the model's nor the
   data's, found with ``gc`` at every ``val_func`` call (max over calls), relative to the model's
   parameter bytes. Ours: the analysed layer's weight/bias snapshot + buffers; NNI: a full state-dict
   copy + its wrapper's mask buffers.
3. **workers=2** on a sweep whose compute-bound evaluations take >= 0.3 s each, against the serial sweep
   with one torch thread (what each worker uses) and with the default thread count ("plain serial"). On
   a 2-core machine this cannot scale: PyTorch's intra-op threads already use both cores. Sweeps whose
   evaluations wait on something else are measured by ``bench_sensitivity_scale.py``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

NNI_PYTHON = os.environ.get("NNI_PYTHON", "/work/nni-venv/bin/python")
QUICK = os.environ.get("PRUNESCOPE_BENCH_QUICK") == "1"  # bench/run_all.py --quick: small inputs, to prove it runs


class BenchNet(nn.Module):
    """Six 3x3 Conv2d layers (with BatchNorm) and a Linear head, 3x32x32 inputs."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans, chans[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in chans[1:])
        self.fc = nn.Linear(chans[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, (c, b) in enumerate(zip(self.convs, self.bns)):
            x = torch.relu(b(c(x)))
            if k % 2 == 1:
                x = torch.max_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))


def build(seed: int = 0) -> BenchNet:
    torch.manual_seed(seed)
    return BenchNet().eval()


_DATA: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def evaluate(model: nn.Module, n: int = 64) -> float:
    """Cross-entropy on ``n`` seeded images (labels: the unpruned model's predictions)."""
    if n not in _DATA:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, 3, 32, 32, generator=g)
        with torch.no_grad():
            _DATA[n] = (x, build()(x).argmax(1))
    x, y = _DATA[n]
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item()


def evaluate_slow(model: nn.Module) -> float:
    return evaluate(model, 192)


class Timed:
    """val_func wrapper: sums the time spent inside the evaluation; optionally measures held memory."""

    def __init__(self, fn, memory: bool = False) -> None:
        self.fn, self.memory, self.total, self.calls, self.extra = fn, memory, 0.0, 0, 0
        self.known: set[int] = set()

    def baseline_tensors(self, model: nn.Module) -> None:
        self.known = {t.untyped_storage().data_ptr() for t in _live_tensors()}

    def __call__(self, model: nn.Module) -> float:
        if self.memory:
            extra = sum(t.untyped_storage().nbytes() for t in _unique(_live_tensors())
                        if t.untyped_storage().data_ptr() not in self.known)
            self.extra = max(self.extra, extra)
        t0 = time.perf_counter()
        v = self.fn(model)
        self.total += time.perf_counter() - t0
        self.calls += 1
        return v


def _live_tensors() -> list[torch.Tensor]:
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch.distributed objects warns
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]


def _unique(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in ts:
        p = t.untyped_storage().data_ptr()
        if p not in seen:
            seen.add(p)
            out.append(t)
    return out


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


SPARS = [0.5] if QUICK else [0.1, 0.3, 0.5, 0.7, 0.9]


def _sweep(analysis_cls: type, kind: str, **kwargs: object) -> dict:
    """One timed sweep of ``analysis_cls`` (NNI's or ours) on the benchmark model."""
    torch.set_num_threads(1)
    model = build()
    evaluate(model)
    val = Timed(evaluate, memory=kind == "memory")
    val.baseline_tensors(model)
    t0 = time.perf_counter()
    sa = analysis_cls(model, val, sparsities=SPARS, **kwargs)
    sa.analysis(val_args=[model])
    wall = time.perf_counter() - t0
    return {"wall": wall, "val": val.total, "calls": val.calls, "extra": val.extra, "params": param_bytes(model),
            "result": {k: [repr(v) for v in r.values()] for k, r in sa.sensitivities.items()}}


def nni_side(kind: str) -> dict:
    import logging

    logging.disable(logging.CRITICAL)
    from nni.compression.pytorch.utils.sensitivity_analysis import SensitivityAnalysis

    out = _sweep(SensitivityAnalysis, kind)
    out.pop("result")
    return out


def ours(kind: str) -> dict:
    from prunescope.sensitivity import SensitivityAnalysis

    return _sweep(SensitivityAnalysis, kind, progress=False)


def run_nni(kind: str) -> dict | None:
    if not os.path.exists(NNI_PYTHON):
        return None
    out = subprocess.run([NNI_PYTHON, os.path.abspath(__file__), "--nni-child", kind], capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        print(f"NNI run failed: {out.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def workers_speedup() -> dict:
    from prunescope.sensitivity import SensitivityAnalysis

    res: dict = {}
    threads = os.cpu_count() or 1
    for label, nthreads, workers in (("serial, 1 thread", 1, None), (f"serial, {threads} threads", threads, None),
                                     ("workers=2", 1, 2)):
        torch.set_num_threads(nthreads)
        model = build()
        evaluate_slow(model)  # warm: data set built and cached
        t0 = time.perf_counter()
        evaluate_slow(model)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        sa = SensitivityAnalysis(model, evaluate_slow, sparsities=[0.5] if QUICK else [0.25, 0.5, 0.75],
                                 workers=workers, progress=False)
        sa.analysis(val_args=[model])
        res[label] = {"wall": time.perf_counter() - t0, "eval": one,
                      "result": {k: list(v.values()) for k, v in sa.sensitivities.items()}}
    return res


def main() -> None:
    if not os.path.exists(NNI_PYTHON):
        print(f"(NNI 2.10.1 skipped: no interpreter at {NNI_PYTHON}; set NNI_PYTHON)")
    kib = param_bytes(build()) / 1024
    print(f"Sensitivity sweep: BenchNet (6 Conv2d + BN, {kib:.0f} KiB of parameters), sparsities {SPARS}, l1, CPU")
    o = ours("time")
    n = run_nni("time")
    om = ours("memory")
    nm = run_nni("memory")
    print(f"\n{'':34}{'prunescope':>14}{'NNI 2.10.1':>14}")
    ratio = o["wall"] / o["val"]
    nratio = f"{n['wall'] / n['val']:.3f}x" if n else "n/a"
    print(f"{'sweep wall / summed val time':34}{ratio:>13.3f}x{nratio:>14}")
    print(f"{'val_func calls':34}{o['calls']:>14}{(n or {}).get('calls', 'n/a'):>14}")
    nextra = f"{nm['extra']:,}" if nm else "n/a"  # a number with thousands separators, or n/a without NNI
    print(f"{'extra bytes held during val':34}{om['extra']:>14,}{nextra:>14}")
    pb = om["params"]
    nrel = f"{nm['extra'] / pb:.3f}" if nm else "n/a"
    print(f"{'  ... / model parameter bytes':34}{om['extra'] / pb:>14.3f}{nrel:>14}")
    largest = max(c.weight.numel() * 4 + c.bias.numel() * 4 for c in build().convs)
    print(f"{'largest analysed layer (w+b) bytes':34}{largest:>14,}")
    w = workers_speedup()
    base1 = w["serial, 1 thread"]["wall"]
    plain = next(r["wall"] for k, r in w.items() if k.startswith("serial, ") and k != "serial, 1 thread")
    print(f"\nworkers speed-up (6 layers x {1 if QUICK else 3} sparsities, one evaluation = "
          f"{w['serial, 1 thread']['eval']:.2f} s single-threaded, compute-bound)")
    for label, r in w.items():
        print(f"  {label:22} {r['wall']:7.2f} s   speed-up vs serial 1 thread {base1 / r['wall']:.2f}x, "
              f"vs plain serial {plain / r['wall']:.2f}x")
    same = w["workers=2"]["result"] == w["serial, 1 thread"]["result"]
    print(f"  workers=2 results identical to serial (1 thread): {same}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--nni-child":
        print(json.dumps(nni_side(sys.argv[2])))
    else:
        main()
