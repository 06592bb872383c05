"""Mask files and mask validation.

Files are written atomically (a temporary file in the same directory, then ``os.replace``), so a crash
never leaves a half-written mask file behind. Loading never executes code: ``torch.load`` runs with
``weights_only=True``, which only rebuilds tensors and plain containers; anything else (a crafted
pickle that would call ``os.system``, say) is refused and reported as a :class:`MaskError` naming the
file. Files written by NNI's ``export_model`` (``torch.save`` of the same layout, possibly with CUDA
tensors) load; ``map_location`` (default ``'cpu'``) moves them.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn

from .._io import atomic_open
from ..errors import MaskError
from .layers import bias_of, expert_param_shape, weight_of

__all__ = ["check_structure", "load_masks", "save_masks", "validate_masks"]

PathLike = Union[str, "os.PathLike[str]"]
Masks = dict[str, dict[str, "torch.Tensor | None"]]


def check_structure(masks: Any, source: str = "masks") -> Masks:
    """Check the layout ``{name: {'weight': tensor, 'bias': tensor or None}}``; return it normalised.

    A missing ``'bias'`` key becomes ``None``; a ``bool`` mask becomes the same mask of 0.0/1.0 (float32).
    Raises :class:`MaskError` saying what is wrong and where.

    >>> import torch
    >>> check_structure({'fc': {'weight': torch.ones(2, 2)}})['fc']['bias'] is None
    True
    """
    if not isinstance(masks, Mapping):
        raise MaskError(f"{source}: expected a dict {{layer_name: {{'weight': ..., 'bias': ...}}}}, "
                        f"got {type(masks).__name__}")
    out: Masks = {}
    for name, entry in masks.items():
        if not isinstance(name, str):
            raise MaskError(f"{source}: layer names must be strings, got {name!r}")
        if not isinstance(entry, Mapping):
            raise MaskError(f"{source}: layer {name!r}: expected a dict with 'weight' (and 'bias'), "
                            f"got {type(entry).__name__}")
        extra = set(entry) - {"weight", "bias"}
        if extra:
            raise MaskError(f"{source}: layer {name!r}: unexpected key(s) {sorted(map(str, extra))}; "
                            "only 'weight' and 'bias' are allowed")
        w = entry.get("weight")
        b = entry.get("bias")
        if not isinstance(w, torch.Tensor):
            raise MaskError(f"{source}: layer {name!r}: 'weight' must be a tensor, got {type(w).__name__}")
        if b is not None and not isinstance(b, torch.Tensor):
            raise MaskError(f"{source}: layer {name!r}: 'bias' must be a tensor or None, got {type(b).__name__}")
        for key, t in (("weight", w), ("bias", b)):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                raise MaskError(f"{source}: layer {name!r}: the {key!r} mask is a meta tensor (a shape without "
                                "values); masks need real 0/1 values")
        out[name] = {"weight": w.float() if w.dtype == torch.bool else w,
                     "bias": b.float() if b is not None and b.dtype == torch.bool else b}
    return out


def _binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def validate_masks(masks: Any, model: nn.Module, source: str = "masks", *, values: bool = True) -> Masks:
    """Check masks against a model; raise :class:`MaskError` naming the layer and the problem.

    Checks: the layer exists, it has a ``weight`` tensor (otherwise it cannot be masked), the shapes
    match, the values are only 0 and 1 (``values=False``: not checked here, for a caller that reads every
    value anyway and checks them in the same pass), and a bias mask is only given for a layer with a bias.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> validate_masks({'1': {'weight': torch.ones(2, 2)}}, model)
    Traceback (most recent call last):
    ...
    prunescope.errors.MaskError: masks: layer '1': no such layer in the model (layers with weights: 0)
    """
    masks = check_structure(masks, source)
    modules = dict(model.named_modules())
    for name, m in masks.items():
        module = modules.get(name)
        if module is None and _fused_expert_mask(model, name, m, source, values):
            continue
        if module is None:
            known = [n for n, mod in modules.items() if n and weight_of(mod) is not None]
            hint = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
            raise MaskError(f"{source}: layer {name!r}: no such layer in the model (layers with weights: {hint})")
        w = weight_of(module)
        if w is None:
            raise MaskError(f"{source}: layer {name!r}: a {type(module).__name__} has no weight tensor, "
                            "so it cannot be masked")
        if tuple(m["weight"].shape) != tuple(w.shape):
            raise MaskError(f"{source}: layer {name!r}: weight mask has shape {tuple(m['weight'].shape)}, "
                            f"the layer's weight has shape {tuple(w.shape)}")
        if values and not _binary(m["weight"]):
            raise MaskError(f"{source}: layer {name!r}: weight mask has values other than 0 and 1")
        b = bias_of(module)
        bm = m["bias"]
        if bm is not None:
            if b is None:
                raise MaskError(f"{source}: layer {name!r}: a bias mask is given but the layer has no bias")
            if tuple(bm.shape) != tuple(b.shape):
                raise MaskError(f"{source}: layer {name!r}: bias mask has shape {tuple(bm.shape)}, "
                                f"the layer's bias has shape {tuple(b.shape)}")
            if values and not _binary(bm):
                raise MaskError(f"{source}: layer {name!r}: bias mask has values other than 0 and 1")
    return masks


def _fused_expert_mask(model: nn.Module, name: str, m: Mapping[str, Any], source: str, values: bool = True) -> bool:
    """A mask keyed by a fused expert parameter (a 3-D parameter, ``'layers.0.mlp.experts.gate_up_proj'``): check
    it has the parameter's shape, 0/1 values and no bias; False when ``name`` is no such parameter."""
    shape = expert_param_shape(model, name)
    if shape is None:
        return False
    if tuple(m["weight"].shape) != shape:
        raise MaskError(f"{source}: fused expert parameter {name!r}: mask has shape {tuple(m['weight'].shape)}, "
                        f"the parameter has shape {shape}")
    if values and not _binary(m["weight"]):
        raise MaskError(f"{source}: fused expert parameter {name!r}: mask has values other than 0 and 1")
    if m.get("bias") is not None:
        raise MaskError(f"{source}: fused expert parameter {name!r}: a bias mask is given, but a fused expert "
                        "parameter is masked as one tensor ('weight' only)")
    return True


def save_masks(masks: Mapping[str, Mapping[str, torch.Tensor | None]], path: PathLike) -> None:
    """Write masks to ``path`` atomically, in NNI's file format (``torch.save`` of the dict).

    >>> import os, tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> save_masks({'fc': {'weight': torch.ones(2, 2), 'bias': None}}, os.path.join(d, 'm.pth'))
    >>> load_masks(os.path.join(d, 'm.pth'))['fc']['weight'].shape
    torch.Size([2, 2])
    """
    data = check_structure(masks, "save_masks")
    with atomic_open(path, "wb") as f:
        torch.save(data, f)


def load_masks(path: PathLike, map_location: Any = "cpu") -> Masks:
    """Load a mask file written by :func:`save_masks` or by NNI, without executing any code.

    Raises :class:`MaskError` naming the file when it is missing, is not a mask file, or holds anything
    but tensors in the mask layout (a pickle that tries to run code is refused, not run).

    >>> import torch, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), 'm.pth')
    >>> torch.save({'conv': {'weight': torch.zeros(1, 1, 1, 1), 'bias': None}}, p)
    >>> sorted(load_masks(p))
    ['conv']
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MaskError(f"mask file {path!r} is a directory, not a mask file")
    if not os.path.isfile(path):
        raise MaskError(f"mask file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise MaskError(f"mask file {path!r} cannot be read: {e.strerror or e}") from None
    # torch.save writes a zip archive (PK\x03\x04), or a pickle (protocol byte 0x80) in the legacy format
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        kind = "an empty file" if not head else (
            "a text file" if _looks_like_text(head) else "not a torch.save file")
        raise MaskError(f"mask file {path!r} is not a mask file ({kind}; expected a file written by save_masks "
                        "or NNI's export_model)")
    try:
        with warnings.catch_warnings():  # torch warns about non-default pickle protocols; the error says more
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" not in str(e).lower():
            raise MaskError(f"mask file {path!r} is not a mask file: it could not be unpickled ({first})") from None
        raise MaskError(
            f"mask file {path!r} was refused: it contains objects other than tensors and plain containers, "
            f"so loading it could run code ({first})"
        ) from None
    except Exception as e:  # corrupt zip, truncated file, not a torch file at all, ...
        raise MaskError(f"mask file {path!r} could not be read as a mask file: {type(e).__name__}: {e}") from None
    return check_structure(data, f"mask file {path!r}")


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in (9, 10, 13) for c in head)
