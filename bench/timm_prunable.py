"""timm zoo: how much of each model is prunable, and does shrink build exactly what ``unit_masks`` offers.

``python bench/timm_prunable.py [name ...]`` (default: every model of ``tests/transformers/timm_prunable_zoo.py``,
about 90 architectures in 15 families, random weights, CPU, small inputs).

Per model: the fraction of the model's MACs in the conv/linear layers of the dependency sets offered by
``unit_masks`` **before** issue 19 (every set without an unsafe layer, a channel reaching the output or a
non-filter member: shrink refused some and conflict-fixed grouped ones) and **after** (the one definition of
:func:`prunescope.narrow.prunable.prunable_sets`), then the pipeline of ``check``: ``unit_masks`` at 30 % ->
``shrink`` (refused? conflicts fixed? channels kept?) -> relative difference shrunk vs ``as_pruned`` -> dense
count of the shrunk model vs effective count. Per family: the mean fractions before and after.
"""

from __future__ import annotations

import sys
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


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or list(SPEC)
    fam: dict[str, list[tuple[float, float]]] = {}
    print(f"{'model':32s} {'family':14s} {'before':>7s} {'after':>7s}  outcome")
    for n in names:
        try:
            before, after = shares(n)
            row = check(n)
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
