"""Apply masks to a model temporarily, restoring the exact previous weights afterwards."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .files import validate_masks
from .layers import bias_of, weight_of

__all__ = ["apply_masks"]


class _MaskParametrization(nn.Module):
    """Multiplies a parametrized tensor by its mask. The mask is a plain attribute, not a buffer, so the
    model's ``state_dict`` is the same while it is applied."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(device=x.device, dtype=x.dtype)


@contextmanager
def apply_masks(model: nn.Module, masks: Mapping[str, Mapping[str, Any]]) -> Iterator[nn.Module]:
    """Multiply weights and biases by their masks in place; restore them on exit, also on exceptions.

    A parametrized tensor (``torch.nn.utils.parametrize``, ``weight_norm``) is masked where it is used: a mask
    step is appended to the layer's parametrization for the duration and removed on exit, so the *effective*
    weight is masked and the stored ``original`` tensors are never touched.

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
    steps: list[tuple[nn.Module, str, torch.Tensor]] = []  # (ParametrizationList, tensor name, mask)
    for name, m in checked.items():
        if name not in modules:  # a fused expert parameter (removal/expert_cuts.py): the mask has its shape
            owner, _, attr = name.rpartition(".")
            tensor = getattr(model.get_submodule(owner) if owner else model, attr)
            if id(tensor) not in seen:
                seen.add(id(tensor))
                saved.append((tensor, tensor.detach().clone()))
            targets.append((tensor, m["weight"]))
            continue
        module = modules[name]
        for tname, mask in (("weight", m["weight"]), ("bias", m["bias"])):
            if mask is None:
                continue
            if parametrize.is_parametrized(module, tname):
                steps.append((module.parametrizations[tname], tname, mask))  # type: ignore[index]
                continue
            tensor = weight_of(module) if tname == "weight" else bias_of(module)
            if tensor is None:
                continue
            if id(tensor) not in seen:  # a tensor shared by two layers is saved once
                seen.add(id(tensor))
                saved.append((tensor, tensor.detach().clone()))
            targets.append((tensor, mask))
    added: list[tuple[nn.Module, str]] = []
    try:
        for plist, _, mask in steps:
            key = str(len(plist))
            plist.add_module(key, _MaskParametrization(mask.detach()))
            added.append((plist, key))
        with torch.no_grad():
            for tensor, mask in targets:
                tensor.mul_(mask.to(device=tensor.device, dtype=tensor.dtype))
        yield model
    finally:
        with torch.no_grad():
            for tensor, copy in reversed(saved):
                tensor.copy_(copy)
        for plist, key in reversed(added):
            del plist._modules[key]
