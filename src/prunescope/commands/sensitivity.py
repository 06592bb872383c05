"""``prunescope sensitivity``: NNI's layer-wise pruning sensitivity sweep from the command line.

Example::

    prunescope sensitivity mypkg.models:build --val mypkg.models:evaluate \\
        --sparsities 0.25,0.5,0.75 --early-stop dropped:0.05 --workers 2 --checkpoint sens.ckpt \\
        --out sens.csv --plot sens.png

``MODEL`` (or ``--model MODEL``, the older spelling) names a module (or a callable returning one, or a
torchvision model name); ``--val`` names a callable that takes the model and returns its metric.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from .common import CLIError, load_model, load_object


def _floats(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise CLIError(f"malformed --sparsities {text!r}: expected comma-separated numbers like 0.25,0.5") from None


def _early_stop(text: str | None) -> tuple[str | None, float | None]:
    if text is None:
        return None, None
    mode, sep, value = text.partition(":")
    if not sep:
        raise CLIError(f"malformed --early-stop {text!r}: expected MODE:VALUE, e.g. dropped:0.05")
    try:
        return mode, float(value)
    except ValueError:
        raise CLIError(f"malformed --early-stop value {value!r}: expected a number") from None


def check_writable(path: str, option: str) -> None:
    """Refuse an output path that cannot be written, before any evaluation runs (not after the sweep)."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        raise CLIError(f"{option} {path!r} is a directory; give a file path")
    if not os.path.isdir(folder):
        what = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise CLIError(f"{option} {path!r}: folder {folder!r} {what}")
    try:  # the real test (permissions, read-only file systems): create and remove a file beside it
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CLIError(f"{option} {path!r} cannot be written: {e.strerror or e}") from None
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise CLIError(f"{option} {path!r} exists and is not writable")


def _run(args: argparse.Namespace) -> int:
    from ..sensitivity import MetricError, SensitivityAnalysis

    if args.model and args.model_option and args.model != args.model_option:
        raise CLIError(f"two models given: {args.model!r} and --model {args.model_option!r}; give one")
    args.model = args.model or args.model_option
    if not args.model:
        raise CLIError("give the model: prunescope sensitivity MODEL --val pkg.mod:evaluate --out sens.csv")
    check_writable(args.out, "--out")
    if args.plot:
        check_writable(args.plot, "--plot")
    model = load_model(args.model)
    val = load_object(args.val, "validation function")
    if not callable(val):
        raise CLIError(f"--val {args.val!r} is not callable")
    mode, value = _early_stop(args.early_stop)
    layers = [n.strip() for n in args.layers.split(",") if n.strip()] if args.layers else None
    sa = SensitivityAnalysis(
        model, val, sparsities=_floats(args.sparsities) if args.sparsities else None, prune_type=args.prune_type,
        early_stop_mode=mode, early_stop_value=value, checkpoint=args.checkpoint, workers=args.workers,
        progress=not args.no_progress)
    try:
        sa.analysis(val_args=[model], specified_layers=layers)
    except MetricError as e:  # name the option the user wrote, not only the API's val_func
        raise CLIError(f"--val {args.val!r} (the val_func): {e}") from None
    sa.export(args.out)
    msg = f"baseline {sa.ori_metric!r}; {len(sa.sensitivities)} layers -> {args.out}"
    if args.plot:
        sa.plot(args.plot)
        msg += f", {args.plot}"
    print(msg)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``sensitivity`` sub-command."""
    p = subparsers.add_parser(
        "sensitivity", help="layer-wise pruning sensitivity sweep (NNI's SensitivityAnalysis)",
        description="Prune one layer at a time at increasing sparsities and record the validation metric. "
                    "Writes NNI's CSV.")
    p.add_argument("model", nargs="?", default=None,
                   help="package.module:callable_or_module (looked up in the current folder first), or a "
                        "torchvision model name (random weights)")
    p.add_argument("--model", dest="model_option", metavar="MODEL", default=None,
                   help="the same as the positional MODEL (the older spelling, kept)")
    p.add_argument("--val", required=True, help="package.module:function taking the model, returning a number")
    p.add_argument("--sparsities", help="comma-separated, default 0.1,...,0.9")
    p.add_argument("--prune-type", default="l1", choices=("l1", "l2", "fpgm", "level"),
                   help="how a layer is pruned: filters by L1/L2 norm or FPGM distance, or unstructured by magnitude")
    p.add_argument("--early-stop", metavar="MODE:VALUE", help="minimize|maximize|dropped|raised, e.g. dropped:0.05")
    p.add_argument("--layers", help="comma-separated layer names to analyse (default: all targets)")
    p.add_argument("--workers", type=int, help="run the evaluations in N local processes (pays off only when "
                   "evaluations wait on something else: a GPU each, a remote service)")
    p.add_argument("--checkpoint", help="JSON-lines checkpoint: finished evaluations are skipped on rerun")
    p.add_argument("--out", required=True, help="CSV file to write (NNI's format)")
    p.add_argument("--plot", help="also write a PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
