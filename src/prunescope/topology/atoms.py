"""The channel engine: which layer output channels flow into every recorded tensor.

This is the core that every topology analysis (and mask-conflict fixing, effective FLOPs) reads. It walks a
:class:`~prunescope.graph.ModelGraph` once, in execution order, and gives every tensor value a
:class:`ChannelInfo`: the tensor axes that carry channels and, for every position on those axes, the
*atom* that lives there. An atom is one output channel of one layer, ``(layer_name, channel_index)``; a
layer is the owner of the weight parameter that a channel-mixing op consumes (``conv2d``, ``linear``,
``multi_head_attention_forward``, ``embedding``, a ``matmul`` with a parameter), so ``F.conv2d(x,
self.weight)`` and a module called twice are handled like any ``nn.Conv2d``.

Atoms are joined into *classes* with a union-find when pruning one of them forces pruning the others:

* elementwise ops (``add``, ``mul``, ``sub``, ``div``, in-place and ``__iadd__`` forms, ``where`` ...) tie the
  atoms at aligned positions after broadcasting; an operand whose channel axis has size 1 and is broadcast
  (a per-sample scalar) or that carries no atoms (a constant) ties nothing; an SE scale ``(N, C, 1, 1)``
  ties its producer to the scaled tensor;
* a depthwise convolution ties output channel ``o`` to input channel ``o // multiplier``;
* ``cat``/``stack`` along a non-channel axis tie their inputs position by position;
* ``chunk``/``split`` into equal pieces along channels tie position ``p`` of every piece (they re-split at
  ``C'/n`` after pruning), a reshape that splits the channel axis into groups ``(g, C/g)`` (channel shuffle,
  attention heads) ties the same in-group index of every group;
* a layer that reads a tensor whose channel slice spans several atoms (e.g. a flattened or pixel-shuffled
  grid) ties them (one input channel of the layer = one unit).

Shape ops (``view``, ``reshape``, ``flatten``, ``permute``, ``transpose``, ``cat`` along channels,
``chunk``/``split``, ``__getitem__``, ``pad``, ``roll``, ``expand`` ...) are never described by rules: the op is
re-run by :func:`map_channels` on a float64 tensor of channel-position ids (one id per position of the
channel grid, broadcast over the other axes, 0 for "no channel") and the ids found in the result give the
exact mapping. Channel-preserving ops (norms, activations, pooling, dropout, interpolation, softmax ...) pass
the grid through. Any other op that touches channels *stops* them: its input atoms are marked unsafe with
the op named, and its outputs carry no channels (never a silent tie nor a silent "free").

Atoms are also *pinned* (unsafe to prune) when a shape op writes their count into the code: a
``view``/``reshape``/``expand`` whose channel-carrying output axis has an explicit size (``x.view(-1, 1024)``,
ViT's ``reshape(n, hidden_dim, -)``), a slice or split with fixed sizes along channels. Sizes of ``-1``,
``flatten`` and pure group split/merge reshapes are free (they follow the pruned count).

Example
-------
>>> import torch
>>> from torch import nn
>>> from prunescope.graph import trace
>>> from prunescope.topology import channel_atoms
>>> class Res(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
...     def forward(self, x):
...         y = self.a(x)
...         return y + self.b(y)
>>> ca = channel_atoms(trace(Res(), torch.ones(1, 3, 8, 8)))
>>> out = ca.graph.outputs[0]
>>> ca.info(out).axes, ca.channels(out)[0]
((1,), [('a', 0), ('b', 0)])
>>> ca.layer_sets()
[['a', 'b']]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence
from weakref import WeakKeyDictionary

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..graph import ModelGraph, OpNode, TensorInfo

__all__ = [
    "ChannelInfo", "ChannelAtoms", "LayerInfo", "TopologyWarning", "channel_atoms", "map_channels",
    "CONV_OPS", "LINEAR_OPS",
]


class TopologyWarning(UserWarning):
    """An op whose channel semantics are unknown stopped the analysis; the layers feeding it are unsafe."""


@dataclass
class ChannelInfo:
    """The channels carried by one tensor value.

    ``axes``: the tensor axes that carry channels, ascending (usually one: ``(1,)`` for NCHW, ``(2,)`` for
    ``(N, L, C)``; several after a reshape that spreads channels over several axes).
    ``atoms``: ``int64`` array of shape ``[shape[a] for a in axes]``; entry = atom id of that channel
    position, ``-1`` = a position that carries no layer channel (padding, a constant, a model input).
    """

    axes: tuple[int, ...]
    atoms: np.ndarray

    def positions(self) -> int:
        return int(self.atoms.size)


@dataclass
class LayerInfo:
    """A layer found in the trace (the owner of a weight consumed by a channel-mixing op)."""

    name: str
    kind: str  # 'conv' | 'conv_transpose' | 'linear' | 'attention' | 'embedding' | 'matmul' | 'norm'
    module_type: str  # class name of the owning module ('' when the owner is not a module)
    first_op: int  # index of the first op that used it
    out_channels: int = 0
    in_channels: int = 0
    groups: int = 1
    atom_start: int = -1  # atoms of this layer are atom_start .. atom_start + out_channels - 1
    depthwise: bool = False
    inputs: list[np.ndarray] = field(default_factory=list)  # per call: atom per input channel (-1: none)
    input_ids: list[int] = field(default_factory=list)  # per call: id of the TensorInfo it read
    nodes: list[int] = field(default_factory=list)  # per call: index of the op node


CONV_OPS = frozenset("conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d".split())
LINEAR_OPS = frozenset({"linear"})
_TRANSPOSED = frozenset({"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
_NORM_OPS = {"batch_norm": 1, "instance_norm": 1, "group_norm": 1, "layer_norm": -1}
_ELEMENTWISE = frozenset(
    """add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub subtract subtract_ mul mul_
    __mul__ __rmul__ __imul__ multiply multiply_ div div_ __truediv__ __rtruediv__ __itruediv__ divide divide_
    true_divide floor_divide __floordiv__ __rfloordiv__ __mod__ remainder fmod pow __pow__ __rpow__ pow_
    addcmul addcmul_ addcdiv addcdiv_ where maximum minimum fmax fmin max min lerp lerp_ logical_and
    logical_or logical_xor logical_and_ logical_or_ logical_xor_ __and__ __or__ __xor__ __iand__ __ior__
    eq ne lt le gt ge __eq__ __ne__ __lt__ __le__ __gt__ __ge__ masked_fill masked_fill_ copysign atan2
    hypot xlogy clamp clamp_ clip clip_ squared_difference""".split()
)
# ops whose output has the first tensor input's layout (shape may change on non-channel axes only)
_PASS = frozenset(
    """relu relu_ relu6 hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu celu gelu silu silu_ mish
    hardswish hardswish_ hardsigmoid hardsigmoid_ sigmoid sigmoid_ tanh tanh_ softplus softsign tanhshrink
    logsigmoid prelu rrelu glu_ threshold threshold_ abs abs_ neg neg_ __neg__ __pos__ __abs__ exp exp_
    log log_ log1p log2 sqrt sqrt_ rsqrt rsqrt_ square reciprocal reciprocal_ sign erf sin cos floor ceil
    round trunc frac nan_to_num clamp_min clamp_max
    dropout dropout_ dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
    max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices lp_pool1d lp_pool2d
    interpolate upsample upsample_nearest upsample_bilinear
    softmax log_softmax softmin normalize local_response_norm
    contiguous clone detach detach_ to float half double bfloat16 type type_as cpu cuda requires_grad_
    __deepcopy__ zero_ fill_ new_zeros new_ones new_full new_empty zeros_like ones_like empty_like
    full_like rand_like randn_like""".split()
)
_FRESH = frozenset(
    "new_zeros new_ones new_full new_empty zeros_like ones_like empty_like full_like rand_like randn_like zero_ "
    "fill_".split()
)
_REDUCE = frozenset("mean sum amax amin max min std var norm logsumexp prod argmax argmin nansum nanmean".split())
_EXEC = frozenset(
    """view reshape flatten unflatten permute transpose swapaxes swapdims movedim moveaxis t T mT squeeze
    unsqueeze expand expand_as repeat tile chunk split tensor_split split_with_sizes unsafe_split
    unsafe_chunk unbind cat concat concatenate stack hstack vstack __getitem__ __setitem__ narrow select
    index_select roll flip pad constant_pad_nd pixel_shuffle pixel_unshuffle channel_shuffle
    native_channel_shuffle view_as reshape_as ravel diagonal gather take_along_dim""".split()
)
_RESHAPE = frozenset({"view", "reshape", "unflatten", "expand"})
_SPLIT = frozenset({"chunk", "split", "tensor_split", "split_with_sizes", "unsafe_split", "unsafe_chunk",
                    "unbind"})
_MATMUL = frozenset({"matmul", "__matmul__", "__rmatmul__", "mm", "bmm"})


def _norm_axis(a: int, nd: int) -> int:
    return a + nd if a < 0 else a


class _UF:
    """Deferred union-find: edges are collected as arrays and solved once, vectorised."""

    def __init__(self) -> None:
        self.a: list[np.ndarray] = []
        self.b: list[np.ndarray] = []

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.int64).reshape(-1)
        b = np.asarray(b, dtype=np.int64).reshape(-1)
        m = (a >= 0) & (b >= 0) & (a != b)
        if m.any():
            self.a.append(a[m])
            self.b.append(b[m])

    def solve(self, n: int) -> np.ndarray:
        parent = np.arange(n, dtype=np.int64)
        if not self.a or n == 0:
            return parent
        a = np.concatenate(self.a)
        b = np.concatenate(self.b)
        while True:  # hook roots to the smaller root, then jump pointers to the roots (Shiloach-Vishkin)
            pa, pb = parent[a], parent[b]
            diff = pa != pb
            if not diff.any():
                return parent
            pa, pb = pa[diff], pb[diff]
            lo, hi = np.minimum(pa, pb), np.maximum(pa, pb)
            np.minimum.at(parent, hi, lo)
            while True:
                pp = parent[parent]
                if np.array_equal(pp, parent):
                    break
                parent = pp


@dataclass
class _Note:
    kind: str  # 'pin' | 'stop'
    op: str
    module: str
    index: int
    text: str

    def describe(self) -> str:
        where = f"module '{self.module}'" if self.module else "the model's forward"
        return f"{self.text} ('{self.op}' op #{self.index} in {where})"


class ChannelAtoms:
    """Channel atoms of every tensor of one :class:`~prunescope.graph.ModelGraph` (see module docstring).

    Main members:

    * ``graph``; ``layers``: ``{name: LayerInfo}`` in order of first use; ``atom_layer``/``atom_channel``:
      per atom id, the layer index (into ``layer_names``) and its output-channel index;
    * :meth:`info` (tensor → :class:`ChannelInfo` or ``None``), :meth:`channels` (tensor → per channel
      position the list of ``(layer, channel)`` atoms tied there, execution order), :meth:`atom`
      (``(layer, c)`` → atom id), :meth:`atom_class` (atom id → class id), :meth:`class_members`;
    * :meth:`layer_sets` (layers sharing an atom class, restricted to a layer filter);
    * ``unsafe``: ``{layer: [reason, ...]}`` for layers with a pinned or stopped output channel;
      ``stopped_ops``: descriptions of ops that stopped the analysis.
    """

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self.layers: dict[str, LayerInfo] = {}
        self.followers: dict[str, list[np.ndarray]] = {}  # norm layers: per call, atom per channel
        self.follower_types: dict[str, str] = {}
        self._infos: dict[int, ChannelInfo] = {}
        self._uf = _UF()
        self._natoms = 0
        self._owner: list[int] = []  # per layer block: (layer index) expanded lazily
        self._pins: list[tuple[np.ndarray, _Note]] = []
        self._cond_pins: list[tuple[np.ndarray, np.ndarray, np.ndarray, _Note]] = []
        self.stopped_ops: list[str] = []
        self._stop_notes: list[tuple[np.ndarray, _Note]] = []
        self._run()
        self._finish()

    # ------------------------------------------------------------------ public queries
    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def info(self, t: TensorInfo | int) -> ChannelInfo | None:
        """The :class:`ChannelInfo` of a tensor value (``None``: it carries no layer channels)."""
        return self._infos.get(t if isinstance(t, int) else t.id)

    def atom(self, layer: str, channel: int) -> int:
        """Atom id of output channel ``channel`` of ``layer``."""
        li = self.layers[layer]
        if not 0 <= channel < li.out_channels:
            raise IndexError(f"layer '{layer}' has {li.out_channels} output channels, not {channel}")
        return li.atom_start + channel

    def atom_name(self, atom: int) -> tuple[str, int]:
        """``(layer, channel)`` of an atom id."""
        li = self._layer_list[int(self.atom_layer[atom])]
        return li.name, int(self.atom_channel[atom])

    def atom_class(self, atom: int | np.ndarray) -> Any:
        """Class id (a representative atom id) of an atom id or an array of them (``-1`` stays ``-1``)."""
        a = np.asarray(atom)
        out = np.where(a >= 0, self.root[np.maximum(a, 0)], -1)
        return int(out) if out.ndim == 0 else out

    def class_members(self, cls: int) -> list[tuple[str, int]]:
        """All ``(layer, channel)`` atoms of a class, in atom order (layers in order of first use)."""
        return [self.atom_name(int(a)) for a in np.nonzero(self.root == self.root[cls])[0]]

    def channels(self, t: TensorInfo | int) -> list[list[tuple[str, int]]]:
        """Per channel position of tensor ``t`` (grid flattened row-major), the atoms tied there."""
        ci = self.info(t)
        if ci is None:
            return []
        return [self.class_members(int(a)) if a >= 0 else [] for a in ci.atoms.reshape(-1)]

    def layer_atoms(self, layer: str) -> np.ndarray:
        li = self.layers[layer]
        return np.arange(li.atom_start, li.atom_start + li.out_channels)

    def layer_classes(self, layer: str) -> np.ndarray:
        """Class id per output channel of a layer."""
        return self.root[self.layer_atoms(layer)]

    def layer_sets(self, include: Iterable[str] | None = None) -> list[list[str]]:
        """Layers (in ``include``, default all) that share an atom class: ordered list of ordered lists.

        Sets appear in order of the first execution of any member; members in execution order.
        """
        inc = None if include is None else set(include)
        names = [n for n in self.layers if inc is None or n in inc]
        return sets_from_classes(names, {n: self.layer_classes(n) for n in names})

    # ------------------------------------------------------------------ building
    def _new_layer(self, name: str, kind: str, node: OpNode, out_ch: int) -> LayerInfo:
        li = self.layers.get(name)
        if li is None:
            mod = self.graph.modules.get(name)
            li = LayerInfo(name, kind, type(mod).__name__ if mod is not None else "", node.index, out_ch)
            li.atom_start = self._natoms
            self._natoms += out_ch
            self.layers[name] = li
        elif li.out_channels != out_ch:  # the same weight used with another output size: give up on it
            self._stop([self.layer_atoms(name)], node, f"layer '{name}' is used with {out_ch} and "
                       f"{li.out_channels} output channels")
        return li

    def _weight_owner(self, t: TensorInfo, node: OpNode) -> str:
        if t.kind in ("param", "buffer") and t.name:
            return self.graph.param_owner(t) or t.name
        # a weight computed from a parameter (weight standardisation, w.t(), ...): follow single-param ancestry
        seen = 0
        frontier = [t]
        while frontier and seen < 32:
            cur = frontier.pop()
            seen += 1
            if cur.kind in ("param", "buffer") and cur.name and cur.numel() == t.numel():
                return self.graph.param_owner(cur) or cur.name
            p = self.graph.producer(cur)
            if p is not None:
                frontier.extend(i for i in p.inputs if i.numel() == t.numel() or i.kind == "param")
        return f"<{node.name}#{node.index}>"

    def _record_input(self, li: LayerInfo, rep: np.ndarray, tid: int, node: OpNode) -> None:
        if li.inputs and len(li.inputs[0]) == len(rep):
            # a layer called again: its input column c reads channel c of every call's input
            self._uf.union(li.inputs[0], rep)
        li.inputs.append(rep)
        li.input_ids.append(tid)
        li.nodes.append(node.index)

    def _set(self, t: TensorInfo, ci: ChannelInfo | None) -> None:
        if ci is not None and ci.atoms.size and (ci.atoms >= 0).any():
            self._infos[t.id] = ci

    def _stop(self, grids: Sequence[np.ndarray], node: OpNode, text: str) -> None:
        note = _Note("stop", node.name, node.module, node.index, text)
        atoms = np.concatenate([g.reshape(-1) for g in grids]) if grids else np.zeros(0, np.int64)
        self._stop_notes.append((atoms, note))
        self.stopped_ops.append(note.describe())

    def _pin(self, grid: np.ndarray, node: OpNode, text: str) -> None:
        self._pins.append((grid.reshape(-1).copy(), _Note("pin", node.name, node.module, node.index, text)))

    def _reps(self, ci: ChannelInfo | None, ndim: int, axis: int, size: int) -> np.ndarray:
        """Atom per position along ``axis`` (tying the atoms of one slice when the grid has other axes)."""
        axis = _norm_axis(axis, ndim)
        if ci is None or axis not in ci.axes:
            # channels on other axes are batch-like for a layer reading along ``axis``: no constraint
            return np.full(size, -1, np.int64)
        k = ci.axes.index(axis)
        g = np.moveaxis(ci.atoms, k, 0).reshape(ci.atoms.shape[k], -1)
        if g.shape[1] == 1:
            return g[:, 0].copy()
        rep = np.full(g.shape[0], -1, np.int64)
        valid = g >= 0
        has = valid.any(1)
        idx = valid.argmax(1)
        rep[has] = g[has, idx[has]]
        self._uf.union(np.repeat(rep, g.shape[1]), g.reshape(-1))
        return rep

    def _combine(self, parts: list[tuple[ChannelInfo, tuple[int, ...]]],
                 out_shape: tuple[int, ...]) -> ChannelInfo | None:
        """Elementwise union of operands (info, shape) broadcast to ``out_shape``."""
        nd = len(out_shape)
        mapped: list[tuple[dict[int, int], ChannelInfo]] = []
        out_axes: set[int] = set()
        for ci, shp in parts:
            off = nd - len(shp)
            keep: dict[int, int] = {}
            for k, a in enumerate(ci.axes):
                oa = a + off
                if shp[a] == 1 and out_shape[oa] != 1:
                    continue  # broadcast size-1 channel axis: a per-sample scalar ties nothing
                keep[oa] = k
            if keep:
                mapped.append((keep, ci))
                out_axes.update(keep)
        if not mapped:
            return None
        axes = tuple(sorted(out_axes))
        gshape = tuple(out_shape[a] for a in axes)
        grids = []
        for keep, ci in mapped:
            g = ci.atoms
            drop = [k for k in range(len(ci.axes)) if k not in keep.values()]
            if drop:
                g = g[tuple(0 if k in drop else slice(None) for k in range(g.ndim))]
            kept_axes = [oa for oa in sorted(keep, key=lambda oa: keep[oa])]
            order = np.argsort(kept_axes)
            g = np.transpose(g, order)
            sorted_axes = sorted(kept_axes)
            view = [g.shape[sorted_axes.index(a)] if a in sorted_axes else 1 for a in axes]
            grids.append(np.broadcast_to(g.reshape(view), gshape))
        if len(grids) == 1:
            return ChannelInfo(axes, np.array(grids[0], dtype=np.int64))
        st = np.stack([np.asarray(g).reshape(-1) for g in grids])
        valid = st >= 0
        has = valid.any(0)
        first = valid.argmax(0)
        rep = np.where(has, st[first, np.arange(st.shape[1])], -1)
        for row in st:
            self._uf.union(row, rep)
        return ChannelInfo(axes, rep.reshape(gshape))

    # ------------------------------------------------------------------ the walk
    def _run(self) -> None:
        for node in self.graph.nodes:
            ins = [self._infos.get(t.id) for t in node.inputs]
            if not any(ci is not None for ci in ins):
                if node.name in CONV_OPS or node.name in LINEAR_OPS or node.name in (
                        "multi_head_attention_forward", "embedding"):
                    self._layer_op(node, ins)  # layers on a model input or constant still make atoms
                continue
            try:
                self._visit(node, ins)
            except _Unknown as e:
                self._stop([ci.atoms for ci in ins if ci is not None], node, str(e))

    def _visit(self, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        name = node.name
        if name in CONV_OPS or name in LINEAR_OPS or name in ("multi_head_attention_forward", "embedding"):
            self._layer_op(node, ins)
        elif name in _NORM_OPS:
            self._norm(node, ins)
        elif name in _REDUCE and len(node.inputs) == 1:
            self._reduce(node, ins)
        elif name in _ELEMENTWISE:
            self._elementwise(node, ins)
        elif name in _PASS:
            self._pass(node, ins)
        elif name in _REDUCE:
            self._reduce(node, ins)
        elif name in ("cat", "concat", "concatenate", "stack") and self._cat_nonchannel(node, ins):
            pass
        elif name in _EXEC:
            self._exec(node, ins)
        elif name in _MATMUL:
            self._matmul(node, ins)
        elif name == "scaled_dot_product_attention":
            self._sdpa(node, ins)
        elif name == "einsum":
            self._einsum(node, ins)
        else:
            raise _Unknown(f"op '{name}' has no known channel semantics")

    # -- layers
    def _layer_op(self, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        name = node.name
        x = node.inputs[0] if node.inputs else None
        cin = ins[0] if ins else None
        if name in CONV_OPS:
            w = _arg(node, 1, "weight")
            if not isinstance(w, TensorInfo) or x is None:
                raise _Unknown(f"'{name}' without a weight tensor")
            groups = _arg(node, 6, "groups", 1)  # conv*d and conv_transpose*d both have it 7th
            groups = int(groups) if isinstance(groups, int) else 1
            transposed = name in _TRANSPOSED
            out_ch = w.shape[1] * groups if transposed else w.shape[0]
            ax = 1 if x.ndim == w.ndim else 0
            in_ch = x.shape[ax]
            owner = self._weight_owner(w, node)
            li = self._new_layer(owner, "conv_transpose" if transposed else "conv", node, out_ch)
            li.in_channels, li.groups = in_ch, groups
            rep = self._reps(cin, x.ndim, ax, in_ch)
            self._record_input(li, rep, x.id, node)
            atoms = self.layer_atoms(owner)
            if groups > 1 and groups == in_ch and out_ch % in_ch == 0:
                li.depthwise = True
                self._uf.union(atoms, rep[np.arange(out_ch) // (out_ch // in_ch)])
            for o in node.outputs[:1]:
                self._set(o, ChannelInfo((ax,), atoms.copy()))
        elif name == "linear":
            w = _arg(node, 1, "weight")
            if not isinstance(w, TensorInfo) or x is None:
                raise _Unknown("'linear' without a weight tensor")
            owner = self._weight_owner(w, node)
            li = self._new_layer(owner, "linear", node, w.shape[0] if w.ndim == 2 else 1)
            li.in_channels = x.shape[-1] if x.ndim else 1
            self._record_input(li, self._reps(cin, x.ndim, x.ndim - 1, li.in_channels), x.id, node)
            for o in node.outputs[:1]:
                if o.ndim:
                    self._set(o, ChannelInfo((o.ndim - 1,), self.layer_atoms(owner)))
        elif name == "embedding":
            w = _arg(node, 1, "weight")
            if not isinstance(w, TensorInfo):
                raise _Unknown("'embedding' without a weight tensor")
            owner = self._weight_owner(w, node)
            self._new_layer(owner, "embedding", node, w.shape[1])
            for o in node.outputs[:1]:
                self._set(o, ChannelInfo((o.ndim - 1,), self.layer_atoms(owner)))
        else:  # multi_head_attention_forward(query, key, value, embed_dim, num_heads, in_proj_weight, ...)
            params = [t for t in node.inputs if t.kind == "param"]
            if not params:
                raise _Unknown("attention without parameters")
            owner = self._weight_owner(params[0], node)
            q = node.inputs[0]
            e = q.shape[-1]
            out = node.outputs[0]
            li = self._new_layer(owner, "attention", node, out.shape[-1])
            li.in_channels = e
            reps = []
            for k in range(min(3, len(node.inputs))):
                t = node.inputs[k]
                if t.kind == "param":
                    break
                reps.append(self._reps(ins[k], t.ndim, t.ndim - 1, t.shape[-1]))
            self._record_input(li, reps[0] if reps else np.full(e, -1, np.int64), q.id, node)
            atoms = self.layer_atoms(owner)
            if reps and len(reps[0]) == len(atoms):  # nn.MultiheadAttention: one embed_dim in and out
                self._uf.union(atoms, reps[0])
            self._set(out, ChannelInfo((out.ndim - 1,), atoms))

    def _norm(self, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        x = node.inputs[0]
        out = node.outputs[0]
        self._set(out, ins[0])
        params = [t for t in node.inputs[1:] if t.kind in ("param", "buffer")]
        if params and ins[0] is not None:
            owner = self.graph.param_owner(params[0]) or ""
            ax = _NORM_OPS[node.name]
            ax = x.ndim - 1 if ax < 0 else (1 if x.ndim > 1 else 0)
            rep = self._reps(ins[0], x.ndim, ax, x.shape[ax])
            self.followers.setdefault(owner, []).append(rep)
            mod = self.graph.modules.get(owner)
            self.follower_types[owner] = type(mod).__name__ if mod is not None else ""

    def _elementwise(self, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        out = node.outputs[0] if node.outputs else None
        if out is None:
            return
        parts = [(ci, t.shape) for ci, t in zip(ins, node.inputs) if ci is not None and t.ndim <= out.ndim]
        res = self._combine(parts, out.shape)
        for o in node.outputs:
            if o.shape == out.shape:
                self._set(o, res)

    def _pass(self, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        if node.name in _FRESH:
            return  # a new tensor of the same shape carries no channels
        x, ci = node.inputs[0], ins[0]
        if ci is None:
            return
        for o in node.outputs:
            if o.ndim == x.ndim and all(o.shape[a] == x.shape[a] for a in ci.axes):
                self._set(o, ci)
            elif o.ndim == x.ndim and o.dtype in (torch.int64,):  # pooling indices
                continue
            else:
                raise _Unknown(f"'{node.name}' changes the size of a channel axis")

    def _reduce(self, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        x, ci = node.inputs[0], ins[0]
        if ci is None:
            return
        dims = _arg(node, 1, "dim", None)
        if isinstance(dims, TensorInfo):  # max(a, b) is elementwise
            self._elementwise(node, ins)
            return
        keep = bool(_arg(node, 2, "keepdim", False))
        if dims is None:
            dims_t = tuple(range(x.ndim))
        elif isinstance(dims, int):
            dims_t = (dims,)
        else:
            dims_t = tuple(dims)
        red = {_norm_axis(int(d), x.ndim) for d in dims_t}
        g = ci.atoms
        axes = list(ci.axes)
        for a in sorted(red & set(ci.axes), reverse=True):
            k = axes.index(a)
            gm = np.moveaxis(g, k, -1)
            # positions left on the other channel axes now depend on all reduced atoms: tie them
            flat = gm.reshape(-1, gm.shape[-1])
            rep = self._first_valid(flat)
            if gm.ndim > 1:
                self._uf.union(np.repeat(rep, flat.shape[1]), flat.reshape(-1))
            g = rep.reshape(gm.shape[:-1])
            axes.pop(k)
        new_axes = []
        for a in axes:
            new_axes.append(a if keep else a - sum(1 for r in red if r < a))
        res = ChannelInfo(tuple(new_axes), g) if new_axes else None
        for o in node.outputs:
            if o.dtype.is_floating_point or o is node.outputs[0]:
                self._set(o, res)

    @staticmethod
    def _first_valid(flat: np.ndarray) -> np.ndarray:
        valid = flat >= 0
        has = valid.any(1)
        idx = valid.argmax(1)
        rep = np.full(flat.shape[0], -1, np.int64)
        rep[has] = flat[has, idx[has]]
        return rep

    def _cat_nonchannel(self, node: OpNode, ins: list[ChannelInfo | None]) -> bool:
        """``cat``/``stack`` along an axis that carries no channels ties the inputs; True if handled."""
        out = node.outputs[0]
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(dim, int):
            return False
        stack = node.name == "stack"
        nd_in = out.ndim - 1 if stack else out.ndim
        d = _norm_axis(dim, out.ndim if stack else nd_in)
        parts = [(ci, t.shape) for ci, t in zip(ins, node.inputs) if ci is not None]
        if any(t.ndim != nd_in for ci, t in zip(ins, node.inputs) if ci is not None):
            return False
        if not stack and any(d in ci.axes for ci, _ in parts):
            return False
        if stack:
            parts = [(ChannelInfo(tuple(a + (a >= d) for a in ci.axes), ci.atoms),
                      shp[:d] + (1,) + shp[d:]) for ci, shp in parts]
            ref = out.shape
        else:
            ref = out.shape[:d] + (1,) + out.shape[d + 1:]
            parts = [(ci, shp[:d] + (1,) + shp[d + 1:]) for ci, shp in parts]
        res = self._combine(parts, ref)
        self._set(out, res)
        return True

    def _matmul(self, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        if len(node.inputs) != 2:
            raise _Unknown(f"'{node.name}' with {len(node.inputs)} tensor inputs")
        a, b = node.inputs
        ca, cb = ins
        if node.name == "__rmatmul__":
            a, b, ca, cb = b, a, cb, ca
        out = node.outputs[0]
        if a.ndim < 2 or b.ndim < 2:
            raise _Unknown(f"'{node.name}' on a 1-D operand")
        ra = self._reps(ca, a.ndim, a.ndim - 1, a.shape[-1])
        rb = self._reps(cb, b.ndim, b.ndim - 2, b.shape[-2])
        self._uf.union(ra, rb)  # the contracted index: pruning it needs both operands
        parts = []
        if ca is not None:
            red = self._drop_axis(ca, a.ndim - 1)
            if red is not None:
                parts.append((red, a.shape[:-1] + (1,)))
        if cb is not None:
            red = self._drop_axis(cb, b.ndim - 2)
            if red is not None:
                parts.append((red, b.shape[:-2] + (1, b.shape[-1])))
        res = self._combine(parts, out.shape) if parts else None
        if b.kind == "param" or a.kind == "param":  # x @ W: W's owner is a layer making new channels
            w = b if b.kind == "param" else a
            owner = self._weight_owner(w, node)
            axis = out.ndim - 1 if w is b else out.ndim - 2
            self._new_layer(owner, "matmul", node, out.shape[axis])
            res = ChannelInfo((axis,), self.layer_atoms(owner))
        self._set(out, res)

    def _einsum(self, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        eq = node.args[0] if node.args and isinstance(node.args[0], str) else None
        if eq is None or "..." in eq or "->" not in eq:
            raise _Unknown("'einsum' without an explicit equation")
        lhs, rhs = eq.replace(" ", "").split("->")
        terms = lhs.split(",")
        out = node.outputs[0]
        if len(terms) != len(node.inputs) or any(len(t) != len(set(t)) for t in terms) or len(rhs) != out.ndim:
            raise _Unknown(f"'einsum' equation {eq!r} not supported")
        reps: dict[str, list[np.ndarray]] = {}
        for term, t, ci in zip(terms, node.inputs, ins):
            for a, letter in enumerate(term):
                if letter not in rhs:
                    reps.setdefault(letter, []).append(self._reps(ci, t.ndim, a, t.shape[a]))
        for rs in reps.values():
            for r in rs[1:]:
                self._uf.union(rs[0], r)  # a contracted index: pruning it needs every operand
        parts = []
        for term, ci in zip(terms, ins):
            if ci is None:
                continue
            red: ChannelInfo | None = ci
            for a in sorted((a for a, letter in enumerate(term) if letter not in rhs), reverse=True):
                red = self._drop_axis(red, a) if red is not None else None
            if red is None:
                continue
            keep = [a for a, letter in enumerate(term) if letter in rhs]
            # after dropping, grid axes are the kept ones; renumber to output positions
            pos = {a: rhs.index(term[a]) for a in keep}
            red = _renumber(ChannelInfo(red.axes, red.atoms), {a: pos[a] for a in red.axes})
            shp = tuple(out.shape[j] if any(pos[a] == j for a in keep) else 1 for j in range(out.ndim))
            parts.append((red, shp))
        self._set(out, self._combine(parts, out.shape) if parts else None)

    def _drop_axis(self, ci: ChannelInfo, axis: int) -> ChannelInfo | None:
        """Grid with ``axis`` replaced by size 1 (its atoms already consumed/tied)."""
        if axis not in ci.axes:
            return ci
        k = ci.axes.index(axis)
        if len(ci.axes) == 1:
            return None
        g = np.take(ci.atoms, [0], axis=k)
        axes = ci.axes[:k] + ci.axes[k + 1:]
        return ChannelInfo(axes, np.squeeze(g, axis=k))

    def _sdpa(self, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        q, k, v = node.inputs[:3]
        cq, ck, cv = ins[:3]
        rq = self._reps(cq, q.ndim, q.ndim - 1, q.shape[-1])
        rk = self._reps(ck, k.ndim, k.ndim - 1, k.shape[-1])
        self._uf.union(rq, rk)
        parts = []
        for ci, t in ((cq, q), (ck, k), (cv, v)):
            if ci is None:
                continue
            red = self._drop_axis(ci, t.ndim - 1) if t is not v else ci
            red = self._drop_axis(red, t.ndim - 2) if red is not None and t is not q else red
            if red is not None:
                parts.append((red, t.shape[:-2] + ((t.shape[-2] if t is q else 1), (t.shape[-1] if t is v else 1))))
        out = node.outputs[0]
        self._set(out, self._combine(parts, out.shape) if parts else None)

    # -- executed shape ops
    def _exec(self, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        outs = _fast_map(node, ins)
        if outs is None:
            outs = map_channels(node, ins)
        if outs is None:
            raise _Unknown(f"'{node.name}' could not be replayed on channel ids")
        name = node.name
        if name in _RESHAPE and ins[0] is not None and outs and outs[0] is not None:
            self._reshape_rule(node, ins[0], outs[0])
        elif name in _SPLIT and ins[0] is not None:
            self._split_rule(node, ins[0], outs)
        else:
            present = np.unique(np.concatenate([o.atoms.reshape(-1) for o in outs if o is not None])) \
                if any(o is not None for o in outs) else np.zeros(0, np.int64)
            for ci in ins:
                if ci is None:
                    continue
                lost = ~np.isin(ci.atoms, present) & (ci.atoms >= 0)
                if lost.any():
                    if any(not t.dtype.is_floating_point for t in node.inputs):
                        raise _Unknown(f"'{name}' indexes channels with a tensor of indices")
                    # fine if every dropped channel is tied to a kept one (a whole group of a group split)
                    self._cond_pins.append((ci.atoms[lost], present[present >= 0], ci.atoms.copy(), _Note(
                        "pin", node.name, node.module, node.index,
                        f"'{name}' keeps or overwrites a fixed subset of the {ci.atoms.size} channels")))
        targets = node.outputs
        for o, ci in zip(targets, outs):
            self._set(o, ci)

    def _reshape_rule(self, node: OpNode, ci: ChannelInfo, co: ChannelInfo) -> None:
        sizes = _explicit_sizes(node)
        gi, go = ci.atoms, co.atoms
        if len(ci.axes) == 1 and len(co.axes) >= 2 and go.size == gi.size and np.array_equal(go.reshape(-1), gi):
            inner = go.shape[-1]
            g2 = go.reshape(-1, inner)
            self._uf.union(np.tile(g2[0], g2.shape[0]), g2.reshape(-1))  # same in-group index in every group
            return
        if len(co.axes) == 1 and len(ci.axes) >= 2 and go.size == gi.size and np.array_equal(go, gi.reshape(-1)):
            return  # merge of a group split: follows the pruned count
        if sizes is None:
            return
        for a in co.axes:
            if a < len(sizes) and sizes[a] is not None and sizes[a] != -1:
                self._pin(gi, node, f"'{node.name}' writes the size {sizes[a]} of a channel-carrying axis "
                          f"(axis {a} of {list(node.outputs[0].shape)})")
                return

    def _split_rule(self, node: OpNode, ci: ChannelInfo, outs: list[ChannelInfo | None]) -> None:
        x = node.inputs[0]
        dim = _arg(node, 2 if node.name != "unbind" else 1, "dim", 0)
        if not isinstance(dim, int):
            return
        d = _norm_axis(dim, x.ndim)
        if d not in ci.axes:
            return
        size_arg = _arg(node, 1, "split_size_or_sections" if node.name != "chunk" else "chunks", None)
        if node.name == "split" and size_arg is None:
            size_arg = node.kwargs.get("split_size")
        sizes = [o.shape[d] for o in node.outputs] if node.name != "unbind" else []
        equal = len(set(sizes)) == 1 and len(sizes) > 1
        computed = node.name in ("chunk", "unsafe_chunk") or (node.name in ("split", "unsafe_split")
                                                               and isinstance(size_arg, int))
        if equal and computed:
            reps = [self._reps(o, x.ndim, d, sz) for o, sz in zip(outs, sizes)]
            for r in reps[1:]:
                self._uf.union(reps[0], r)  # chunk re-splits at C'/n: prune the same position in every piece
        else:
            self._pin(ci.atoms, node, f"'{node.name}' cuts the channel axis at fixed sizes {sizes or 1}")

    def _finish(self) -> None:
        n = self._natoms
        self._layer_list = list(self.layers.values())
        self.atom_layer = np.zeros(n, np.int64)
        self.atom_channel = np.zeros(n, np.int64)
        for i, li in enumerate(self._layer_list):
            self.atom_layer[li.atom_start:li.atom_start + li.out_channels] = i
            self.atom_channel[li.atom_start:li.atom_start + li.out_channels] = np.arange(li.out_channels)
        self.root = self._uf.solve(n)
        self.class_notes: dict[int, list[str]] = {}
        for lost, kept, allatoms, note in self._cond_pins:
            if not np.isin(self.root[lost], self.root[kept]).all():
                self._pins.append((allatoms.reshape(-1), note))
        notes: dict[int, dict[str, None]] = {}
        for atoms, note in self._pins + self._stop_notes:
            atoms = atoms[atoms >= 0]
            d = note.describe()
            for c in np.unique(self.root[atoms]).tolist():
                notes.setdefault(c, {})[d] = None
        self.class_notes = {c: list(v) for c, v in notes.items()}
        self.unsafe: dict[str, list[str]] = {}
        if notes:
            for li in self._layer_list:
                reasons: dict[str, None] = {}
                for c in np.unique(self.layer_classes(li.name)).tolist():
                    if c in notes:
                        reasons.update(notes[c])
                if reasons:
                    self.unsafe[li.name] = list(reasons)
        if self._stop_notes:
            stopped_layers: dict[str, list[str]] = {}
            for atoms, note in self._stop_notes:
                atoms = atoms[atoms >= 0]
                cls = set(np.unique(self.root[atoms]).tolist())
                lay = [li.name for li in self._layer_list if cls & set(self.layer_classes(li.name).tolist())]
                stopped_layers[note.describe()] = lay
            msg = "; ".join(f"{k}: layers made unsafe: {', '.join(v) if v else 'none'}"
                            for k, v in stopped_layers.items())
            warnings.warn(f"prunescope topology: unknown channel semantics, analysis stopped at {msg}",
                          TopologyWarning, stacklevel=4)


class _Unknown(Exception):
    pass


def _arg(node: OpNode, pos: int, key: str, default: Any = None) -> Any:
    if key in node.kwargs:
        return node.kwargs[key]
    if len(node.args) > pos:
        return node.args[pos]
    return default


def _explicit_sizes(node: OpNode) -> list[int | None] | None:
    """Per output axis of a view/reshape/expand/unflatten, the size written in the call (``None``: derived)."""
    out = node.outputs[0]
    if node.name in ("view", "reshape", "expand"):
        rest = [a for a in node.args[1:]]
        if "shape" in node.kwargs:
            rest = [node.kwargs["shape"]]
        if "size" in node.kwargs:
            rest = [node.kwargs["size"]]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
            rest = list(rest[0])
        if not all(isinstance(r, int) for r in rest) or len(rest) != out.ndim:
            return None
        return [int(r) for r in rest]
    if node.name == "unflatten":
        dim = _arg(node, 1, "dim")
        sizes = _arg(node, 2, "sizes")
        if not isinstance(dim, int) or not isinstance(sizes, (tuple, list, torch.Size)):
            return None
        d = _norm_axis(dim, node.inputs[0].ndim)
        res: list[int | None] = [None] * out.ndim
        for k, s in enumerate(sizes):
            res[d + k] = int(s)
        return res
    return None


def _renumber(ci: ChannelInfo, mapping: dict[int, int]) -> ChannelInfo:
    """Move grid axes to new tensor axes (``mapping``: old axis -> new axis), keeping the atoms."""
    new = [mapping[a] for a in ci.axes]
    order = np.argsort(new)
    return ChannelInfo(tuple(sorted(new)), np.transpose(ci.atoms, order) if len(new) > 1 else ci.atoms)


def _fast_map(node: OpNode, ins: Sequence[ChannelInfo | None]) -> list[ChannelInfo | None] | None:
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
            dims = [_norm_axis(int(d), nd) for d in dims]
            return [_renumber(ci, {d: k for k, d in enumerate(dims)})]
        if name in ("transpose", "swapaxes", "swapdims"):
            d0 = _norm_axis(int(_arg(node, 1, "dim0")), nd)
            d1 = _norm_axis(int(_arg(node, 2, "dim1")), nd)
            m = {a: a for a in range(nd)}
            m[d0], m[d1] = d1, d0
            return [_renumber(ci, m)]
        if name in ("t", "T", "mT") and nd >= 2:
            m = {a: a for a in range(nd)}
            m[nd - 1], m[nd - 2] = nd - 2, nd - 1
            return [_renumber(ci, m)]
        if name in ("roll", "flip", "pad", "constant_pad_nd", "contiguous") or (
                name == "expand" and ond == nd):
            if ond != nd or any(out.shape[a] != x.shape[a] for a in ci.axes):
                return None
            if name == "roll":
                dims = _arg(node, 2, "dims")
                dims = [dims] if isinstance(dims, int) else list(dims or [])
                if not dims or any(_norm_axis(d, nd) in ci.axes for d in dims):
                    return None
            if name == "flip":
                dims = _arg(node, 1, "dims")
                dims = [dims] if isinstance(dims, int) else list(dims or [])
                if any(_norm_axis(d, nd) in ci.axes for d in dims):
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
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(dim, int) or len(node.outputs) != 1:
        return None
    d = _norm_axis(dim, out.ndim)
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
    dim = _arg(node, 2, "dim", 0)
    if not isinstance(dim, int):
        return None
    d = _norm_axis(dim, x.ndim)
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
    return [_renumber(ci, m)]


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


_CACHE: WeakKeyDictionary[ModelGraph, ChannelAtoms] = WeakKeyDictionary()


def channel_atoms(graph: ModelGraph) -> ChannelAtoms:
    """The :class:`ChannelAtoms` of a graph (computed once per graph and cached while the graph lives).

    >>> import torch
    >>> from prunescope.graph import trace
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    >>> ca = channel_atoms(trace(net, torch.ones(1, 3, 2, 2)))
    >>> [ca.atom_name(int(a))[1] for a in ca.layers['2'].inputs[0]]  # fc input j <- conv channel j // 4
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    """
    ca = _CACHE.get(graph)
    if ca is None:
        ca = ChannelAtoms(graph)
        _CACHE[graph] = ca
    return ca


def sets_from_classes(names: list[str], classes: dict[str, np.ndarray]) -> list[list[str]]:
    """Group names that share a class id; ordered by first member, members in ``names`` order."""
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[int, int] = {}
    for i, n in enumerate(names):
        for c in np.unique(classes[n]):
            if c < 0:
                continue
            j = first.setdefault(int(c), i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[str]] = {}
    for i, n in enumerate(names):
        groups.setdefault(find(i), []).append(n)
    return list(groups.values())


def _gcd_list(v: Iterable[int]) -> int:
    g = 0
    for x in v:
        g = math.gcd(g, x)
    return g
