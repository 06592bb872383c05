"""Effective FLOPs and parameters: the model as it will be once masked channels are physically removed.

NNI's counter only discounts a layer's own removed filters. Here a removed output channel of one layer also
removes the matching input channel of every layer that consumes it — through BatchNorm, activations,
pooling, residual adds, concatenation, channel shuffles and ``flatten`` into a Linear — and norms shrink with
their channels. The figure equals the dense count of the physically narrowed network.

Which channels go is the removal plan of :mod:`prunescope.removal.plan`, the same one :func:`prunescope.shrink`
builds the narrowed model from (its dense count equals this count; tested on every torchvision model).
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

A removed channel that reaches the next layer as a non-zero constant (``sigmoid(0) = 0.5``) is folded into that
layer's bias where that is exact (a bias created for it is counted), or kept (counted) where it is not; see
:mod:`prunescope.removal.fold`. Channels pinned for their values (a mean over the channel axis) count as removed
here when masked, but ``shrink`` refuses them.

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
from torch import nn

from ..graph import ModelGraph, OpNode, check_graph_of, trace
from ..masks.files import validate_masks
from ..removal.plan import plan_removal, removed_channels
from ..removal.stdconv import std_weights
from .counter import FlopsReport, _build

__all__ = ["effective_report", "node_scales", "removed_channels"]


def node_scales(ca: Any, atom_removed: np.ndarray, index: dict[int, np.ndarray] | None = None
                ) -> Callable[[OpNode], tuple[float, int | None]]:
    """Per counted op node, the factor its dense count is multiplied by once ``atom_removed`` (per engine atom,
    see :func:`prunescope.topology.channel_atoms`) is physically gone.

    * a conv / linear call: pairs of kept (input, output) channels over dense pairs, per group (the MACs of
      ``W[out_kept][:, in_kept]``); so does its weight standardisation's ``batch_norm`` (the elements of the
      narrowed weight), and the ops computing its per-filter gain by the kept output channels;
    * a fused expert layer: pairs per expert (the removal plan keeps equal counts per expert);
    * ``scaled_dot_product_attention``: the Q·Kᵀ part by the query's kept channel positions, the A·V part by
      the output's (a value narrowed under multi-query attention narrows A·V only);
    * any other op: the fraction of its output (else input) channel positions still alive.

    The effective counter and :class:`prunescope.flops.plancost.PlanCost` both multiply by these factors, so the
    two give the same count by construction. ``index``: a cache (kept by a caller that counts many plans on one
    graph) of each atom array's positions into the alive vector, ``-1`` (no atom: always alive) mapped to an
    extra last entry.
    """
    alive_ext = np.append(~np.asarray(atom_removed, dtype=bool), True)
    n = len(alive_ext) - 1

    def alive_in(atoms: np.ndarray) -> np.ndarray:
        idx = index.get(id(atoms)) if index is not None else None
        if idx is None:
            a = np.asarray(atoms).reshape(-1)
            idx = np.where(a >= 0, a, n)
            if index is not None:
                index[id(atoms)] = idx  # the arrays live as long as the engine (ca) the caller holds
        return alive_ext[idx]

    # per op node of a layer call: MAC scale (pairs of kept input and output channels / dense pairs)
    layer_scale: dict[int, tuple[float, int | None]] = {}
    std = std_weights(ca.graph)
    for li in ca.layers.values():
        if li.kind == "experts":  # a fused expert layer: pairs per expert (the plan keeps equal counts per expert)
            ok = (~atom_removed[li.atom_start: li.atom_start + li.out_channels]).reshape(li.experts, -1)
            for node_idx, ins in zip(li.nodes, li.inputs):
                ik = alive_in(ins).reshape(li.experts, -1)
                pairs = float((ik.sum(1) * ok.sum(1)).mean())
                layer_scale[node_idx] = (pairs / (ik.shape[1] * ok.shape[1]) if ik.size and ok.size else 1.0, None)
            continue
        if li.kind not in ("conv", "conv_transpose", "linear"):
            continue
        out_keep = ~atom_removed[li.atom_start: li.atom_start + li.out_channels]
        for node_idx, ins in zip(li.nodes, li.inputs):
            in_keep = alive_in(ins)
            cin, cout, gr = len(in_keep), len(out_keep), max(1, li.groups)
            if cin % gr or cout % gr:
                layer_scale[node_idx] = (1.0, None)
                continue
            pairs = int(np.dot(in_keep.reshape(gr, -1).sum(1, dtype=np.int64),
                               out_keep.reshape(gr, -1).sum(1, dtype=np.int64)))
            dense_pairs = (cin // gr) * cout
            layer_scale[node_idx] = (pairs / dense_pairs if dense_pairs else 1.0, None)
            sw = std.get(node_idx)
            if sw is not None:  # its weight standardisation: over the kept filters' kept elements
                for i in sw.per_element:
                    layer_scale[i] = layer_scale[node_idx]
                for i in sw.per_filter:
                    layer_scale[i] = (float(out_keep.mean()) if cout else 1.0, None)

    def alive_frac(t: Any) -> float:
        ci = ca.info(t)
        return float(alive_in(ci.atoms).mean()) if ci is not None and ci.atoms.size else 1.0

    def op_scale(node: OpNode) -> tuple[float, int | None]:
        hit = layer_scale.get(node.index)
        if hit is not None:
            return hit
        if node.name == "scaled_dot_product_attention" and len(node.inputs) >= 3 and node.outputs:
            # queries · keys · (E_qk + E_v): the Q·Kᵀ part scales with the query's kept channels (a removed head
            # removes its query dims), the A·V part with the output's (the value's kept dims, per kept head)
            eq, ev = node.inputs[0].shape[-1], node.outputs[0].shape[-1]
            if eq + ev:
                return (eq * alive_frac(node.inputs[0]) + ev * alive_frac(node.outputs[0])) / (eq + ev), None
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

    return op_scale


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
    check_graph_of(graph, model, "flops_report")
    g = graph if graph is not None else trace(model, x)
    masks = validate_masks(masks or {}, model, "count_flops_params masks")
    plan = plan_removal(g, masks, check_pins=False)
    op_scale = node_scales(plan.atoms, plan.atom_removed)
    rep = _build(g, model, custom_ops or {}, mode, {}, op_scale)
    rep.total_params = plan.param_count(model)
    return rep
