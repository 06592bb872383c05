"""Sensitivity at scale: one evaluation per job on a Dask cluster of separate processes on 127.0.0.1.

``python bench/bench_sensitivity_scale.py`` (or ``bench/run_all.py sensitivity_scale``).

Model: the 3-Conv2d SmallCNN of the NNI 2.10.1 references (``tests/data/nni``), ``l1``, NNI's default 9
sparsities 0.1 ... 0.9, metric ``accuracy``. Every evaluation first **waits 0.15 s** (``time.sleep``: it
stands for an evaluation bound elsewhere, an accelerator or a remote service; on this 2-core machine
compute-bound evaluations cannot scale) and then computes the metric single-threaded.
The cluster: ``dask scheduler`` + 4 ``dask worker --nthreads 1`` processes on loopback, started once,
torch imported on each (long-lived workers). All times are measured in the same run, median of 3:

1. no early stop: plain serial sweep vs 4 Dask workers (ideal 4x: 28 evaluations incl. the baseline);
2. ``early_stop_mode='dropped'`` (0.001): serial, per-layer jobs (the previous design: baseline in the
   parent, then one job per layer) and per-evaluation jobs with speculation.

Values are compared with the serial sweep and, without early stop, with NNI 2.10.1's reference
(``tests/data/nni/sensitivity/cnn_default_l1.json``), as ``repr`` strings.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "tests" / "data" / "nni", ROOT / "tests" / "sensitivity"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import sens_models as M  # noqa: E402
from dask_loopback import loopback_cluster  # noqa: E402
from sens_helpers import Slow, layer_job  # noqa: E402

QUICK = os.environ.get("PRUNESCOPE_BENCH_QUICK") == "1"  # bench/run_all.py --quick: small inputs, to prove it runs
WAIT = 0.02 if QUICK else 0.15
WORKERS = 2 if QUICK else 4
DROPPED = 0.001
REPEAT = 1 if QUICK else 3  # every time is the median of 3 runs (the machine is shared; single runs vary by ~10%)


def _reprs(sens: dict) -> dict:
    return {k: [repr(v) for v in r.values()] for k, r in sens.items()}


def sweep(executor=None, **kw) -> tuple[float, dict, float]:
    import torch

    from prunescope.sensitivity import SensitivityAnalysis

    torch.set_num_threads(1)
    model = M.build_cnn()
    t0 = time.perf_counter()
    sa = SensitivityAnalysis(model, Slow("accuracy", WAIT), executor=executor, progress=False, **kw)
    sa.analysis(val_args=[model])
    return time.perf_counter() - t0, _reprs(sa.sensitivities), sa.ori_metric


def per_layer_jobs(executor, **kw) -> tuple[float, dict]:
    """The previous design: baseline in the parent, then one job per layer (its sparsities in order)."""
    import torch

    from prunescope.sensitivity import SensitivityAnalysis
    from prunescope.sensitivity.jobs import Job
    from prunescope.sensitivity.parallel import make_bundle

    torch.set_num_threads(1)
    model = M.build_cnn()
    val = Slow("accuracy", WAIT)
    t0 = time.perf_counter()
    sa = SensitivityAnalysis(model, val, progress=False, **kw)
    ori = val(model)
    digest, data = make_bundle(model, val, [model], {})
    jobs = [Job(k, g, tuple(sa.sparsities), tuple(sa.sparsities), "l1", ori, sa.early_stop_mode,
                sa.early_stop_value) for k, g in sa.groups.items()]
    futs = [executor.submit(layer_job, j, digest, data) for j in jobs]
    res = {j.key: dict(zip(sa.sparsities, f.result())) for j, f in zip(jobs, futs)}
    return time.perf_counter() - t0, _reprs(res)


def median(fn, *args, **kw) -> tuple:
    """Run ``fn`` REPEAT times; the median time, and the results (all runs must agree)."""
    runs = [fn(*args, **kw) for _ in range(REPEAT)]
    assert all(r[1] == runs[0][1] for r in runs), "a repeated run gave different values"
    return (sorted(r[0] for r in runs)[REPEAT // 2], *runs[0][1:])


def main() -> None:
    ref = json.loads((ROOT / "tests" / "data" / "nni" / "sensitivity" / "cnn_default_l1.json").read_text())
    nni = {k: [v for _, v in rows] for k, rows in ref["results"].items()}
    print(f"Sensitivity at scale: SmallCNN (3 Conv2d), 9 sparsities, l1, every evaluation waits {WAIT} s "
          f"(time.sleep) then computes; {WORKERS} single-thread Dask workers, separate processes on 127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp, loopback_cluster(WORKERS, Path(tmp)) as (_, client):
        ex = client.get_executor()
        sweep(ex, sparsities=[0.5])  # warm: first bundle on every worker, imports
        t_ser, r_ser, _ = median(sweep)
        t_dask, r_dask, _ = median(sweep, ex)
        print(f"\nno early stop (28 evaluations incl. the baseline; ideal {WORKERS}.00x)")
        print(f"  serial sweep                  {t_ser:6.2f} s")
        print(f"  {WORKERS} Dask workers, per-eval jobs {t_dask:6.2f} s   speed-up {t_ser / t_dask:.2f}x")
        print(f"  values identical to serial: {r_dask == r_ser}; to NNI 2.10.1: {r_dask == nni and r_ser == nni}")
        kw = {"early_stop_mode": "dropped", "early_stop_value": DROPPED}
        t_ser2, r_ser2, _ = median(sweep, **kw)
        t_layer, r_layer = median(per_layer_jobs, ex, **kw)
        t_eval, r_eval, _ = median(sweep, ex, **kw)
        n = sum(len(v) for v in r_ser2.values()) + 1
        print(f"\nearly_stop_mode='dropped', value {DROPPED} ({n} evaluations needed; rows "
              f"{ {k: len(v) for k, v in r_ser2.items()} })")
        print(f"  serial sweep                  {t_ser2:6.2f} s")
        print(f"  per-layer jobs (old design)   {t_layer:6.2f} s   speed-up {t_ser2 / t_layer:.2f}x")
        print(f"  per-eval jobs + speculation   {t_eval:6.2f} s   speed-up {t_ser2 / t_eval:.2f}x "
              f"({t_layer / t_eval:.2f}x faster than per-layer jobs)")
        print(f"  values identical to serial: per-eval {r_eval == r_ser2}, per-layer {r_layer == r_ser2}")


if __name__ == "__main__":
    main()
