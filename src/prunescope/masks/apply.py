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


def _zero_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """The dim-0 slices a mask zeroes, when every slice is all 0 or all 1 (a filter mask, NNI's layout): one
    pass over the mask, which also proves its values are 0/1. ``None`` for any other mask (NaN included)."""
    if mask.dim() == 0 or mask.numel() == 0:
        return None
    flat = mask.reshape(mask.shape[0], -1)
    lo, hi = flat.amin(1), flat.amax(1)  # two reductions: ~60x faster than torch.aminmax(dim=) on CPU
    if not torch.equal(lo, hi) or not bool(((hi == 0) | (hi == 1)).all()):
        return None
    return (hi == 0).nonzero().flatten()


@contextmanager
def apply_masks(model: nn.Module, masks: Mapping[str, Mapping[str, Any]]) -> Iterator[nn.Module]:
    """Multiply weights and biases by their masks in place; restore them on exit, also on exceptions.

    A parametrized tensor (``torch.nn.utils.parametrize``, ``weight_norm``) is masked where it is used: a mask
    step is appended to the layer's parametrization for the duration and removed on exit, so the *effective*
    weight is masked and the stored ``original`` tensors are never touched.

    Only what a mask zeroes is touched: for a filter mask (every slice along dim 0 all 0 or all 1, NNI's
    layout) the zeroed slices are copied and multiplied by 0, the others are not written at all; any other
    mask multiplies the whole tensor, copied first. On exit the copies are written back with ``copy_`` /
    ``index_copy_`` (in reverse order, so a tensor shared by two layers comes back too): the restored values
    are bit-identical (NaN and ``-0.0`` included) and the tensors keep their identity (optimizers and hooks
    that hold them keep working). Masks are validated before anything is touched (a filter mask's 0/1 values
    in the same pass that finds its zeroed slices); a bad mask raises :class:`~prunescope.errors.MaskError`
    naming the layer.

    >>> import torch
    >>> fc = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> before = fc[0].weight.clone()
    >>> with apply_masks(fc, {'0': {'weight': torch.tensor([[1., 0.], [0., 1.]]), 'bias': None}}):
    ...     bool(fc[0].weight[0, 1] == 0)
    True
    >>> torch.equal(fc[0].weight, before)
    True
    """
    checked = validate_masks(masks, model, values=False)
    modules = dict(model.named_modules())
    targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (tensor, mask, zeroed rows)
    steps: list[tuple[nn.Module, str, torch.Tensor]] = []  # (ParametrizationList, tensor name, mask)
    unchecked: dict[str, dict[str, Any]] = {}  # masks whose 0/1 values validate_masks checks
    for name, m in checked.items():
        if name not in modules:  # a fused expert parameter (removal/expert_cuts.py): the mask has its shape
            owner, _, attr = name.rpartition(".")
            tensor = getattr(model.get_submodule(owner) if owner else model, attr)
            rows = _zero_rows(m["weight"])
            if rows is None:
                unchecked[name] = m
            targets.append((tensor, m["weight"], rows))
            continue
        module = modules[name]
        for tname, mask in (("weight", m["weight"]), ("bias", m["bias"])):
            if mask is None:
                continue
            rows = _zero_rows(mask)
            if rows is None:
                unchecked[name] = m
            if parametrize.is_parametrized(module, tname):
                steps.append((module.parametrizations[tname], tname, mask))  # type: ignore[index]
                continue
            tensor = weight_of(module) if tname == "weight" else bias_of(module)
            if tensor is not None:
                targets.append((tensor, mask, rows))
    if unchecked:
        validate_masks(unchecked, model)  # raises, naming the layer, on values other than 0 and 1
    added: list[tuple[nn.Module, str]] = []
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (tensor, copy, rows or None)
    try:
        for plist, _, mask in steps:
            key = str(len(plist))
            plist.add_module(key, _MaskParametrization(mask.detach()))
            added.append((plist, key))
        with torch.no_grad():
            for tensor, mask, rows in targets:
                if rows is None:
                    saved.append((tensor, tensor.detach().clone(), None))
                    tensor.mul_(mask.to(device=tensor.device, dtype=tensor.dtype))
                elif len(rows):
                    rows = rows.to(tensor.device)
                    part = tensor.index_select(0, rows)
                    saved.append((tensor, part, rows))
                    tensor.index_copy_(0, rows, part * 0)  # what multiplying by the mask's zeros gives
        yield model
    finally:
        with torch.no_grad():
            for tensor, copy, rows in reversed(saved):
                if rows is None:
                    tensor.copy_(copy)
                else:
                    tensor.index_copy_(0, rows, copy)
        for plist, key in reversed(added):
            del plist._modules[key]
