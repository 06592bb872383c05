"""Op rules of the channel engine: what each family of recorded ops does to channel atoms.

Every rule is a function ``rule(ca, node, ins)`` of the :class:`~prunescope.topology.engine.ChannelAtoms`
being built, one recorded :class:`~prunescope.graph.OpNode` and the :class:`ChannelInfo` of each of its tensor
inputs (``None``: no channels). A rule sets the channel info of the node's outputs and records ties
(``ca.union``), pins (``ca.pin``) and stops (raise :class:`UnknownOp`) through the engine's builder methods.
:data:`RULES` maps an op name to its rule; an op that is in no family stops the analysis.

Families: layers (conv, linear, embedding and a linear that reuses an embedding's matrix,
``nn.MultiheadAttention``, LSTM/GRU/RNN hidden units), norms, elementwise (broadcast ties), channel-preserving
ops, reductions, matrix products (``matmul``/``bmm``/``einsum``/SDPA: the contracted index ties both operands),
``unfold``/``fold``, and shape ops, which are replayed on channel ids (:mod:`.replay`) and pinned when they
write a channel count into the code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import ConfigError
from ..graph import OpNode, TensorInfo
from ..ops import (
    CONV_OPS,
    CONV_TRANSPOSE_OPS,
    ELEMENTWISE,
    FACTORY_LIKE,
    FAMILIES,
    LAYER_OPS,
    MATMUL_OPS,
    NEUTRAL_ON_ZERO,
    NORM_AXIS,
    REDUCTIONS,
    RNN_GATES,
    RNN_OPS,
    SHAPE_OPS,
    UNARY,
    add_to_family,
    arg,
)
from .base import ChannelInfo, UnknownOp, first_valid, norm_axis
from .contract import addmm, einsum, matmul, sdpa
from .replay import fast_map, map_channels

if TYPE_CHECKING:
    from .engine import ChannelAtoms

__all__ = ["RULES", "Rule", "layer_op", "register_channel_rule", "elementwise", "passthrough"]

Rule = Callable[["ChannelAtoms", OpNode, "list[ChannelInfo | None]"], None]

# ops of UNARY that mix the positions of one axis: a channel axis there pins (``dim`` argument position)
_CROSS_AXIS = {"softmax": 1, "log_softmax": 1, "softmin": 1, "normalize": 2, "local_response_norm": -1}
_RESHAPE = frozenset({"view", "reshape", "unflatten", "expand"})
_SPLIT = frozenset({"chunk", "split", "tensor_split", "split_with_sizes", "unsafe_split", "unsafe_chunk",
                    "unbind"})

def explicit_sizes(node: OpNode) -> list[int | None] | None:
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
        dim = arg(node, 1, "dim")
        sizes = arg(node, 2, "sizes")
        if not isinstance(dim, int) or not isinstance(sizes, (tuple, list, torch.Size)):
            return None
        d = norm_axis(dim, node.inputs[0].ndim)
        res: list[int | None] = [None] * out.ndim
        for k, s in enumerate(sizes):
            res[d + k] = int(s)
        return res
    return None



# -- layers

def layer_op(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    name = node.name
    if name in RNN_OPS:
        recurrent_op(ca, node, ins)
        return
    x = node.inputs[0] if node.inputs else None
    cin = ins[0] if ins else None
    if name in CONV_OPS:
        w = arg(node, 1, "weight")
        if not isinstance(w, TensorInfo) or x is None:
            raise UnknownOp(f"'{name}' without a weight tensor")
        groups = arg(node, 6, "groups", 1)  # conv*d and conv_transpose*d both have it 7th
        groups = int(groups) if isinstance(groups, int) else 1
        transposed = name in CONV_TRANSPOSE_OPS
        out_ch = w.shape[1] * groups if transposed else w.shape[0]
        ax = 1 if x.ndim == w.ndim else 0
        in_ch = x.shape[ax]
        owner = ca.weight_owner(w, node)
        li = ca.new_layer(owner, "conv_transpose" if transposed else "conv", node, out_ch)
        li.in_channels, li.groups = in_ch, groups
        li.weight_out_dim = 1 if transposed else 0
        rep = ca.reps(cin, x.ndim, ax, in_ch)
        ca.record_input(li, rep, x.id, node)
        atoms = ca.layer_atoms(owner)
        if groups > 1 and groups == in_ch and out_ch % in_ch == 0:
            li.depthwise = True
            ca.union(atoms, rep[np.arange(out_ch) // (out_ch // in_ch)])
        for o in node.outputs[:1]:
            ca.set_info(o, ChannelInfo((ax,), atoms.copy()))
    elif name == "linear":
        w = arg(node, 1, "weight")
        if not isinstance(w, TensorInfo) or x is None:
            raise UnknownOp("'linear' without a weight tensor")
        owner = ca.weight_owner(w, node)
        tied = ca.layers.get(owner)
        if tied is not None and tied.kind == "embedding" and w.ndim == 2 and tied.out_channels == w.shape[1] \
                and x.ndim and x.shape[-1] == w.shape[1]:
            # a tied input/output embedding (``lm_head.weight is wte.weight``): the product reads the embedding's
            # channels as its input columns, so column c goes with embedding channel c; its outputs (one per
            # vocabulary entry = embedding row) are no channels of any layer
            ca.union(ca.layer_atoms(owner), ca.reps(cin, x.ndim, x.ndim - 1, w.shape[1]))
            return
        li = ca.new_layer(owner, "linear", node, w.shape[0] if w.ndim == 2 else 1)
        li.in_channels = x.shape[-1] if x.ndim else 1
        ca.record_input(li, ca.reps(cin, x.ndim, x.ndim - 1, li.in_channels), x.id, node)
        for o in node.outputs[:1]:
            if o.ndim:
                ca.set_info(o, ChannelInfo((o.ndim - 1,), ca.layer_atoms(owner)))
    elif name == "embedding":
        w = arg(node, 1, "weight")
        if not isinstance(w, TensorInfo):
            raise UnknownOp("'embedding' without a weight tensor")
        owner = ca.weight_owner(w, node)
        li = ca.new_layer(owner, "embedding", node, w.shape[1])
        li.weight_out_dim = 1
        li.nodes.append(node.index)  # every lookup (shrink narrows the weight, as_pruned zeroes the output)
        for o in node.outputs[:1]:
            ca.set_info(o, ChannelInfo((o.ndim - 1,), ca.layer_atoms(owner)))
    else:  # multi_head_attention_forward(query, key, value, embed_dim, num_heads, in_proj_weight, ...)
        params = [t for t in node.inputs if t.kind == "param"]
        if not params:
            raise UnknownOp("attention without parameters")
        owner = ca.weight_owner(params[0], node)
        q = node.inputs[0]
        e = q.shape[-1]
        out = node.outputs[0]
        li = ca.new_layer(owner, "attention", node, out.shape[-1])
        li.in_channels = e
        reps = []
        for k in range(min(3, len(node.inputs))):
            t = node.inputs[k]
            if t.kind == "param":
                break
            reps.append(ca.reps(ins[k], t.ndim, t.ndim - 1, t.shape[-1]))
        ca.record_input(li, reps[0] if reps else np.full(e, -1, np.int64), q.id, node)
        atoms = ca.layer_atoms(owner)
        if reps and len(reps[0]) == len(atoms):  # nn.MultiheadAttention: one embed_dim in and out
            ca.union(atoms, reps[0])
        if isinstance(arg(node, 5, "in_proj_weight"), TensorInfo):  # packed: q, k, v read the same E columns
            for r in reps[1:]:
                if len(r) == len(reps[0]):
                    ca.union(reps[0], r)
        ca.set_info(out, ChannelInfo((out.ndim - 1,), atoms))


def recurrent_op(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    """``lstm``/``gru``/``rnn_tanh``/``rnn_relu`` (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): a layer of hidden units.

    Hidden unit ``j`` of one recurrent layer is row ``j`` of each gate block (``G`` = 4 for LSTM, 3 for GRU, 1
    for RNN) of ``weight_ih``/``weight_hh``/biases, column ``j`` of ``weight_hh`` and column ``j`` (and
    ``H + j`` when bidirectional) of whatever reads the output. All layers and directions of one module share
    one ``hidden_size``, so unit ``j`` of every layer and direction is one atom (removing it keeps the sizes
    equal; the module's ``hidden_size`` attribute must follow, as ``in_features`` does for a shrunk Linear).
    The input's channels are the columns of ``weight_ih_l0`` (``input_size`` follows them). An initial state
    made by the module itself (zeros of ``hidden_size``) follows it; one given from outside is tied to its
    producer, or pins the units when it is computed from inputs and constants (its size is written).
    """
    name = node.name
    params_at = next((i for i, a in enumerate(node.args) if isinstance(a, (list, tuple)) and a
                      and all(isinstance(t, TensorInfo) and t.kind == "param" for t in a)), None)
    if params_at is None:
        raise UnknownOp(f"'{name}' without its list of weight parameters")
    params = list(node.args[params_at])
    gates = RNN_GATES[name]
    w_ih, w_hh = params[0], params[1]
    hidden = w_ih.shape[0] // gates
    if w_hh.shape[1] != hidden:
        raise UnknownOp(f"'{name}' with a projection (proj_size {w_hh.shape[1]} != hidden_size {hidden}): hidden "
                        "and output units differ")
    x = node.inputs[0]
    owner = ca.weight_owner(w_ih, node)
    li = ca.new_layer(owner, "rnn", node, hidden)
    li.in_channels = x.shape[-1]
    ca.record_input(li, ca.reps(ins[0], x.ndim, x.ndim - 1, x.shape[-1]), x.id, node)
    atoms = ca.layer_atoms(owner)
    state = {t.id for a in node.args[1:params_at] for t in (a if isinstance(a, (list, tuple)) else [a])
             if isinstance(t, TensorInfo) and t.dtype.is_floating_point}
    for t, ci in zip(node.inputs, ins):
        if t.id not in state or t.shape[-1] != hidden:
            continue
        if ci is not None:
            ca.union(atoms, ca.reps(ci, t.ndim, t.ndim - 1, hidden))
            continue
        prod = ca.graph.producer(t)
        if (prod is None or prod.call != node.call) and ca.from_inputs_only(t):
            ca.pin(atoms, node, f"the initial state given to '{name}' has a fixed hidden size {hidden}")
    out = node.outputs[0]
    if out.shape[-1] % hidden:
        raise UnknownOp(f"'{name}' output of width {out.shape[-1]} for hidden_size {hidden}")
    ca.set_info(out, ChannelInfo((out.ndim - 1,), np.tile(atoms, out.shape[-1] // hidden)))
    for o in node.outputs[1:]:  # h_n (and c_n): (layers * directions, N, hidden)
        if o.ndim and o.shape[-1] == hidden and o.dtype.is_floating_point:
            ca.set_info(o, ChannelInfo((o.ndim - 1,), atoms.copy()))


def packed_sequence_op(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    """``pack_padded_sequence``/``pad_packed_sequence``: time steps are regrouped, the feature axis (last) is
    kept; the batch sizes carry no channels."""
    x, ci, out = node.inputs[0], ins[0], node.outputs[0]
    if ci is None:
        return
    if ci.axes != (x.ndim - 1,) or out.shape[-1] != x.shape[-1]:
        raise UnknownOp(f"'{node.name}' of a tensor whose channels are not on its last axis alone")
    ca.set_info(out, ChannelInfo((out.ndim - 1,), ci.atoms))


def norm_op(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    x = node.inputs[0]
    out = node.outputs[0]
    ca.set_info(out, ins[0])
    params = [t for t in node.inputs[1:] if t.kind in ("param", "buffer")]
    if params and ins[0] is not None:
        owner = ca.graph.param_owner(params[0]) or ""
        ax = NORM_AXIS[node.name]
        ax = x.ndim - 1 if ax < 0 else (1 if x.ndim > 1 else 0)
        rep = ca.reps(ins[0], x.ndim, ax, x.shape[ax])
        ca.followers.setdefault(owner, []).append(rep)
        mod = ca.graph.modules.get(owner)
        ca.follower_types[owner] = type(mod).__name__ if mod is not None else ""


def elementwise(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    out = node.outputs[0] if node.outputs else None
    if out is None:
        return
    parts = [(ci, t.shape) for ci, t in zip(ins, node.inputs) if ci is not None and t.ndim <= out.ndim]
    res = ca.combine(parts, out.shape)
    for o in node.outputs:
        if o.shape == out.shape:
            ca.set_info(o, res)
    if res is not None and len(node.inputs) > 1:
        _fixed_operands(ca, node, ins, res)


def _fixed_operands(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None], res: ChannelInfo) -> None:
    """An operand computed from model inputs and constants only that has a channel axis at full size (a
    per-head attention mask given as input or built from constants) fixes that size: pin the classes that would
    change it. (Operands derived from parameters - layer scales, class tokens - are not judged here.)"""
    out = node.outputs[0]
    for a in res.axes:
        if out.shape[a] <= 1:
            continue
        for t, ci in zip(node.inputs, ins):
            off = out.ndim - t.ndim
            if a < off or t.shape[a - off] != out.shape[a] or (ci is not None and a - off in ci.axes):
                continue
            if ca.from_inputs_only(t):
                ca.pin_axes(res.atoms, [res.axes.index(a)], node,
                            f"'{node.name}' meets an operand whose axis of size {out.shape[a]} cannot shrink")
                break


def passthrough(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    if node.name in FACTORY_LIKE:
        return  # a new tensor of the same shape carries no channels
    x, ci = node.inputs[0], ins[0]
    if ci is None:
        return
    pos = _CROSS_AXIS.get(node.name)
    if pos is not None:
        if pos < 0:  # local_response_norm: across dim 1
            d: object = 1 if x.ndim > 1 else 0
        else:
            d = arg(node, pos, "dim", 1 if node.name == "normalize" else None)
            if d is None:  # softmax's legacy implicit dim
                d = 0 if x.ndim in (0, 1, 3) else 1
        if isinstance(d, int) and norm_axis(d, x.ndim) in ci.axes:
            _value_pin(ca, node, ci, {norm_axis(d, x.ndim)}, "mixes the channels along")
    for o in node.outputs:
        if o.ndim == x.ndim and all(o.shape[a] == x.shape[a] for a in ci.axes):
            ca.set_info(o, ci)
        elif o.ndim == x.ndim and o.dtype in (torch.int64,):  # pooling indices
            continue
        else:
            raise UnknownOp(f"'{node.name}' changes the size of a channel axis")


def _value_pin(ca: ChannelAtoms, node: OpNode, ci: ChannelInfo, axes: set[int], what: str) -> None:
    """A reduction or cross-channel op over channel axes ``axes`` of its input: removing a channel changes its
    value (a mean over fewer channels), not a size, so the pin is a value pin (no physical probe clears it).
    Sums and p-norms over channels that are exactly zero when removed are neutral: decided once the walk is
    done from the value analysis (:mod:`.values`, engine ``_finish``)."""
    if node.name in ("norm", "normalize"):  # a p-norm ignores zeros for p > 0 ('fro' is p = 2)
        p = arg(node, 1, "p", "fro" if node.name == "norm" else 2)
        neutral = p in (None, "fro") or (isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0)
    else:
        neutral = node.name in NEUTRAL_ON_ZERO
    text = (f"'{node.name}' {what} channel axis {sorted(axes)[0]} of {list(node.inputs[0].shape)}: removing a "
            "channel changes its value")
    if len(ci.axes) > len(axes):  # other channel axes: fine where each fiber along ``axes`` is one unit
        ca.value_pin_unless_fibers(ci.atoms, [ci.axes.index(a) for a in sorted(axes)], node, text, neutral)
        return
    if neutral:
        ca.neutral_checks.append((node, node.inputs[0], ci.atoms.copy(), text))
        return
    ca.pin(ci.atoms, node, text)
    ca.value_pins.append(ci.atoms.reshape(-1).copy())


def reduce_op(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    x, ci = node.inputs[0], ins[0]
    if ci is None:
        return
    dims = arg(node, 2, "dim", None) if node.name == "norm" else arg(node, 1, "dim", None)
    if isinstance(dims, TensorInfo):  # max(a, b) is elementwise
        elementwise(ca, node, ins)
        return
    keep = bool(arg(node, 3 if node.name == "norm" else 2, "keepdim", False))
    if dims is None:
        dims_t = tuple(range(x.ndim))
    elif isinstance(dims, int):
        dims_t = (dims,)
    else:
        dims_t = tuple(dims)
    red = {norm_axis(int(d), x.ndim) for d in dims_t}
    if red & set(ci.axes):
        _value_pin(ca, node, ci, red & set(ci.axes), "reduces over")
    g = ci.atoms
    axes = list(ci.axes)
    for a in sorted(red & set(ci.axes), reverse=True):
        k = axes.index(a)
        gm = np.moveaxis(g, k, -1)
        # positions left on the other channel axes now depend on all reduced atoms: tie them
        flat = gm.reshape(-1, gm.shape[-1])
        rep = first_valid(flat)
        if gm.ndim > 1:
            ca.union(np.repeat(rep, flat.shape[1]), flat.reshape(-1))
        g = rep.reshape(gm.shape[:-1])
        axes.pop(k)
    new_axes = []
    for a in axes:
        new_axes.append(a if keep else a - sum(1 for r in red if r < a))
    res = ChannelInfo(tuple(new_axes), g) if new_axes else None
    for o in node.outputs:
        if o.dtype.is_floating_point or o is node.outputs[0]:
            ca.set_info(o, res)


def cat_nonchannel(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> bool:
    """``cat``/``stack`` along an axis that carries no channels ties the inputs; True if handled."""
    out = node.outputs[0]
    dim = arg(node, 1, "dim", 0)
    if not isinstance(dim, int):
        return False
    stack = node.name == "stack"
    nd_in = out.ndim - 1 if stack else out.ndim
    d = norm_axis(dim, out.ndim if stack else nd_in)
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
    res = ca.combine(parts, ref)
    ca.set_info(out, res)
    return True


# -- executed shape ops

def shape_op(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    outs = fast_map(node, ins)
    if outs is None:
        outs = map_channels(node, ins)
    if outs is None:
        raise UnknownOp(f"'{node.name}' could not be replayed on channel ids")
    name = node.name
    if name == "roll" and ins[0] is not None:
        _roll_rule(ca, node, ins[0])
    if name in _RESHAPE and ins[0] is not None and outs and outs[0] is not None:
        reshape_rule(ca, node, ins[0], outs[0])
    elif name in _SPLIT and ins[0] is not None:
        split_rule(ca, node, ins[0], outs)
    else:
        present = np.unique(np.concatenate([o.atoms.reshape(-1) for o in outs if o is not None])) \
            if any(o is not None for o in outs) else np.zeros(0, np.int64)
        for ci in ins:
            if ci is None:
                continue
            lost = ~np.isin(ci.atoms, present) & (ci.atoms >= 0)
            if lost.any():
                if any(not t.dtype.is_floating_point for t in node.inputs):
                    raise UnknownOp(f"'{name}' indexes channels with a tensor of indices")
                # fine if every dropped channel is tied to a kept one (a whole group of a group split)
                ca.pin_unless_tied(ci.atoms[lost], present[present >= 0], ci.atoms, node,
                                   f"'{name}' keeps or overwrites a fixed subset of the {ci.atoms.size} channels")
    targets = node.outputs
    for o, ci in zip(targets, outs):
        ca.set_info(o, ci)


def _roll_rule(ca: ChannelAtoms, node: OpNode, ci: ChannelInfo) -> None:
    """``roll`` along a channel axis wraps at the channel count: after a removal the same shift moves the
    channels near the end to other positions (physically checked: removing one of the last ``shift`` channels
    gives another output), so those axes are pinned."""
    x = node.inputs[0]
    dims = arg(node, 2, "dims")
    shifts = arg(node, 1, "shifts")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    shifts = [shifts] if isinstance(shifts, int) else list(shifts or [])
    if not dims:  # roll of the flattened tensor: every channel axis wraps
        ca.pin_axes(ci.atoms, list(range(len(ci.axes))), node, "'roll' of the flattened tensor moves channels "
                    "by a count that changes when one is removed")
        return
    for d, sh in zip(dims, shifts):
        a = d % x.ndim
        if a in ci.axes and isinstance(sh, int) and sh % x.shape[a]:
            ca.pin_axes(ci.atoms, [ci.axes.index(a)], node, f"'roll' by {sh} along channel axis {a} wraps at the "
                        f"channel count, which a removal changes")


def reshape_rule(ca: ChannelAtoms, node: OpNode, ci: ChannelInfo, co: ChannelInfo) -> None:
    """Ties and pins of a ``view``/``reshape``/``unflatten``/``expand`` that moves channels.

    * A split of one channel axis into several (``(C,) -> (G, D)``, heads or channel groups): the axis written
      as ``-1`` is the one that shrinks, so one unit is a slice across it: ``view(B, L, -1, D)`` (a literal
      head size) makes every head one unit, ``view(B, L, H, -1)`` ties the same in-head index of every head.
      Without a ``-1`` on the grid axes the innermost axis shrinks (channel shuffle ``view(N, g, C // g, H, W)``);
      a split into three or more axes with every size written (``reshape(B, N, 3, heads, C // heads)``) pins it.
    * The merge back of such a split follows the pruned count (``reshape(B, L, -1)``, a shuffle's merge).
    * Elsewhere a size written on a channel-carrying axis pins the classes that would change it
      (:meth:`~prunescope.topology.engine.ChannelAtoms.pin_axes`); two idioms are read as following the
      tensor instead: a repeat of heads for grouped-query attention (``expand`` + ``reshape``, ``repeat_kv``)
      and a trailing channel axis kept as is while the leading axes are flattened for a weight product and
      restored after it (HF ``Conv1D``: ``addmm(b, x.view(-1, nx), W).view(..., nf)``).
    """
    sizes = explicit_sizes(node)
    gi, go = ci.atoms, co.atoms
    if len(ci.axes) == 1 and len(co.axes) >= 2 and go.size == gi.size and np.array_equal(go.reshape(-1), gi):
        derived = [k for k, a in enumerate(co.axes) if sizes is not None and sizes[a] == -1]
        k = derived[0] if len(derived) == 1 else len(co.axes) - 1
        if sizes is not None and not derived and len(co.axes) >= 3:
            k = len(co.axes) - 2  # (3, heads, head_dim) all written: a unit is a head (see the pin below)
        rows = np.moveaxis(go, k, 0).reshape(go.shape[k], -1)
        ca.union(np.repeat(rows[:, :1], rows.shape[1], axis=1), rows)  # one unit = one slice across axis k
        if sizes is not None and not derived and len(co.axes) >= 3:
            # (3, heads, head_dim) all written: the sizes are read from elsewhere (torchvision swin's C // heads
            # with C the block's input width; timm's self.num_heads), not from this tensor, so the shrinking
            # axis cannot follow it here; shrink tries it physically (attributes the forward reads are updated
            # and every planned shape checked) and refuses with this pin when it does not work
            a = co.axes[k]
            ca.pin_axes(go, [k], node, f"'{node.name}' writes the size {sizes[a]} of a channel-carrying axis "
                        f"(axis {a} of {list(node.outputs[0].shape)})")
        return
    if len(co.axes) == 1 and len(ci.axes) >= 2 and go.size == gi.size and np.array_equal(go, gi.reshape(-1)):
        return  # merge of a group split: follows the pruned count
    if sizes is None:
        return
    out = node.outputs[0]
    if node.name == "expand":  # a size equal to the input's on a non-broadcast axis can only restate it
        x = node.inputs[0]
        off = out.ndim - x.ndim
        sizes = [None if a >= off and x.shape[a - off] == out.shape[a] and x.shape[a - off] != 1 else s
                 for a, s in enumerate(sizes)]
    prod = ca.graph.producer(node.inputs[0])
    free = _repeated_axis(ci, co) if prod is not None and prod.name == "expand" else None
    if free is None and _weight_product_reshape(ca, node, ci, co):
        return
    fixed = [k for k, a in enumerate(co.axes)
             if a < len(sizes) and sizes[a] is not None and sizes[a] != -1 and a != free]
    if fixed:
        a = co.axes[fixed[0]]
        ca.pin_axes(go, fixed, node, f"'{node.name}' writes the size {sizes[a]} of a channel-carrying axis "
                    f"(axis {a} of {list(out.shape)})")


def _repeated_axis(ci: ChannelInfo, co: ChannelInfo) -> int | None:
    """The output axis along which every input position is repeated ``r`` times in a row (``repeat_kv``)."""
    gi, go = ci.atoms, co.atoms
    if gi.ndim != go.ndim or go.size <= gi.size or go.size % gi.size:
        return None
    for k in range(gi.ndim):
        if go.shape[k] % gi.shape[k] == 0 and go.shape[:k] + go.shape[k + 1:] == gi.shape[:k] + gi.shape[k + 1:]:
            r = go.shape[k] // gi.shape[k]
            if r > 1 and np.array_equal(np.repeat(gi, r, axis=k), go):
                return co.axes[k]
    return None


_WEIGHT_PRODUCTS = frozenset({"addmm", "mm", "matmul", "linear"})


def _weight_product_reshape(ca: ChannelAtoms, node: OpNode, ci: ChannelInfo, co: ChannelInfo) -> bool:
    """A reshape that keeps the trailing channel axis as is, next to a product with a weight (``Conv1D``)."""
    x, out = node.inputs[0], node.outputs[0]
    if ci.axes != (x.ndim - 1,) or co.axes != (out.ndim - 1,) or not np.array_equal(ci.atoms, co.atoms):
        return False

    def weight_product(n: OpNode | None) -> bool:
        return n is not None and n.name in _WEIGHT_PRODUCTS and any(t.kind == "param" and t.ndim == 2
                                                                    for t in n.inputs)

    cons = ca.graph.consumers(out)
    return weight_product(ca.graph.producer(x)) or (bool(cons) and all(weight_product(n) for n in cons))


def split_rule(ca: ChannelAtoms, node: OpNode, ci: ChannelInfo, outs: list[ChannelInfo | None]) -> None:
    x = node.inputs[0]
    dim = arg(node, 2 if node.name != "unbind" else 1, "dim", 0)
    if not isinstance(dim, int):
        return
    d = norm_axis(dim, x.ndim)
    if d not in ci.axes:
        return
    if node.name == "unbind":
        # one piece per position along d (q, k, v = qkv.unbind(0)): the pieces stay stacked, so a unit takes the
        # same position from each; a unit that is a whole slice along d would change the number of pieces
        k = ci.axes.index(d)
        g = np.moveaxis(ci.atoms, k, 0)
        for piece in g[1:]:
            ca.union(g[0], piece)
        ca.pin_axes(ci.atoms, [k], node, f"'unbind' makes one output per position of a channel-carrying axis "
                    f"(axis {d} of size {x.shape[d]}): their number is fixed")
        return
    size_arg = arg(node, 1, "split_size_or_sections" if node.name != "chunk" else "chunks", None)
    if node.name == "split" and size_arg is None:
        size_arg = node.kwargs.get("split_size")
    sizes = [o.shape[d] for o in node.outputs] if node.name != "unbind" else []
    equal = len(set(sizes)) == 1 and len(sizes) > 1
    computed = node.name in ("chunk", "unsafe_chunk") or (node.name in ("split", "unsafe_split")
                                                           and isinstance(size_arg, int))
    if equal and computed:
        reps = [ca.reps(o, x.ndim, d, sz) for o, sz in zip(outs, sizes)]
        for r in reps[1:]:
            ca.union(reps[0], r)  # chunk re-splits at C'/n: prune the same position in every piece
    else:
        ca.pin(ci.atoms, node, f"'{node.name}' cuts the channel axis at fixed sizes {sizes or 1}")


def unfold_op(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    """``F.unfold`` (im2col): channel ``c`` of ``(N, C, H, W)`` becomes rows ``c*K .. c*K+K-1`` of ``(N, C*K, L)``
    (``K`` = kernel positions; padded entries still belong to channel ``c``'s rows). ``Tensor.unfold(dim, size,
    step)`` (a sliding-window view, one more axis) is replayed like the other shape ops."""
    x, out = node.inputs[0], node.outputs[0]
    if out.ndim == x.ndim + 1:
        shape_op(ca, node, ins)
        return
    ci, cax = ins[0], x.ndim - 3
    if ci is None:
        return
    if ci.axes != (cax,) or out.ndim != x.ndim - 1 or out.shape[cax] % x.shape[cax]:
        raise UnknownOp("'unfold' of a tensor whose channels are not on its channel axis alone")
    ca.set_info(out, ChannelInfo((cax,), np.repeat(ci.atoms, out.shape[cax] // x.shape[cax])))


def fold_op(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    """``F.fold`` (col2im): rows ``c*K .. c*K+K-1`` of ``(N, C*K, L)`` are summed into channel ``c``: one unit."""
    x, out = node.inputs[0], node.outputs[0]
    ci, cax = ins[0], x.ndim - 2
    if ci is None:
        return
    if ci.axes != (cax,) or out.ndim != x.ndim + 1 or x.shape[cax] % out.shape[cax]:
        raise UnknownOp("'fold' of a tensor whose channels are not on its channel axis alone")
    g = ci.atoms.reshape(out.shape[cax], -1)
    rep = first_valid(g)
    ca.union(np.repeat(rep, g.shape[1]), g.reshape(-1))
    ca.set_info(out, ChannelInfo((cax,), rep))


def _reduce_or_elementwise(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    """``max``/``min``: a reduction with one tensor input, elementwise with two."""
    if len(node.inputs) == 1:
        reduce_op(ca, node, ins)
    else:
        elementwise(ca, node, ins)


def _cat_op(ca: ChannelAtoms, node: OpNode, ins: list[ChannelInfo | None]) -> None:
    if not cat_nonchannel(ca, node, ins):
        shape_op(ca, node, ins)


RULES: dict[str, Rule] = {}


def register_channel_rule(*names: str, family: str | None = None,
                          zero_preserving: bool = False) -> Callable[[Rule], Rule]:
    """Register the channel semantics of the ops ``names`` (recorded op names, :func:`prunescope.ops.op_name`:
    ``'mylib::act'`` for a ``torch.library`` custom op), as the built-in rules are registered.

    An op without a rule stops the channel analysis: the layers feeding it are reported unsafe
    (:func:`~prunescope.removal.not_safe_to_prune`) and shrink keeps their channels. Two forms:

    * ``register_channel_rule(name, family="elementwise" | "unary", zero_preserving=...)`` registers at once: the
      op behaves like the built-in family — ``"elementwise"``: its tensor operands are combined element by
      element with broadcasting (their channels are tied, like ``add``/``mul``); ``"unary"``: its output has the
      channels of its first input (an activation). ``zero_preserving=True`` says the op maps zeros to exactly
      zero (f(0) = 0), so a removed channel stays removed through it and shrink can narrow the layers around
      it; without it a removed channel becomes an unknown value there and shrink keeps it unless a norm or a
      layer module after it zeroes it (the value analysis, :mod:`.values`).
    * ``@register_channel_rule(name)`` on a function ``rule(ca, node, ins)`` (see the module docs) registers
      a rule of your own; it describes channels only (the value analysis treats the op's outputs as unknown).

    A later registration of a name overrides an earlier one (the built-in rules included).

    >>> import torch
    >>> from torch import nn
    >>> from prunescope import not_safe_to_prune, register_channel_rule
    >>> @torch.library.custom_op("psdoc::soft_clip", mutates_args=())
    ... def soft_clip(x: torch.Tensor) -> torch.Tensor:
    ...     return torch.tanh(x)
    >>> @soft_clip.register_fake
    ... def _(x):
    ...     return torch.empty_like(x)
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)
    ...     def forward(self, x):
    ...         return self.conv2(soft_clip(self.conv1(x)))
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:  # the op stops the analysis: conv1 feeds it
    ...     not_safe_to_prune(Net(), torch.ones(1, 3, 16, 16))
    ['conv1']
    >>> "stopped at op 'psdoc::soft_clip'" in str(w[0].message)
    True
    >>> _ = register_channel_rule("psdoc::soft_clip", family="unary", zero_preserving=True)
    >>> not_safe_to_prune(Net(), torch.ones(1, 3, 16, 16))
    []
    """
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"register_channel_rule needs op names (non-empty strings), got {names!r}")
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(f"register_channel_rule: unknown family {family!r}; choose one of {sorted(FAMILIES)}")
        rule = _FAMILY_RULES[family]
        for n in names:
            add_to_family(n, family, zero_preserving=zero_preserving)
            RULES[n] = rule
    elif zero_preserving:
        raise ConfigError("register_channel_rule: zero_preserving applies to a family (family='elementwise' or "
                          "'unary'); a rule of your own describes channels only")

    def deco(rule: Rule) -> Rule:
        if family is not None:
            raise ConfigError(f"register_channel_rule({', '.join(map(repr, names))}, family={family!r}) has "
                              "registered the family's rule already; use either family= or the decorator")
        if not callable(rule):
            raise ConfigError(f"register_channel_rule: the rule must be a function (ca, node, ins), got "
                              f"{type(rule).__name__}")
        for n in names:
            RULES[n] = rule
        return rule

    return deco


def _register_builtin_rules() -> None:
    # lowest precedence first: a later family overrides an op name that is in several
    register_channel_rule(*MATMUL_OPS)(matmul)
    register_channel_rule(*SHAPE_OPS)(shape_op)
    register_channel_rule("cat", "concat", "concatenate", "stack")(_cat_op)
    register_channel_rule(*REDUCTIONS)(reduce_op)
    register_channel_rule(*UNARY)(passthrough)
    register_channel_rule(*ELEMENTWISE)(elementwise)
    register_channel_rule(*(REDUCTIONS & ELEMENTWISE))(_reduce_or_elementwise)
    register_channel_rule(*NORM_AXIS)(norm_op)
    register_channel_rule(*LAYER_OPS)(layer_op)
    register_channel_rule("addmm", "baddbmm")(addmm)
    register_channel_rule("scaled_dot_product_attention")(sdpa)
    register_channel_rule("einsum")(einsum)
    register_channel_rule("unfold")(unfold_op)
    register_channel_rule("_pack_padded_sequence", "_pad_packed_sequence")(packed_sequence_op)
    register_channel_rule("fold")(fold_op)


_FAMILY_RULES: dict[str, Rule] = {"elementwise": elementwise, "unary": passthrough}
_register_builtin_rules()
# the mixture-of-experts rules (topk, _grouped_mm, bmm of gathered expert weights) are registered by
# topology/moe.py itself, with register_channel_rule (the topology package imports it)
