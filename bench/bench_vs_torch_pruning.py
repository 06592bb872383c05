"""Benchmark: prunescope's shipped models against Torch-Pruning 1.6.1's at the same MACs (issue 17).

``python bench/bench_vs_torch_pruning.py [--draws 3] [--json out.json]`` with an interpreter that has
``torch_pruning`` (never a dependency of prunescope; without it the script prints a skip line), e.g.
``PYTHONPATH=src /work/venvs/tp/bin/python bench/bench_vs_torch_pruning.py``.

* ``digits``: the embedded CNN (:func:`prunescope.examples.digits.load_trained`: trained once, cached); prunescope
  removes 50 / 62.5 / 75 % of every prunable set (``unit_masks``) and ships the shrunk model as pruned (L1) or
  reconstructed from 128 unlabeled training inputs (L1, activation and reconstruction-aware units; the last also
  with the inputs' one-pixel shifts), mean/min over draws of those inputs. Torch-Pruning's ``MagnitudePruner``
  (L1 importance, uniform or global ratio, the classifier ignored, no fine-tuning) gets the ratio whose MACs are
  closest to prunescope's (bisection). Held-out accuracy (500 digits), MACs and parameters of every shipped
  model, all counted by :func:`prunescope.count_flops_params` (batch 1).
* ``resnet18``: torchvision, random weights, 1x3x224x224: MACs and parameters only (half of every prunable set
  for prunescope; Torch-Pruning at the closest MACs), and the seconds each takes.

Measured (session 16, ``/work/venvs/tp``: torch 2.14.1 CPU, torch-pruning 1.6.1 (whose ``__version__`` says
1.6.0); one thread on a 2-core machine shared with other jobs). Digits, dense 0.992, 0.411 M MACs, 43,002
params; held-out accuracy (prunescope: mean/min over 3 draws), MACs and params in % of dense:

    removed  method                                            accuracy     MACs %  params %
    50 %     prunescope l1, as pruned                          0.508        25.6    25.6
    50 %     prunescope l1 + reconstruct                       0.961/0.956  25.6    25.6
    50 %     prunescope activation + reconstruct               0.975/0.972  25.6    25.6
    50 %     prunescope reconstruction + reconstruct           0.981/0.976  25.6    25.6
    50 %     prunescope reconstruction + reconstruct(shifts)   0.983/0.982  25.6    25.6
    50 %     torch-pruning L1 uniform (ratio 0.490)            0.488        25.6    25.6
    50 %     torch-pruning L1 global (ratio 0.460)             0.746        25.5    27.0
    62.5 %   prunescope l1, as pruned                          0.132        14.6    14.6
    62.5 %   prunescope l1 + reconstruct                       0.948/0.940  14.6    14.6
    62.5 %   prunescope activation + reconstruct               0.965/0.950  14.6    14.6
    62.5 %   prunescope reconstruction + reconstruct           0.959/0.942  14.6    14.6
    62.5 %   prunescope reconstruction + reconstruct(shifts)   0.975/0.968  14.6    14.6
    62.5 %   torch-pruning L1 uniform (ratio 0.623)            0.166        14.6    14.6
    62.5 %   torch-pruning L1 global (ratio 0.534)             0.202        14.6    17.8
    75 %     prunescope l1, as pruned                          0.184         6.7     6.7
    75 %     prunescope l1 + reconstruct                       0.925/0.914   6.7     6.7
    75 %     prunescope activation + reconstruct               0.930/0.912   6.7     6.7
    75 %     prunescope reconstruction + reconstruct           0.927/0.912   6.7     6.7
    75 %     prunescope reconstruction + reconstruct(shifts)   0.946/0.936   6.7     6.7
    75 %     torch-pruning L1 uniform (ratio 0.742)            0.204         6.7     6.7
    75 %     torch-pruning L1 global (ratio 0.616)             0.126         6.8     8.6

Torch-Pruning's L1 uniform model equals prunescope's L1 as pruned in MACs and parameters and nearly in accuracy
(both are magnitude pruning without recovery); what separates the shipped models is the reconstruction from
unlabeled inputs, which Torch-Pruning does not offer (its users fine-tune). resnet18 (random weights, dense
1.814 G MACs, 11.69 M params): prunescope L1 units 50 % 0.483 G MACs (26.6 %), 3.06 M params; Torch-Pruning
uniform (ratio 0.499) the same 0.483 G / 3.06 M, global (ratio 0.499) 0.483 G / 3.11 M. Seconds in the
Torch-Pruning rows are the whole bisection (14 prunings on digits, 10 on resnet18), not one pruning.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import numpy as np
import torch
from torch import nn

from prunescope import count_flops_params, unit_masks
from prunescope._io import atomic_open
from prunescope.narrow import reconstruct, shrink

QUICK = os.environ.get("PRUNESCOPE_BENCH_QUICK") == "1"


def macs_params(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    flops, params, _ = count_flops_params(model, x, verbose=False)
    return int(flops), int(params)


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float, global_pruning: bool, ignored: list[str]
             ) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning's MagnitudePruner (L1) at ``ratio``."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, global_pruning=global_pruning,
                                       ignored_layers=[mods[n] for n in ignored])
    pruner.step()
    return m


def tp_at_macs(model: nn.Module, x: torch.Tensor, target: int, global_pruning: bool, ignored: list[str],
               steps: int = 14) -> tuple[nn.Module, float, int, int]:
    """Torch-Pruning's model whose MACs are closest to ``target`` (bisection on the ratio; MACs fall as it
    grows): ``(model, ratio, macs, params)``."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        m = tp_prune(model, x, mid, global_pruning, ignored)
        macs, params = macs_params(m, x)
        if best is None or abs(macs - target) < abs(best[2] - target):
            best = (m, mid, macs, params)
        if macs > target:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best


def shifted(calib: torch.Tensor) -> list[torch.Tensor]:
    return [calib] + [torch.roll(calib, s, d) for d in (2, 3) for s in (1, -1)]


def _digits(draws: int, sparsities: tuple[float, ...]) -> dict:
    from prunescope.examples import digits

    model = digits.load_trained().eval()
    xt = digits.load_data()[0]
    calibs = [xt[torch.randperm(len(xt), generator=torch.Generator().manual_seed(s))[:128]]
              for s in range(1, draws + 1)]
    x = torch.ones(digits.INPUT_SIZE)
    dense_macs, dense_params = macs_params(model, x)
    out = {"case": "digits", "dense": {"acc": digits.evaluate(model), "macs": dense_macs, "params": dense_params},
           "rows": []}
    print(f"digits: dense acc {out['dense']['acc']:.3f}, {dense_macs / 1e6:.3f} M MACs, {dense_params} params; "
          f"prunescope: mean/min over {draws} draws of 128 unlabeled inputs")
    print(f"{'removed':>7} {'method':>44} {'acc':>11} {'MACs %':>7} {'params %':>8} {'s':>6}")
    for sp in sparsities:
        rows = []
        methods = [("prunescope l1, as pruned", "l1", None), ("prunescope l1 + reconstruct", "l1", "plain"),
                   ("prunescope activation + reconstruct", "activation", "plain"),
                   ("prunescope reconstruction + reconstruct", "reconstruction", "plain"),
                   ("prunescope reconstruction + reconstruct(shifts)", "reconstruction", "shifts")]
        target = None
        for label, score, rec in methods:
            accs, secs = [], []
            for calib in calibs if score != "l1" or rec else calibs[:1]:
                t = time.perf_counter()
                masks = unit_masks(model, x, sp, prune_type=score, calibration=[calib])
                small = (shrink(model, masks, x) if rec is None else
                         reconstruct(model, masks, x, [calib] if rec == "plain" else shifted(calib)))
                secs.append(time.perf_counter() - t)
                accs.append(digits.evaluate(small))
            macs, params = macs_params(small, x)
            target = macs if target is None else target
            rows.append({"method": label, "acc_mean": float(np.mean(accs)), "acc_min": float(min(accs)),
                         "macs": macs, "params": params, "seconds": float(np.mean(secs))})
        for g in (False, True):
            t = time.perf_counter()
            m, ratio, macs, params = tp_at_macs(model, x, target, g, ["fc2"])  # type: ignore[arg-type]
            secs = time.perf_counter() - t
            acc = digits.evaluate(m)
            rows.append({"method": f"torch-pruning L1 {'global' if g else 'uniform'} (ratio {ratio:.3f})",
                         "acc_mean": acc, "acc_min": acc, "macs": macs, "params": params, "seconds": secs})
        for r in rows:
            r["sparsity"] = sp
            print(f"{sp:>7.3f} {r['method']:>44} {r['acc_mean']:.3f}/{r['acc_min']:.3f} "
                  f"{100 * r['macs'] / dense_macs:>7.1f} {100 * r['params'] / dense_params:>8.1f} "
                  f"{r['seconds']:>6.2f}", flush=True)
        out["rows"].extend(rows)
    return out


def _resnet18() -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    dense = macs_params(model, x)
    t = time.perf_counter()
    small = shrink(model, unit_masks(model, x, 0.5), x)
    ps_secs = time.perf_counter() - t
    ps = macs_params(small, x)
    rows = [{"method": "prunescope l1 units 50 %", "macs": ps[0], "params": ps[1], "seconds": ps_secs}]
    for g in (False, True):
        t = time.perf_counter()
        _m, ratio, macs, params = tp_at_macs(model, x, ps[0], g, ["fc"], steps=10)
        rows.append({"method": f"torch-pruning L1 {'global' if g else 'uniform'} (ratio {ratio:.3f})",
                     "macs": macs, "params": params, "seconds": time.perf_counter() - t})
    print(f"resnet18 (random weights): dense {dense[0] / 1e9:.3f} G MACs, {dense[1] / 1e6:.2f} M params")
    for r in rows:
        print(f"{r['method']:>44}: {r['macs'] / 1e9:.3f} G MACs ({100 * r['macs'] / dense[0]:.1f} %), "
              f"{r['params'] / 1e6:.2f} M params ({100 * r['params'] / dense[1]:.1f} %), {r['seconds']:.1f} s",
              flush=True)
    return {"case": "resnet18", "dense": {"macs": dense[0], "params": dense[1]}, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=1 if QUICK else 3)
    ap.add_argument("--no-resnet18", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        print("(Torch-Pruning skipped: pip install torch-pruning==1.6.1 into this interpreter)")
        return
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results = [_digits(a.draws, (0.5,) if QUICK else (0.5, 0.625, 0.75))]
    if not (a.no_resnet18 or QUICK):
        results.append(_resnet18())
    if a.json:
        with atomic_open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
