"""timm zoo: how much of each model is prunable, and does shrink build exactly what ``unit_masks`` offers.

``python bench/timm_prunable.py [name ...]`` (default: every model of ``tests/transformers/timm_prunable_zoo.py``,
about 90 architectures in 15 families, random weights, CPU, small inputs).

Per model: the fraction of the model's MACs in the conv/linear layers of the dependency sets offered by
``unit_masks`` **before** issue 19 (every set without an unsafe layer, a channel reaching the output or a
non-filter member: shrink refused some and conflict-fixed grouped ones) and **after** (the one definition of
:func:`prunescope.narrow.prunable.prunable_sets`), then the pipeline of ``check``: ``unit_masks`` at 30 % ->
``shrink`` (refused? conflicts fixed? channels kept?) -> relative difference shrunk vs ``as_pruned`` -> dense
count of the shrunk model vs effective count. Per family: the mean fractions before and after.

``--shares``: only the two fractions (no pipeline; runs on any prunescope that has ``prunable_sets``, e.g.
``PYTHONPATH=/work/main/src python bench/timm_prunable.py --shares`` for main's numbers).

``--time BASELINE_SRC [name ...]``: seconds of ``prunable_sets`` (the model built and traced beforehand) with the
prunescope of ``BASELINE_SRC`` (e.g. main's ``src``) and with this tree's, each in a fresh process, the two
alternating per model so both see the same machine load; the best of ``--reps`` (default 2) runs; prints the
ratio this / baseline. Default models: vit_tiny, crossvit_tiny_240, cait_xxs24 (2 blocks), swin_tiny.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "transformers"))

from timm_prunable_zoo import FAMILY, SPEC, build, check, mac_share  # noqa: E402

# reasons that only the new definition gives: the old unit_masks offered these sets
_NEW_REASONS = ("shrink cannot remove", "its units cannot be removed group by group")


def shares(name: str) -> tuple[float, float]:
    """``(before, after)``: fraction of MACs in the sets unit_masks offered before issue 19 and now."""
    from prunescope.graph import trace
    from prunescope.narrow.prunable import prunable_sets

    model, x = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = trace(model, x)
        p = prunable_sets(model, g, x)
    old = list(p.sets) + [tuple(k.split("+")) for k, why in p.excluded.items() if why.startswith(_NEW_REASONS)]
    return mac_share(model, x, old), mac_share(model, x, p.sets)


_TIMED = ["vit_tiny_patch16_224", "crossvit_tiny_240", "cait_xxs24_224", "swin_tiny_patch4_window7_224"]
_SRC = str(Path(__file__).resolve().parents[1] / "src")


def _time_worker(name: str) -> None:
    """In a fresh process: seconds of one ``prunable_sets`` call (printed last)."""
    from prunescope.graph import trace
    from prunescope.narrow.prunable import prunable_sets

    model, x = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = trace(model, x)
        t = time.perf_counter()
        p = prunable_sets(model, g, x)
        dt = time.perf_counter() - t
    print(f"{dt:.3f} {len(p.sets)}")


def _timed(src: str, name: str) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, __file__, "--time-worker", name], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[-2]), int(out[-1])


def time_sets(baseline: str, names: list[str], reps: int) -> int:
    print(f"prunable_sets seconds, best of {reps}; baseline = {baseline}, this = {_SRC}")
    print(f"{'model':32s} {'baseline':>9s} {'sets':>5s} {'this':>9s} {'sets':>5s} {'ratio':>6s}")
    for n in names or _TIMED:
        base, this = [], []
        for _ in range(reps):  # alternate: both trees see the same load
            base.append(_timed(baseline, n))
            this.append(_timed(_SRC, n))
        b, t = min(base), min(this)
        print(f"{n:32s} {b[0]:9.2f} {b[1]:5d} {t[0]:9.2f} {t[1]:5d} {t[0] / b[0]:6.2f}x", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--time-worker"]:
        _time_worker(args[1])
        return 0
    if args[:1] == ["--time"]:
        reps = 2
        if "--reps" in args:
            i = args.index("--reps")
            reps = int(args[i + 1])
            del args[i:i + 2]
        return time_sets(args[1], args[2:], reps)
    only_shares = "--shares" in args
    names = [a for a in args if a != "--shares"] or list(SPEC)
    fam: dict[str, list[tuple[float, float]]] = {}
    print(f"{'model':32s} {'family':14s} {'before':>7s} {'after':>7s}  outcome")
    for n in names:
        try:
            before, after = shares(n)
            row = {"error": "(--shares: pipeline not run)"} if only_shares else check(n)
        except Exception as e:  # noqa: BLE001 - a model this timm cannot build/trace at the small size
            print(f"{n:32s} {FAMILY.get(n, '?'):14s} {'':>7s} {'':>7s}  not measured: {type(e).__name__}: "
                  f"{str(e)[:80]}")
            continue
        fam.setdefault(FAMILY.get(n, "?"), []).append((before, after))
        if "error" in row:
            out = row["error"][:100]
        else:
            dense, eff = row["counts"]
            out = (f"fixed {row['fixed']}, kept {row['protected']}, rel {row['rel']:.1e}, "
                   f"counts {'equal' if dense == eff else f'DIFFER {dense} vs {eff}'}")
        print(f"{n:32s} {FAMILY.get(n, '?'):14s} {before:7.1%} {after:7.1%}  {out}", flush=True)
    print(f"\n{'family':14s} {'models':>6s} {'before':>7s} {'after':>7s}   (mean fraction of MACs in offered sets)")
    for f, rows in fam.items():
        print(f"{f:14s} {len(rows):6d} {sum(r[0] for r in rows) / len(rows):7.1%} "
              f"{sum(r[1] for r in rows) / len(rows):7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
