"""Topology analysis before pruning: channel, input-channel, group and reshape dependencies.

NNI-compatible entry points (same names and signatures as ``nni.compression.pytorch.utils``), built on the
shared recorded trace (:func:`prunescope.graph.trace`) and on the channel engine
:func:`~prunescope.topology.engine.channel_atoms`, which is public for other analyses:

* :class:`ChannelDependency` — layers whose output channels must be pruned together (residual adds, SE
  scales, depthwise convs, channel shuffle ...), ``.dependency_sets`` / ``.sets`` / ``.export(path)``;
* :class:`InputChannelDependency` — layers that read the same channels (input-channel pruning);
* :class:`GroupDependency` — grouped-convolution divisibility constraints, ``.dependency`` / ``.min_groups``;
* NNI's ``ReshapeDependency`` and ``not_safe_to_prune`` (layers whose channel count is pinned by a shape op
  or that feed an op the analysis cannot interpret) decide each pin physically with the removal plan, so they
  live in :mod:`prunescope.removal.unsafe` (root names: ``prunescope.ReshapeDependency``,
  ``prunescope.not_safe_to_prune``).

Every class accepts ``traced_model=`` a :class:`~prunescope.graph.ModelGraph` (or ``graph=``), so one trace
feeds several analyses.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Iterable

import numpy as np
from torch import nn

from .._io import atomic_open
from ..errors import ConfigError, UnsupportedModelError
from ..graph import ModelGraph
from ..ops import CONV_KINDS, CONV_OPS, LINEAR_OPS
from . import moe  # noqa: F401 - registers the mixture-of-experts channel rules
from .base import ChannelInfo, LayerInfo, TopologyWarning
from .engine import ChannelAtoms, channel_atoms, sets_from_classes, weight_owner
from .heads import AttentionHeads, AttentionWeightDependency, HeadDependency
from .replay import map_channels
from .rules import register_channel_rule
from .tracing import _refuse_quantized, get_graph

__all__ = [
    "ChannelDependency", "InputChannelDependency", "GroupDependency",
    "channel_atoms", "map_channels", "ChannelAtoms", "ChannelInfo", "LayerInfo", "TopologyWarning",
    "get_graph", "HeadDependency", "AttentionWeightDependency", "AttentionHeads", "register_channel_rule",
    "checked_channel_atoms", "atomic_csv", "is_module_layer",
]


def checked_channel_atoms(graph: ModelGraph) -> ChannelAtoms:
    """:func:`channel_atoms`, with a quantized layer refused by name and no private exception escaping."""
    _refuse_quantized(graph.model)
    try:
        return channel_atoms(graph)
    except Exception as e:
        if type(e).__name__ != "_Unknown":
            raise
        raise UnsupportedModelError(f"channel analysis cannot interpret the model: {e}") from None


def atomic_csv(path: str | os.PathLike[str], rows: Iterable[list[Any]]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        for r in rows:
            w.writerow(r)


def is_module_layer(ca: ChannelAtoms, name: str) -> bool:
    # fused expert parameters (topology/moe.py) are layers of the engine but not modules: the NNI-compatible
    # views list modules only (their units are read off the engine: channel_atoms(graph).layers)
    return not name.startswith("<") and ca.layers[name].kind != "experts"


class ChannelDependency:
    """Layers whose output channels (filters) must be pruned together.

    ``prune_type='Filter'`` (default) groups convolution layers (Conv1d/2d/3d, ConvTranspose); with
    ``include_linear=True`` also Linear, ``nn.MultiheadAttention`` (named by the attention module) and other
    weighted layers. ``prune_type='Batchnorm'`` groups BatchNorm layers instead. ``dummy_input`` is a tensor,
    a tuple of tensors or a dict of keyword inputs; ``traced_model`` (or ``graph``) may be a
    :class:`~prunescope.graph.ModelGraph` to reuse one trace.

    Attributes: ``dependency_sets`` (list of sets, sets in order of first execution), ``sets`` (the same as
    ordered lists, names in execution order), ``dependency`` (``{layer: its set}``), ``atoms`` (the
    :class:`~prunescope.topology.engine.ChannelAtoms` engine with the exact channel-level ties), ``unsafe``
    (``{layer: [reason, ...]}`` for the grouped layers whose channels reach a pin of the channel engine; the
    engine's answer alone: :func:`prunescope.not_safe_to_prune` decides each pin physically).

    Example
    -------
    >>> import torch, torchvision
    >>> dep = ChannelDependency(torchvision.models.resnet18(), torch.ones(1, 3, 224, 224))
    >>> dep.sets[0]
    ['conv1', 'layer1.0.conv2', 'layer1.1.conv2']
    >>> len(dep.dependency_sets)
    12
    """

    header = ["Dependency Set", "Convolutional Layers"]

    def __init__(self, model: nn.Module | None = None, dummy_input: Any = None, traced_model: Any = None,
                 prune_type: str = "Filter", *, include_linear: bool = False,
                 graph: ModelGraph | None = None) -> None:
        if prune_type not in ("Filter", "Batchnorm"):
            raise ConfigError(f"prune_type must be 'Filter' or 'Batchnorm', got {prune_type!r}")
        self.graph = get_graph(model, dummy_input, traced_model, graph)
        self.model = model if model is not None else self.graph.model
        self.prune_type = prune_type
        self.include_linear = include_linear
        self.atoms = checked_channel_atoms(self.graph)
        self.sets: list[list[str]] = self._build()
        self.dependency: dict[str, set[str]] = {}
        for s in self.sets:
            ss = set(s)
            for n in s:
                self.dependency[n] = ss

    def targets(self) -> list[str]:
        """The layers grouped, in order of first execution."""
        ca = self.atoms
        if self.prune_type == "Batchnorm":
            return [n for n, t in ca.follower_types.items() if t.startswith("BatchNorm")]
        return [n for n, li in ca.layers.items() if is_module_layer(ca, n)
                and (li.kind in CONV_KINDS or self.include_linear)]

    def _build(self) -> list[list[str]]:
        ca = self.atoms
        names = self.targets()
        if self.prune_type == "Batchnorm":
            classes = {n: np.concatenate([ca.atom_class(r) for r in ca.followers[n]]) for n in names}
        else:
            classes = {n: ca.layer_classes(n) for n in names}
        return sets_from_classes(names, classes)

    @property
    def dependency_sets(self) -> list[set[str]]:
        """List of sets of layer names, in order of first execution (every executed target layer once)."""
        return [set(s) for s in self.sets]

    @property
    def unsafe(self) -> dict[str, list[str]]:
        """``{layer: [reason, ...]}`` for the grouped layers whose output channels are unsafe to prune."""
        unsafe = self.atoms.unsafe
        return {n: unsafe[n] for s in self.sets for n in s if n in unsafe}

    def export(self, filepath: str | os.PathLike[str]) -> None:
        """Write ``Dependency Set,Convolutional Layers`` then ``Set N,name,...`` rows (atomic write)."""
        atomic_csv(filepath, [self.header] + [[f"Set {k}", *s] for k, s in enumerate(self.sets, 1)])


class InputChannelDependency(ChannelDependency):
    """Layers that read the same channels and must therefore prune the same *input* channels.

    Two layers are grouped when, channel position by channel position, they read the same atoms (the same
    tensor, or tensors joined by channel-preserving ops and elementwise ties). Layers reading a
    concatenation see different channel lists and are not grouped (as NNI, where ``cat`` breaks the chain).

    >>> import torch, torchvision
    >>> dep = InputChannelDependency(torchvision.models.resnet18(), torch.ones(1, 3, 224, 224))
    >>> dep.sets[1]  # all read the stage-1 residual channels
    ['layer1.0.conv1', 'layer1.1.conv1', 'layer2.0.conv1', 'layer2.0.downsample.0']
    """

    def _build(self) -> list[list[str]]:
        ca = self.atoms
        names = self.targets() if self.prune_type == "Filter" else []
        keys: dict[Any, list[str]] = {}
        for n in names:
            li = ca.layers[n]
            if not li.inputs:
                keys.setdefault(("layer", n), []).append(n)
                continue
            cls = ca.atom_class(li.inputs[0])
            key: Any = ("tensor", li.input_ids[0]) if (cls < 0).all() else ("atoms", tuple(cls.tolist()))
            keys.setdefault(key, []).append(n)
        return list(keys.values())


class GroupDependency:
    """Grouped-convolution constraints: ``dependency[layer]`` = the number its filter count must be divisible by.

    As NNI: each Conv/ConvTranspose layer contributes its ``groups`` (1 for a depthwise conv whose
    ``out_channels == groups``), each GroupNorm its ``num_groups``; a constraint ``g > 1`` also applies to the
    nearest convolution layers upstream (through every op up to the first layer on each path).
    ``dependency[name] = lcm`` of its list, ``min_groups[name] = min`` of the list if that equals its gcd,
    else 1. Keys in order of first execution.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, groups=4))
    >>> GroupDependency(net, torch.ones(1, 8, 4, 4)).dependency
    {'0': 4, '1': 4}
    """

    header = ["Conv Layer Name", "Group"]

    def __init__(self, model: nn.Module | None = None, dummy_input: Any = None, traced_model: Any = None, *,
                 graph: ModelGraph | None = None) -> None:
        self.graph = get_graph(model, dummy_input, traced_model, graph)
        self.model = model if model is not None else self.graph.model
        self.groups: dict[str, list[int]] = {}
        self._build()
        self.dependency: dict[str, int] = {n: _lcm(v) for n, v in self.groups.items()}
        self.min_groups: dict[str, int] = {}
        for n, v in self.groups.items():
            g = 0
            for x in v:
                g = math.gcd(g, x)
            self.min_groups[n] = min(v) if min(v) == g else 1

    @property
    def dependency_sets(self) -> dict[str, int]:
        """NNI returns the ``{layer: lcm}`` dict here."""
        return self.dependency

    def _parents(self, node_index: int) -> list[str]:
        g = self.graph
        node = g.nodes[node_index]
        found: list[str] = []
        seen: set[int] = set()
        stack = [t for t in node.inputs[:1]]
        while stack:
            t = stack.pop()
            p = g.producer(t)
            if p is None or p.index in seen:
                continue
            seen.add(p.index)
            if p.name in CONV_OPS or p.name in LINEAR_OPS or p.name in ("multi_head_attention_forward",
                                                                         "embedding"):
                if p.name in CONV_OPS:
                    w = p.inputs[1] if len(p.inputs) > 1 else None
                    name = weight_owner(g, w) if w is not None else None
                    if name and name not in found:
                        found.append(name)
                continue
            stack.extend(reversed(p.inputs))
        return found

    def _build(self) -> None:
        g = self.graph
        for node in g.nodes:
            if node.name in CONV_OPS and len(node.inputs) > 1:
                w = node.inputs[1]
                name = weight_owner(g, w) or f"<{node.name}#{node.index}>"
                groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
                groups = int(groups) if isinstance(groups, int) else 1
                transposed = "transpose" in node.name
                out_ch = w.shape[1] * groups if transposed else w.shape[0]
                grp = 1 if out_ch == groups else groups
            elif node.name == "group_norm":
                ng = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups", 1)
                params = [t for t in node.inputs[1:] if t.kind == "param"]
                name = (g.param_owner(params[0]) if params else None) or node.module
                grp = int(ng)
            else:
                continue
            self.groups.setdefault(name, []).append(grp)
            if grp > 1:
                for p in self._parents(node.index):
                    self.groups.setdefault(p, []).append(grp)

    def export(self, filepath: str | os.PathLike[str]) -> None:
        """Write ``Conv Layer Name,Group`` then ``name,lcm`` rows (atomic write)."""
        atomic_csv(filepath, [self.header] + [[n, v] for n, v in self.dependency.items()])


def _lcm(v: list[int]) -> int:
    r = 1
    for x in v:
        r = r * x // math.gcd(r, x)
    return r
