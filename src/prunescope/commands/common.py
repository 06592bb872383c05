"""Helpers shared by the sub-commands: loading a model by name, parsing sizes, one-line errors."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .._io import check_writable


class CLIError(Exception):
    """An error the command line prints as one line (no traceback) and exits 2 for."""


def parse_size(text: str) -> tuple[int, ...]:
    """``'1,3,224,224'`` → ``(1, 3, 224, 224)``."""
    try:
        size = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise CLIError(f"malformed --input-size {text!r}: expected comma-separated integers like 1,3,224,224") from None
    if not size or any(s <= 0 for s in size):
        raise CLIError(f"malformed --input-size {text!r}: expected positive integers like 1,3,224,224")
    return size


def _module_path() -> list[str]:
    """Put the current folder first on ``sys.path``, as ``python -m`` does (a console script starts with its own
    ``bin`` folder there instead), so that ``mymodel:build`` finds ``./mymodel.py``. It stays there for the rest
    of the process: the user's module may import its neighbours later, and worker processes inherit the path."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path[:1]):
        sys.path.insert(0, cwd)
    return [os.path.abspath(p or ".") for p in sys.path]


def load_object(spec: str, what: str = "object") -> Any:
    """Load ``package.module:attr`` (attr may be dotted). The module is looked up in the current folder first,
    then on ``sys.path``, as ``python -m`` does; the error names where it looked."""
    mod_name, _, attr = spec.partition(":")
    if not attr or not mod_name:
        raise CLIError(f"{what} {spec!r} must have the form package.module:name")
    if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
        hint = mod_name.removesuffix(".py").replace("/", ".").replace("\\", ".").strip(".")
        raise CLIError(f"{what} {spec!r}: give a module name, not a file path (e.g. {hint}:{attr}, run from the "
                       "folder that holds it)")
    searched = _module_path()
    try:
        obj: Any = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            shown = ", ".join(searched[:4]) + (f" and {len(searched) - 4} more" if len(searched) > 4 else "")
            raise CLIError(f"cannot import module {mod_name!r} for {what} {spec!r}: no module named {e.name!r} in "
                           f"the current folder nor on sys.path (looked in {shown})") from None
        raise CLIError(f"module {mod_name!r} for {what} {spec!r} was found but importing it failed: {e}") from None
    except ImportError as e:
        raise CLIError(f"cannot import module {mod_name!r} for {what} {spec!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"module {mod_name!r} ({getattr(obj, '__file__', None) or mod_name}) has no attribute "
                           f"{attr!r} ({what} {spec!r})")
        obj = getattr(obj, part)
    return obj


def check_device(text: str | None) -> str | None:
    """Validate ``--device`` before anything is built: a known device type that exists on this machine."""
    if text is None:
        return None
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"unknown --device {text!r}: expected cpu, meta, cuda or cuda:N (a torch device string)") \
            from None
    if dev.type in ("cpu", "meta"):
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text!r}: no CUDA GPU is available on this machine "
                           "(torch.cuda.is_available() is False); use --device cpu or meta")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return text
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # backend not built in or no such device
        first = " ".join(str(e).split())[:200]
        raise CLIError(f"--device {text!r} is not usable on this machine: {first}") from None
    return text


def check_out(path: str, what: str = "--out") -> None:
    """Fail before any work when an output file cannot be written (a directory, a missing folder ...)."""
    check_writable(path, what)


def one_line(e: BaseException) -> str:
    """An exception as one line of text (messages from torch can span several lines)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def load_model(spec: str, device: str | None = None) -> nn.Module:
    """A torchvision model name (random weights, no download) or ``package.module:callable``."""
    check_device(device)
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
        raise CLIError(
            "torchvision is needed for model names; install prunescope[vision] or give pkg.mod:callable"
        ) from None
    names = set(torchvision.models.list_models())
    if spec not in names:
        close = difflib.get_close_matches(spec, sorted(names), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CLIError(f"unknown model {spec!r}: not a torchvision model name nor package.module:callable{hint}")
    ctx: Any = torch.device(device) if device else contextlib.nullcontext()
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchvision's init-weights notices
        model = torchvision.models.get_model(spec, weights=None)
    return model.eval()


def build_on_meta(builder: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with its parameters and buffers on the ``meta`` device (no memory, no init compute).

    Tries ``with torch.device('meta')`` first; builders that compute with tensors while constructing
    (torchvision's RegNet computes its widths with ``torch`` and ``.tolist()``) are built on the CPU with
    each parameter and buffer moved to ``meta`` the moment it is registered, so initialisation costs nothing.
    """
    try:
        with torch.device("meta"):
            return builder()
    except (NotImplementedError, RuntimeError):
        pass
    reg_p, reg_b = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self: nn.Module, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        reg_p(self, name, param)

    def register_buffer(self: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        if tensor is not None and tensor.device.type != "meta":
            tensor = tensor.to("meta")
        reg_b(self, name, tensor, persistent)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
    try:
        return builder()
    finally:
        nn.Module.register_parameter = reg_p  # type: ignore[method-assign]
        nn.Module.register_buffer = reg_b  # type: ignore[method-assign]
