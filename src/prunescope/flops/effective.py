"""Effective FLOPs and parameters: the model as it will be once masked channels are physically removed.

NNI's counter only discounts a layer's own removed filters. Here a removed output channel of one layer also
removes the matching input channel of every layer that consumes it — through BatchNorm, activations,
pooling, residual adds, concatenation, channel shuffles and ``flatten`` into a Linear — and norms shrink with
their channels. The figure equals the dense count of the physically narrowed network.

How a channel is decided removed (read off the channel engine,
:func:`prunescope.topology.channel_atoms`): every output channel of every layer is an *atom*; ops that force
channels to be pruned together (a residual add, an SE scale, a depthwise convolution) join atoms into one
class. A class is removed when **every** member atom is masked (its filter is all zeros), depthwise layers
excepted: a depthwise channel follows its input channel and is removed with it. This is the outcome of
``fix_mask_conflict``'s default (union) policy followed by physical pruning: a channel that some tied layer
still keeps cannot be removed, so it is counted.

Convention for norms: a removed channel is removed from the BatchNorm that follows too, and the constant
``β − γ·μ/σ`` that an eval-mode BatchNorm would produce from a zeroed channel is **dropped** (as physical
pruners — NNI's speedup, Torch-Pruning — do), not carried into the next layer. The effective count is the
count of that narrowed network.

Unstructured (fine-grained) masks remove no channel and leave the count unchanged; attention projections and
layers the engine cannot narrow are counted dense.

>>> import torch
>>> from torch import nn
>>> from prunescope import count_flops_params
>>> net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
>>> mask = torch.ones(4, 3, 1, 1); mask[:2] = 0          # remove 2 of conv 0's 4 filters
>>> count_flops_params(net, (1, 3, 2, 2), masks={'0': {'weight': mask}}, effective=True, verbose=False)[:2]
(40, 10)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import MaskError
from ..graph import ModelGraph, OpNode, trace
from .counter import FlopsReport, _build

__all__ = ["effective_report", "removed_channels"]


def _filter_keep(mask: torch.Tensor, kind: str, groups: int) -> np.ndarray:
    """Per output channel: does the mask keep any weight of that channel's filter?"""
    m = mask.detach().to("cpu") != 0
    if kind == "conv_transpose":  # weight (C_in, C_out/g, *k): output channel = g * (C_out/g) + j
        cin, cpg = m.shape[0], m.shape[1]
        per_group = m.reshape(groups, cin // groups, cpg, -1).any(dim=(1, 3))  # (g, C_out/g)
        return per_group.reshape(-1).numpy()
    return m.reshape(m.shape[0], -1).any(dim=1).numpy()


def removed_channels(graph: ModelGraph, masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{layer: bool array}`` of output channels that are physically removed (see module docs)."""
    from ..topology import channel_atoms

    ca = channel_atoms(graph)
    n = len(ca.root)
    masked = np.zeros(n, dtype=bool)
    voter = np.ones(n, dtype=bool)
    for li in ca.layers.values():
        if li.depthwise:
            voter[li.atom_start: li.atom_start + li.out_channels] = False
    for layer, m in masks.items():
        w = m.get("weight") if isinstance(m, Mapping) else m
        if w is None or layer not in ca.layers:
            continue
        li = ca.layers[layer]
        if li.kind not in ("conv", "conv_transpose", "linear"):
            continue
        keep = _filter_keep(w, li.kind, li.groups)
        if keep.shape[0] != li.out_channels:
            raise MaskError(f"mask of layer {layer!r} covers {keep.shape[0]} output channels, the layer has "
                            f"{li.out_channels}")
        masked[li.atom_start: li.atom_start + li.out_channels] = ~keep
    root = ca.root
    # a class is removed when all of its voting atoms are masked and it has at least one voter
    alive_vote = np.zeros(n, dtype=bool)
    np.logical_or.at(alive_vote, root[voter], ~masked[voter])
    has_voter = np.zeros(n, dtype=bool)
    np.logical_or.at(has_voter, root[voter], True)
    class_removed = has_voter & ~alive_vote
    atom_removed = class_removed[root]
    # depthwise atoms are also removed by their own mask (a depthwise filter removed = its channel removed)
    atom_removed |= masked & ~voter
    return {name: atom_removed[li.atom_start: li.atom_start + li.out_channels] for name, li in ca.layers.items()}


def effective_report(
    model: nn.Module,
    x: Any = None,
    custom_ops: Mapping[type, Callable[..., Any]] | None = None,
    mode: str = "default",
    *,
    masks: Mapping[str, Any] | None = None,
    graph: ModelGraph | None = None,
) -> FlopsReport:
    """:class:`FlopsReport` of the narrowed network; ``total_params`` counts its parameters."""
    from ..topology import channel_atoms

    g = graph if graph is not None else trace(model, x)
    from ..masks.io import validate_masks

    masks = validate_masks(masks or {}, model, "count_flops_params masks")
    modules = dict(model.named_modules())
    ca = channel_atoms(g)
    removed = removed_channels(g, masks)
    atom_removed = np.zeros(len(ca.root), dtype=bool)
    for name, li in ca.layers.items():
        atom_removed[li.atom_start: li.atom_start + li.out_channels] = removed[name]

    def alive_in(atoms: np.ndarray) -> np.ndarray:
        a = np.asarray(atoms).reshape(-1)
        return np.where(a >= 0, ~atom_removed[np.maximum(a, 0)], True)

    # per op node of a layer call: (MAC scale, effective params of that layer)
    layer_scale: dict[int, tuple[float, int | None]] = {}
    removed_params = 0
    counted_layers: set[str] = set()
    for name, li in ca.layers.items():
        if li.kind not in ("conv", "conv_transpose", "linear"):
            continue
        out_keep = ~removed[name]
        module = modules.get(name)
        for call_no, (node_idx, ins) in enumerate(zip(li.nodes, li.inputs)):
            in_keep = alive_in(ins)
            cin, cout, gr = len(in_keep), len(out_keep), max(1, li.groups)
            if cin % gr or cout % gr:
                layer_scale[node_idx] = (1.0, None)
                continue
            pairs = sum(int(in_keep.reshape(gr, -1)[k].sum()) * int(out_keep.reshape(gr, -1)[k].sum())
                        for k in range(gr))
            dense_pairs = (cin // gr) * cout
            scale = pairs / dense_pairs if dense_pairs else 1.0
            w = getattr(module, "weight", None) if module is not None else None
            eff_p = None
            if call_no == 0 and isinstance(w, torch.Tensor) and name not in counted_layers:
                counted_layers.add(name)
                k = w.numel() // max(1, dense_pairs)
                b = getattr(module, "bias", None)
                eff_p = pairs * k + (int(out_keep.sum()) if isinstance(b, torch.Tensor) else 0)
                removed_params += w.numel() + (b.numel() if isinstance(b, torch.Tensor) else 0) - eff_p
            layer_scale[node_idx] = (scale, eff_p)
    # norms that follow a layer shrink with its channels
    for name, per_call in ca.followers.items():
        module = modules.get(name)
        if module is None or not per_call:
            continue
        keep = alive_in(per_call[0])
        frac = float(keep.mean()) if keep.size else 1.0
        own = sum(p.numel() for p in module.parameters(recurse=False))
        removed_params += int(round(own * (1 - frac)))

    def op_scale(node: OpNode) -> tuple[float, int | None]:
        hit = layer_scale.get(node.index)
        if hit is not None:
            return hit
        # other ops (full mode): the fraction of their output channel positions still alive
        if node.outputs:
            ci = ca.info(node.outputs[0])
            if ci is not None and ci.atoms.size:
                return float(alive_in(ci.atoms).mean()), None
        if node.inputs:
            ci = ca.info(node.inputs[0])
            if ci is not None and ci.atoms.size:
                return float(alive_in(ci.atoms).mean()), None
        return 1.0, None

    rep = _build(g, model, custom_ops or {}, mode, {}, op_scale)
    rep.total_params = sum(p.numel() for p in model.parameters()) - removed_params
    return rep
