"""Masks for fused expert parameters: remove the same number of units from every expert.

A fused expert layer (:mod:`prunescope.topology.moe`) holds all experts in one 3-D parameter; its masks are keyed
by the parameter's name and have its shape (:mod:`prunescope.removal.expert_cuts`). :func:`expert_masks` scores the
units of every expert (an expert unit is one class of the channel engine: for a SwiGLU expert, row ``j`` and
row ``I + j`` of ``gate_up_proj[e]``; ``down_proj[e]``'s column ``j`` reads it) by the norms of their rows and
removes the ``int(units * sparsity)`` lowest of **each** expert, so every expert keeps the same width and
:func:`prunescope.shrink` can narrow the fused tensors.

Example
-------
>>> import torch, transformers
>>> from prunescope.masks.expert_masks import expert_masks
>>> cfg = transformers.MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
...                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
>>> torch.manual_seed(0) and None
>>> model = transformers.MixtralModel(cfg).eval()
>>> with torch.no_grad():
...     _ = model.layers[0].mlp.experts.gate_up_proj.normal_()
>>> m = expert_masks(model, {"input_ids": torch.ones(1, 6, dtype=torch.long)}, 0.25)
>>> w = m["layers.0.mlp.experts.gate_up_proj"]["weight"]          # (4 experts, 2 * 16, 32)
>>> [int(w[e, :, 0].sum()) for e in range(4)]                     # 12 of 16 units (gate + up rows) stay
[24, 24, 24, 24]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..graph import trace
from ..topology import channel_atoms

__all__ = ["expert_masks"]


def _row_scores(p: torch.Tensor, out_dim: int, prune_type: str) -> np.ndarray:
    """``(E, N)`` score of every expert row (output channel) of a fused parameter."""
    rows = p.detach().float().movedim(out_dim, 1).reshape(p.shape[0], p.shape[out_dim], -1)
    s = rows.abs().sum(-1) if prune_type == "l1" else rows.norm(dim=-1)
    return s.cpu().numpy()


@torch.no_grad()
def expert_masks(model: nn.Module, dummy_input: Any, sparsity: float, *, prune_type: str = "l1",
                 graph: Any = None) -> dict[str, dict[str, Any]]:
    """Masks removing ``int(units_per_expert * sparsity)`` units of every expert of every fused expert layer.

    A unit's score is the sum of the L1 norms (``prune_type='l2'``: L2 norms) of its rows in the fused
    parameters (gate and up rows of one expert); the lowest-scoring units of each expert go (ties: the lower
    index first). Fused layers whose units the engine reports unsafe, or whose units are tied across experts
    or to other layers (a down projection's outputs are the residual stream), are left out. Returns
    ``{parameter name: {'weight': mask, 'bias': None}}``; the model is not modified.
    """
    if prune_type not in ("l1", "l2"):
        raise ConfigError(f"expert unit pruning scores rows by 'l1' or 'l2', got {prune_type!r}")
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
    g = graph if graph is not None else trace(model, dummy_input)
    ca = channel_atoms(g)
    params = dict(model.named_parameters())
    fused = {n: li for n, li in ca.layers.items() if li.kind == "experts" and n in params}
    notes = getattr(ca, "class_notes", {})
    out: dict[str, dict[str, Any]] = {}
    done: set[int] = set()
    for name, li in fused.items():
        cls = ca.layer_classes(name).reshape(li.experts, -1)
        if any(int(c) in done for c in cls.reshape(-1)):
            continue  # units already handled with another fused layer (separate gate and up parameters)
        rows: dict[int, list[tuple[str, int, int]]] = {}  # class -> (layer, expert, row) of every member
        ok = True
        for c in np.unique(cls).tolist():
            members = ca.class_members(int(c))
            for layer, ch in members:
                m = fused.get(layer)
                if m is None or c in notes:
                    ok = False
                    break
                rows.setdefault(c, []).append((layer, ch // (m.out_channels // m.experts),
                                               ch % (m.out_channels // m.experts)))
            if not ok or len({e for _, e, _ in rows[c]}) != 1:
                ok = False
                break
        if not ok:
            continue
        scores = {n: _row_scores(params[n], fused[n].weight_out_dim, prune_type)
                  for n in {layer for v in rows.values() for layer, _, _ in v}}
        masks = {n: torch.ones_like(params[n]) for n in scores}
        for e in range(li.experts):
            units = list(dict.fromkeys(int(c) for c in cls[e]))  # in channel order
            k = int(len(units) * sparsity)
            sc = np.array([sum(scores[n][ee, j] for n, ee, j in rows[c]) for c in units])
            for i in np.argsort(sc, kind="stable")[:k].tolist():
                for n, ee, j in rows[units[i]]:
                    idx: list[Any] = [ee, slice(None), slice(None)]
                    idx[fused[n].weight_out_dim] = j
                    masks[n][tuple(idx)] = 0
        done.update(int(c) for c in rows)
        for n, m in masks.items():
            out[n] = {"weight": m, "bias": None}
    return out
