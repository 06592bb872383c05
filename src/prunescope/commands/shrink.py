"""``prunescope shrink MODEL --input-size 1,3,224,224 --masks masks.pth --out small.pt``"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from .common import CLIError, check_device, check_out, load_model, parse_size


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "shrink", help="physically remove masked channels: write the smaller model, compare cost and latency",
        description="Turn a mask file into the physically narrower model (same classes and module names, fewer "
                    "channels), fixing mask conflicts first. Prints MACs, parameters and measured CPU latency "
                    "before and after, and writes a pruned-model file (load it with prunescope.load_pruned).",
    )
    p.add_argument("model", help="torchvision model name (random weights) or package.module:callable")
    p.add_argument("--input-size", required=True, help="input size, e.g. 1,3,224,224")
    p.add_argument("--masks", required=True, help="mask file (NNI layout, e.g. from `prunescope masks`)")
    p.add_argument("--out", required=True, help="pruned-model file to write (atomically)")
    p.add_argument("--no-fix", action="store_true", help="do not fix mask conflicts first")
    p.add_argument("--runs", type=int, default=15, help="timed runs per model (interleaved; median)")
    p.add_argument("--seed", type=int, default=None, help="torch.manual_seed before building the model")
    p.add_argument("--device", default=None, help="device to build the model on (latency is measured there)")
    p.set_defaults(func=_run)


def _run(a: argparse.Namespace) -> int:
    from ..flops import flops_report
    from ..masks import load_masks
    from ..narrow import ShrinkWarning, save_pruned, shrink
    from ..narrow.latency import measure_latency

    size = parse_size(a.input_size)
    if check_device(a.device) is not None and torch.device(a.device).type == "meta":
        raise CLIError("--device meta builds the model without weights (shapes only), but shrink writes the pruned "
                       "model's weights to --out and times it; use --device cpu (or cuda)")
    check_out(a.out)
    if a.runs < 1:
        raise CLIError(f"--runs must be at least 1, got {a.runs}")
    masks = load_masks(a.masks)
    if a.seed is not None:
        torch.manual_seed(a.seed)
    model = load_model(a.model, a.device).eval()
    x = torch.randn(size, device=a.device or "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShrinkWarning)
        small, res = shrink(model, masks, x, fix_conflicts=not a.no_fix, return_result=True)
    for w in caught:
        if issubclass(w.category, ShrinkWarning):
            sys.stderr.write(f"note: {w.message}\n")
    before = flops_report(model, x)
    after = flops_report(small, x)
    ms = measure_latency({"before": model, "after": small}, x, runs=a.runs)
    save_pruned(small, a.out)
    dev = a.device or "cpu"
    rows = [("", "before", "after", "ratio"),
            ("MACs", f"{before.total_flops:,}", f"{after.total_flops:,}",
             f"{after.total_flops / max(1, before.total_flops):.3f}"),
            ("params", f"{before.total_params:,}", f"{after.total_params:,}",
             f"{after.total_params / max(1, before.total_params):.3f}"),
            (f"latency ({dev}, median ms)", f"{ms['before']:.2f}", f"{ms['after']:.2f}",
             f"{ms['after'] / ms['before']:.3f}")]
    w0 = max(len(r[0]) for r in rows)
    out = [f"{r[0]:<{w0}}  {r[1]:>16}  {r[2]:>16}  {r[3]:>6}" for r in rows]
    out.append(f"removed {sum(res.removed.values()):,} channels in {len(res.removed)} layers; "
               f"{len(res.fixed)} conflicts fixed; wrote {a.out}")
    sys.stdout.write("\n".join(out) + "\n")
    return 0
