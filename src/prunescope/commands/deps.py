"""``prunescope deps MODEL --input-size ... [--csv out.csv] [--include-linear] [--device meta]`` and
``prunescope unsafe MODEL --input-size ...``: channel dependency sets and layers not safe to prune."""

from __future__ import annotations

import argparse
import warnings

import torch

from .common import CLIError, check_device, check_out, load_model, parse_size


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision model name (random weights) or package.module:callable")
    p.add_argument("--input-size", required=True, help="input size, e.g. 1,3,224,224")
    p.add_argument("--device", default=None, help="device to build and trace on (e.g. meta, cpu, cuda)")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("deps", help="channel dependency sets (layers that must be pruned together)",
                       description="Print the channel dependency sets (NNI ChannelDependency layout).")
    _common(p)
    p.add_argument("--csv", default=None, help="write the sets as CSV (Dependency Set,Convolutional Layers)")
    p.add_argument("--include-linear", action="store_true", help="also group Linear/attention layers")
    p.set_defaults(func=_deps)
    q = sub.add_parser("unsafe", help="layers not safe to prune (channel count pinned downstream)",
                       description="List the layers whose output channel count is pinned, with the reason.")
    _common(q)
    q.set_defaults(func=_unsafe)


def _graph(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..graph import trace
    from .common import build_on_meta

    size = parse_size(a.input_size)
    check_device(a.device)
    if getattr(a, "csv", None):
        check_out(a.csv, "--csv")
    model = build_on_meta(lambda: load_model(a.model)) if a.device == "meta" else load_model(a.model, a.device)
    try:
        x = torch.ones(size, device=a.device or "cpu")
    except RuntimeError as e:
        raise CLIError(f"cannot create an input on device {a.device!r}: {e}") from None
    return trace(model, x)


def _warn_line(w: warnings.WarningMessage) -> None:
    import sys

    print(f"prunescope: warning: {w.message}", file=sys.stderr)


def _deps(a: argparse.Namespace) -> int:
    from ..topology import ChannelDependency

    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        dep = ChannelDependency(traced_model=_graph(a), include_linear=a.include_linear)
    for w in ws:
        _warn_line(w)
    if a.csv:
        dep.export(a.csv)
        print(f"{len(dep.sets)} sets written to {a.csv}")
        return 0
    print(",".join(dep.header))
    for k, s in enumerate(dep.sets, 1):
        print(",".join([f"Set {k}", *s]))
    return 0


def _unsafe(a: argparse.Namespace) -> int:
    from ..removal import not_safe_to_prune

    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        reasons = not_safe_to_prune(None, None, traced_model=_graph(a), with_reasons=True)
    for w in ws:
        _warn_line(w)
    assert isinstance(reasons, dict)
    if not reasons:
        print("no layer is pinned: all layers are safe to prune")
    for layer, rs in reasons.items():
        print(f"{layer}: {rs[0]}" + (f" (+{len(rs) - 1} more)" if len(rs) > 1 else ""))
    return 0
