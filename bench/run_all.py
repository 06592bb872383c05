"""Run every benchmark: ``python bench/run_all.py [--quick] [flops|topology|sensitivity ...]``.

Each benchmark prints its figures as ratios against a baseline measured in the same run. Peers that are not
installed (NNI through ``NNI_PYTHON``, Torch-Pruning, fvcore, ptflops, thop) are skipped with a line saying so.
``--quick`` runs every benchmark on small inputs (one or a few models, fewer repeats) to prove that it runs;
its figures are not the ones the README quotes. A benchmark that fails is reported and the others still run;
the exit code is 1 when any failed.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

BENCHES = ("flops", "topology", "sensitivity", "sensitivity_scale", "shrink", "heads", "verify", "scores",
           "vs_torch_pruning")

#: arguments of the benchmarks that take a command line, in quick mode (the others read PRUNESCOPE_BENCH_QUICK)
QUICK_ARGS = {"shrink": ["--models", "resnet18", "--no-latency", "--timeout", "300"],
              "heads": ["--models", "gqa_norope"]}


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    names = [a for a in argv if a != "--quick"]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    if quick:
        os.environ["PRUNESCOPE_BENCH_QUICK"] = "1"  # read at import by each benchmark and its worker processes
    failed = []
    for name in names or BENCHES:
        print(f"\n##### {name}{' (quick)' if quick else ''} #####", flush=True)
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"bench_{name}")
            if inspect.signature(mod.main).parameters:
                mod.main(QUICK_ARGS.get(name, []) if quick else [])
            else:
                mod.main()
        except Exception as e:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            print(f"[{name}] FAILED: {type(e).__name__}: {e}")
            failed.append(name)
            continue
        print(f"[{name}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
