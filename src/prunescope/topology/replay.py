"""Channel-id replay: how a shape op moves channels, found by running it, never by a rule per op.

:func:`map_channels` re-runs one recorded shape op (``view``, ``permute``, ``cat``, ``__getitem__``, ``pad``,
``pixel_shuffle`` ...) on float64 tensors whose values are channel-position ids and reads the mapping off the
result. :func:`fast_map` answers the most common single-input cases (permute/transpose, pure regrouping of
non-channel axes, ``cat``/``split`` along channels) from the shapes alone, with the same result and no replay.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..graph import OpNode, TensorInfo
from .base import ChannelInfo, arg, norm_axis, renumber

__all__ = ["map_channels", "fast_map"]


def fast_map(node: OpNode, ins: Sequence[ChannelInfo | None]) -> list[ChannelInfo | None] | None:
    """Channel mapping of common single-input shape ops without replaying them (``None``: replay)."""
    if node.name in ("cat", "concat", "concatenate"):
        return _fast_cat(node, ins)
    if node.name in ("chunk", "split", "unsafe_chunk", "unsafe_split", "split_with_sizes", "tensor_split"):
        return _fast_split(node, ins)
    if len(node.outputs) != 1 or not ins or ins[0] is None or any(ci is not None for ci in ins[1:]):
        return None
    ci, x, out = ins[0], node.inputs[0], node.outputs[0]
    nd, ond = x.ndim, out.ndim
    name = node.name
    args = node.args[1:]
    try:
        if name in ("permute",):
            dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            dims = node.kwargs.get("dims", dims)
            dims = [norm_axis(int(d), nd) for d in dims]
            return [renumber(ci, {d: k for k, d in enumerate(dims)})]
        if name in ("transpose", "swapaxes", "swapdims"):
            d0 = norm_axis(int(arg(node, 1, "dim0")), nd)
            d1 = norm_axis(int(arg(node, 2, "dim1")), nd)
            m = {a: a for a in range(nd)}
            m[d0], m[d1] = d1, d0
            return [renumber(ci, m)]
        if name in ("t", "T", "mT") and nd >= 2:
            m = {a: a for a in range(nd)}
            m[nd - 1], m[nd - 2] = nd - 2, nd - 1
            return [renumber(ci, m)]
        if name in ("roll", "flip", "pad", "constant_pad_nd", "contiguous") or (
                name == "expand" and ond == nd):
            if ond != nd or any(out.shape[a] != x.shape[a] for a in ci.axes):
                return None
            if name == "roll":
                dims = arg(node, 2, "dims")
                dims = [dims] if isinstance(dims, int) else list(dims or [])
                if not dims or any(norm_axis(d, nd) in ci.axes for d in dims):
                    return None
            if name == "flip":
                dims = arg(node, 1, "dims")
                dims = [dims] if isinstance(dims, int) else list(dims or [])
                if any(norm_axis(d, nd) in ci.axes for d in dims):
                    return None
            return [ci]
        if name in ("unsqueeze", "squeeze", "view", "reshape", "flatten", "unflatten", "view_as",
                    "reshape_as", "ravel", "expand"):
            return _prefix_suffix(ci, x.shape, out.shape)
    except (TypeError, ValueError, IndexError):
        return None
    return None


def _fast_cat(node: OpNode, ins: Sequence[ChannelInfo | None]) -> list[ChannelInfo | None] | None:
    out = node.outputs[0]
    dim = arg(node, 1, "dim", 0)
    if not isinstance(dim, int) or len(node.outputs) != 1:
        return None
    d = norm_axis(dim, out.ndim)
    axes = {ci.axes for ci in ins if ci is not None}
    if len(axes) != 1:
        return None
    (ax,) = axes
    if d not in ax or any(t.ndim != out.ndim for t in node.inputs):
        return None
    k = ax.index(d)
    grids = []
    for t, ci in zip(node.inputs, ins):
        grids.append(ci.atoms if ci is not None else np.full([t.shape[a] for a in ax], -1, np.int64))
    return [ChannelInfo(ax, np.concatenate(grids, axis=k))]


def _fast_split(node: OpNode, ins: Sequence[ChannelInfo | None]) -> list[ChannelInfo | None] | None:
    if not ins or ins[0] is None or any(ci is not None for ci in ins[1:]):
        return None
    ci, x = ins[0], node.inputs[0]
    dim = arg(node, 2, "dim", 0)
    if not isinstance(dim, int):
        return None
    d = norm_axis(dim, x.ndim)
    if any(o.ndim != x.ndim for o in node.outputs):
        return None
    if d not in ci.axes:
        return [ci if all(o.shape[a] == x.shape[a] for a in ci.axes) else None for o in node.outputs] \
            if all(all(o.shape[a] == x.shape[a] for a in ci.axes) for o in node.outputs) else None
    k = ci.axes.index(d)
    res: list[ChannelInfo | None] = []
    start = 0
    for o in node.outputs:
        n = o.shape[d]
        res.append(ChannelInfo(ci.axes, np.take(ci.atoms, np.arange(start, start + n), axis=k)))
        start += n
    if start != x.shape[d]:
        return None
    return res


def _prefix_suffix(ci: ChannelInfo, ishape: tuple[int, ...],
                   oshape: tuple[int, ...]) -> list[ChannelInfo | None] | None:
    """A reshape that only regroups non-channel axes: the channel axes sit in an unchanged prefix/suffix."""
    p = 0
    while p < min(len(ishape), len(oshape)) and ishape[p] == oshape[p]:
        p += 1
    q = 0
    while q < min(len(ishape), len(oshape)) - p and ishape[-1 - q] == oshape[-1 - q]:
        q += 1
    m: dict[int, int] = {}
    for a in ci.axes:
        if a < p:
            m[a] = a
        elif a >= len(ishape) - q:
            m[a] = a - len(ishape) + len(oshape)
        elif ishape[a] == 1:
            return None
        else:
            return None
    return [renumber(ci, m)]


def map_channels(node: OpNode, infos: Sequence[ChannelInfo | None]) -> list[ChannelInfo | None] | None:
    """Map channel grids through one recorded shape op by replaying it on tensors of channel-position ids.

    ``infos`` gives, per tensor input of ``node`` (``node.inputs`` order), its :class:`ChannelInfo` or
    ``None``. Every input with channels becomes a float64 tensor of its recorded shape whose value at each
    element is ``1 + offset + (flat index of its channel-grid position)``, broadcast over the other axes;
    other floating inputs become zeros, integer inputs zeros, boolean inputs ``True``. ``node.func`` is then
    called with the recorded non-tensor arguments. In each result the axes along which the ids vary are the
    channel axes, and the ids read at index 0 of the other axes give the grid (id 0 or a value that is not
    an id → ``-1``). Returns one entry per ``node.outputs`` (``None`` = no channels), or ``None`` when the
    op cannot be replayed (it raises, returns other shapes, or produces values that are not ids).

    Example: ``view(N, 2, C/2, H, W)`` of a grid ``[a0..a5]`` on axis 1 gives axes ``(1, 2)`` and grid
    ``[[a0, a1, a2], [a3, a4, a5]]``; ``flatten(1)`` of ``(N, C, 2, 2)`` gives axis 1 with each atom 4 times.
    """
    table: list[np.ndarray] = []
    offset = 0
    id_of: dict[int, torch.Tensor] = {}

    def make(t: TensorInfo, ci: ChannelInfo | None) -> torch.Tensor:
        nonlocal offset
        if t.id in id_of:
            return id_of[t.id]
        if ci is None:
            if t.dtype == torch.bool:
                v = torch.ones(t.shape, dtype=torch.bool)
            elif t.dtype.is_floating_point or t.dtype.is_complex:
                v = torch.zeros(t.shape, dtype=torch.float64)
            else:
                v = torch.zeros(t.shape, dtype=torch.int64)
        else:
            n = ci.atoms.size
            ids = torch.arange(1 + offset, 1 + offset + n, dtype=torch.float64).reshape(ci.atoms.shape)
            view = [t.shape[a] if a in ci.axes else 1 for a in range(len(t.shape))]
            v = ids.reshape(view).expand(t.shape)
            table.append(ci.atoms.reshape(-1))
            offset += n
        id_of[t.id] = v
        return v

    infos_by_id = {}
    for t, ci in zip(node.inputs, infos):
        infos_by_id.setdefault(t.id, ci)

    def sub(a: Any) -> Any:
        if isinstance(a, TensorInfo):
            return make(a, infos_by_id.get(a.id))
        return a

    args = pytree.tree_map(sub, list(node.args))
    kwargs = pytree.tree_map(sub, dict(node.kwargs))
    if node.name in ("pad", "constant_pad_nd") and kwargs.get("value") is not None:
        kwargs["value"] = 0.0
    try:
        with torch.no_grad():
            try:
                res = node.func(*args, **kwargs)
            except RuntimeError:  # e.g. view() of an expanded (non-contiguous) id tensor: copy and retry
                args = pytree.tree_map(lambda v: v.contiguous() if isinstance(v, torch.Tensor) else v, args)
                res = node.func(*args, **kwargs)
    except Exception:
        return None
    if res is None or node.name == "__setitem__":
        res = args[0]
    leaves = [r for r in (pytree.tree_leaves(res) if not isinstance(res, torch.Tensor) else [res])
              if isinstance(r, torch.Tensor)]
    if len(leaves) != len(node.outputs):
        return None
    lut = np.concatenate([np.full(1, -1, np.int64)] + [tb.astype(np.int64) for tb in table])
    result: list[ChannelInfo | None] = []
    for r, o in zip(leaves, node.outputs):
        if tuple(r.shape) != tuple(o.shape):
            return None
        if not r.dtype.is_floating_point:
            result.append(None)
            continue
        ci = _read_grid(r, lut)
        if ci is False:
            return None
        result.append(ci)  # type: ignore[arg-type]
    return result


def _read_grid(r: torch.Tensor, lut: np.ndarray) -> ChannelInfo | None | bool:
    if r.numel() == 0:
        return None
    origin = r[(0,) * r.ndim] if r.ndim else r
    # cheap guess: the axes along which the ids vary on the lines through the origin; verified below
    axes = [a for a in range(r.ndim) if r.shape[a] > 1 and bool(
        (r[tuple(slice(None) if b == a else 0 for b in range(r.ndim))] != origin).any())]
    grid = _grid_on(r, axes)
    if not bool((r == grid.reshape([r.shape[a] if a in axes else 1 for a in range(r.ndim)])).all()):
        axes = [a for a in range(r.ndim) if r.shape[a] > 1 and bool((r != r.narrow(a, 0, 1)).any())]
        grid = _grid_on(r, axes)
    vals = grid.numpy() if grid.ndim else np.asarray(grid.item())
    if not np.all(np.isfinite(vals)) or not np.all(vals == np.round(vals)):
        return False
    iv = vals.astype(np.int64)
    iv = np.where((iv >= 0) & (iv < len(lut)), iv, 0)
    atoms = lut[iv]
    if not axes or not (atoms >= 0).any():
        return None
    return ChannelInfo(tuple(axes), atoms.reshape([r.shape[a] for a in axes]))


def _grid_on(r: torch.Tensor, axes: list[int]) -> torch.Tensor:
    g = r
    for a in reversed(range(r.ndim)):
        if a not in axes:
            g = g.select(a, 0)
    return g
