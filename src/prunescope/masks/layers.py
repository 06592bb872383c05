"""Which axis of a layer's weight is a "filter" (an output channel), shared by pruners and the fixer.

* ``Conv1d/2d/3d`` and ``Linear``: output channels are dim 0 of the weight (NNI's convention).
* ``ConvTranspose1d/2d/3d``: the weight is ``(in_channels, out_channels // groups, *kernel)``, so an
  output channel is a slice along **dim 1** (within its group). A "filter" of a transposed conv is
  everything that produces one output channel: ``weight[g*in_pg:(g+1)*in_pg, j]`` for output channel
  ``g*out_pg + j``. NNI v1 treats dim 0 (the input channels) as filters for any layer type, which is
  wrong for transposed convs; NNI's filter maskers only accept Conv2d anyway.
* Hugging Face ``Conv1D`` (GPT-2's projections) is a linear layer whose weight is stored transposed,
  ``(in_features, out_features)`` (``addmm(bias, x, weight)``): an output channel is a **column** (dim 1)
  and an input channel a row. The class is recognised by type when ``transformers`` is loaded (see
  :func:`is_transposed_linear`); the channel engine finds the same axis from the recorded ``addmm``.
  ``nn.Embedding`` likewise: an output channel is a column of its ``(num_embeddings, dim)`` weight.
* ``BatchNorm``/``GroupNorm``/``LayerNorm``/``InstanceNorm`` (1-D weight): one element per channel.

Input channels (the axis a pruned upstream filter removes) are dim 1 for conv/linear and dim 0 for
transposed conv.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FILTER_TYPES: tuple[type[nn.Module], ...] = CONV_TYPES + CONVT_TYPES + (nn.Linear,)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)


def _transposed_linear_types() -> tuple[type, ...]:
    """Linear layers that store their weight as ``(in, out)``; only classes of already-imported packages."""
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return (cls,) if isinstance(cls, type) else ()


def is_transposed_linear(module: nn.Module) -> bool:
    """True for a layer whose output channels are the **columns** of a 2-D weight: Hugging Face ``Conv1D``
    (weight ``(in_features, out_features)``) and ``nn.Embedding`` (weight ``(num_embeddings, dim)``; a
    channel is one embedding dimension, e.g. T5's relative position bias column of one head)."""
    types = (nn.Embedding, *_transposed_linear_types())
    return isinstance(module, types)


def weight_of(module: nn.Module) -> torch.Tensor | None:
    """The module's ``weight`` tensor, or None when it has none (such a module cannot be masked)."""
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def bias_of(module: nn.Module) -> torch.Tensor | None:
    """The module's ``bias`` tensor, or None."""
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def has_filters(module: nn.Module) -> bool:
    """True for layer types whose output channels (filters) can be pruned as whole units."""
    if isinstance(module, FILTER_TYPES) or is_transposed_linear(module):
        return True
    w = weight_of(module)
    return isinstance(module, NORM_TYPES) and w is not None and w.dim() == 1


def num_filters(module: nn.Module) -> int:
    """Number of output channels of a filter-prunable layer."""
    w = weight_of(module)
    assert w is not None
    if isinstance(module, CONVT_TYPES):
        return w.shape[1] * module.groups  # type: ignore[attr-defined]
    if is_transposed_linear(module):
        return w.shape[1]
    return w.shape[0]


def filter_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (weight-shaped) as ``(num_filters, elements_per_filter)``, row i = output channel i.

    For conv and linear layers this is exactly ``tensor.view(n, -1)``, the same call NNI makes, so scores
    computed from it are bit-identical to NNI's.
    """
    if isinstance(module, CONVT_TYPES):
        g = module.groups  # type: ignore[attr-defined]
        cin, opg = tensor.shape[0], tensor.shape[1]
        t = tensor.reshape(g, cin // g, opg, -1).transpose(1, 2)  # (g, out_pg, in_pg, k)
        return t.reshape(g * opg, -1)
    if is_transposed_linear(module) and tensor.dim() == 2:
        return tensor.t()
    if tensor.dim() == 1:
        return tensor.view(-1, 1)
    return tensor.reshape(tensor.shape[0], -1)


def expand_filters(module: nn.Module, keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A weight-shaped mask (dtype/device of ``like``) that keeps the output channels where ``keep``."""
    keep = keep.to(device=like.device, dtype=like.dtype)
    if isinstance(module, CONVT_TYPES):
        g = module.groups  # type: ignore[attr-defined]
        cin, opg = like.shape[0], like.shape[1]
        k = keep.view(g, 1, opg).expand(g, cin // g, opg).reshape(cin, opg)
        return k.view(cin, opg, *([1] * (like.dim() - 2))).expand_as(like).contiguous()
    if is_transposed_linear(module) and like.dim() == 2:
        return keep.view(1, -1).expand_as(like).contiguous()
    return keep.view(-1, *([1] * (like.dim() - 1))).expand_as(like).contiguous()


def filter_keep(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Bool vector: output channel i is kept if its part of ``mask`` is non-zero anywhere (NNI's rule)."""
    return filter_matrix(module, mask).abs().sum(dim=1) != 0


def is_structured(module: nn.Module, mask: torch.Tensor) -> bool:
    """True when every filter of ``mask`` is either all ones or all zeros."""
    m = filter_matrix(module, mask)
    s = m.sum(dim=1)
    return bool(((s == 0) | (s == m.shape[1])).all())


def in_channel_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as ``(in_channels_per_group_or_all, rest)``: row i = input channel i of the weight."""
    if isinstance(module, CONVT_TYPES) or tensor.dim() == 1 or is_transposed_linear(module):
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.transpose(0, 1).reshape(tensor.shape[1], -1)


def expand_in_channels(module: nn.Module, keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A weight-shaped mask keeping the weight's input-channel slices where ``keep``."""
    keep = keep.to(device=like.device, dtype=like.dtype)
    if isinstance(module, CONVT_TYPES) or like.dim() == 1 or is_transposed_linear(module):
        return keep.view(-1, *([1] * (like.dim() - 1))).expand_as(like).contiguous()
    return keep.view(1, -1, *([1] * (like.dim() - 2))).expand_as(like).contiguous()


def expert_param_shape(model: torch.nn.Module, name: str) -> tuple[int, ...] | None:
    """Shape of ``name`` if it is a 3-D parameter of ``model`` other than a layer's ``weight`` (a fused expert
    weight), else None."""
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    p = mod._parameters.get(attr) if attr else None
    if p is getattr(mod, "weight", None):  # a layer's own weight (a Conv1d's is 3-D) is masked by the layer name
        return None
    return tuple(p.shape) if isinstance(p, torch.Tensor) and p.dim() == 3 else None
