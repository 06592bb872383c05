"""Physical pruning of Linear / HF Conv1D / LayerNorm / Embedding models, for checking topology answers.

``prune(model, ca, classes)`` removes, in a copy, every output channel whose atom class is in ``classes``
(weight rows, or columns for a ``Conv1D``/embedding weight, and bias), every input column that carries such
a channel, and the same channels of the norms that follow. ``mask(model, ca, classes)`` zeroes the same
output channels instead. Independent of the engine except for reading which channel is in which class.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def _keep(ca, atoms: np.ndarray, classes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(~np.isin(ca.atom_class(np.asarray(atoms)), classes))


def prune(model: nn.Module, ca, classes, layers: list[str] | None = None) -> nn.Module:
    """Remove ``classes`` physically (from ``layers`` only, if given: an incomplete removal)."""
    classes = np.asarray(list(classes))
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, li in ca.layers.items():
            mod = mods[name]
            w = mod.weight
            od = li.weight_out_dim
            kout = _keep(ca, ca.layer_atoms(name), classes)
            if layers is not None and name not in layers:
                kout = torch.ones_like(kout)
            kin = _keep(ca, li.inputs[0], classes) if li.inputs else None
            if layers is not None:
                kin = None
            new = w.index_select(od, kout.nonzero().flatten())
            if kin is not None and li.kind != "embedding":
                new = new.index_select(1 - od, kin.nonzero().flatten())
            mod.weight = nn.Parameter(new)
            if getattr(mod, "bias", None) is not None:
                mod.bias = nn.Parameter(mod.bias[kout])
        if layers is None:
            for name, reps in ca.followers.items():
                k = _keep(ca, reps[0], classes)
                mod = mods[name]
                mod.weight = nn.Parameter(mod.weight[k])
                if getattr(mod, "bias", None) is not None:
                    mod.bias = nn.Parameter(mod.bias[k])
                if hasattr(mod, "normalized_shape"):
                    mod.normalized_shape = (int(k.sum()),)
    return m


def mask(model: nn.Module, ca, classes) -> nn.Module:
    classes = np.asarray(list(classes))
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, li in ca.layers.items():
            drop = ~_keep(ca, ca.layer_atoms(name), classes)
            w = mods[name].weight
            idx = [slice(None)] * w.ndim
            idx[li.weight_out_dim] = drop
            w[tuple(idx)] = 0
            if getattr(mods[name], "bias", None) is not None:
                mods[name].bias[drop] = 0
    return m


def classes_of(ca, layer: str, channels) -> np.ndarray:
    return np.unique(ca.atom_class(np.array([ca.atom(layer, c) for c in channels])))


def partition(ca, layer: str) -> list[list[int]]:
    """Output channels of ``layer`` grouped by class, groups in order of their first channel."""
    groups: dict[int, list[int]] = {}
    for c, k in enumerate(ca.layer_classes(layer).tolist()):
        groups.setdefault(k, []).append(c)
    return list(groups.values())
