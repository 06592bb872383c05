"""The channel engine: which layer output channels flow into every recorded tensor.

This is the core that every topology analysis (and mask-conflict fixing, effective FLOPs) reads. It walks a
:class:`~prunescope.graph.ModelGraph` once, in execution order, and gives every tensor value a
:class:`ChannelInfo`: the tensor axes that carry channels and, for every position on those axes, the
*atom* that lives there. An atom is one output channel of one layer, ``(layer_name, channel_index)``; a
layer is the owner of the weight parameter that a channel-mixing op consumes (``conv2d``, ``linear``,
``multi_head_attention_forward``, ``embedding``, ``lstm``/``gru``/``rnn_*`` (one atom per hidden unit, shared by
all layers and directions of the module), a ``matmul`` with a parameter), so ``F.conv2d(x, self.weight)`` and
a module called twice are handled like any ``nn.Conv2d``.

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

Layout: this module is the engine (the walk, the union-find, the queries and the builder methods that the
op rules call); :mod:`.rules` holds the per-op-family rules and the table :data:`~.rules.RULES` that maps an
op name to its rule, :mod:`.contract` the rules of contractions and attention (heads, GQA, masks);
:mod:`.replay` replays shape ops on channel ids; :mod:`.base` holds the data types; :mod:`.heads` reads
the head-level view (:class:`~prunescope.topology.heads.HeadDependency`) off a finished engine.

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

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence
from weakref import WeakKeyDictionary

import numpy as np

from ..graph import ModelGraph, OpNode, TensorInfo
from ..ops import LAYER_OPS
from .base import ChannelInfo, LayerInfo, TopologyWarning, UnknownOp, norm_axis
from .rules import RULES, layer_op
from .values import ZERO, value_states

__all__ = ["ChannelAtoms", "channel_atoms", "sets_from_classes", "UnionFind", "weight_owner"]


class UnionFind:
    """Deferred union-find: edges are collected as arrays and solved vectorised, incrementally on demand.

    ``solve(n)`` resumes from the previous solution and only processes the edges added since, so a rule that
    needs the classes found so far (a contraction asking whether a head is one unit) costs little.

    >>> uf = UnionFind()
    >>> uf.union(np.array([0, 3]), np.array([2, 4]))
    >>> uf.solve(5).tolist()
    [0, 1, 0, 3, 3]
    """

    def __init__(self) -> None:
        self.a: list[np.ndarray] = []
        self.b: list[np.ndarray] = []
        self._parent = np.zeros(0, np.int64)
        self._done = 0

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.int64).reshape(-1)
        b = np.asarray(b, dtype=np.int64).reshape(-1)
        m = (a >= 0) & (b >= 0) & (a != b)
        if m.any():
            self.a.append(a[m])
            self.b.append(b[m])

    def solve(self, n: int) -> np.ndarray:
        """Root (smallest member) of every element ``0 .. n-1`` (a new array)."""
        parent = self._parent
        if len(parent) < n:
            parent = np.concatenate([parent, np.arange(len(parent), n, dtype=np.int64)])
        if self._done < len(self.a) and n:
            a = np.concatenate(self.a[self._done:])
            b = np.concatenate(self.b[self._done:])
            while True:  # hook roots to the smaller root, then jump pointers to the roots (Shiloach-Vishkin)
                pa, pb = parent[a], parent[b]
                diff = pa != pb
                if not diff.any():
                    break
                pa, pb = pa[diff], pb[diff]
                lo, hi = np.minimum(pa, pb), np.maximum(pa, pb)
                np.minimum.at(parent, hi, lo)
                while True:
                    pp = parent[parent]
                    if np.array_equal(pp, parent):
                        break
                    parent = pp
            self._done = len(self.a)
        self._parent = parent
        return parent.copy()


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
        self._uf = UnionFind()
        self._natoms = 0
        self._owner: list[int] = []  # per layer block: (layer index) expanded lazily
        self._pins: list[tuple[np.ndarray, _Note]] = []
        self._cond_pins: list[tuple[np.ndarray, np.ndarray, np.ndarray, _Note]] = []
        self._axis_pins: list[tuple[np.ndarray, tuple[int, ...], _Note]] = []
        self._inputs_only: dict[int, bool] = {}
        self.stopped_ops: list[str] = []
        self._stop_notes: list[tuple[np.ndarray, _Note]] = []
        # work a rule registers to run once the walk is done, before classes are solved (topology/moe.py)
        self.finishers: list[Callable[[ChannelAtoms], None]] = []
        # atoms pinned for what their values select, not for a size (topk routing): no physical probe clears them
        self.value_pins: list[np.ndarray] = []
        # sums/p-norms over a channel axis: neutral where the channels are exactly zero when removed (_finish)
        self.neutral_checks: list[tuple[OpNode, TensorInfo, np.ndarray, str]] = []
        # reductions / softmax over some axes of a multi-axis channel grid, judged once the classes are known
        # (:meth:`value_pin_unless_fibers`): (node, atoms, reduced grid axes, text, neutral on zero)
        self._fiber_checks: list[tuple[OpNode, np.ndarray, tuple[int, ...], str, bool]] = []
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

    # ------------------------------------------------------------------ builder methods (used by the rules)
    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie atoms ``a[i]`` and ``b[i]`` (entries ``-1`` tie nothing)."""
        self._uf.union(a, b)

    def pin_unless_tied(self, lost: np.ndarray, kept: np.ndarray, grid: np.ndarray, node: OpNode,
                        text: str) -> None:
        """Pin ``grid`` unless, once all ties are known, every atom in ``lost`` is tied to one in ``kept``."""
        self._cond_pins.append((lost, kept, grid.copy(), _Note("pin", node.name, node.module, node.index, text)))

    def pin_axes(self, grid: np.ndarray, axes: Sequence[int], node: OpNode, text: str) -> None:
        """Pin every class whose removal would change the size of grid axis ``k`` for ``k`` in ``axes``.

        Used where a size is fixed (written in the code, or an operand of full size that cannot follow): a
        class changes the size of axis ``k`` when it holds a whole slice of the grid across ``k`` (for a
        one-axis grid: any position). Decided once all ties are known, so a head whose channels are one unit
        pins nothing on a fixed head_dim axis.
        """
        if grid.size and axes:
            self._axis_pins.append((grid.copy(), tuple(axes),
                                    _Note("pin", node.name, node.module, node.index, text)))

    def value_pin_unless_fibers(self, grid: np.ndarray, axes: Sequence[int], node: OpNode, text: str,
                                neutral: bool) -> None:
        """A softmax or reduction over grid axes ``axes`` of a grid with other channel axes (SK-ResNet's softmax
        over the paths axis of ``(N, paths, C, 1, 1)``): each *fiber* (the positions that differ only along
        ``axes``) is normalised or reduced among itself. When, once all ties are known, every fiber lies in one
        class, removing a class removes whole fibers and the kept fibers compute what they computed: nothing is
        pinned. Otherwise a removal changes the value of kept positions: a value pin (or, for a sum or p-norm,
        the neutral-on-zero check of :meth:`_neutral_reductions`), as for a reduction over a one-axis grid."""
        self._fiber_checks.append((node, grid.copy(), tuple(axes), text, neutral))

    def _fiber_pins(self) -> None:
        for node, grid, axes, text, neutral in self._fiber_checks:
            cls = self.classes_now(grid)
            rest = [k for k in range(cls.ndim) if k not in axes]
            fib = np.transpose(cls, rest + list(axes)).reshape(-1, int(np.prod([cls.shape[k] for k in axes])))
            if (fib >= 0).all() and (fib == fib[:, :1]).all():
                continue
            if neutral:
                self.neutral_checks.append((node, node.inputs[0], grid, text))
            else:
                self.pin(grid, node, text)
                self.value_pins.append(grid.reshape(-1).copy())
        self._fiber_checks = []

    def from_inputs_only(self, t: TensorInfo) -> bool:
        """``t`` is computed from model inputs and constants only (no parameter, buffer or layer channel on
        the way): its sizes are those of the example input or written in the code, never a layer's width."""
        memo = self._inputs_only
        stack = [t]
        while stack:
            cur = stack[-1]
            if cur.id in memo:
                stack.pop()
                continue
            if cur.kind in ("param", "buffer") or cur.id in self._infos:
                memo[cur.id] = False
                stack.pop()
                continue
            prod = self.graph.producer(cur) if cur.kind == "op" else None
            if prod is None:
                memo[cur.id] = cur.kind in ("input", "const")
                stack.pop()
                continue
            todo = [x for x in prod.inputs if x.id not in memo]
            if todo:
                stack.extend(todo)
                continue
            memo[cur.id] = all(memo[x.id] for x in prod.inputs)
            stack.pop()
        return memo[t.id]

    def classes_now(self, atoms: np.ndarray) -> np.ndarray:
        """Class (representative atom) of each atom with the ties recorded so far (``-1`` stays ``-1``)."""
        root = self._uf.solve(self._natoms)
        a = np.asarray(atoms)
        return np.where(a >= 0, root[np.maximum(a, 0)], -1)

    def new_layer(self, name: str, kind: str, node: OpNode, out_ch: int) -> LayerInfo:
        li = self.layers.get(name)
        if li is None:
            mod = self.graph.modules.get(name)
            li = LayerInfo(name, kind, type(mod).__name__ if mod is not None else "", node.index, out_ch)
            li.atom_start = self._natoms
            self._natoms += out_ch
            self.layers[name] = li
        elif li.out_channels != out_ch:  # the same weight used with another output size: give up on it
            self.stop([self.layer_atoms(name)], node, f"layer '{name}' is used with {out_ch} and "
                       f"{li.out_channels} output channels")
        return li

    def weight_owner(self, t: TensorInfo, node: OpNode) -> str:
        return weight_owner(self.graph, t) or f"<{node.name}#{node.index}>"

    def record_input(self, li: LayerInfo, rep: np.ndarray, tid: int, node: OpNode) -> None:
        if li.inputs and len(li.inputs[0]) == len(rep):
            # a layer called again: its input column c reads channel c of every call's input
            self.union(li.inputs[0], rep)
        li.inputs.append(rep)
        li.input_ids.append(tid)
        li.nodes.append(node.index)

    def set_info(self, t: TensorInfo, ci: ChannelInfo | None) -> None:
        if ci is not None and ci.atoms.size and (ci.atoms >= 0).any():
            self._infos[t.id] = ci

    def stop(self, grids: Sequence[np.ndarray], node: OpNode, text: str) -> None:
        note = _Note("stop", node.name, node.module, node.index, text)
        atoms = np.concatenate([g.reshape(-1) for g in grids]) if grids else np.zeros(0, np.int64)
        self._stop_notes.append((atoms, note))
        self.stopped_ops.append(note.describe())

    def pin(self, grid: np.ndarray, node: OpNode, text: str) -> None:
        self._pins.append((grid.reshape(-1).copy(), _Note("pin", node.name, node.module, node.index, text)))

    def reps(self, ci: ChannelInfo | None, ndim: int, axis: int, size: int) -> np.ndarray:
        """Atom per position along ``axis`` (tying the atoms of one slice when the grid has other axes)."""
        axis = norm_axis(axis, ndim)
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
        self.union(np.repeat(rep, g.shape[1]), g.reshape(-1))
        return rep

    def combine(self, parts: list[tuple[ChannelInfo, tuple[int, ...]]],
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
            self.union(row, rep)
        return ChannelInfo(axes, rep.reshape(gshape))


    def _neutral_reductions(self) -> None:
        """Pin the channels of a sum/p-norm over a channel axis unless each is exactly zero there whenever it is
        removed (the value analysis of :mod:`.values` with every atom removed: a position's state depends only
        on its own class and on tensors without channels)."""
        if not self.neutral_checks:
            return
        vs = value_states(self, np.ones(self._natoms, bool))
        neutral = []
        for node, x, atoms, text in self.neutral_checks:
            st = vs.get(x)
            valid = atoms >= 0
            if st is not None and st.shape == atoms.shape and (st[valid] == ZERO).all():
                neutral.append((node, x, atoms, text))
                continue
            why = vs.explain.get(x.id)
            self.pin(atoms, node, text + (f" (a removed channel is not zero there: {why})" if why else ""))
            self.value_pins.append(atoms.reshape(-1).copy())
        self.neutral_checks = neutral  # the neutral ones (shrink's plan checks them again for its removal)

    # ------------------------------------------------------------------ the walk
    def _run(self) -> None:
        for node in self.graph.nodes:
            ins = [self._infos.get(t.id) for t in node.inputs]
            if not any(ci is not None for ci in ins):
                if node.name in LAYER_OPS:
                    layer_op(self, node, ins)  # layers on a model input or constant still make atoms
                continue
            rule = RULES.get(node.name)
            try:
                if rule is None:
                    raise UnknownOp(f"op '{node.name}' has no known channel semantics")
                rule(self, node, ins)
            except UnknownOp as e:
                self.stop([ci.atoms for ci in ins if ci is not None], node, str(e))

    def _finish(self) -> None:
        for fn in self.finishers:
            fn(self)
        self._fiber_pins()
        self._neutral_reductions()
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
        for grid, axes, note in self._axis_pins:
            cls = np.where(grid >= 0, self.root[np.maximum(grid, 0)], -1)
            hit: set[int] = set()
            for k in axes:
                sl = np.moveaxis(cls, k, 0).reshape(cls.shape[k], -1)
                whole = (sl == sl[:, :1]).all(1) & (sl[:, 0] >= 0)
                hit.update(sl[whole, 0].tolist())
            if hit:
                self._pins.append((np.array(sorted(hit), np.int64), note))
        notes: dict[int, dict[str, None]] = {}
        for atoms, note in self._pins + self._stop_notes:
            atoms = atoms[atoms >= 0]
            d = note.describe()
            for c in np.unique(self.root[atoms]).tolist():
                notes.setdefault(c, {})[d] = None
        self.class_notes = {c: list(v) for c, v in notes.items()}
        # classes that no physical try can clear: an op with unknown channel semantics, a value pin (a mean or a
        # softmax over channels, topk routing); the other pins are sizes, which shrink tries physically
        hard = [a for a, _ in self._stop_notes] + list(self.value_pins)
        hard = [a[a >= 0] for a in hard]
        self.hard_classes: set[int] = set(np.unique(self.root[np.concatenate(hard)]).tolist()) \
            if hard and any(a.size for a in hard) else set()
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


_CACHE: WeakKeyDictionary[ModelGraph, ChannelAtoms] = WeakKeyDictionary()


def weight_owner(graph: ModelGraph, t: TensorInfo) -> str | None:
    """The layer (module) a layer call's weight ``t`` belongs to: the owner of the stored parameter, also when the
    weight is computed from one (weight standardisation, ``w.t()``, ...: single-parameter ancestry is followed);
    None when no stored tensor of its size is found."""
    if t.kind in ("param", "buffer") and t.name:
        return graph.param_owner(t) or t.name
    seen = 0
    frontier = [t]
    while frontier and seen < 32:
        cur = frontier.pop()
        seen += 1
        if cur.kind in ("param", "buffer") and cur.name and cur.numel() == t.numel():
            return graph.param_owner(cur) or cur.name
        p = graph.producer(cur)
        if p is not None:
            frontier.extend(i for i in p.inputs if i.numel() == t.numel() or i.kind == "param")
    return None


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
