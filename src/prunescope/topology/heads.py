"""Head-level view of attention: for every attention its heads, head_dim, kv groups and tied q/k/v/o layers.

Attentions are found from the recorded ops, never from module names: every
``scaled_dot_product_attention`` call, and every eager ``softmax(q @ kᵀ) @ v`` (a product of two tensors
whose channels are split into heads, followed through scaling/masking/softmax/dropout to the product with
``v``). The head and head_dim axes are the ones the projection's channels were split into (the reshape
``(.., C) -> (.., heads, head_dim)``); each head's channels of the q, k and v layers are read off the channel
engine, and the output projection's input columns of each head are found by replaying the shape ops between
the attention output and that layer on position ids.

Grouped-query attention (GQA) rule — **a pruning unit is a whole kv group**: one key/value head with all the
query heads that read it. This is what the channel engine derives (``repeat_kv``/``expand`` and SDPA's
``enable_gqa`` tie query head ``j`` to kv head ``j // group_size``), and what LLM-Pruner does for LLaMA-3
(it prunes whole ``k_proj`` heads and the query heads coupled to them). Torch-Pruning's alternative —
keep every kv head and remove the same number of query heads from each group — is not a set of channel
classes (it is a "same count per group" constraint) and would need ``num_key_value_groups`` changed; it is
not offered. Removing whole groups keeps ``num_key_value_groups`` and ``head_dim`` as they are, and only
``num_heads``/``num_key_value_heads`` shrink.

Example
-------
>>> import torch
>>> from torch import nn
>>> import torch.nn.functional as F
>>> class Attn(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
...     def forward(self, x):
...         b, n, _ = x.shape
...         q, k, v = (p(x).view(b, n, -1, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
...         return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
>>> att = HeadDependency(Attn(), torch.ones(1, 3, 8)).attentions[0]
>>> (att.q, att.k, att.v, att.o, att.heads, att.head_dim, att.kv_heads)
('q', 'k', 'v', 'o', 2, 4, 2)
>>> att.q_channels, att.o_columns, att.units
([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]], [[0], [1]])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..graph import ModelGraph, OpNode, TensorInfo
from .base import ChannelInfo, arg
from .engine import ChannelAtoms, channel_atoms
from .replay import fast_map, map_channels
from .rules import RULES, passthrough, shape_op
from .tracing import get_graph

__all__ = ["AttentionHeads", "HeadDependency", "AttentionWeightDependency", "find_attentions"]

_PRODUCTS = frozenset({"matmul", "__matmul__", "bmm"})
# ops between q·kᵀ and ·v in an eager attention (scaling, masking, softmax, dropout, casts, and the views that
# split the windows of a shifted-window mask off the batch axis and merge them back: swin)
_SCORE_OPS = frozenset("""mul __mul__ div __truediv__ add __add__ sub masked_fill masked_fill_ where softmax
    log_softmax dropout to float type type_as half bfloat16 double contiguous clamp __iadd__ add_ mul_ div_
    __imul__ __itruediv__ view reshape""".split())


@dataclass
class AttentionHeads:
    """One attention: its layers and, per head, the channels that make it.

    ``q``/``k``/``v``/``o``: the layers (``k``, ``v`` may equal ``q`` for a fused ``qkv`` projection; ``o`` is
    ``None`` when the output does not reach a layer through shape ops). ``q_channels[j]``: output channels of
    ``q`` that form query head ``j``; ``k_channels[g]``/``v_channels[g]``: those of kv head ``g``;
    ``o_columns[j]``: input columns of ``o`` that read head ``j``; ``kv_group[j]``: the kv head of query head
    ``j``. ``units``: lists of query heads that go together (one kv group under GQA, one head otherwise); empty
    when the head count is fixed (the channel classes are in-head positions, e.g. ``view(B, L, H, -1)`` with
    a literal head count). ``pinned``: reasons why a unit (or, with no units, a head) cannot be removed (from
    the channel engine). ``tied``: the other layers whose channels go with these heads (a relative position
    bias shared by several attentions: T5's ``relative_attention_bias``, column ``h`` per head, and the q/k/v
    of every attention that adds it).

    An attention that is one recorded op (``nn.MultiheadAttention``, ``F.multi_head_attention_forward``) has
    no q/k/v layers of its own: ``q``/``k``/``v`` name the module, ``weights`` the parameter holding each
    one's rows (``q_channels`` are rows of the packed ``in_proj_weight``, ``k_channels`` rows ``E + ..``,
    ``v_channels`` rows ``2E + ..``; with ``kdim``/``vdim`` set, rows of ``q/k/v_proj_weight``) and ``o`` the
    module whose weight's columns ``o_columns`` are (``out_proj``).
    """

    module: str
    node: int
    q: str
    k: str
    v: str
    o: str | None
    heads: int
    head_dim: int
    kv_heads: int
    v_head_dim: int
    q_channels: list[list[int]]
    k_channels: list[list[int]]
    v_channels: list[list[int]]
    o_columns: list[list[int]] | None
    kv_group: list[int]
    units: list[list[int]] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 without GQA)."""
        return self.heads // self.kv_heads if self.kv_heads else 0

    @property
    def layers(self) -> list[str]:
        """``[q, k, v, o]`` without repeats (a fused projection once)."""
        return list(dict.fromkeys(n for n in (self.q, self.k, self.v, self.o) if n is not None))


def _head_grid(ca: ChannelAtoms, t: TensorInfo, head_axis: int, dim_axis: int) -> tuple[str, np.ndarray] | None:
    """``(layer, channels[head, dim])`` of a tensor whose channels sit on ``head_axis`` × ``dim_axis``."""
    ci = ca.info(t)
    if ci is None or dim_axis not in ci.axes or not set(ci.axes) <= {head_axis, dim_axis}:
        return None
    g = ci.atoms
    if head_axis in ci.axes:
        g = g if ci.axes.index(head_axis) == 0 else g.T
    else:
        g = g.reshape(1, -1)  # one head shared by all (multi-query attention)
    if (g < 0).any():
        return None
    layer_ix = ca.atom_layer[g]
    if not (layer_ix == layer_ix.flat[0]).all():
        return None
    return ca.layer_names[int(layer_ix.flat[0])], ca.atom_channel[g]


def _out_layer(ca: ChannelAtoms, t: TensorInfo, head_axis: int, dim_axis: int) -> tuple[str, np.ndarray] | None:
    """The layer that reads the attention output ``t`` and, per its input column, the ``head * dim + d`` id."""
    g = ca.graph
    nh, nd = t.shape[head_axis], t.shape[dim_axis]
    ids = np.arange(nh * nd, dtype=np.int64).reshape(nh, nd)
    cur = t
    ci = ChannelInfo((head_axis, dim_axis), ids) if head_axis < dim_axis else ChannelInfo((dim_axis, head_axis),
                                                                                           ids.T.copy())
    for _ in range(16):
        cons = g.consumers(cur)
        if len(cons) != 1:
            return None
        node = cons[0]
        data = _layer_data_input(node)
        if data is not None:
            if data.id != cur.id or ci.axes != (cur.ndim - 1,):
                return None
            w = node.inputs[1] if node.name == "linear" else node.inputs[2]
            return ca.weight_owner(w, node), ci.atoms
        rule = RULES.get(node.name)
        if rule not in (shape_op, passthrough) or len(node.outputs) != 1:
            return None
        infos = [ci if x.id == cur.id else None for x in node.inputs]
        if rule is passthrough:
            outs = [ci]
        else:
            outs = fast_map(node, infos) or map_channels(node, infos)
        if not outs or outs[0] is None:
            return None
        cur, ci = node.outputs[0], outs[0]
    return None


def _layer_data_input(node: OpNode) -> TensorInfo | None:
    if node.name == "linear" and len(node.inputs) >= 2 and node.inputs[1].kind == "param":
        return node.inputs[0]
    if node.name == "addmm" and len(node.inputs) >= 3 and node.inputs[2].kind == "param":
        return node.inputs[1]
    return None


def _attention_ops(ca: ChannelAtoms) -> list[tuple[OpNode, TensorInfo, TensorInfo, TensorInfo, TensorInfo, bool]]:
    """``(node, q, k, v, out, k_transposed)`` of every SDPA call and every eager softmax(q·kᵀ)·v."""
    g = ca.graph
    found = []
    for node in g.nodes:
        if node.name == "scaled_dot_product_attention" and len(node.inputs) >= 3:
            found.append((node, node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0], False))
        elif node.name in _PRODUCTS and len(node.inputs) == 2 and node.inputs[0].ndim >= 3 \
                and all(x.kind not in ("param", "buffer") for x in node.inputs):
            qi, ki = (ca.info(x) for x in node.inputs)
            q, k = node.inputs
            if qi is None or ki is None or q.ndim - 1 not in qi.axes or k.ndim - 2 not in ki.axes:
                continue
            front = {node.outputs[0].id}
            for nxt in g.nodes[node.index + 1:node.index + 40]:
                ins = [x.id for x in nxt.inputs]
                if not front & set(ins):
                    continue
                if nxt.name in _PRODUCTS and len(nxt.inputs) == 2 and nxt.inputs[0].id in front:
                    found.append((node, q, k, nxt.inputs[1], nxt.outputs[0], True))
                    break
                if nxt.name in _SCORE_OPS:
                    front.update(o.id for o in nxt.outputs)
    return found


_MHA_PIN = ("a head of '{module}' (F.multi_head_attention_forward) cannot be removed: the op derives head_dim = "
            "embed_dim // num_heads from the query width and requires the query, the q/k/v projections and "
            "out_proj to be embed_dim wide, so fewer heads means a narrower embed_dim (its input and output "
            "width), not fewer rows of in_proj_weight")


def _mha_heads(ca: ChannelAtoms, node: OpNode) -> AttentionHeads | None:
    """The heads of one ``multi_head_attention_forward`` call (``nn.MultiheadAttention``)."""
    e, h = arg(node, 3, "embed_dim_to_check"), arg(node, 4, "num_heads")
    packed, out_w = arg(node, 5, "in_proj_weight"), arg(node, 11, "out_proj_weight")
    if not isinstance(e, int) or not isinstance(h, int) or h <= 0 or e % h or not isinstance(out_w, TensorInfo):
        return None
    d = e // h
    g = ca.graph
    if isinstance(packed, TensorInfo) and not arg(node, 17, "use_separate_proj_weight", False):
        ws = {p: packed for p in "qkv"}
        off = {"q": 0, "k": e, "v": 2 * e}
    else:
        ws = {p: arg(node, 18 + i, f"{p}_proj_weight") for i, p in enumerate("qkv")}
        off = dict.fromkeys("qkv", 0)
        if not all(isinstance(w, TensorInfo) for w in ws.values()):
            return None
    names = {p: g.param_owner(w) or w.name or "" for p, w in ws.items()}
    rows = {p: [list(range(off[p] + d * j, off[p] + d * (j + 1))) for j in range(h)] for p in "qkv"}
    att = AttentionHeads(node.module, node.index, names["q"], names["k"], names["v"], g.param_owner(out_w), h, d,
                         h, d, rows["q"], rows["k"], rows["v"], [list(range(d * j, d * (j + 1))) for j in range(h)],
                         list(range(h)), units=[[j] for j in range(h)],
                         weights={**{p: w.name or "" for p, w in ws.items()}, "o": out_w.name or ""})
    att.pinned = [_MHA_PIN.format(module=node.module)]
    return att


def find_attentions(ca: ChannelAtoms) -> list[AttentionHeads]:
    """Every attention of the graph whose q, k and v come from layers through a head split, and every
    ``nn.MultiheadAttention`` call (heads listed from its packed weights, pinned: see :data:`_MHA_PIN`)."""
    res = []
    for node in ca.graph.nodes:
        if node.name == "multi_head_attention_forward":
            att = _mha_heads(ca, node)
            if att is not None:
                res.append(att)
    for node, q, k, v, out, k_t in _attention_ops(ca):
        nd = q.ndim
        gq = _head_grid(ca, q, nd - 3, nd - 1)
        gk = _head_grid(ca, k, k.ndim - 3, k.ndim - 2 if k_t else k.ndim - 1)
        gv = _head_grid(ca, v, v.ndim - 3, v.ndim - 1)
        if gq is None or gk is None or gv is None:
            continue
        (qn, qc), (kn, kc), (vn, vc) = gq, gk, gv
        heads = qc.shape[0]
        # kv heads: distinct rows (repeat_kv repeats them), or fewer rows (SDPA enable_gqa)
        rows = {}
        kv_group = []
        for j in range(kc.shape[0]):
            kv_group.append(rows.setdefault(tuple(kc[j].tolist()), len(rows)))
        kv_heads = len(rows)
        if kc.shape[0] != heads:
            if kc.shape[0] == 0 or heads % kc.shape[0]:
                continue
            r = heads // kc.shape[0]
            kv_group = [kv_group[j // r] for j in range(heads)]
        if kc.shape[0] == heads:  # repeated kv heads: take each one where it first appears
            k_rows = [kc[kv_group.index(gi)] for gi in range(kv_heads)]
            v_rows = [vc[kv_group.index(gi)] for gi in range(kv_heads)] if vc.shape[0] == heads else list(vc)
        else:
            k_rows, v_rows = list(kc), list(vc)
        if len(v_rows) != kv_heads:
            continue
        o = _out_layer(ca, out, out.ndim - 3, out.ndim - 1)
        o_name, o_cols = (o[0], [np.nonzero(o[1] // vc.shape[1] == j)[0].tolist() for j in range(heads)]) \
            if o is not None else (None, None)
        att = AttentionHeads(node.module, node.index, qn, kn, vn, o_name, heads, qc.shape[1], kv_heads,
                             vc.shape[1], [r.tolist() for r in qc], [r.tolist() for r in k_rows],
                             [r.tolist() for r in v_rows], o_cols, kv_group)
        _units(ca, att)
        res.append(att)
    res.sort(key=lambda a: a.node)
    return res


def _units(ca: ChannelAtoms, att: AttentionHeads) -> None:
    """Query heads that one channel class removes together (kv groups under GQA), and the pins on them."""
    cls_of_head = []
    for j in range(att.heads):
        atoms = [ca.atom(att.q, c) for c in att.q_channels[j]]
        atoms += [ca.atom(att.k, c) for c in att.k_channels[att.kv_group[j]]]
        atoms += [ca.atom(att.v, c) for c in att.v_channels[att.kv_group[j]]]
        cls = np.unique(ca.atom_class(np.array(atoms)))
        if len(cls) != 1:  # the head's channels are several units: the head count is fixed
            notes: dict[str, None] = {}
            for c in np.unique(ca.atom_class(np.array([ca.atom(n, c) for n in (att.q, att.k, att.v)
                                                        for c in range(ca.layers[n].out_channels)]))).tolist():
                notes.update(dict.fromkeys(ca.class_notes.get(c, [])))
            att.pinned = list(notes)
            return
        cls_of_head.append(int(cls[0]))
    units: dict[int, list[int]] = {}
    for j, c in enumerate(cls_of_head):
        units.setdefault(c, []).append(j)
    att.units = list(units.values())
    notes = {}
    for c in units:
        notes.update(dict.fromkeys(ca.class_notes.get(c, [])))
    att.pinned = list(notes)
    own = {att.q, att.k, att.v, att.o}
    members = np.unique(ca.atom_layer[np.isin(ca.root, np.array(list(units), np.int64))]).tolist()
    att.tied = [ca.layer_names[i] for i in members if ca.layer_names[i] not in own]


class HeadDependency:
    """Attention heads as pruning units (head-level companion of :class:`ChannelDependency`).

    ``attentions``: one :class:`AttentionHeads` per attention, in execution order; ``dependency_sets``: the
    ``[q, k, v, o]`` layers of each (NNI's ``AttentionWeightDependency`` layout). Same arguments as the other
    topology classes (``traced_model=``/``graph=`` reuse a trace).
    """

    def __init__(self, model: nn.Module | None = None, dummy_input: Any = None, traced_model: Any = None, *,
                 graph: ModelGraph | None = None) -> None:
        self.graph = get_graph(model, dummy_input, traced_model, graph)
        self.model = model if model is not None else self.graph.model
        self.atoms = channel_atoms(self.graph)
        self.attentions: list[AttentionHeads] = find_attentions(self.atoms)

    @property
    def dependency_sets(self) -> list[list[str]]:
        return [a.layers for a in self.attentions]


class AttentionWeightDependency(HeadDependency):
    """NNI's name: ``dependency_sets`` lists the ``[q, k, v, o]`` layers of every attention."""

