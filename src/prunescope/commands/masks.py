"""``prunescope masks MODEL --pruner l1 --sparsity 0.5 --out masks.pth [--input-size 1,3,224,224 --fix]``"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from .common import CLIError, check_device, check_out, load_model, parse_size


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "masks", help="compute pruning masks (NNI-exact L1/L2/FPGM/Level) and write a mask file",
        description="Compute pruning masks exactly as NNI 2.10.1's one-shot pruners do and save them in NNI's "
                    "mask-file layout. With --fix, make them consistent with the model's channel and group "
                    "dependencies first.",
    )
    p.add_argument("model", help="torchvision model name (random weights) or package.module:callable")
    p.add_argument("--input-size", default=None, help="input size, e.g. 1,3,224,224 (needed by --fix)")
    p.add_argument("--pruner", choices=("l1", "l2", "fpgm", "level"), default="l1",
                   help="NNI one-shot pruner: filters with the smallest L1/L2 norm or FPGM distance, or "
                        "unstructured by magnitude (level)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction to prune, 0 < s < 1")
    p.add_argument("--op-types", default=None,
                   help="comma-separated layer class names (default: Conv2d; 'default' for --pruner level)")
    p.add_argument("--op-names", default=None, help="comma-separated layer names to restrict pruning to")
    p.add_argument("--exclude", default=None, help="comma-separated layer names never to prune")
    p.add_argument("--config", default=None, help="JSON file with an NNI config_list (replaces the options above)")
    p.add_argument("--fix", action="store_true", help="fix channel/group conflicts (fix_mask_conflict)")
    p.add_argument("--policy", choices=("union", "intersection", "l1"), default="union",
                   help="with --fix: how to merge a dependency set's channels (union = NNI)")
    p.add_argument("--seed", type=int, default=None, help="torch.manual_seed before building the model")
    p.add_argument("--device", default=None, help="device to build the model on (cpu, cuda, ...)")
    p.add_argument("--out", required=True, help="mask file to write (atomically)")
    p.add_argument("--quiet", action="store_true", help="do not print the per-layer summary")
    p.set_defaults(func=_run)


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _config(a: argparse.Namespace) -> list[dict[str, Any]]:
    if a.config:
        try:
            with open(a.config) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CLIError(f"cannot read --config {a.config!r}: {e}") from None
        if any(x is not None for x in (a.sparsity, a.op_types, a.op_names, a.exclude)):
            raise CLIError("--config replaces --sparsity/--op-types/--op-names/--exclude; give one or the other")
        return cfg
    if a.sparsity is None:
        raise CLIError("give --sparsity (or --config)")
    entry: dict[str, Any] = {"sparsity": a.sparsity}
    types = _names(a.op_types) or (["default"] if a.pruner == "level" else ["Conv2d"])
    entry["op_types"] = types
    if a.op_names:
        entry["op_names"] = _names(a.op_names)
    cfg = [entry]
    if a.exclude:
        cfg.append({"exclude": True, "op_names": _names(a.exclude)})
    return cfg


def _summary(masks: dict, changed: list | None) -> str:
    lines = [f"{'layer':<40} {'kept filters':>14} {'kept weights':>14}"]
    for name, m in masks.items():
        w = m["weight"]
        kept_w = f"{int(w.count_nonzero())}/{w.numel()}"
        rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(-1, 1)
        kept_f = f"{int((rows.abs().sum(dim=1) != 0).sum())}/{rows.shape[0]}"
        lines.append(f"{name:<40} {kept_f:>14} {kept_w:>14}")
    if changed is not None:
        lines.append(f"fix_mask_conflict changed {len(changed)} dependency set(s)")
        for c in changed:
            lines.append(f"  {c}")
    return "\n".join(lines) + "\n"


def _run(a: argparse.Namespace) -> int:
    from ..masks import save_masks
    from ..masks.pruners import PRUNERS

    if a.fix and not a.input_size:
        raise CLIError("--fix needs --input-size (the model is traced to find its dependencies)")
    size = parse_size(a.input_size) if a.input_size else None
    check_device(a.device)
    check_out(a.out)
    if a.seed is not None:
        torch.manual_seed(a.seed)
    model = load_model(a.model, a.device)
    cfg = _config(a)
    masks = PRUNERS[a.pruner](model, cfg).compute_masks()
    if not masks:
        raise CLIError("the configuration selects no layer of this model; check --op-types/--op-names")
    changed = None
    if a.fix:
        from ..masks.conflict import fix_mask_conflict

        try:
            x = torch.ones(size, device=a.device or "cpu")  # type: ignore[arg-type]
        except RuntimeError as e:
            raise CLIError(f"cannot create an input on device {a.device!r}: {e}") from None
        masks = fix_mask_conflict(masks, model, x, policy=a.policy)
        changed = [f"{c.members} ({c.reason})" for c in masks.changed]
    save_masks(masks, a.out)
    if not a.quiet:
        sys.stdout.write(_summary(masks, changed))
        sys.stdout.write(f"masks for {len(masks)} layer(s) written to {a.out}\n")
    return 0
