"""Pruned-model files: the narrowed shapes and the weights, no pickled code.

``save_pruned(small, path)`` writes one ``torch.save`` file (atomically) holding plain containers only: the
model's class name, every parameter's and buffer's shape, the attributes that torch's modules read in their
forward (``in_channels``, ``num_features``, ``normalized_shape`` ...) and the state dict. It loads with
``weights_only=True``, so nothing in it can execute code. ``load_pruned(dense, path)`` narrows a freshly built
dense model of the same class to those shapes and loads the weights; the result is the pruned model.

The file also holds a SHA-256 digest of every tensor of the state dict (its dtype, shape and bytes), checked at
load: a damaged file (a flipped byte in a weight) is refused naming the tensor. Files written before the
digests existed (no ``digests`` entry) load as before, unchecked. Everything else in the file is checked against
the model and the file's own tensors before the model is touched: shapes are lists of non-negative sizes that
only narrow, and the module attributes (``in_channels``, ``num_features`` ...) have their type and agree with
the tensors (a pruned model only narrows: an integer attribute is at most the dense model's value).

>>> import io, os, tempfile, torch
>>> from torch import nn
>>> from prunescope.narrow import shrink, save_pruned, load_pruned
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

import hashlib
import io
import os
import pickle
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ..errors import ShrinkError
from ..masks.layers import is_transposed_linear
from ..removal.narrow import attr_names, replace_tensors

__all__ = ["save_pruned", "load_pruned", "FORMAT"]

FORMAT = "prunescope-pruned-model"
VERSION = 1


def _attrs_of(mod: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in vars(mod).items() if not k.startswith("_") and type(v) is int}
    out.update({k: list(v) for k, v in vars(mod).items() if not k.startswith("_") and type(v) is tuple and v
                and all(type(e) is int for e in v)})  # a shape kept as an attribute (narrow/attrs.py)
    for n in sorted(attr_names(mod)):
        v = getattr(mod, n, None)
        if isinstance(v, (int, tuple, list)) and not isinstance(v, bool):
            out[n] = list(v) if isinstance(v, (tuple, list)) else int(v)
    return out


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and bytes (CPU, contiguous)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    c = t.detach().cpu().contiguous().reshape(-1)
    if c.numel():
        h.update(c.view(torch.uint8).numpy())  # the bytes themselves, no copy
    return h.hexdigest()


def _digests(state: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and not v.is_quantized:
            out[k] = tensor_digest(v)
    return out


def save_pruned(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the (shrunk) model's shapes, module attributes and weights to ``path`` (atomic, weights_only), with
    a SHA-256 digest per tensor that :func:`load_pruned` checks. A model on the ``meta`` device (shapes only)
    has no weights to write: :class:`~prunescope.narrow.ShrinkError` naming the first such tensor."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise ShrinkError(f"cannot save the pruned model: tensor '{name}' is on the meta device (shapes "
                              "only, no values); shrink a model with real weights (e.g. built on cpu) to save "
                              "it", name.rpartition(".")[0])
    shapes: dict[str, list[int]] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        shapes[name] = list(t.shape)
    attrs = {name: a for name, m in model.named_modules() if (a := _attrs_of(m))}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "model_class": type(model).__qualname__,
               "shapes": shapes, "attrs": attrs, "state_dict": state, "digests": _digests(state),
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


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_tensors(data: dict[str, Any], p: str) -> None:
    """The file's own consistency: shapes are lists of sizes, every tensor of the state dict has the shape the
    file lists for it, and its digest (when the file has digests) matches its bytes."""
    shapes, state, digests = data.get("shapes"), data.get("state_dict"), data.get("digests")
    if not isinstance(shapes, dict) or not isinstance(state, dict) or not isinstance(data.get("attrs", {}), dict):
        raise ShrinkError(f"{p!r} is damaged: its shapes, attributes or weights are not tables")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise ShrinkError(f"{p!r} is damaged: the shape of '{name}' is {shape!r}, not a list of sizes >= 0",
                              str(name).rpartition(".")[0])
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        if name in shapes and list(t.shape) != shapes[name]:
            raise ShrinkError(f"{p!r} is damaged: tensor '{name}' is {tuple(t.shape)}, the file lists "
                              f"{tuple(shapes[name])} for it", name.rpartition(".")[0])
    if digests is None:
        return  # written before digests existed: loaded unchecked, as then
    if not isinstance(digests, dict):
        raise ShrinkError(f"{p!r} is damaged: its digests are not a table")
    for name, d in digests.items():
        t = state.get(name)
        if not isinstance(t, torch.Tensor):
            raise ShrinkError(f"{p!r} is damaged: it has a digest for tensor '{name}' but no such tensor",
                              str(name).rpartition(".")[0])
        if tensor_digest(t) != d:
            raise ShrinkError(f"{p!r} is damaged: tensor '{name}' does not match the SHA-256 digest written with "
                              "it (the file changed after save_pruned)", name.rpartition(".")[0])
    missing = [k for k, v in state.items() if isinstance(v, torch.Tensor) and not v.is_quantized and k not in digests]
    if missing:
        raise ShrinkError(f"{p!r} is damaged: tensor '{missing[0]}' has no digest", missing[0].rpartition(".")[0])


def _implied(mod: nn.Module, name: str, shapes: dict[str, list[int]], groups: int) -> dict[str, Any]:
    """The size attributes of ``mod`` that its (narrowed) tensors in ``shapes`` imply."""
    def shape(t: str) -> list[int] | None:
        return shapes.get(f"{name}.{t}" if name else t)

    w = shape("weight")
    out: dict[str, Any] = {}
    if isinstance(mod, nn.modules.conv._ConvNd) and w is not None and len(w) >= 2:
        a, b = (w[1] * groups, w[0]) if not mod.transposed else (w[0], w[1] * groups)
        out.update(in_channels=a, out_channels=b)
    elif isinstance(mod, nn.Linear) and w is not None and len(w) == 2:
        out.update(in_features=w[1], out_features=w[0])
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        t = w if w is not None else shape("running_mean")
        if t is not None and len(t) == 1:
            out["num_features"] = t[0]
    elif isinstance(mod, nn.GroupNorm) and w is not None and len(w) == 1:
        out["num_channels"] = w[0]
    elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) and w is not None:
        out["normalized_shape"] = list(w)
    elif isinstance(mod, nn.PReLU) and w is not None and len(w) == 1:
        out["num_parameters"] = w[0]
    elif isinstance(mod, nn.Embedding) and w is not None and len(w) == 2:
        out["embedding_dim"] = w[1]
    elif is_transposed_linear(mod) and w is not None and len(w) == 2:
        out.update(nx=w[0], nf=w[1])
    return out


def _check_attrs(attrs: Any, modules: dict[str, nn.Module], shapes: dict[str, list[int]], p: str) -> None:
    """Every attribute the file sets has the dense module's type (an int, or a list of ints), is at most the
    dense value (a pruned model only narrows; a negative dense value stays as it is), and the sizes the file's
    tensors imply (``in_channels`` = the weight's input width x groups ...) are the ones it sets."""
    for name, values in attrs.items():
        mod = modules.get(name)
        if mod is None:
            raise ShrinkError(f"layer '{name}' does not fit: the model has no such module", name)
        if not isinstance(values, dict):
            raise ShrinkError(f"{p!r} is damaged: the attributes of layer '{name}' are not a table", name)
        dense = _attrs_of(mod)
        for k, v in values.items():
            if k not in dense:
                continue  # not an attribute this module has (as before: ignored)
            d = dense[k]
            if isinstance(d, list):
                ok = isinstance(v, list) and len(v) == len(d) and all(_is_size(x) and x <= y for x, y in zip(v, d))
            elif d >= 0:
                ok = _is_size(v) and v <= d
            else:
                ok = type(v) is int and v == d
            if not ok:
                raise ShrinkError(f"layer '{name}': attribute {k}={v!r} in {p!r} does not fit the model ({k}="
                                  f"{d!r} there; a pruned model only narrows)", name)
        merged = {**dense, **{k: v for k, v in values.items() if k in dense}}
        groups = merged.get("groups", 1)
        for k, want in _implied(mod, name, shapes, groups if _is_size(groups) and groups > 0 else 1).items():
            if k in merged and merged[k] != want:
                raise ShrinkError(f"layer '{name}': attribute {k}={merged[k]!r} in {p!r} does not agree with "
                                  f"its tensors, which give {k}={want!r}", name)


def load_pruned(dense_model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Narrow ``dense_model`` (freshly built, same class as the pruned model) to the file's shapes; load weights.

    The model is changed in place and returned, in the train/eval mode the pruned model was saved in. A file
    that does not fit the model raises :class:`~prunescope.narrow.ShrinkError` naming the first tensor or layer
    that does not fit; a damaged file (a tensor that does not match its digest, attributes that disagree with
    the tensors) is refused naming the tensor or layer, before the model is touched.
    """
    data = _read(path)
    p = os.fspath(path)
    want = data.get("model_class")
    if want and want != type(dense_model).__qualname__:
        raise ShrinkError(f"the file holds a pruned {want}, the model given is a {type(dense_model).__qualname__}")
    _check_tensors(data, p)
    shapes: dict[str, list[int]] = data["shapes"]
    for name, shape in shapes.items():  # a bias shrink created to hold folded constants (removal/fold.py)
        owner, _, attr = name.rpartition(".")
        mod = dict(dense_model.named_modules()).get(owner)
        if attr == "bias" and mod is not None and "bias" in mod._parameters and mod._parameters["bias"] is None \
                and len(shape) == 1:
            w = getattr(mod, "weight", None)
            mod.bias = nn.Parameter(torch.empty(shape, dtype=w.dtype if w is not None else torch.float32))
    own = dict(dense_model.named_parameters())
    own.update(dict(dense_model.named_buffers()))
    for name in own:
        if name not in shapes:
            raise ShrinkError(f"layer '{name.rpartition('.')[0]}' does not fit: the file has no '{name}'",
                              name.rpartition(".")[0])
    for name, shape in shapes.items():
        t = own.get(name)
        layer = name.rpartition(".")[0]
        if t is None:
            raise ShrinkError(f"layer '{layer}' does not fit: the model has no '{name}'", layer)
        if len(shape) != t.ndim or any(s > d for s, d in zip(shape, t.shape)):
            raise ShrinkError(f"layer '{layer}' does not fit: '{name}' is {tuple(shape)} in the file, "
                              f"{tuple(t.shape)} in the model (a pruned model only narrows)", layer)
    modules = dict(dense_model.named_modules())
    _check_attrs(data.get("attrs", {}), modules, shapes, p)
    state = data["state_dict"]
    own_state = dense_model.state_dict()
    for name in own_state:
        if name not in state:
            raise ShrinkError(f"layer '{name.rpartition('.')[0]}' does not fit: the file has no weights for "
                              f"'{name}'", name.rpartition(".")[0])
    for name, t in state.items():
        if name not in own_state:
            raise ShrinkError(f"layer '{name.rpartition('.')[0]}' does not fit: the file has weights for "
                              f"'{name}', the model has no such tensor", name.rpartition(".")[0])
        if isinstance(t, torch.Tensor) and name not in shapes and list(t.shape) != list(own_state[name].shape):
            raise ShrinkError(f"layer '{name.rpartition('.')[0]}' does not fit: '{name}' is {tuple(t.shape)} in "
                              f"the file, {tuple(own_state[name].shape)} in the model", name.rpartition(".")[0])
    new_by_id: dict[int, torch.Tensor] = {}
    for name, shape in shapes.items():
        t = own[name]
        if list(t.shape) != list(shape) and id(t) not in new_by_id:
            new = torch.empty(shape, dtype=t.dtype, device=t.device)
            new_by_id[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                else new
    replace_tensors(dense_model, new_by_id)
    for name, values in data.get("attrs", {}).items():
        mod = modules[name]
        allowed = _attrs_of(mod)
        for k, v in values.items():
            if k in allowed:
                setattr(mod, k, tuple(v) if isinstance(allowed[k], list) else v)
    try:
        dense_model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ShrinkError(f"the file's weights do not fit the model: {' '.join(str(e).split())[:300]}") from e
    evals = set(data.get("eval_modules", []))
    for name, m in modules.items():
        m.training = name not in evals
    return dense_model
