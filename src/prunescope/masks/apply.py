"""Apply masks to a model temporarily, restoring the exact previous weights afterwards."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .io import validate_masks
from .layers import bias_of, weight_of

__all__ = ["apply_masks"]


@contextmanager
def apply_masks(model: nn.Module, masks: Mapping[str, Mapping[str, Any]]) -> Iterator[nn.Module]:
    """Multiply weights and biases by their masks in place; restore them on exit, also on exceptions.

    Only the masked tensors are copied (not the whole state dict) and restored by ``copy_`` from those
    copies, so the restored values are bit-identical (NaN and ``-0.0`` included) and the tensors keep
    their identity (optimizers and hooks that hold them keep working). Masks are validated before
    anything is touched; a bad mask raises :class:`~prunescope.errors.MaskError` naming the layer.

    >>> import torch
    >>> fc = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> before = fc[0].weight.clone()
    >>> with apply_masks(fc, {'0': {'weight': torch.tensor([[1., 0.], [0., 1.]]), 'bias': None}}):
    ...     bool(fc[0].weight[0, 1] == 0)
    True
    >>> torch.equal(fc[0].weight, before)
    True
    """
    checked = validate_masks(masks, model)
    modules = dict(model.named_modules())
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    targets: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, m in checked.items():
        module = modules[name]
        pairs = [(weight_of(module), m["weight"]), (bias_of(module), m["bias"])]
        for tensor, mask in pairs:
            if tensor is None or mask is None:
                continue
            if id(tensor) not in seen:  # a tensor shared by two layers is saved once
                seen.add(id(tensor))
                saved.append((tensor, tensor.detach().clone()))
            targets.append((tensor, mask))
    try:
        with torch.no_grad():
            for tensor, mask in targets:
                tensor.mul_(mask.to(device=tensor.device, dtype=tensor.dtype))
        yield model
    finally:
        with torch.no_grad():
            for tensor, copy in reversed(saved):
                tensor.copy_(copy)
