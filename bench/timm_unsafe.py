"""timm zoo: the fraction of conv/linear layers reported unsafe to prune, engine alone vs. with the pin probe.

``python bench/timm_unsafe.py [--limit N] [name ...]`` (or ``bench/run_all.py timm_unsafe``). One model per timm
family (``timm.list_models()`` grouped by the name's leading word, the smallest-looking member), built with
``pretrained=False`` on the ``meta`` device and traced on its ``pretrained_cfg`` input size. A model that cannot
be built or traced on meta is a *refusal*, counted apart with its reason; nothing else may fail.

Per model: conv/linear layers, the fraction unsafe before (``channel_atoms(graph).unsafe``: the engine alone)
and after (:func:`prunescope.removal.probe.probe_pins`), the number of probes and the probe's seconds.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from typing import Any

import torch

# the smallest member of a family is usually named with one of these (first match wins)
_SMALL = ("test", "pico", "femto", "atto", "nano", "micro", "tiny", "xxs", "xs", "small", "b0", "s0", "t0",
          "lite0", "050", "_t", "18", "_s", "mini", "base")
_EXTRA = ("swin_tiny_patch4_window7_224",)  # the best-known member of a family whose pick is another
_LAYER_KINDS = ("conv", "conv_transpose", "linear")


def family_names(limit: int | None = None) -> list[str]:
    """One timm architecture per family (leading word of the name), in timm's order."""
    import timm

    fam: dict[str, list[str]] = {}
    for n in timm.list_models():
        fam.setdefault(re.split(r"[_\d]", n)[0], []).append(n)
    out = []
    for members in fam.values():
        pick = members[0]
        for key in _SMALL:
            hit = [m for m in members if key in m]
            if hit:
                pick = min(hit, key=len)
                break
        out.append(pick)
    out += [n for n in _EXTRA if n not in out]
    return out[:limit] if limit else out


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The timm model on ``meta`` and a ``meta`` input of its default size."""
    import timm

    from prunescope.commands.common import build_on_meta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_on_meta(lambda: timm.create_model(name, pretrained=False))
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    return model.eval(), torch.empty((1, *size), device="meta")


def measure(name: str) -> dict[str, Any]:
    """One row: ``{'name', 'layers', 'before', 'after', 'probes', 'probe_s', 'trace_s'}`` or ``{'refused': why}``."""
    from prunescope.graph import trace
    from prunescope.removal.probe import probe_pins
    from prunescope.topology import channel_atoms

    row: dict[str, Any] = {"name": name}
    try:
        model, x = build(name)
    except Exception as e:  # noqa: BLE001 - a model timm cannot build on meta: a refusal, counted apart
        row["refused"] = f"build: {type(e).__name__}: {str(e)[:120]}"
        return row
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = trace(model, x)
            ca = channel_atoms(g)
    except Exception as e:  # noqa: BLE001 - refused with a reason (TraceError, UnsupportedModelError ...)
        row["refused"] = f"trace: {type(e).__name__}: {str(e)[:120]}"
        return row
    row["trace_s"] = time.perf_counter() - t0
    layers = [n for n, li in ca.layers.items() if li.kind in _LAYER_KINDS and not n.startswith("<")]
    res = probe_pins(g, x)
    row.update(layers=len(layers), before=sum(n in ca.unsafe for n in layers) / max(1, len(layers)),
               after=sum(n in res.unsafe for n in layers) / max(1, len(layers)), probes=res.probes,
               probe_s=res.seconds, cleared=len(res.cleared_layers))
    return row


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    limit = None
    if "--limit" in argv:
        i = argv.index("--limit")
        limit = int(argv[i + 1])
        del argv[i:i + 2]
    names = argv or family_names(limit)
    rows = []
    print(f"{'model':40s} {'layers':>6s} {'before':>7s} {'after':>7s} {'probes':>6s} {'probe s':>8s} {'trace s':>8s}")
    for n in names:
        r = measure(n)
        rows.append(r)
        if "refused" in r:
            print(f"{n:40s} refused: {r['refused']}")
        else:
            print(f"{n:40s} {r['layers']:6d} {r['before']:7.0%} {r['after']:7.0%} {r['probes']:6d} "
                  f"{r['probe_s']:8.2f} {r['trace_s']:8.2f}", flush=True)
    ok = [r for r in rows if "refused" not in r]
    if not ok:
        print("no model measured")
        return 0
    half_b = sum(r["before"] >= 0.5 for r in ok)
    half_a = sum(r["after"] >= 0.5 for r in ok)
    changed = [r for r in ok if r["after"] < r["before"]]
    ps = sorted(r["probe_s"] for r in ok)
    print(f"\n{len(ok)} models measured, {len(rows) - len(ok)} refused; ≥ 50% unsafe: {half_b} before, {half_a} "
          f"after the probe; {len(changed)} models changed; mean unsafe {sum(r['before'] for r in ok) / len(ok):.1%}"
          f" -> {sum(r['after'] for r in ok) / len(ok):.1%}; probe seconds per model: median {ps[len(ps) // 2]:.2f}, "
          f"max {ps[-1]:.2f}, total {sum(ps):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
