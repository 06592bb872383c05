"""One-shot pruners that compute masks exactly as NNI 2.10.1's v1 pruners do, without touching the model.

The rules (NNI's v1 maskers, ``nni/algorithms/compression/pytorch/pruning``):

* **Filter pruners** (``l1``, ``l2``, ``fpgm``): ``num_prune = int(n_filters * sparsity)``; if
  ``n_filters < 2`` or ``num_prune < 1`` the mask is all ones.

  - ``l1``: score = sum of ``|w|`` per filter; ``l2``: score = L2 norm per filter. The threshold is the
    largest of the ``num_prune`` smallest scores and every filter scoring ``<= threshold`` is pruned, so
    ties can prune **more** than ``num_prune`` filters (as in NNI).
  - ``fpgm``: score = sum of Euclidean distances from the filter to all filters; exactly ``num_prune``
    filters with the smallest scores are pruned, ties broken by lower index first (NNI sorts with
    Python's stable ``sorted``).
  - The bias mask follows the filter mask; a layer without bias gets ``'bias': None``.

* **Level pruner** (``level``, unstructured): ``k = int(numel * sparsity)``; if ``k == 0`` all ones,
  else every weight with ``|w| <= threshold`` (the k-th smallest magnitude) is pruned. The bias is not
  pruned: it gets an all-ones mask when the layer has a bias (what NNI's ``export_model`` writes).

Masks have the weight's dtype and device (NNI's exported masks are float32, the dtype of float32
models). Filter pruning supports Conv1d/2d/3d, ConvTranspose1d/2d/3d (a filter = one output channel,
dim 1 of the weight; see :mod:`prunescope.masks.layers`) and Linear (a filter = one output row); NNI
itself only accepts Conv2d there. Level pruning accepts any module with a ``weight`` tensor.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from . import layers as _layers
from .files import save_masks
from .layers import FILTER_TYPES, bias_of, expand_filters, filter_matrix, num_filters, weight_of

__all__ = [
    "PRUNE_TYPES",
    "FPGMPruner",
    "L1FilterPruner",
    "L2FilterPruner",
    "LevelPruner",
    "Pruner",
    "filter_scores",
    "group_masks",
    "layer_mask",
]

PRUNE_TYPES = ("l1", "l2", "fpgm", "level")

#: NNI's ``default_layers.weighted_modules``: what ``op_types: ['default']`` expands to.
DEFAULT_OP_TYPES = (
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Linear", "Bilinear", "PReLU", "Embedding", "EmbeddingBag",
)

Mask = dict[str, "torch.Tensor | None"]


def transposed_linear_types() -> tuple[type, ...]:
    """Linear layers with an ``(in, out)`` weight (Hugging Face ``Conv1D``) that :mod:`.layers` can mask."""
    f = getattr(_layers, "_transposed_linear_types", None)
    return tuple(f()) if f is not None else ()


def is_filter_layer(module: nn.Module | None) -> bool:
    """A layer whose output channels are filters: conv, transposed conv, Linear, Hugging Face ``Conv1D``."""
    return module is not None and isinstance(module, FILTER_TYPES + transposed_linear_types())


def _mask_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.is_floating_point() else torch.float32


@torch.no_grad()
def filter_scores(module: nn.Module, prune_type: str) -> torch.Tensor:
    """Per-output-channel importance scores used by the filter pruners (lower = pruned first).

    The arithmetic mirrors NNI's maskers op for op (same view, same reduction), so the scores are
    bit-identical to NNI's for Conv2d layers.

    >>> import torch
    >>> conv = torch.nn.Conv2d(1, 3, 1, bias=False)
    >>> _ = conv.weight.data.copy_(torch.tensor([1.0, -3.0, 2.0]).view(3, 1, 1, 1))
    >>> filter_scores(conv, "l1").tolist()
    [1.0, 3.0, 2.0]
    """
    w = weight_of(module)
    if w is None or not is_filter_layer(module):
        raise ConfigError(f"{type(module).__name__} has no filters to score")
    w = w.detach()
    if prune_type == "l1":
        return filter_matrix(module, w.abs()).sum(dim=1)
    if prune_type == "l2":
        return torch.sqrt((filter_matrix(module, w) ** 2).sum(dim=1))
    if prune_type == "fpgm":
        m = filter_matrix(module, w).contiguous()
        buf = torch.empty_like(m)
        dists = torch.empty(m.shape[0], dtype=m.dtype, device=m.device)
        for i in range(m.shape[0]):  # one row at a time with NNI's arithmetic, for identical rounding
            torch.sub(m, m[i], out=buf)
            buf.mul_(buf)
            dists[i] = torch.sqrt(buf.sum(-1)).sum()
        return dists.to(torch.float32)  # NNI collects the sums into a float32 torch.Tensor
    raise ConfigError(f"unknown filter prune type {prune_type!r}; expected one of 'l1', 'l2', 'fpgm'")


@torch.no_grad()
def layer_mask(module: nn.Module, sparsity: float, prune_type: str) -> Mask:
    """NNI 2.10.1's mask for one layer: ``{'weight': tensor, 'bias': tensor or None}``, 1 = keep.

    ``prune_type`` is ``'l1'``, ``'l2'``, ``'fpgm'`` (filter pruning) or ``'level'`` (unstructured).
    ``sparsity`` may be anything in ``[0, 1]`` (NNI's pruners accept only ``0 < s < 1``; the rules give
    all ones at 0 and prune everything at 1). The module is not modified.

    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> conv = torch.nn.Conv2d(3, 8, 3)
    >>> m = layer_mask(conv, 0.5, "l1")
    >>> int(m["weight"].sum(dim=(1, 2, 3)).count_nonzero()), m["bias"].tolist() == (
    ...     m["weight"].amax(dim=(1, 2, 3)).tolist())
    (4, True)
    """
    if prune_type not in PRUNE_TYPES:
        raise ConfigError(f"unknown prune type {prune_type!r}; expected one of {', '.join(PRUNE_TYPES)}")
    try:
        sparsity = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity must be a number in [0, 1], got {sparsity!r}") from None
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity must be in [0, 1], got {sparsity}")
    w = weight_of(module)
    if w is None:
        raise ConfigError(f"{type(module).__name__} has no weight tensor to prune")
    w = w.detach()
    b = bias_of(module)
    dtype = _mask_dtype(w)
    ones_w = torch.ones(w.shape, dtype=dtype, device=w.device)
    ones_b = None if b is None else torch.ones(b.shape, dtype=dtype, device=b.device)

    if prune_type == "level":
        k = int(w.numel() * sparsity)
        if k == 0:
            return {"weight": ones_w, "bias": ones_b}
        w_abs = w.abs()
        threshold = torch.topk(w_abs.reshape(-1), k, largest=False)[0].max()
        return {"weight": torch.gt(w_abs, threshold).to(dtype), "bias": ones_b}

    if not is_filter_layer(module):
        names = ", ".join(t.__name__ for t in FILTER_TYPES)
        raise ConfigError(f"{prune_type} filter pruning supports {names}; got {type(module).__name__}")
    n = num_filters(module)
    num_prune = int(n * sparsity)
    if n < 2 or num_prune < 1:
        return {"weight": ones_w, "bias": ones_b}
    scores = filter_scores(module, prune_type)
    if prune_type == "fpgm":
        keep = torch.ones(n, dtype=torch.bool, device=w.device)
        keep[torch.argsort(scores, stable=True)[:num_prune]] = False
    else:
        threshold = torch.topk(scores.view(-1), num_prune, largest=False)[0].max()
        keep = torch.gt(scores, threshold)
    bias = None if b is None else keep.to(device=b.device, dtype=dtype)
    return {"weight": expand_filters(module, keep, ones_w), "bias": bias}


# --------------------------------------------------------------------------------------------------
# config_list handling (NNI v1's select_config)

_ALLOWED_KEYS = {"sparsity", "op_types", "op_names", "exclude"}


def select_lowest(scores: torch.Tensor, num_prune: int, prune_type: str) -> torch.Tensor:
    """NNI's selection rule on summed scores: bool keep per entry (floor count given, ``<= threshold`` for
    l1/l2 so ties can prune more, FPGM: exactly ``num_prune`` in stable order)."""
    n = scores.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if n < 2 or num_prune < 1:
        return keep
    if prune_type == "fpgm":
        keep[torch.argsort(scores, stable=True)[:num_prune]] = False
        return keep
    threshold = torch.topk(scores, num_prune, largest=False)[0].max()
    return torch.gt(scores, threshold)


def _select_per_chunk(scores: torch.Tensor, chunk: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep per entry: in every chunk, exactly ``int(size * sparsity)`` entries with the lowest scores pruned."""
    if chunk.shape[0] != scores.shape[0]:
        raise ConfigError(f"chunks: one chunk id per unit is needed ({scores.shape[0]} units, {chunk.shape[0]} ids)")
    keep = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    for c in torch.unique(chunk).tolist():
        idx = torch.nonzero(chunk == c).flatten().to(scores.device)
        k = int(idx.numel() * sparsity)
        if k > 0:
            keep[idx[torch.argsort(scores[idx], stable=True)[:k]]] = False
    return keep


def _masks_from_keep(modules: Sequence[nn.Module], keeps: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    out = []
    for m, keep in zip(modules, keeps):
        w = m.weight
        ones = torch.ones(w.shape, dtype=w.dtype, device=w.device)
        b = getattr(m, "bias", None)
        out.append({"weight": expand_filters(m, keep, ones),
                    "bias": None if b is None else keep.to(device=b.device, dtype=b.dtype)})
    return out


@torch.no_grad()
def group_masks(modules: Sequence[nn.Module], sparsity: float, prune_type: str,
                units: Sequence[Sequence[int]] | None = None,
                extra_scores: torch.Tensor | None = None,
                chunks: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Masks for layers pruned together; filter pruners keep the same output channels in every member.

    One layer: exactly :func:`prunescope.masks.pruners.layer_mask` (NNI's mask). Several layers and a
    filter prune type: per-channel scores are summed over the members (NNI v2's dependency-aware rule),
    then NNI's selection rule (floor count, ``<= threshold``, FPGM stable order) picks the channels.
    ``level`` masks each member on its own at the same sparsity.

    ``units`` (unit pruning, see :mod:`prunescope.masks.units`): per member, the unit id of each output
    channel (ids ``0 .. U-1``; a unit may hold several channels of a layer, e.g. an attention head, and
    channels of layers of different widths, e.g. a kv group). A unit's score is the sum of its channels'
    scores over all members (plus ``extra_scores[u]`` when given, e.g. consumer columns) and
    ``int(U * sparsity)`` units are pruned with the same selection rule. When every unit is one channel of
    every member (``units[k] == range(n)``) this is exactly the rule above, bit for bit.

    ``chunks`` (grouped convolutions, :func:`prunescope.narrow.prunable.unit_chunks`): the chunk of every unit;
    ``int(units per chunk * sparsity)`` units are pruned in every chunk, exactly that many (lowest scores,
    stable order on ties), so every group loses as many channels as the others.
    """
    if prune_type == "level" or (units is None and len(modules) == 1):
        return [layer_mask(m, sparsity, prune_type) for m in modules]
    if units is not None:
        ids = [torch.as_tensor(list(u), dtype=torch.long) for u in units]
        if len(ids) != len(modules) or any(len(u) != num_filters(m) for u, m in zip(ids, modules)):
            raise ConfigError("units: one unit id per output channel of every member is needed")
        n_units = int(max(int(u.max()) for u in ids if len(u)) + 1) if any(len(u) for u in ids) else 0
        dev = weight_of(modules[0]).device  # type: ignore[union-attr]
        scores = torch.zeros(n_units, dtype=torch.float64, device=dev)
        for m, u in zip(modules, ids):  # member by member, like the sum below (same float64 rounding)
            scores.index_add_(0, u.to(dev), filter_scores(m, prune_type).to(torch.float64).to(dev))
        if extra_scores is not None:
            scores = scores + extra_scores.to(device=dev, dtype=torch.float64)
        if chunks is not None:
            keep_unit = _select_per_chunk(scores, torch.as_tensor(list(chunks), dtype=torch.long), float(sparsity))
        else:
            keep_unit = select_lowest(scores, int(n_units * float(sparsity)), prune_type)
        return _masks_from_keep(modules, [keep_unit[u.to(dev)] for u in ids])
    n = num_filters(modules[0])
    total = sum(filter_scores(m, prune_type).to(torch.float64) for m in modules)
    assert isinstance(total, torch.Tensor)
    keep = select_lowest(total, int(n * sparsity), prune_type)
    return _masks_from_keep(modules, [keep] * len(modules))


def _type_name(module: nn.Module) -> str:
    """NNI's ``op_types`` name of a module: its class name, the original class for a parametrized module
    (``weight_norm`` makes a ``Conv2d`` a ``ParametrizedConv2d``)."""
    from torch.nn.utils import parametrize

    return parametrize.type_before_parametrizations(module).__name__


def _validate_config(model: nn.Module, config_list: Any) -> list[dict[str, Any]]:
    if not isinstance(config_list, (list, tuple)):
        raise ConfigError(f"config_list must be a list of dicts, got {type(config_list).__name__}")
    if not config_list:
        raise ConfigError("config_list is empty: nothing to prune")
    names = {n for n, _ in model.named_modules()}
    types = {_type_name(m) for _, m in model.named_modules()} | {"default"}
    out = []
    for i, entry in enumerate(config_list):
        where = f"config_list[{i}] ({entry!r})"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: each entry must be a dict")
        unknown = set(entry) - _ALLOWED_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ALLOWED_KEYS)}")
        if "op_types" not in entry and "op_names" not in entry:
            raise ConfigError(f"{where}: either 'op_types' or 'op_names' must be given")
        for key in ("op_types", "op_names"):
            if key in entry:
                v = entry[key]
                if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
                    raise ConfigError(f"{where}: '{key}' must be a list of strings")
        if "exclude" in entry and not isinstance(entry["exclude"], bool):
            raise ConfigError(f"{where}: 'exclude' must be True or False")
        excluded = bool(entry.get("exclude", False))
        if not excluded:
            if "sparsity" not in entry:
                raise ConfigError(f"{where}: 'sparsity' is required unless 'exclude': True")
            s = entry["sparsity"]
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1:
                raise ConfigError(f"{where}: 'sparsity' must be a float with 0 < sparsity < 1, got {s!r}")
        missing_names = [n for n in entry.get("op_names", ()) if n not in names]
        missing_types = [t for t in entry.get("op_types", ()) if t not in types]
        if missing_names:
            warnings.warn(f"{where}: op_names {missing_names} not found in the model", stacklevel=4)
        if missing_types:
            warnings.warn(f"{where}: op_types {missing_types} not found in the model", stacklevel=4)
        e = dict(entry)
        if "op_types" in e:
            expanded: list[str] = []
            for t in e["op_types"]:
                expanded.extend(DEFAULT_OP_TYPES if t == "default" else [t])
            e["op_types"] = expanded
        out.append(e)
    return out


def select_config(config_list: Iterable[dict[str, Any]], name: str, module: nn.Module) -> dict | None:
    """The config entry that applies to a layer: the **last** matching entry wins; None if excluded.

    An entry matches when the layer's class name is in its ``op_types`` (if given) and its dotted name is
    in its ``op_names`` (if given). ``'exclude': True`` on the winning entry means "do not prune".
    """
    ret = None
    for c in config_list:
        if "op_types" in c and _type_name(module) not in c["op_types"]:
            continue
        if "op_names" in c and name not in c["op_names"]:
            continue
        ret = c
    if ret is None or ret.get("exclude", False):
        return None
    return ret


class Pruner:
    """Base one-shot pruner: ``Pruner(model, config_list).compute_masks()`` → masks dict.

    ``config_list`` has NNI's form, e.g. ``[{'sparsity': 0.5, 'op_types': ['Conv2d']},
    {'sparsity': 0.3, 'op_names': ['layer1.0.conv1']}, {'exclude': True, 'op_names': ['conv1']}]``.
    Later entries override earlier ones. ``'default'`` in ``op_types`` means NNI's weighted layer types.
    The model is never modified (no wrappers, no in-place multiplication).
    """

    prune_type: str = ""

    def __init__(self, model: nn.Module, config_list: list[dict[str, Any]], optimizer: Any = None, *,
                 dependency_aware: bool = False, dummy_input: Any = None) -> None:
        # ``optimizer`` and ``dummy_input`` are accepted for NNI v1 call compatibility and not used
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if dependency_aware:
            raise ConfigError("dependency_aware=True (NNI's dependency-aware mode) is not supported; compute "
                              "masks normally and use fix_mask_conflict(..., policy='l1') to align them")
        self.model = model
        self.config_list = _validate_config(model, config_list)

    def targets(self) -> list[tuple[str, nn.Module, float]]:
        """``(name, module, sparsity)`` for every layer the config selects, in ``named_modules`` order."""
        out = []
        for name, module in self.model.named_modules():
            if module is self.model:
                continue
            cfg = select_config(self.config_list, name, module)
            if cfg is None:
                continue
            if weight_of(module) is None:
                raise ConfigError(f"layer {name!r} ({type(module).__name__}) is selected but has no weight")
            if self.prune_type != "level" and not isinstance(module, FILTER_TYPES):
                kinds = ", ".join(t.__name__ for t in FILTER_TYPES)
                raise ConfigError(
                    f"layer {name!r} ({type(module).__name__}) is selected but {type(self).__name__} "
                    f"only prunes {kinds}; narrow 'op_types' or exclude it"
                )
            out.append((name, module, float(cfg["sparsity"])))
        return out

    def compute_masks(self) -> dict[str, Mask]:
        """Masks for every selected layer, ``{name: {'weight': tensor, 'bias': tensor or None}}``.

        Selected layers that end up with nothing pruned get all-ones masks, like NNI's export.
        """
        return {name: layer_mask(module, s, self.prune_type) for name, module, s in self.targets()}

    def export_masks(self, path: str | os.PathLike[str]) -> dict[str, Mask]:
        """Compute the masks and write them atomically to ``path`` (NNI's mask-file layout); return them."""

        masks = self.compute_masks()
        save_masks(masks, path)
        return masks


class L1FilterPruner(Pruner):
    """Prune the filters with the smallest L1 norm (NNI ``L1FilterPruner``).

    >>> import torch, torchvision
    >>> torch.manual_seed(0) and None
    >>> model = torchvision.models.resnet18()
    >>> masks = L1FilterPruner(model, [{'sparsity': 0.5, 'op_types': ['Conv2d']}]).compute_masks()
    >>> int(masks['conv1']['weight'].amax(dim=(1, 2, 3)).sum())
    32
    """

    prune_type = "l1"


class L2FilterPruner(Pruner):
    """Prune the filters with the smallest L2 norm (NNI ``L2FilterPruner``).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 3))
    >>> masks = L2FilterPruner(model, [{'sparsity': 0.3, 'op_types': ['Conv2d']}]).compute_masks()
    >>> int(masks['0']['bias'].sum())
    7
    """

    prune_type = "l2"


class FPGMPruner(Pruner):
    """Prune the filters closest to the geometric median (NNI ``FPGMPruner``).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 3))
    >>> masks = FPGMPruner(model, [{'sparsity': 0.5, 'op_types': ['Conv2d']}]).compute_masks()
    >>> int(masks['0']['bias'].sum())
    5
    """

    prune_type = "fpgm"


class LevelPruner(Pruner):
    """Prune individual weights of smallest magnitude (NNI ``LevelPruner``, unstructured).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(10, 10))
    >>> masks = LevelPruner(model, [{'sparsity': 0.25, 'op_types': ['default']}]).compute_masks()
    >>> int(masks['0']['weight'].sum()), int(masks['0']['bias'].sum())
    (75, 10)
    """

    prune_type = "level"


PRUNERS: dict[str, type[Pruner]] = {
    "l1": L1FilterPruner,
    "l2": L2FilterPruner,
    "fpgm": FPGMPruner,
    "level": LevelPruner,
}
