"""Helpers shared by the sub-commands: loading a model by name, parsing sizes, one-line errors."""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn


class CLIError(Exception):
    """An error the command line prints as one line (no traceback) and exits 2 for."""


def parse_size(text: str) -> tuple[int, ...]:
    """``'1,3,224,224'`` → ``(1, 3, 224, 224)``."""
    try:
        size = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise CLIError(f"malformed --input-size {text!r}: expected comma-separated integers like 1,3,224,224")
    if not size or any(s <= 0 for s in size):
        raise CLIError(f"malformed --input-size {text!r}: expected positive integers like 1,3,224,224")
    return size


def load_object(spec: str, what: str = "object") -> Any:
    """Load ``package.module:attr`` (attr may be dotted)."""
    mod_name, _, attr = spec.partition(":")
    if not attr:
        raise CLIError(f"{what} {spec!r} must have the form package.module:name")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise CLIError(f"cannot import module {mod_name!r} for {what} {spec!r}: {e}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"module {mod_name!r} has no attribute {attr!r} ({what} {spec!r})")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str, device: str | None = None) -> nn.Module:
    """A torchvision model name (random weights, no download) or ``package.module:callable``."""
    if ":" in spec:
        obj = load_object(spec, "model")
        model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
        if not isinstance(model, nn.Module):
            raise CLIError(f"model {spec!r} did not give a torch.nn.Module (got {type(model).__name__})")
        if device:
            model = model.to(device)
        return model
    try:
        import torchvision
    except ImportError:
        raise CLIError("torchvision is needed for model names; install prunescope[vision] or give pkg.mod:callable")
    names = set(torchvision.models.list_models())
    if spec not in names:
        close = sorted(n for n in names if spec.lower()[:4] in n)[:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CLIError(f"unknown model {spec!r}: not a torchvision model name nor package.module:callable{hint}")
    ctx: Any = torch.device(device) if device else torch.device("cpu")
    with ctx:
        model = torchvision.models.get_model(spec, weights=None)
    return model.eval()


def run_guarded(func: Callable[[], int]) -> int:
    """Run a command body; known errors become one line on stderr and exit code 2."""
    import sys

    from ..errors import PrunescopeError

    try:
        return func()
    except (CLIError, PrunescopeError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"prunescope: error: {e}", file=sys.stderr)
        return 2
