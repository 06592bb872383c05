"""The graph a topology analysis reads: the given one, or a trace of a parameter-free ``meta`` copy of the model
(shapes are all the channel engine needs), with quantized models refused by name."""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import TraceError, UnsupportedModelError
from ..graph import ModelGraph, meta_copy, quantized_kind, trace

__all__ = ["get_graph", "meta_trace"]


def get_graph(model: nn.Module | None, dummy_input: Any, traced_model: Any = None,
              graph: ModelGraph | None = None) -> ModelGraph:
    """The :class:`ModelGraph` to analyse: ``graph`` or ``traced_model`` if it is one, else a new trace."""
    if graph is not None:
        return graph
    if isinstance(traced_model, ModelGraph):
        return traced_model
    if traced_model is not None:
        raise TypeError(
            "traced_model must be a prunescope ModelGraph (from prunescope.trace); torch.jit traces are not "
            f"used, got {type(traced_model).__name__}"
        )
    if model is None or dummy_input is None:
        raise TypeError("give model and dummy_input, or traced_model=ModelGraph")
    _refuse_quantized(model)
    meta = meta_trace(model, dummy_input)
    return meta if meta is not None else trace(model, dummy_input)


def _refuse_quantized(model: nn.Module) -> None:
    """Quantized layers hold packed int8 weights behind opaque kernels: their channels cannot be followed, and
    a silent empty answer would read as "nothing to prune". Refuse them by name (analyse the float model)."""
    for name, m in model.named_modules():
        if quantized_kind(m) is not None:
            where = f"module '{name}'" if name else "the model"
            raise UnsupportedModelError(
                f"{where} is a quantized {type(m).__name__} ({type(m).__module__}): channel dependencies are "
                "analysed on float layers; analyse the model before quantization (the same channels apply "
                "after it)", module=name)


def meta_trace(model: nn.Module, dummy_input: Any) -> ModelGraph | None:
    """Trace a parameter-free ``meta`` copy of the model: topology needs shapes, not values.

    A forward that reads tensor values (data-dependent control flow, ``.item()``, ``.tolist()``) or uses an
    op without a meta kernel raises on ``meta``; then ``None`` is returned and the caller traces the real
    model, so the branch actually taken on ``dummy_input`` is what gets analysed.

    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    >>> [n.name for n in meta_trace(net, torch.ones(2, 4)).nodes]
    ['linear', 'relu']
    >>> class Reads(nn.Module):
    ...     def forward(self, x):
    ...         return x * 2 if x.sum().item() > 0 else x   # needs a value: no meta trace
    >>> meta_trace(nn.Sequential(nn.Linear(4, 4), Reads()), torch.ones(1, 4)) is None
    True
    """
    if all(t.device.type == "meta" for t in itertools.chain(model.parameters(), model.buffers())):
        return None  # already on meta (or nothing to copy): the caller's own trace is the meta trace
    try:
        meta_model = meta_copy(model)
        x = pytree.tree_map(
            lambda v: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v, dummy_input)
        if isinstance(x, tuple) and all(isinstance(v, int) for v in x):
            x = tuple(x)
        g = trace(meta_model, x)
    except (TraceError, RuntimeError, NotImplementedError, TypeError, copy.Error) as e:
        # e.g. a data-dependent op (nonzero, one-argument where, .item()) in the forward: a one-line note
        logging.getLogger("prunescope").info(
            "prunescope: the meta-device trace failed (%s); tracing on the model's own device instead",
            str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return None
    return g
