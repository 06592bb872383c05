"""Pruned-model files: the narrowed shapes and the weights, no pickled code.

``save_pruned(small, path)`` writes one ``torch.save`` file (atomically) holding plain containers only: the
model's class name, every parameter's and buffer's shape, the attributes that torch's modules read in their
forward (``in_channels``, ``num_features``, ``normalized_shape`` ...) and the state dict. It loads with
``weights_only=True``, so nothing in it can execute code. ``load_pruned(dense, path)`` narrows a freshly built
dense model of the same class to those shapes and loads the weights; the result is the pruned model.

>>> import io, os, tempfile, torch
>>> from torch import nn
>>> from prunescope.shrink import shrink, save_pruned, load_pruned
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> m = torch.ones(8, 3, 3, 3); m[:4] = 0
>>> small = shrink(net, {'0': {'weight': m, 'bias': None}}, torch.ones(1, 3, 8, 8))
>>> path = os.path.join(tempfile.mkdtemp(), 'small.pt')
>>> save_pruned(small, path)
>>> again = load_pruned(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), path)
>>> again[2].in_channels, torch.equal(again[2].weight, small[2].weight)
(4, True)
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from .core import attr_names, replace_tensors
from .plan import ShrinkError

__all__ = ["save_pruned", "load_pruned", "FORMAT"]

FORMAT = "prunescope-pruned-model"
VERSION = 1


def _attrs_of(mod: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in vars(mod).items() if not k.startswith("_") and type(v) is int}
    out.update({k: list(v) for k, v in vars(mod).items() if not k.startswith("_") and type(v) is tuple and v
                and all(type(e) is int for e in v)})  # a shape kept as an attribute (shrink/attrs.py)
    for n in sorted(attr_names(mod)):
        v = getattr(mod, n, None)
        if isinstance(v, (int, tuple, list)) and not isinstance(v, bool):
            out[n] = list(v) if isinstance(v, (tuple, list)) else int(v)
    return out


def save_pruned(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the (shrunk) model's shapes, module attributes and weights to ``path`` (atomic, weights_only)."""
    shapes: dict[str, list[int]] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        shapes[name] = list(t.shape)
    attrs = {name: a for name, m in model.named_modules() if (a := _attrs_of(m))}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "model_class": type(model).__qualname__,
               "shapes": shapes, "attrs": attrs, "state_dict": state,
               "eval_modules": [name for name, m in model.named_modules() if not m.training]}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, buf.getvalue())


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = os.fspath(path)
    if os.path.isdir(p):
        raise ShrinkError(f"pruned-model file {p!r} is a directory")
    if not os.path.exists(p):
        raise ShrinkError(f"pruned-model file {p!r} does not exist")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ShrinkError(f"{p!r} is not a prunescope pruned-model file (it holds objects that a weights-only "
                          f"load refuses): {str(e).splitlines()[0]}") from e
    except Exception as e:  # noqa: BLE001 - not a torch file at all
        raise ShrinkError(f"{p!r} is not a prunescope pruned-model file: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ShrinkError(f"{p!r} is not a prunescope pruned-model file (written by save_pruned)")
    if data.get("version") != VERSION:
        raise ShrinkError(f"{p!r} has pruned-model format version {data.get('version')}, this prunescope reads "
                          f"{VERSION}")
    return data


def load_pruned(dense_model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Narrow ``dense_model`` (freshly built, same class as the pruned model) to the file's shapes; load weights.

    The model is changed in place and returned, in the train/eval mode the pruned model was saved in. A file
    that does not fit the model raises
    :class:`~prunescope.shrink.ShrinkError` naming the first tensor or layer that does not fit.
    """
    data = _read(path)
    want = data.get("model_class")
    if want and want != type(dense_model).__qualname__:
        raise ShrinkError(f"the file holds a pruned {want}, the model given is a {type(dense_model).__qualname__}")
    shapes: dict[str, list[int]] = data["shapes"]
    own = dict(dense_model.named_parameters())
    own.update(dict(dense_model.named_buffers()))
    for name in own:
        if name not in shapes:
            raise ShrinkError(f"layer '{name.rpartition('.')[0]}' does not fit: the file has no '{name}'",
                              name.rpartition(".")[0])
    new_by_id: dict[int, torch.Tensor] = {}
    for name, shape in shapes.items():
        t = own.get(name)
        layer = name.rpartition(".")[0]
        if t is None:
            raise ShrinkError(f"layer '{layer}' does not fit: the model has no '{name}'", layer)
        if len(shape) != t.ndim or any(s > d for s, d in zip(shape, t.shape)):
            raise ShrinkError(f"layer '{layer}' does not fit: '{name}' is {tuple(shape)} in the file, "
                              f"{tuple(t.shape)} in the model (a pruned model only narrows)", layer)
        if list(t.shape) != list(shape) and id(t) not in new_by_id:
            new = torch.empty(shape, dtype=t.dtype, device=t.device)
            new_by_id[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                else new
    replace_tensors(dense_model, new_by_id)
    modules = dict(dense_model.named_modules())
    for name, values in data["attrs"].items():
        mod = modules.get(name)
        if mod is None:
            raise ShrinkError(f"layer '{name}' does not fit: the model has no such module", name)
        allowed = _attrs_of(mod)
        for k, v in values.items():
            if k in allowed:
                setattr(mod, k, tuple(v) if isinstance(allowed[k], list) else v)
    try:
        dense_model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as e:
        raise ShrinkError(f"the file's weights do not fit the model: {str(e).splitlines()[0]}") from e
    evals = set(data.get("eval_modules", []))
    for name, m in modules.items():
        m.training = name not in evals
    return dense_model
