"""``prunescope flops MODEL --input-size 1,3,224,224 [--mode full] [--format table|csv|json] [--device meta]``"""

from __future__ import annotations

import argparse
import sys

import torch

from .common import CLIError, check_device, check_out, load_model, parse_size


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("flops", help="count FLOPs (MACs) and parameters per layer",
                       description="Count FLOPs (as MACs, multiply-accumulates) and parameters per layer.")
    p.add_argument("model", help="torchvision model name (random weights) or package.module:callable")
    p.add_argument("--input-size", required=True, help="input size, e.g. 1,3,224,224")
    p.add_argument("--mode", choices=("default", "full"), default="default",
                   help="default: multiply-accumulates of convolutions, matmuls/linear layers, attention and RNNs; "
                        "full: also norms, activations, pooling, elementwise ops (and lists ops with no formula)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="output format: a per-layer table, NNI's CSV columns, or JSON")
    p.add_argument("--device", default=None, help="device to build and count on (e.g. meta, cpu, cuda)")
    p.add_argument("--masks", default=None, help="mask file (NNI layout) to count the pruned model")
    p.add_argument("--effective", action="store_true",
                   help="with --masks: count the physically narrowed model (input channels included)")
    p.add_argument("--out", default=None, help="write the csv/json/table here instead of stdout")
    p.set_defaults(func=_run)


def _run(a: argparse.Namespace) -> int:
    from ..flops import flops_report
    from .common import build_on_meta

    size = parse_size(a.input_size)
    check_device(a.device)
    if a.out:
        check_out(a.out)
    if a.device == "meta":
        model = build_on_meta(lambda: load_model(a.model))
    else:
        model = load_model(a.model, a.device)
    device = a.device or "cpu"
    masks = None
    if a.masks:
        from ..masks import load_masks

        masks = load_masks(a.masks)
    elif a.effective:
        raise CLIError("--effective needs --masks")
    try:
        x = torch.ones(size, device=device)
    except RuntimeError as e:
        raise CLIError(f"cannot create an input on device {device!r}: {e}") from None
    rep = flops_report(model, x, mode=a.mode, masks=masks, effective=a.effective)
    if a.format == "csv":
        text = rep.to_csv()
    elif a.format == "json":
        text = rep.to_json()
    else:
        text = rep.table()
    if a.out:
        from ..flops.counter import atomic_write_text

        atomic_write_text(a.out, text)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
