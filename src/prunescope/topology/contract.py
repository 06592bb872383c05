"""Channel rules for contractions: ``matmul``/``bmm``/``mm``/``addmm``/``einsum`` and attention (SDPA).

A contraction is written with one label per axis (``bhle,bhse->bhls`` for attention scores). Three rules:

* **Contracted labels tie positionally.** Position ``(h, d)`` of ``q`` meets position ``(h, d)`` of ``k``;
  the operands are aligned on their shared labels and broadcast over the others, so a key shared by all heads
  (``k`` with no head axis) ties its channel ``d`` to channel ``d`` of every query head, while per-head keys tie
  head by head. (A layer reading a tensor is different: its input column sees every position of the slice.)
* **What remains of an operand is carried only where it is one unit.** After ``q·kᵀ`` the scores of head
  ``h`` are removed only if the whole head goes; so head ``h`` of the output carries the class of ``q``'s head
  ``h`` when, with the ties known so far, all channels of that head are one class (a head split with a literal
  head size makes them one), and nothing otherwise (the head count is then fixed).
* **A fixed size blocks removal.** When an operand has a label at full size without channels there and its
  sizes cannot follow a layer (scores whose heads are fixed, an attention mask with a per-head axis computed
  from the inputs), every class that holds a whole slice of another operand across that label is pinned.

Grouped-query attention (``enable_gqa=True``) repeats the key/value head axis ``Hq / Hk`` times, exactly as
``repeat_kv`` does before a plain SDPA, so both paths give the same ties.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..graph import OpNode, TensorInfo
from .base import ChannelInfo, UnknownOp, arg

if TYPE_CHECKING:
    from .engine import ChannelAtoms

__all__ = ["Operand", "contract", "matmul", "einsum", "sdpa", "addmm"]



class Operand(NamedTuple):
    ci: ChannelInfo | None
    shape: tuple[int, ...]
    labels: str
    tensor: TensorInfo | None  # None: an intermediate of the rule (attention scores)


def _grid(op: Operand, sizes: dict[str, int]) -> tuple[np.ndarray, str] | None:
    """The operand's channel grid and the label of each grid axis (broadcast size-1 channel axes dropped)."""
    if op.ci is None:
        return None
    g, labs = op.ci.atoms, ""
    for k in range(len(op.ci.axes) - 1, -1, -1):
        lab = op.labels[op.ci.axes[k]]
        if g.shape[k] == 1 and sizes[lab] != 1:
            g = np.take(g, 0, axis=k)  # a per-sample scalar along this label: ties nothing
        else:
            labs = lab + labs
    if not labs or not (g >= 0).any():
        return None
    return g, labs


def _align(g: np.ndarray, labs: str, target: str, sizes: dict[str, int]) -> np.ndarray:
    order = [labs.index(t) for t in target if t in labs]
    g = np.transpose(g, order)
    view = [sizes[t] if t in labs else 1 for t in target]
    return np.broadcast_to(g.reshape(view), [sizes[t] for t in target])


def _tie_all(ca: ChannelAtoms, grids: list[np.ndarray]) -> None:
    st = np.stack([np.asarray(x).reshape(-1) for x in grids])
    valid = st >= 0
    rep = np.where(valid.any(0), st[valid.argmax(0), np.arange(st.shape[1])], -1)
    for row in st:
        ca.union(row, rep)


def contract(ca: ChannelAtoms, node: OpNode, ops: list[Operand], out_labels: str,
             out_shape: tuple[int, ...]) -> ChannelInfo | None:
    """Ties of a contraction of ``ops`` into ``out_labels`` and the channel info of its result."""
    sizes: dict[str, int] = {}
    for op in ops:
        for lab, n in zip(op.labels, op.shape):
            sizes[lab] = max(sizes.get(lab, 1), n)
    for lab, n in zip(out_labels, out_shape):
        sizes[lab] = max(sizes.get(lab, 1), n)
    grids = [_grid(op, sizes) for op in ops]
    contracted = sorted({lab for op in ops for lab in op.labels} - set(out_labels))
    # 1. contracted labels: positions that meet are tied
    for c in contracted:
        meet = [gr for gr in grids if gr is not None and c in gr[1]]
        if len(meet) < 2:
            continue
        target = "".join(dict.fromkeys("".join(gl for _, gl in meet)))
        _tie_all(ca, [_align(g, gl, target, sizes) for g, gl in meet])
    # 2. what remains of every operand
    parts: list[tuple[ChannelInfo, tuple[int, ...]]] = []
    carried: list[tuple[np.ndarray, str]] = []
    fixed: list[set[str]] = [set() for _ in ops]
    for i, (op, gr) in enumerate(zip(ops, grids)):
        if gr is None:
            continue
        g, gl = gr
        for c in [c for c in contracted if c in gl]:
            k = gl.index(c)
            if len(gl) == 1:
                g, gl = np.zeros(0, np.int64), ""
                break
            cls = np.moveaxis(ca.classes_now(g), k, -1)
            one = (cls == cls[..., :1]).all(-1) & (cls[..., 0] >= 0)
            first = np.take(g, 0, axis=k)
            if not one.all():
                fixed[i].update(gl.replace(c, ""))
            g = np.where(one, first, -1)
            gl = gl.replace(c, "")
        if not gl or not (g >= 0).any():
            continue
        axes = sorted(out_labels.index(lab) for lab in gl)
        g = _align(g, gl, "".join(out_labels[a] for a in axes), sizes)
        shp = tuple(op.shape[op.labels.index(lab)] if lab in op.labels else 1 for lab in out_labels)
        parts.append((ChannelInfo(tuple(axes), np.array(g)), shp))
        carried.append((np.array(g), "".join(out_labels[a] for a in axes)))
    res = ca.combine(parts, out_shape) if parts else None
    # 3. a label kept at full size without channels by one operand fixes that size for the others
    for j, lab in enumerate(out_labels):
        if out_shape[j] <= 1:
            continue
        blocked = any(
            lab in op.labels and op.shape[op.labels.index(lab)] == out_shape[j]
            and (op.tensor is None or ca.from_inputs_only(op.tensor))
            and (grids[i] is None or lab not in grids[i][1] or lab in fixed[i])
            for i, op in enumerate(ops))
        if not blocked:
            continue
        for g, gl in carried:
            if lab in gl:
                ca.pin_axes(g, [gl.index(lab)], node,
                            f"'{node.name}' meets an operand whose axis of size {out_shape[j]} cannot shrink")
    return res


def _letters(n: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def _matmul_ops(a: TensorInfo, b: TensorInfo, ia: ChannelInfo | None, ib: ChannelInfo | None,
                out_nd: int) -> tuple[list[Operand], str]:
    batch = _letters(out_nd - 2)
    la = batch[len(batch) - (a.ndim - 2):] + "ik" if a.ndim > 2 else "ik"
    lb = batch[len(batch) - (b.ndim - 2):] + "kj" if b.ndim > 2 else "kj"
    return [Operand(ia, a.shape, la, a), Operand(ib, b.shape, lb, b)], batch + "ij"


def matmul(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    """``a @ b`` (``matmul``, ``mm``, ``bmm``, ``@``); with a parameter operand it is a layer (``x @ W``)."""
    if len(node.inputs) != 2:
        raise UnknownOp(f"'{node.name}' with {len(node.inputs)} tensor inputs")
    a, b = node.inputs
    ia, ib = ins
    if node.name == "__rmatmul__":
        a, b, ia, ib = b, a, ib, ia
    out = node.outputs[0]
    if a.ndim < 2 or b.ndim < 2:
        raise UnknownOp(f"'{node.name}' on a 1-D operand")
    ops, lo = _matmul_ops(a, b, ia, ib, out.ndim)
    res = contract(ca, node, ops, lo, out.shape)
    if b.kind == "param" or a.kind == "param":  # x @ W: W's owner is a layer making new channels
        w = b if b.kind == "param" else a
        owner = ca.weight_owner(w, node)
        axis = out.ndim - 1 if w is b else out.ndim - 2
        li = ca.new_layer(owner, "matmul", node, out.shape[axis])
        li.weight_out_dim = w.ndim - 1 if w is b else w.ndim - 2
        res = ChannelInfo((axis,), ca.layer_atoms(owner))
    ca.set_info(out, res)


def addmm(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    """``addmm(bias, x, W)`` with a parameter ``W`` of shape ``(in, out)`` is a linear layer (HF ``Conv1D``);
    otherwise (and for ``baddbmm``/``addbmm``-like forms) a product plus an elementwise add."""
    bias, m1, m2 = arg(node, 0, "input"), arg(node, 1, "mat1"), arg(node, 2, "mat2")
    if node.name == "baddbmm":
        m1, m2 = arg(node, 1, "batch1"), arg(node, 2, "batch2")
    if not all(isinstance(t, TensorInfo) for t in (bias, m1, m2)):
        raise UnknownOp(f"'{node.name}' without three tensor operands")
    info = {t.id: ci for t, ci in zip(node.inputs, ins)}
    out = node.outputs[0]
    if node.name == "addmm" and m2.kind == "param" and m2.ndim == 2:
        owner = ca.weight_owner(m2, node)
        li = ca.new_layer(owner, "linear", node, m2.shape[1])
        li.in_channels = m1.shape[-1]
        li.weight_out_dim = 1
        ca.record_input(li, ca.reps(info.get(m1.id), m1.ndim, m1.ndim - 1, li.in_channels), m1.id, node)
        ca.set_info(out, ChannelInfo((out.ndim - 1,), ca.layer_atoms(owner)))
        return
    ops, lo = _matmul_ops(m1, m2, info.get(m1.id), info.get(m2.id), out.ndim)
    prod = contract(ca, node, ops, lo, out.shape)
    parts = [(ci, shp) for ci, shp in ((prod, out.shape), (info.get(bias.id), bias.shape)) if ci is not None]
    ca.set_info(out, ca.combine(parts, out.shape) if parts else None)


def einsum(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    eq = node.args[0] if node.args and isinstance(node.args[0], str) else None
    if eq is None or "..." in eq or "->" not in eq:
        raise UnknownOp("'einsum' without an explicit equation")
    lhs, rhs = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    out = node.outputs[0]
    if len(terms) != len(node.inputs) or any(len(t) != len(set(t)) for t in terms) or len(rhs) != out.ndim:
        raise UnknownOp(f"'einsum' equation {eq!r} not supported")
    ops = [Operand(ci, t.shape, term, t) for term, t, ci in zip(terms, node.inputs, ins)]
    ca.set_info(out, contract(ca, node, ops, rhs, out.shape))


def sdpa(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    """``scaled_dot_product_attention(q, k, v, attn_mask, ..., enable_gqa)`` as ``softmax(q·kᵀ + mask)·v``."""
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    if not all(isinstance(t, TensorInfo) for t in (q, k, v)) or min(q.ndim, k.ndim, v.ndim) < 2:
        raise UnknownOp("'scaled_dot_product_attention' without 2-D or larger q, k, v")
    info = {t.id: ci for t, ci in zip(node.inputs, ins)}
    out = node.outputs[0]
    nb = out.ndim - 2
    batch = _letters(nb)
    # a batch label per leading axis; the head axis (third from the end) may be shared by kv groups
    kv = []
    for t in (k, v):
        ci, shape = info.get(t.id), t.shape
        if t.ndim >= 3 and q.ndim >= 3 and shape[-3] != q.shape[-3] and shape[-3] > 1:
            r, rem = divmod(q.shape[-3], shape[-3])
            if rem:
                raise UnknownOp("'scaled_dot_product_attention' with a head count that does not divide")
            if ci is not None and t.ndim - 3 in ci.axes:  # enable_gqa: kv head j serves query heads j*r..
                ci = ChannelInfo(ci.axes, np.repeat(ci.atoms, r, axis=ci.axes.index(t.ndim - 3)))
            shape = shape[:-3] + (q.shape[-3],) + shape[-2:]
        kv.append((ci, shape))
    (ck, ks), (cv, vs) = kv

    def lab(nd: int, tail: str) -> str:
        return batch[nb - (nd - 2):] + tail

    scores_shape = out.shape[:-2] + (q.shape[-2], ks[-2])
    scores = contract(ca, node, [Operand(info.get(q.id), q.shape, lab(q.ndim, "le"), q),
                                 Operand(ck, ks, lab(k.ndim, "se"), k)], batch + "ls", scores_shape)
    if isinstance(mask, TensorInfo):
        mlab = (batch + "ls")[len(batch) + 2 - mask.ndim:]
        scores = contract(ca, node, [Operand(scores, scores_shape, batch + "ls", None),
                                     Operand(info.get(mask.id), mask.shape, mlab, mask)],
                          batch + "ls", scores_shape)
    res = contract(ca, node, [Operand(scores, scores_shape, batch + "ls", None),
                              Operand(cv, vs, lab(v.ndim, "sf"), v)], batch + "lf", out.shape)
    ca.set_info(out, res)
