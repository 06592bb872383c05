"""Mixture-of-experts rules of the channel engine: routing (``topk``) and fused expert weights (``_grouped_mm``).

A Hugging Face ``transformers`` 5 MoE layer (Mixtral, Qwen2-MoE, ... with the default ``grouped_mm`` experts
implementation) runs, on the flattened tokens ``x`` of shape ``(T, H)``::

    logits = F.linear(x, router.weight)                  # (T, E): one channel per expert
    w, idx = topk(softmax(logits), k)                    # routing weights and expert indices
    xs = x[perm // k]                                    # token-expert pairs sorted by expert, (S, H)
    h = _grouped_mm(xs, gate_up_proj.transpose(-2, -1), offs)   # gate_up_proj (E, 2I, H) -> (S, 2I)
    gate, up = h.chunk(2, -1); h = act(gate) * up        # (S, I)
    y = _grouped_mm(h, down_proj.transpose(-2, -1), offs)       # down_proj (E, H, I) -> (S, H)
    out = (y * w[perm, None])[inv_perm].view(T, k, H).sum(1)    # back into the residual stream

The ``batched_mm`` experts implementation gathers one weight per token-expert pair instead,
``bmm(gate_up_proj[ids], x.unsqueeze(-1))``; that ``bmm`` is read as the same fused layer (:func:`expert_bmm`).
The ``eager`` implementation (a Python loop over the experts hit, ``nonzero``, ``index_add_``) is not
modelled: it cannot trace on meta (the entry points fall back to the real device with a one-line log note) and
the engine stops at ``index_add_`` (its experts' layers are reported unsafe).

Routing
-------
``topk`` along a channel axis selects channels *by value*: its outputs (weights and indices) carry no channel
of the input, and the number of channels it chooses among is fixed (the router's output channels are the
experts: removing router row ``e`` would shift every later index, so the indices would pick the wrong
experts' weights, although every shape still fits). So ``topk`` pins the channels of its input (the router is
reported unsafe, nothing is stopped) and its outputs carry no channels. The pin is a *value pin*
(``ChannelAtoms.value_pins``): the physical pin probe (:mod:`.probe`), which clears pins whose removal runs
with every size following, leaves it, because here the sizes do follow.
Routing weights and indices then only index and scale token rows; the hidden-state channels flow through the
expert products and back into the residual stream.

Fused expert parameters: one layer per parameter, units per expert
------------------------------------------------------------------
Every fused 3-D parameter that a ``_grouped_mm`` consumes (``(E, N, K)`` used as ``W.transpose(-2, -1)``, or
``(E, K, N)`` used directly) is **one layer**, named by the parameter's qualified name (e.g.
``layers.0.mlp.experts.gate_up_proj``), kind ``'experts'``, with ``E · N`` output channels, *expert-major*:
output channel ``e · N + j`` is row ``j`` of expert ``e`` (``LayerInfo.experts = E``; ``weight_out_dim`` is the
parameter axis of ``j``, ``1`` for the transposed use). Its input record (``LayerInfo.inputs``) has ``E · K``
entries, expert-major too: the atom read by column ``k`` of expert ``e``.

A token row of the ``(S, N)`` product belongs to whichever expert the router chose, so one tensor position
stands for row ``j`` of *every* expert. The engine's grid has one atom per position; the product's output
therefore carries a **template**: the atoms of expert 0. The ops that follow (``chunk``, ``act``, ``*``) tie
template atoms exactly as they would tie one expert's rows (gate ``j`` with up ``j``). Once the walk is done,
the ties and pins found on the template are **mirrored** onto every expert (expert ``e``'s atom ``j`` gets the
ties expert 0's atom ``j`` got, to expert ``e``'s copies), so every expert has its own units and no unit spans
two experts. A template class that meets anything outside template atoms (the residual stream, a layer of
another kind) cannot be mirrored: the copies of all experts are tied to it instead (the exact meaning of a
position shared by every expert). A pin or stop on a template atom pins the copies of every expert.

A product whose input carries template atoms (the down projection) reads expert ``e``'s copies in expert
``e``'s columns; its output goes back to the residual stream, so output channel ``j`` of every expert is tied
(one hidden channel, removed from every expert or none).

So for a SwiGLU expert block the units are: per expert ``e`` and hidden unit ``j``, rows ``j`` and ``I + j`` of
``gate_up_proj[e]`` and column ``j`` of ``down_proj[e]`` — independent of every other expert. The shared expert
of Qwen2-MoE is an ordinary gated MLP of ``nn.Linear`` layers (units: gate row, up row, down column).

Masks of a fused layer have the parameter's shape and are keyed by the parameter's name
(``{'layers.0.mlp.experts.gate_up_proj': {'weight': mask}}``); a unit is removed when its rows are all zero.
Shrinking keeps the tensor rectangular: every expert must lose the same number of units (the plan protects
the layer otherwise, see :mod:`prunescope.removal.expert_cuts`); :func:`prunescope.masks.expert_masks.expert_masks`
builds such masks.

Where this plugs in
-------------------
This module registers its rules itself, with :func:`.rules.register_channel_rule` (``topk``,
``_grouped_mm``/``grouped_mm``, and ``bmm`` wrapped so that any other ``bmm`` keeps its rule); the
:mod:`prunescope.topology` package imports it. The mirroring runs as an engine *finisher*
(``ChannelAtoms.finishers``: after the walk, before the classes are solved) and extends the engine's pin and
stop lists itself. The NNI-compatible views (``ChannelDependency``, ``not_safe_to_prune``) list modules only,
so fused layers (parameters, not modules) are not in their sets; read them off ``channel_atoms(graph)``.
On the ``meta`` device ``_grouped_mm`` has no float32 kernel; the recorder makes its output from the shapes
(:mod:`prunescope.graph`), so MoE models trace on meta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import numpy as np

from ..graph import OpNode, TensorInfo
from ..ops import EXPERT_OPS, arg
from .base import ChannelInfo, UnknownOp, norm_axis
from .rules import RULES, Rule, register_channel_rule

if TYPE_CHECKING:
    from .engine import ChannelAtoms

__all__ = ["topk_rule", "grouped_mm_rule", "expert_bmm"]

# ops that carry a tensor unchanged (element for element) from a parameter to the product's weight operand
_SAME = frozenset({"to", "contiguous", "clone", "detach", "float", "half", "bfloat16", "type_as"})


@dataclass
class _Template:
    start: int  # first atom of the layer
    experts: int
    per: int  # output channels per expert


@dataclass
class _State:
    templates: dict[str, _Template] = field(default_factory=dict)


_STATE: WeakKeyDictionary[ChannelAtoms, _State] = WeakKeyDictionary()


def _state(ca: ChannelAtoms) -> _State:
    st = _STATE.get(ca)
    if st is None:
        st = _STATE[ca] = _State()
        ca.finishers.append(_mirror)
    return st


def topk_rule(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    """``topk`` along a channel axis (routing): pin the channels chosen among; outputs carry no channels."""
    x, ci = node.inputs[0], ins[0]
    if ci is None:
        return
    dim = arg(node, 2, "dim", -1)
    if not isinstance(dim, int):
        raise UnknownOp("'topk' without an integer dim")
    d = norm_axis(dim, x.ndim)
    if d not in ci.axes:
        raise UnknownOp("'topk' along a non-channel axis")
    ca.pin(ci.atoms, node, f"'topk' chooses among the {x.shape[d]} channels by value (routing): their number "
                           "is fixed")
    # a removed channel would shift the indices topk returns (expert i+1 read as expert i): the shapes still
    # follow, so the physical pin probe must not clear this pin
    ca.value_pins.append(ci.atoms.reshape(-1).copy())


def _weight_param(ca: ChannelAtoms, w: TensorInfo) -> tuple[TensorInfo, bool] | None:
    """The stored 3-D parameter behind the product's weight operand and whether it is used transposed."""
    transposed = False
    cur = w
    for _ in range(8):
        if cur.kind in ("param", "buffer"):
            return (cur, transposed) if cur.name and cur.ndim == 3 else None
        p = ca.graph.producer(cur)
        if p is None or not p.inputs:
            return None
        src = p.inputs[0]
        if p.name in ("transpose", "swapaxes", "swapdims") and src.ndim == 3:
            dims = sorted(norm_axis(int(a), 3) for a in p.args[1:3] if isinstance(a, int))
            if dims != [1, 2]:
                return None
            transposed = not transposed
        elif p.name in ("mT",) and src.ndim == 3:
            transposed = not transposed
        elif p.name not in _SAME or src.shape != cur.shape:
            return None
        cur = src
    return None


def grouped_mm_rule(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    """``_grouped_mm(x (S, K), W (E, K, N), offs)``: a fused expert layer (see the module docstring)."""
    a = arg(node, 0, "mat_a", arg(node, 0, "input"))
    b = arg(node, 1, "mat_b", arg(node, 1, "weight"))
    offs = arg(node, 2, "offs")
    if not (isinstance(a, TensorInfo) and isinstance(b, TensorInfo) and isinstance(offs, TensorInfo)) or \
            a.ndim != 2 or b.ndim != 3:
        raise UnknownOp(f"'{node.name}' other than tokens (S, K) x experts (E, K, N) with offsets")
    if ca.info(b) is not None:
        raise UnknownOp(f"'{node.name}' with a weight operand that carries layer channels")
    found = _weight_param(ca, b)
    if found is None:
        raise UnknownOp(f"'{node.name}' with a weight that is not a stored 3-D parameter")
    param, transposed = found
    E, K, N = b.shape
    _expert_product(ca, node, param, 1 if transposed else 2, E, K, N, ca.reps(ins[0], a.ndim, 1, K), a.id,
                    node.outputs[0], 1)


def _gathered(ca: ChannelAtoms, w: TensorInfo) -> TensorInfo | None:
    """The 3-D parameter ``P`` when ``w`` is ``P[expert_ids]`` (one weight per token-expert pair)."""
    p = ca.graph.producer(w)
    if p is None or p.name != "__getitem__" or len(p.inputs) != 2:
        return None
    src, idx = p.inputs
    ok = src.kind == "param" and src.name and src.ndim == 3 and idx.ndim == 1 and not idx.dtype.is_floating_point
    return src if ok and idx.id != src.id and w.shape == (idx.shape[0], *src.shape[1:]) else None


def expert_bmm(fallback: Rule) -> Rule:
    """``bmm`` of per-pair gathered expert weights (the ``batched_mm`` experts implementation)::

        bmm(P[ids] (S, N, K), x.unsqueeze(-1) (S, K, 1))      # P (E, N, K)
        bmm(x.unsqueeze(1) (S, 1, K), P[ids] (S, K, N))       # P (E, K, N), transposed storage

    is the same fused expert layer as ``_grouped_mm``; any other ``bmm`` goes to ``fallback``."""

    def rule(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
        if node.name == "bmm" and len(node.inputs) == 2 and len(ins) == 2:
            a, b = node.inputs
            pa, pb = _gathered(ca, a), _gathered(ca, b)
            out = node.outputs[0]
            if pa is not None and ins[0] is None and b.shape[2] == 1:  # (S, N, K) x (S, K, 1)
                E, N, K = pa.shape
                _expert_product(ca, node, pa, 1, E, K, N, ca.reps(ins[1], 3, 1, K), b.id, out, 1)
                return
            if pb is not None and ins[1] is None and a.shape[1] == 1:  # (S, 1, K) x (S, K, N)
                E, K, N = pb.shape
                _expert_product(ca, node, pb, 2, E, K, N, ca.reps(ins[0], 3, 2, K), a.id, out, 2)
                return
        fallback(ca, node, ins)

    return rule


def _expert_product(ca: ChannelAtoms, node: OpNode, param: TensorInfo, out_dim: int, E: int, K: int, N: int,
                    rep: np.ndarray, x_id: int, out: TensorInfo, out_axis: int) -> None:
    """The fused layer of ``param`` (``E`` experts, ``K`` inputs and ``N`` outputs each) read by one product."""
    name = param.name
    assert name is not None
    li = ca.new_layer(name, "experts", node, E * N)
    li.experts = E
    li.in_channels = K
    li.weight_out_dim = out_dim
    owner = ca.graph.param_owner(param)
    mod = ca.graph.modules.get(owner) if owner is not None else None
    li.module_type = type(mod).__name__ if mod is not None else "experts"
    st = _state(ca)
    tmpl = _template_of(st, rep)
    if tmpl is None:  # the same input for every expert (tokens of the residual stream)
        ca.record_input(li, np.tile(rep, E), x_id, node)
    else:  # expert e reads expert e's copies of the template atoms
        if tmpl.experts != E:
            raise UnknownOp(f"'{node.name}' of {E} experts reads the output of a product of {tmpl.experts}")
        inb = (rep >= tmpl.start) & (rep < tmpl.start + tmpl.per)
        ca.record_input(li, np.concatenate([np.where(inb, rep + e * tmpl.per, rep) for e in range(E)]), x_id, node)
    atoms = ca.layer_atoms(name)
    if tmpl is None:
        st.templates[name] = _Template(li.atom_start, E, N)
        ca.set_info(out, ChannelInfo((out_axis,), atoms[:N].copy()))
    else:  # back to shared channels: output channel j of every expert is one channel
        grid = atoms.reshape(E, N)
        for e in range(1, E):
            ca.union(grid[0], grid[e])
        ca.set_info(out, ChannelInfo((out_axis,), grid[0].copy()))


def _template_of(st: _State, rep: np.ndarray) -> _Template | None:
    hit = None
    for t in st.templates.values():
        if ((rep >= t.start) & (rep < t.start + t.per)).any():
            if hit is not None and hit.experts != t.experts:
                raise UnknownOp("a product reads template channels of expert products of different sizes")
            hit = hit or t
    return hit


def _mirror(ca: ChannelAtoms) -> None:
    """Copy the ties and pins found on template atoms (expert 0) to every expert (see the module docstring)."""
    st = _STATE.get(ca)
    if st is None or not st.templates:
        return
    n = ca._natoms
    root = ca.classes_now(np.arange(n))
    # template atom -> (template, offset j); per atom, how to get expert e's copy
    is_t = np.zeros(n, bool)
    per = np.zeros(n, np.int64)
    nexp = np.zeros(n, np.int64)
    for t in st.templates.values():
        is_t[t.start:t.start + t.per] = True
        per[t.start:t.start + t.per] = t.per
        nexp[t.start:t.start + t.per] = t.experts
    tm = np.nonzero(is_t)[0]
    ct = root[tm]
    # a class is mirrorable when all its members are template atoms of products with the same expert count
    bad = np.zeros(n, bool)
    bad[root[np.isin(root, np.unique(ct)) & ~is_t]] = True
    emin = np.full(n, np.iinfo(np.int64).max, np.int64)
    emax = np.zeros(n, np.int64)
    first = np.full(n, n, np.int64)
    np.minimum.at(emin, ct, nexp[tm])
    np.maximum.at(emax, ct, nexp[tm])
    np.minimum.at(first, ct, tm)
    mirror = ~bad[ct] & (emin[ct] == emax[ct])
    for e in range(1, int(nexp.max())):
        has = nexp[tm] > e
        a, c, m = tm[has], ct[has], mirror[has]
        r = first[c]
        # mirrored: expert e's copy joins expert e's copy of the class's first atom; else the class itself
        ca.union(np.where(m, r + e * per[r], c), a + e * per[a])
    # pins and stops noted on template atoms hold for every expert's copy: add each one again with the
    # template atoms replaced by expert e's copies (the classes are mirrored, so it decides the same way)
    E_all = int(nexp.max())

    def shifted(atoms: np.ndarray, e: int) -> np.ndarray | None:
        a = np.asarray(atoms)
        ok = (a >= 0) & (a < n)
        sel = np.zeros(a.shape, bool)
        sel[ok] = is_t[a[ok]] & (nexp[a[ok]] > e)
        if not sel.any():
            return None
        return np.where(sel, a + e * per[np.where(ok, a, 0)], a)

    def touches(atoms: np.ndarray) -> bool:
        a = np.asarray(atoms).reshape(-1)
        a = a[(a >= 0) & (a < n)]
        return bool(is_t[a].any())

    pins = [x for x in ca._pins if touches(x[0])]
    stops = [x for x in ca._stop_notes if touches(x[0])]
    axis_pins = [x for x in ca._axis_pins if touches(x[0])]
    cond_pins = [x for x in ca._cond_pins if touches(x[2]) or touches(x[0])]
    for e in range(1, E_all):
        for src, lst in ((pins, ca._pins), (stops, ca._stop_notes)):
            for atoms, note in src:
                s_ = shifted(atoms, e)
                if s_ is not None:
                    lst.append((s_, note))
        for grid, axes, note in axis_pins:
            s_ = shifted(grid, e)
            if s_ is not None:
                ca._axis_pins.append((s_, axes, note))
        for lost, kept, grid, note in cond_pins:
            sl, sk, sg = shifted(lost, e), shifted(kept, e), shifted(grid, e)
            if sl is not None or sg is not None:
                ca._cond_pins.append((lost if sl is None else sl, kept if sk is None else sk,
                                      grid if sg is None else sg, note))


register_channel_rule("topk")(topk_rule)
register_channel_rule(*EXPERT_OPS)(grouped_mm_rule)
register_channel_rule("bmm")(expert_bmm(RULES["bmm"]))  # gathered expert weights; any other bmm as before
