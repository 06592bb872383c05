"""What a removed channel *is* in the as-pruned model, tensor by tensor: exactly zero, a constant, or unknown.

In the as-pruned masked model (:func:`prunescope.narrow.as_pruned`) a removed channel is zero where its layer
writes it (filters masked, the layer's output zeroed) and after its normalisation (the norm's output zeroed).
On the way to its consumers it can stop being zero: ``sigmoid(0) = 0.5``, ``relu(x) + 1``, an unhooked
eval-mode BatchNorm. The physically narrowed model drops the channel, so every op that *loses* a removed
position (a layer reading it as an input column, a contraction, a reduction over the channel axis) must see
zero there, or a constant that can be folded into the layer's bias, or the channel has to stay.

:func:`value_states` answers this structurally from the recorded ops, for one set of removed atoms. For every
tensor that carries a removed channel it gives a grid (the tensor's channel grid, :class:`~.base.ChannelInfo`)
of states:

* ``LIVE`` (0): the position holds no removed atom;
* ``ZERO`` (1): exactly 0 in the as-pruned model;
* ``CONST`` (2): independent of the model input and the same along every non-channel axis (batch, space);
* ``UNKNOWN`` (3): anything else (depends on the input, or varies along a non-channel axis).

Transfer rules, op family by op family (the families are :mod:`.rules`'s tables): an elementwise unary op keeps
0 only if ``f(0) = 0`` (:data:`~.rules.ZERO_PRESERVING`), otherwise a zero or constant becomes a constant;
``0 * anything = 0``; a binary op of zeros/constants/literals/parameters is a constant (zero when it maps zeros
to zero); anything combined with a per-sample tensor is unknown; shape ops move states with their atoms (a pad
or a concatenation along a non-channel axis makes a constant unknown, and a zero too where an operand without
channels, a class token, fills rows of the removed channels); a contraction keeps zeros only.

``explain[tid]`` names the first op that made a position of the tensor non-zero (for the reason of a kept
channel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..graph import OpNode, TensorInfo
from ..ops import CONTRACTION_OPS as _CONTRACT
from ..ops import ELEMENTWISE as _ELEMENTWISE
from ..ops import FACTORY_LIKE as _FRESH
from ..ops import NEUTRAL_ON_ZERO, ZERO_ABSORBING, ZERO_PRESERVING, ZERO_PRESERVING_BINARY, arg
from ..ops import NORM_AXIS as _NORM_OPS
from ..ops import REDUCTIONS as _REDUCE
from ..ops import SHAPE_OPS as _EXEC
from ..ops import UNARY as _PASS
from .base import norm_axis

if TYPE_CHECKING:
    from .engine import ChannelAtoms

__all__ = ["LIVE", "ZERO", "CONST", "UNKNOWN", "ValueStates", "value_states", "hooked_outputs",
           "IncrementalStates"]

LIVE, ZERO, CONST, UNKNOWN = 0, 1, 2, 3
_NONUNIFORM = 4  # an operand code only: input-independent but varying along a non-channel axis
_CLAMPS = frozenset(("clamp", "clamp_", "clip", "clip_"))
_CAT = frozenset(("cat", "concat", "concatenate", "stack", "hstack", "vstack"))


class ValueStates:
    """The outcome of :func:`value_states`: ``states[tid]`` (int8 grid), ``explain[tid]`` (op description)."""

    def __init__(self) -> None:
        self.states: dict[int, np.ndarray] = {}
        self.explain: dict[int, str] = {}

    def get(self, t: TensorInfo) -> np.ndarray | None:
        return self.states.get(t.id)


def _describe(node: OpNode) -> str:
    return f"'{node.name}' in '{node.module}'" if node.module else f"'{node.name}' in the model's forward"


def hooked_outputs(ca: ChannelAtoms, atom_removed: np.ndarray) -> dict[int, np.ndarray]:
    """Tensor id -> bool grid of positions the as-pruned hooks zero (mirrors ``shrink.core.zero_points``: the
    output of a layer module with removed channels, the output of a norm module holding removed channels)."""
    return HookSites(ca)(atom_removed)


class HookSites:
    """:func:`hooked_outputs` with the removal-independent part (which layer / norm calls can be hooked, where
    their module's outputs are) found once, for many removal vectors."""

    def __init__(self, ca: ChannelAtoms) -> None:
        g = ca.graph
        self.layers: list[tuple[int, int, list[tuple[str, int]]]] = []  # (start, count, [(module, axis)])
        for li in ca.layers.values():
            cands = []
            for idx in li.nodes:
                node = g.nodes[idx]
                ci = ca.info(node.outputs[0]) if node.outputs else None
                if node.module in g.modules and ci is not None and len(ci.axes) == 1:
                    cands.append((node.module, ci.axes[0] - node.outputs[0].ndim))
            if cands:
                self.layers.append((li.atom_start, li.out_channels, cands))
        self.norms: list[tuple[str, int, np.ndarray]] = []  # (module, axis, atoms)
        for node in g.nodes:
            if node.name not in _NORM_OPS or not node.module:
                continue
            o = node.outputs[0]
            ci = ca.info(o)
            if ci is not None and len(ci.axes) == 1:
                self.norms.append((node.module, ci.axes[0] - o.ndim, ci.atoms))
        self.calls: list[tuple[str, TensorInfo, Any]] = []  # (module, output, its channels), in call order
        for call in g.calls:
            if call.outputs and call.outputs[0].ndim and ca.info(call.outputs[0]) is not None:
                self.calls.append((call.name, call.outputs[0], ca.info(call.outputs[0])))

    def __call__(self, atom_removed: np.ndarray) -> dict[int, np.ndarray]:
        points: dict[str, tuple[int, np.ndarray]] = {}
        for start, count, cands in self.layers:
            rem = atom_removed[start: start + count]
            if not rem.any():
                continue
            for module, axis in cands:
                if module not in points:
                    points[module] = (axis, ~rem)
        for module, axis, a in self.norms:
            keep = np.where(a >= 0, ~atom_removed[np.maximum(a, 0)], True)
            if not keep.all() and module not in points:
                points[module] = (axis, keep)
        out: dict[int, np.ndarray] = {}
        for module, o, ci in self.calls:
            pt = points.get(module)
            if pt is None:
                continue
            axis, keep = pt
            ax = axis + o.ndim
            if ax not in ci.axes or o.shape[ax] != keep.size:
                continue
            k = ci.axes.index(ax)
            shape = [1] * ci.atoms.ndim
            shape[k] = keep.size
            out[o.id] = np.broadcast_to(~keep.reshape(shape), ci.atoms.shape)
        return out


def _unary_keeps_zero(node: OpNode) -> bool:
    """Does this one-input op map 0 to exactly 0 (with its recorded arguments)?"""
    name = node.name
    if name in ("hardtanh", "hardtanh_", "clamp", "clamp_", "clip", "clip_"):
        lo = arg(node, 1, "min_val" if name.startswith("hardtanh") else "min", -1.0 if "hardtanh" in name else None)
        hi = arg(node, 2, "max_val" if name.startswith("hardtanh") else "max", 1.0 if "hardtanh" in name else None)
        ok = [v is None or isinstance(v, (int, float)) for v in (lo, hi)]
        return all(ok) and (lo is None or lo <= 0) and (hi is None or hi >= 0)
    if name in ("clamp_min", "clamp_max"):
        v = arg(node, 1, "min" if name == "clamp_min" else "max")
        return isinstance(v, (int, float)) and (v <= 0 if name == "clamp_min" else v >= 0)
    if name in ("threshold", "threshold_"):
        th, val = arg(node, 1, "threshold"), arg(node, 2, "value")
        return isinstance(th, (int, float)) and isinstance(val, (int, float)) and (val == 0 or 0 > th)
    return name in ZERO_PRESERVING


def _pool_keeps_const(node: OpNode) -> bool:
    """Average pooling with zero padding counted in (the default) is not uniform at the borders."""
    if not node.name.startswith("avg_pool"):
        return True
    pad = arg(node, 3, "padding", 0)
    include = arg(node, 5, "count_include_pad", True)
    pads = [pad] if isinstance(pad, int) else list(pad) if isinstance(pad, (tuple, list)) else [1]
    return not include or all(p == 0 for p in pads)


class _Walk:
    def __init__(self, ca: ChannelAtoms, atom_removed: np.ndarray, derived: set[int] | None,
                 hooks: HookSites | None = None) -> None:
        self.ca = ca
        self.ar = atom_removed
        self.derived = derived if derived is not None else _param_derived(ca)
        self.vs = ValueStates()
        self.hooked = (hooks or HookSites(ca))(atom_removed)
        self.root = ca.root if getattr(ca, "root", None) is not None else ca.classes_now(
            np.arange(len(atom_removed)))
        self.layer_nodes: dict[int, str] = {}
        for name, li in ca.layers.items():
            for idx in li.nodes:
                self.layer_nodes[idx] = name

    def removed(self, t: TensorInfo) -> np.ndarray | None:
        ci = self.ca.info(t)
        if ci is None:
            return None
        a = ci.atoms
        rem = np.where(a >= 0, self.ar[np.maximum(a, 0)], False)
        return rem if rem.any() else None

    def state(self, t: TensorInfo) -> np.ndarray | None:
        s = self.vs.states.get(t.id)
        if s is not None:
            return s
        rem = self.removed(t)
        if rem is None:
            return None
        return np.where(rem, UNKNOWN, LIVE).astype(np.int8)  # not derived by a rule: assume the worst

    def set(self, o: TensorInfo, grid: np.ndarray, rem: np.ndarray, node: OpNode) -> None:
        s = np.where(rem, np.maximum(grid, ZERO), LIVE).astype(np.int8)
        hz = self.hooked.get(o.id)
        if hz is not None:
            s = np.where(hz & rem, ZERO, s).astype(np.int8)
        self.vs.states[o.id] = s
        if (s >= CONST).any():
            why = None
            for t in node.inputs:
                prev = self.vs.states.get(t.id)
                if prev is not None and (prev >= CONST).any() and t.id in self.vs.explain:
                    why = self.vs.explain[t.id]
                    break
            self.vs.explain[o.id] = why or _describe(node)

    # -- the walk
    def run(self) -> ValueStates:
        g = self.ca.graph
        for node in g.nodes:
            self.visit(node)
        return self.vs

    def visit(self, node: OpNode) -> None:
        outs = [(o, self.removed(o)) for o in node.outputs]
        outs = [(o, r) for o, r in outs if r is not None]
        for o, rem in outs:
            self.set(o, self.transfer(node, o, rem), rem, node)

    def run_from(self, base: ValueStates, base_hooked: dict[int, np.ndarray], dirty_layers: set[int],
                 touches: list[tuple[frozenset[int], tuple[int, ...]]]) -> ValueStates:
        """The walk of :meth:`run`, re-run only where it can differ from ``base`` (the states of removal vector
        that differs from this one in the atoms of layers ``dirty_layers`` only): a node is visited again when a
        tensor it reads or writes holds an atom of those layers, an input's state changed, or an output's hook
        grid changed; the others keep their base states (see :class:`IncrementalStates`)."""
        g = self.ca.graph
        vs = self.vs
        vs.states = dict(base.states)
        vs.explain = dict(base.explain)
        changed: set[int] = set()
        for tid in set(base_hooked) | set(self.hooked):
            h0, h1 = base_hooked.get(tid), self.hooked.get(tid)
            if h0 is None or h1 is None or not np.array_equal(h0, h1):
                changed.add(tid)
        for node, (layers, tids) in zip(g.nodes, touches):
            if layers.isdisjoint(dirty_layers) and not any(t in changed for t in tids):
                continue
            before = [(o.id, vs.states.pop(o.id, None), vs.explain.pop(o.id, None)) for o in node.outputs]
            self.visit(node)
            for tid, s0, e0 in before:
                s1 = vs.states.get(tid)
                if (s0 is None) != (s1 is None) or (s0 is not None and not np.array_equal(s0, s1)) \
                        or e0 != vs.explain.get(tid):
                    changed.add(tid)
        return vs

    def transfer(self, node: OpNode, o: TensorInfo, rem: np.ndarray) -> np.ndarray:
        name = node.name
        full = np.full(rem.shape, UNKNOWN, np.int8)
        if node.index in self.layer_nodes:
            if o is node.outputs[0]:
                return np.full(rem.shape, CONST, np.int8)  # masked filter: its bias at most (zeroed if hooked)
            return full
        if name in _NORM_OPS:
            ci_o = self.ca.info(o)
            if node.module and ci_o is not None and len(ci_o.axes) == 1:
                # as-pruned semantics: a removed channel is zero after its normalisation (the hook of
                # zero_points; a LayerNorm over channels changes the kept ones anyway, by that convention)
                return np.full(rem.shape, ZERO, np.int8)
            x = self.state(node.inputs[0])
            if name in ("batch_norm", "instance_norm") and x is not None and x.shape == rem.shape \
                    and (x[rem] <= CONST).all():
                return np.full(rem.shape, CONST, np.int8)
            return full
        if name in _CONTRACT:
            return self.by_atom(node, o, product=True)
        if name in _REDUCE and not (len(node.inputs) > 1 and name in _ELEMENTWISE):
            return self.reduction(node, o, rem)
        if name in _PASS and name not in _FRESH:
            return self.passthrough(node, o, rem)
        if name in _CLAMPS and sum(isinstance(t, TensorInfo) for t in node.args) == 1:
            return self.passthrough(node, o, rem)
        if name in ("unfold", "fold"):
            res = self.by_atom(node, o)
            return np.where(res == CONST, UNKNOWN, res).astype(np.int8)
        if name in _ELEMENTWISE:
            return self.elementwise(node, o, rem)
        if name in _EXEC or name in _CAT:
            return self.shape(node, o, rem)
        return full

    def by_atom(self, node: OpNode, o: TensorInfo, product: bool = False) -> np.ndarray:
        """State of each output position from its atom: the worst state of the atom among the inputs' positions;
        for a product (``product=True``: a contraction) zero when some input is zero at every position of that
        atom (``0 * anything`` summed), unknown otherwise."""
        ci = self.ca.info(o)
        out_atoms = ci.atoms.reshape(-1)
        if product:  # by class: a head's q, k, v atoms are one unit, the output holds any of them
            out_atoms = np.where(out_atoms >= 0, self.root[np.maximum(out_atoms, 0)], -1)
        found = []
        for t in node.inputs:
            s = self.state(t)
            if s is None:
                continue
            a = self.ca.info(t).atoms.reshape(-1)
            m = a >= 0
            a, st = a[m], s.reshape(-1)[m]
            if product:
                a = self.root[a]
            order = np.lexsort((-st.astype(np.int64), a))
            a, st = a[order], st[order]
            first = np.r_[True, a[1:] != a[:-1]] if a.size else np.zeros(0, bool)
            ua, us = a[first], st[first]  # worst state per atom in this input
            if not ua.size:
                continue
            pos = np.minimum(np.searchsorted(ua, out_atoms), len(ua) - 1)
            found.append(np.where(ua[pos] == out_atoms, us[pos], -1))
        if not found:
            return np.full(ci.atoms.shape, UNKNOWN, np.int8)
        f = np.stack(found)
        present = f >= 0
        if product:
            res = np.where((f == ZERO).any(0), ZERO, UNKNOWN)
        else:
            res = np.where(present.any(0), np.where(present, f, 0).max(0), UNKNOWN)
        return res.astype(np.int8).reshape(ci.atoms.shape)

    def passthrough(self, node: OpNode, o: TensorInfo, rem: np.ndarray) -> np.ndarray:
        x = node.inputs[0]
        s = self.state(x)
        ci_x = self.ca.info(x)
        if s is None or ci_x is None or ci_x.atoms.shape != rem.shape:
            s = self.by_atom(node, o)
        if not _unary_keeps_zero(node):
            s = np.where(s == ZERO, CONST, s)
        if node.name.startswith(("avg_pool", "lp_pool")) and not _pool_keeps_const(node):
            s = np.where(s == CONST, UNKNOWN, s)
        if node.name == "local_response_norm":
            s = np.where(s == CONST, UNKNOWN, s)
        if node.name == "prelu" and len(node.inputs) > 1 and node.inputs[1].id not in self.derived:
            s = np.where(s == CONST, UNKNOWN, s)
        return s.astype(np.int8)

    def reduction(self, node: OpNode, o: TensorInfo, rem: np.ndarray) -> np.ndarray:
        x = node.inputs[0]
        ci = self.ca.info(x)
        s = self.state(x)
        if s is None or ci is None:
            return np.full(rem.shape, UNKNOWN, np.int8)
        dims = arg(node, 1, "dim", None)
        red = set(range(x.ndim)) if dims is None else {norm_axis(int(d), x.ndim) for d in (
            [dims] if isinstance(dims, int) else dims)}
        over = sorted(red & set(ci.axes), reverse=True)
        for a in over:
            s = s.max(axis=ci.axes.index(a))
        if over and node.name not in NEUTRAL_ON_ZERO:
            s = np.where(s >= ZERO, UNKNOWN, s)
        if node.name == "logsumexp":
            s = np.where(s == ZERO, CONST, s)
        if s.shape != rem.shape:
            return self.by_atom(node, o)
        return s.astype(np.int8)

    def operand_code(self, t: Any, o: TensorInfo, ci_o: Any) -> np.ndarray:
        """Operand state broadcastable to the output's reduced shape (channel axes full, others 1)."""
        nd = o.ndim
        if not isinstance(t, TensorInfo):
            return np.full([1] * nd, CONST, np.int8)  # a literal
        ci = self.ca.info(t)
        off = nd - t.ndim
        if ci is not None:
            s = self.state(t)
            grid = np.zeros(ci.atoms.shape, np.int8) if s is None else s
            shape = [1] * nd
            for k, a in enumerate(ci.axes):
                shape[a + off] = ci.atoms.shape[k]
            for a in ci.axes:  # a channel axis broadcast over the output: per-sample scalar
                if t.shape[a] == 1 and o.shape[a + off] != 1:
                    return np.full([1] * nd, LIVE, np.int8)
            return grid.reshape(shape)
        if t.id in self.derived or t.kind in ("param", "buffer", "const"):
            chan = set(ci_o.axes) if ci_o is not None else set()
            uniform = all(t.shape[a - off] == 1 for a in range(max(off, 0), nd) if a not in chan)
            return np.full([1] * nd, CONST if uniform else _NONUNIFORM, np.int8)
        return np.full([1] * nd, LIVE, np.int8)

    def elementwise(self, node: OpNode, o: TensorInfo, rem: np.ndarray) -> np.ndarray:
        ci_o = self.ca.info(o)
        name = node.name
        ops = list(node.args) + list(node.kwargs.values())
        ops = [v for v in ops if isinstance(v, (TensorInfo, int, float)) and not isinstance(v, bool)]
        if name in ("where", "masked_fill", "masked_fill_"):
            # where(cond, a, b) / masked_fill(x, mask, value): the condition/mask only chooses
            vals = [ops[1], ops[2]] if name == "where" and len(ops) >= 3 else [ops[0]] + ops[2:]
            sel = [ops[0]] if name == "where" else ops[1:2]
        else:
            vals, sel = ops, []
        tensor_like = [v for v in vals if isinstance(v, TensorInfo)]
        if not tensor_like or len(vals) > 4:
            return np.full(rem.shape, UNKNOWN, np.int8)
        shape = [o.shape[a] if ci_o is not None and a in ci_o.axes else 1 for a in range(o.ndim)]
        codes = [np.broadcast_to(self.operand_code(v, o, ci_o), shape) for v in vals]
        scodes = [np.broadcast_to(self.operand_code(v, o, ci_o), shape) for v in sel]
        st = np.stack(codes)
        zero_lit = [isinstance(v, (int, float)) and v == 0 for v in vals]
        is_zero = (st == ZERO) | np.array(zero_lit).reshape((-1,) + (1,) * len(shape))
        all_const = ((st == ZERO) | (st == CONST)).all(0)
        if scodes:
            all_const &= np.stack([(c == ZERO) | (c == CONST) for c in scodes]).all(0)
        res = np.where(all_const, CONST, UNKNOWN)
        if name in ZERO_PRESERVING_BINARY:
            if name.startswith(("div", "true_divide", "__truediv__", "__itruediv__", "divide")):
                zero = is_zero[0] & ~is_zero[1:].any(0)  # 0 / y = 0 unless y is 0 too (NaN)
            elif name in ("pow", "__pow__", "pow_"):
                p = vals[1] if len(vals) > 1 else None
                zero = is_zero[0] & (isinstance(p, (int, float)) and p > 0)
            else:
                zero = is_zero.all(0)
            res = np.where(zero, ZERO, res)
        if name in ZERO_ABSORBING:
            res = np.where(is_zero.any(0), ZERO, res)
        grid = np.asarray(res, np.int8)
        grid = grid[tuple(slice(None) if ci_o is not None and a in ci_o.axes else 0 for a in range(o.ndim))]
        if ci_o is None or grid.shape != rem.shape:
            return np.full(rem.shape, UNKNOWN, np.int8)
        return grid

    def shape(self, node: OpNode, o: TensorInfo, rem: np.ndarray) -> np.ndarray:
        res = self.by_atom(node, o)
        name = node.name
        if name in ("pad", "constant_pad_nd"):
            mode = arg(node, 2, "mode", "constant")
            value = arg(node, 3, "value", 0) if name == "pad" else arg(node, 2, "value", 0)
            if name == "constant_pad_nd" or mode == "constant":
                res = np.where(res == CONST, UNKNOWN, res)
                if value not in (0, 0.0, None):
                    res = np.where(res == ZERO, UNKNOWN, res)
        elif name == "__setitem__":
            value = node.args[2] if len(node.args) > 2 else None
            if not (isinstance(value, (int, float)) and value == 0):
                res = np.where(res >= ZERO, UNKNOWN, res)
        elif name in _CAT:
            dim = arg(node, 1, "dim", 0)
            ci = self.ca.info(o)
            along = isinstance(dim, int) and ci is not None and norm_axis(dim, o.ndim) in ci.axes
            if not along:
                res = np.where(res == CONST, UNKNOWN, res)
                if any(self.ca.info(t) is None and t.numel() > 0 for t in node.inputs):
                    # rows of an operand without channels (a class token; not an empty KV cache): its values sit
                    # at the removed channels of those rows, and the other rows hold something else
                    res = np.where(res == ZERO, UNKNOWN, res)
        return res.astype(np.int8)


def _param_derived(ca: ChannelAtoms) -> set[int]:
    """Ids of tensors computed from parameters, buffers and constants alone (no model input on the way)."""
    out: set[int] = set()
    for t in ca.graph.tensors:
        if t.kind in ("param", "buffer", "const"):
            out.add(t.id)
    for node in ca.graph.nodes:  # a factory op (no tensor input: arange, ones) makes a constant too
        if all(t.id in out for t in node.inputs):
            out.update(o.id for o in node.outputs)
    return out


def value_states(ca: ChannelAtoms, atom_removed: np.ndarray, derived: set[int] | None = None) -> ValueStates:
    """The :class:`ValueStates` of every tensor carrying a removed atom (``atom_removed``: bool per atom).

    ``derived``: ids of tensors computed from parameters and constants alone (default: found here).
    """
    return _Walk(ca, np.asarray(atom_removed, bool), derived).run()


class IncrementalStates:
    """:func:`value_states` of many removal vectors on one engine, each walk restarted from the nearest one done
    before (up to ``keep`` kept): only the nodes that touch a layer whose atoms differ, or read a state that
    changed, are visited again. The states are those of a full walk (tested against :func:`value_states`); a
    plan search whose plans differ in a set or two pays for those sets' part of the graph.
    """

    def __init__(self, ca: ChannelAtoms, derived: set[int] | None = None, keep: int = 8) -> None:
        self.ca = ca
        self.derived = derived if derived is not None else _param_derived(ca)
        self.keep = keep
        self._bases: list[tuple[np.ndarray, ValueStates, dict[int, np.ndarray]]] = []
        self.hooks = HookSites(ca)
        layer_of = np.asarray(ca.atom_layer)
        layers_of: dict[int, frozenset[int]] = {}
        for t in ca.graph.tensors:
            ci = ca.info(t)
            if ci is not None:
                a = ci.atoms.reshape(-1)
                a = a[a >= 0]
                if a.size:
                    layers_of[t.id] = frozenset(np.unique(layer_of[a]).tolist())
        # per node: the layers whose atoms a tensor it reads or writes holds, and those tensors' ids
        self.touches: list[tuple[frozenset[int], tuple[int, ...]]] = []
        for node in ca.graph.nodes:
            ts = [*node.inputs, *node.outputs, *(v for v in (*node.args, *node.kwargs.values())
                                                 if isinstance(v, TensorInfo))]
            self.touches.append((frozenset().union(*(layers_of.get(t.id, frozenset()) for t in ts)),
                                 tuple({t.id for t in ts})))

    def __call__(self, atom_removed: np.ndarray) -> ValueStates:
        ar = np.asarray(atom_removed, bool)
        walk = _Walk(self.ca, ar, self.derived, self.hooks)
        if self._bases:
            diffs = [int(np.count_nonzero(b[0] != ar)) for b in self._bases]
            i = int(np.argmin(diffs))
            base_ar, base_vs, base_hooked = self._bases.pop(i)
            if diffs[i] == 0:
                self._bases.append((base_ar, base_vs, base_hooked))
                return base_vs
            dirty = set(np.unique(np.asarray(self.ca.atom_layer)[np.nonzero(base_ar != ar)[0]]).tolist())
            vs = walk.run_from(base_vs, base_hooked, dirty, self.touches)
            self._bases.append((base_ar, base_vs, base_hooked))
        else:
            vs = walk.run()
        self._bases.append((ar.copy(), vs, walk.hooked))
        del self._bases[: max(0, len(self._bases) - self.keep)]
        return vs
