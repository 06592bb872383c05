"""The removal plan: which channels physically go, and how every stored tensor narrows with them.

One plan, computed once from the channel engine of one trace (:func:`prunescope.topology.channel_atoms`), is
read by both the effective counter (:func:`prunescope.flops.effective.effective_report`) and
:func:`prunescope.narrow.shrink`, so the two can never disagree.

Which channels go
-----------------
Every output channel of every layer is an *atom*; the engine joins atoms into *classes* that must be pruned
together (a residual add, an SE scale, a depthwise convolution, a channel shuffle ...). A class is removed
when **every** member that votes is masked (its filter is all zeros) — the outcome of ``fix_mask_conflict``'s
union policy followed by physical pruning. Depthwise output channels do not vote: they follow their input
channel. A class is **kept** (*protected*) when removing it could not be expressed by narrowing stored
tensors of the same modules:

* it reaches a model output (removing it would change the output's shape);
* it is read by a layer that cannot be narrowed: attention, an embedding, a matrix product with a parameter,
  a layer whose weight is computed (a parametrization, a weight norm) instead of stored — a weight
  standardisation of one stored weight (timm's ``StdConv2d``, ``ScaledStdConv2d``) excepted: it narrows on the
  stored weight and its per-filter gain (:mod:`.stdconv`);
* it is combined with a tensor derived from a parameter in a way other than a direct elementwise use or a
  concatenation along a non-channel axis of a pure view of the parameter (a concatenation along the channel
  axis, a token computed by a layer from the parameter);
* a grouped convolution would keep unequal numbers of channels per group, or a ``GroupNorm`` would keep a
  channel count its group count does not divide;
* it reaches an op that loses it (a layer's input column, the summed axis of a product) with a value other than
  zero in the as-pruned model (:mod:`prunescope.topology.values`): a constant (``sigmoid(0)``, ``relu(x) + 1``)
  is folded into the layer's bias where that is exact (a Linear, a convolution without zero padding, per group;
  a :class:`Fold`, applied by :mod:`.fold`), anything else keeps the channel; so does a constant on a meta model
  (no value to fold).

Protection repeats until nothing changes (protecting a class can only keep more). A removed class that the
engine *pins* (``not_safe_to_prune``: a literal size in a reshape, an op with unknown channel semantics, a mean
or softmax over the channel axis) is an error: :class:`ShrinkError` names the layer and the op.

How tensors narrow
------------------
A :class:`Cut` says, for one stored parameter or buffer (by its qualified name), which indices to keep along
which axes: the output (and input) channels of convolutions and linear layers — per group for grouped
convolutions —, the channels of norms (weight, bias, running statistics), PReLU slopes, and parameters used
directly (or through a pure reshape) in an elementwise op with a channel tensor (a layer scale, a position
embedding), and parameters concatenated through a pure view (``expand``, ``repeat`` along size-1 axes, ``view``
...) along a non-channel axis with a channel tensor, their axis aligned with its channel axis (a ViT's class,
distillation and register tokens, ``torch.cat([cls_token.expand(B, -1, -1), x], dim=1)``): the token rows of the
concatenation then lose the same channels as the other rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import MaskError, ShrinkError
from ..graph import ModelGraph, OpNode, TensorInfo
from ..ops import CONTRACTION_OPS as _CONTRACTIONS
from ..ops import CONV_OPS, CONV_TRANSPOSE_OPS, ELEMENTWISE, EXPERT_OPS, MATMUL_OPS
from ..ops import NORM_AXIS as _NORM_AXIS
from ..ops import arg as _arg
from ..topology import channel_atoms
from ..topology.values import CONST, UNKNOWN, ZERO, value_states
from .expert_cuts import expert_cuts, expert_filter_keep, expert_protection
from .stdconv import std_weights

__all__ = ["ShrinkError", "Cut", "Fold", "RemovalPlan", "plan_removal", "assemble_plan", "removed_channels",
           "example_inputs", "value_pinned_removals", "param_view_shapes"]

_CONV = CONV_OPS - CONV_TRANSPOSE_OPS  # convolutions that are not transposed
# ops whose output is the element-for-element rearrangement of one input (for parameter-derived tensors)
RESHAPE_LIKE = frozenset("view reshape unsqueeze squeeze flatten unflatten contiguous clone detach to float "
                          "half double bfloat16 type_as".split())
# ops that broadcast one input to a larger shape (a class token's ``expand(B, -1, -1)``)
_BROADCASTS = frozenset(("expand", "expand_as", "broadcast_to", "repeat"))
_CATS = frozenset(("cat", "concat", "concatenate"))


@dataclass
class Cut:
    """How one stored tensor narrows: ``keep`` per axis (bool arrays); ``grouped`` for grouped layers.

    ``grouped = (groups, out_axis, in_axis, out_keep, in_keep)``: the weight of a grouped convolution, whose
    in-axis index depends on the group of the output channel (``in_keep`` covers all input channels).
    """

    name: str
    shape: tuple[int, ...]
    keep: dict[int, np.ndarray] = field(default_factory=dict)
    grouped: tuple[int, int, int, np.ndarray, np.ndarray] | None = None

    def new_shape(self) -> tuple[int, ...]:
        s = list(self.shape)
        for ax, k in self.keep.items():
            s[ax] = int(k.sum())
        if self.grouped is not None:
            g, oa, ia, ok, ik = self.grouped
            s[oa] = int(ok.sum()) if oa == 0 else int(ok.sum()) // g
            s[ia] = int(ik.sum()) // g if ia == 1 else int(ik.sum())
        return tuple(s)

    def changes(self) -> bool:
        return self.new_shape() != tuple(self.shape)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """The narrowed copy of ``t`` (which has ``self.shape``)."""
        out = t
        if self.grouped is not None:
            g, oa, ia, ok, ik = self.grouped
            out = _grouped_select(out, g, oa, ia, ok, ik)
        for ax, k in sorted(self.keep.items()):
            if not k.all():
                idx = torch.as_tensor(np.nonzero(k)[0], dtype=torch.long, device=out.device)
                out = out.index_select(ax, idx)
        return out.clone() if out is t else out

    def merge(self, axis: int, keep: np.ndarray, where: str) -> None:
        old = self.keep.get(axis)
        if old is not None and not np.array_equal(old, keep):
            raise ShrinkError(f"tensor '{self.name}' would be narrowed differently along axis {axis} by two uses "
                              f"({where}); a shared tensor must keep the same channels everywhere", self.name)
        self.keep[axis] = keep


def _grouped_select(t: torch.Tensor, g: int, oa: int, ia: int, ok: np.ndarray, ik: np.ndarray) -> torch.Tensor:
    """Select per group. Conv weight ``(C_out, C_in/g, k)`` (``oa=0``): rows are output channels of all groups,
    columns the in-group input channels; transposed ``(C_in, C_out/g, k)`` (``oa=1``): the other way round."""
    row_keep, col_keep = (ok, ik) if oa == 0 else (ik, ok)
    rpg, cpg = t.shape[0] // g, t.shape[1]
    parts = []
    for k in range(g):
        rows = np.nonzero(row_keep[k * rpg:(k + 1) * rpg])[0] + k * rpg
        cols = np.nonzero(col_keep[k * cpg:(k + 1) * cpg])[0]
        blk = t.index_select(0, torch.as_tensor(rows, dtype=torch.long, device=t.device))
        parts.append(blk.index_select(1, torch.as_tensor(cols, dtype=torch.long, device=t.device)))
    return torch.cat(parts, 0)


@dataclass
class Fold:
    """Removed input channels of layer ``layer`` that reach it as constants (``c_j`` at column ``j``): shrink adds
    ``W[:, j] * c_j`` (summed over the kernel and the layer's group) to the bias and drops the column.

    ``node``: the layer's op node; ``columns``: bool per input column; ``bias``: FQN of the bias parameter, or
    ``None`` when the layer has none and one is created (the effective count counts it). The values ``c_j``
    are read from one as-pruned forward when shrinking (:mod:`prunescope.removal.fold`).
    """

    layer: str
    node: int
    columns: np.ndarray
    bias: str | None


@dataclass
class RemovalPlan:
    """The outcome of :func:`plan_removal`.

    * ``removed``: ``{layer: bool array}`` of removed output channels, for every layer of the engine;
    * ``atom_removed``: per engine atom;
    * ``cuts``: ``{tensor FQN: Cut}`` for every stored parameter/buffer that narrows;
    * ``attrs``: ``{module name: {attribute: new value}}`` (``in_channels``, ``num_features``, ...);
    * ``protected``: ``{layer: [reason, ...]}`` for layers whose masked channels had to be kept;
    * ``ignored``: masked layers whose masks remove no channel here (unstructured masks, unnarrowable layers).
    """

    graph: ModelGraph
    atoms: Any
    removed: dict[str, np.ndarray]
    atom_removed: np.ndarray
    cuts: dict[str, Cut] = field(default_factory=dict)
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    protected: dict[str, list[str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    folds: dict[str, Fold] = field(default_factory=dict)

    def alive(self, atoms: np.ndarray) -> np.ndarray:
        a = np.asarray(atoms).reshape(-1)
        return np.where(a >= 0, ~self.atom_removed[np.maximum(a, 0)], True)

    @property
    def removed_count(self) -> int:
        return int(sum(int(v.sum()) for v in self.removed.values()))

    def param_count(self, model: torch.nn.Module) -> int:
        """Parameters of the narrowed model (shared parameters once)."""
        total = 0
        for name, p in model.named_parameters():
            c = self.cuts.get(name)
            total += int(np.prod(c.new_shape())) if c is not None else p.numel()
        for f in self.folds.values():  # a bias created to hold folded constants
            if f.bias is None:
                total += int((~self.removed[f.layer]).sum())
        return total


def example_inputs(graph: ModelGraph, device: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Inputs of the traced call's shapes and dtypes (random floats, zero integers, true booleans), for reading
    what the model computes independently of its input; None when the call cannot be rebuilt from the trace
    (nested or non-tensor inputs). ``device=None`` only checks."""
    pos: dict[int, TensorInfo] = {}
    kw: dict[str, TensorInfo] = {}
    for t in graph.inputs:
        name = t.name or ""
        if name.startswith("input.") and name[6:].isdigit():
            if int(name[6:]) in pos:
                return None
            pos[int(name[6:])] = t
        elif name and name not in kw:
            kw[name] = t
        else:
            return None
    if sorted(pos) != list(range(len(pos))):
        return None
    if device is None:
        return (), {}
    gen = torch.Generator().manual_seed(0)

    def make(t: TensorInfo) -> torch.Tensor:
        if t.dtype.is_floating_point:
            return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(device)
        if t.dtype == torch.bool:
            return torch.ones(t.shape, dtype=torch.bool, device=device)
        return torch.zeros(t.shape, dtype=t.dtype, device=device)

    return tuple(make(pos[i]) for i in range(len(pos))), {k: make(t) for k, t in kw.items()}


def _contracted_pairs(node: OpNode) -> list[tuple[TensorInfo, int, TensorInfo, int]] | None:
    """``(a, axis, b, axis)``: the operands and axes a product sums over, index by index (None: not known)."""
    ins = node.inputs
    if node.name in MATMUL_OPS and len(ins) == 2:
        a, b = ins
        return [(a, a.ndim - 1, b, b.ndim - 2 if b.ndim >= 2 else 0)]
    if node.name == "scaled_dot_product_attention" and len(ins) >= 3:
        q, k = ins[0], ins[1]
        return [(q, q.ndim - 1, k, k.ndim - 1)]  # softmax(q k^T) v sums v over keys: not a channel axis
    return None


def _nonzero_contracted(ca: Any, vs: Any, a: TensorInfo, ax_a: int | None, b: TensorInfo | None,
                        ax_b: int | None) -> list[tuple[TensorInfo, np.ndarray]]:
    """Atoms of removed positions on a summed axis where neither operand is zero (their product is not 0)."""
    def per_index(t: TensorInfo, ax: int) -> tuple[np.ndarray, np.ndarray] | None:
        ci, st = ca.info(t), vs.states.get(t.id)
        if ci is None or st is None or ax not in ci.axes:
            return None
        k = ci.axes.index(ax)
        return (np.moveaxis(st, k, 0).reshape(st.shape[k], -1).max(1),
                np.moveaxis(ci.atoms, k, 0).reshape(st.shape[k], -1))

    if ax_a is None or b is None or ax_b is None:
        st = vs.states.get(a.id)
        if st is None or not (st >= CONST).any():
            return []
        return [(a, ca.info(a).atoms[st >= CONST])]
    pa, pb = per_index(a, ax_a), per_index(b, ax_b)
    if pa is None and pb is None:
        return []
    n = a.shape[ax_a]
    sa = pa[0] if pa is not None else np.zeros(n, np.int8)
    sb = pb[0] if pb is not None else np.zeros(n, np.int8)
    if len(sa) != len(sb):
        return []
    bad = ((sa >= CONST) | (sb >= CONST)) & (sa != ZERO) & (sb != ZERO)
    if not bad.any():
        return []
    return [(t, p[1][bad]) for t, p in ((a, pa), (b, pb)) if p is not None]


def _read_axis(node: OpNode, x: TensorInfo) -> int:
    """The axis of input ``x`` whose positions are a layer call's input columns."""
    if node.name in CONV_OPS:
        w = _arg(node, 1, "weight")
        return 1 if isinstance(w, TensorInfo) and x.ndim == w.ndim else 0
    return x.ndim - 1


def axis_positions(ci: Any, axis: int, atom_removed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along channel axis ``axis`` of a tensor: ``(rows, gone, mixed)`` — the atoms of each position (one row
    per position), which positions lose every atom (they leave the axis), which lose some but not all."""
    k = ci.axes.index(axis)
    rows = np.moveaxis(ci.atoms, k, 0).reshape(ci.atoms.shape[k], -1)
    valid = rows >= 0
    rem = np.where(valid, atom_removed[np.maximum(rows, 0)], False)
    gone = valid.any(1) & (rem | ~valid).all(1)
    return rows, gone, rem.any(1) & ~gone


def _weight_args(node: OpNode) -> tuple[Any, Any, int, int]:
    """``(weight, bias, output axis, input axis)`` of a layer call: ``conv*``/``linear(x, W, b)``, or
    ``addmm(b, x, W)`` with a parameter ``W`` of shape ``(in, out)`` (Hugging Face ``Conv1D``)."""
    if node.name == "addmm":
        return _arg(node, 2, "mat2"), _arg(node, 0, "input"), 1, 0
    if node.name in CONV_TRANSPOSE_OPS:
        return _arg(node, 1, "weight"), _arg(node, 2, "bias"), 1, 0
    if node.name == "embedding":  # embedding(ids, weight (num, dim)): a channel is a column
        return _arg(node, 1, "weight"), None, 1, -1
    return _arg(node, 1, "weight"), _arg(node, 2, "bias"), 0, 1


def _narrowable(node: OpNode) -> bool:
    if node.name in CONV_OPS or node.name in ("linear", "embedding"):
        return True
    w = _arg(node, 2, "mat2") if node.name == "addmm" else None
    return isinstance(w, TensorInfo) and w.kind == "param" and w.ndim == 2


def _filter_keep(mask: torch.Tensor, kind: str, groups: int, out_dim: int = 0) -> np.ndarray:
    """Per output channel: does the mask keep any weight of that channel's filter?"""
    m = mask.detach().to("cpu") != 0
    if kind in ("linear", "embedding") and out_dim:  # weight (in, out): HF Conv1D, nn.Embedding
        m = m.movedim(out_dim, 0)
    if kind == "conv_transpose":  # weight (C_in, C_out/g, *k): output channel = g * (C_out/g) + j
        cin, cpg = m.shape[0], m.shape[1]
        per_group = m.reshape(groups, cin // groups, cpg, -1).any(dim=(1, 3))  # (g, C_out/g)
        return per_group.reshape(-1).numpy()
    return m.reshape(m.shape[0], -1).any(dim=1).numpy()


def masked_atoms(ca: Any, masks: Mapping[str, Any], ignored: list[str]) -> np.ndarray:
    n = len(ca.root)
    masked = np.zeros(n, dtype=bool)
    for layer, m in masks.items():
        w = m.get("weight") if isinstance(m, Mapping) else m
        if w is None:
            continue
        li = ca.layers.get(layer)
        if li is None or li.kind not in ("conv", "conv_transpose", "linear", "experts", "embedding"):
            ignored.append(layer)
            continue
        if w.device.type == "meta":
            raise MaskError(f"mask of layer {layer!r} is on the meta device: it has no values to read")
        if li.kind == "experts":  # a fused expert parameter (removal/expert_cuts.py)
            keep = expert_filter_keep(w, li)
        else:
            keep = _filter_keep(w, li.kind, li.groups, getattr(li, "weight_out_dim", 0) or 0)
        if keep.shape[0] != li.out_channels:
            raise MaskError(f"mask of layer {layer!r} covers {keep.shape[0]} output channels, the layer has "
                            f"{li.out_channels}")
        masked[li.atom_start: li.atom_start + li.out_channels] = ~keep
    return masked


def decide_removal(ca: Any, masked: np.ndarray, protected: np.ndarray) -> np.ndarray:
    n = len(ca.root)
    voter = np.ones(n, dtype=bool)
    for li in ca.layers.values():
        if li.depthwise:
            voter[li.atom_start: li.atom_start + li.out_channels] = False
    root = ca.root
    rv = root[voter]  # per class: does any voter keep it, is there a voter at all (bincount: ufunc.at is slow)
    alive_vote = np.bincount(rv, weights=(~masked[voter]).astype(np.float64), minlength=n) > 0
    has_voter = np.bincount(rv, minlength=n) > 0
    class_removed = has_voter & ~alive_vote
    prot_cls = np.zeros(n, dtype=bool)
    prot_cls[root[protected]] = True
    class_removed &= ~prot_cls
    atom_removed = class_removed[root]
    # a depthwise filter removed by its own mask goes too (its input channel may stay: checked later)
    atom_removed |= masked & ~voter & ~prot_cls[root]
    return atom_removed


def removed_channels(graph: ModelGraph, masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{layer: bool array}`` of output channels that are physically removed (see the module docs)."""
    return plan_removal(graph, masks, check_pins=False).removed


class Planner:
    def __init__(self, graph: ModelGraph, masks: Mapping[str, Any]) -> None:
        self.g = graph
        self.ca = channel_atoms(graph)
        self.ignored: list[str] = []
        self.masked = masked_atoms(self.ca, masks, self.ignored)
        self.prot = np.zeros(len(self.ca.root), dtype=bool)
        self.reasons: dict[int, str] = {}  # class root -> first reason it was protected
        self.derived = self._param_derived()
        self.std = std_weights(graph)  # weight-standardised convolutions: narrowed on their stored weight
        self.folds: dict[str, Fold] = {}
        self._layer_nodes = {i for li in self.ca.layers.values() for i in li.nodes}
        self.states: Callable[[np.ndarray], Any] | None = None  # value_states of a removal vector (cache)
        self.values_known = example_inputs(graph, None) is not None and not any(
            p.device.type == "meta" for p in graph.model.parameters())
        self.const_ids = set(self.derived) | {t.id for t in graph.tensors if t.kind == "const"}
        model = graph.model
        self.stored = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {
            n for n, _ in model.named_buffers(remove_duplicate=False)}
        self.views = self._param_views()

    # -- helpers
    def protect(self, atoms: np.ndarray, reason: str) -> bool:
        a = np.asarray(atoms).reshape(-1)
        a = a[a >= 0]
        new = a[~self.prot[a]]
        if new.size == 0:
            return False
        self.prot[new] = True
        for c in np.unique(self.ca.root[new]).tolist():
            self.reasons.setdefault(int(c), reason)
        return True

    def info_atoms(self, t: TensorInfo) -> np.ndarray:
        ci = self.ca.info(t)
        return ci.atoms.reshape(-1) if ci is not None else np.zeros(0, np.int64)

    def _param_derived(self) -> dict[int, tuple[str, int | None]]:
        """Tensors computed from one stored tensor alone: id -> (FQN, axis of the 1-D source or None)."""
        out: dict[int, tuple[str, int | None]] = {}
        for t in self.g.tensors:
            if t.kind in ("param", "buffer") and t.name:
                out[t.id] = (t.name, 0 if sum(s > 1 for s in t.shape) <= 1 and t.ndim == 1 else None)
        for node in self.g.nodes:
            tins = [t for t in node.inputs if t.kind != "const"]
            if not tins or not all(t.id in out for t in tins) or node.name in CONV_OPS | {"linear"}:
                continue
            if node.name in _NORM_AXIS or node.name == "embedding":
                continue
            src = out[tins[0].id]
            for o in node.outputs:
                axis = None
                if len(tins) == 1 and node.name in RESHAPE_LIKE and src[1] is not None:
                    big = [i for i, s in enumerate(o.shape) if s > 1]
                    if len(big) == 1 and o.numel() == tins[0].numel():
                        axis = big[0]
                out[o.id] = (src[0], axis)
        return out

    def _param_views(self) -> dict[int, tuple[TensorInfo, tuple[int | None, ...]]]:
        """Tensors that are a pure view of one stored tensor ``P`` (reshapes, ``expand``, ``repeat`` along
        size-1 axes): id -> ``(P, per axis the axis of P it is, or None for a size-1 or broadcast axis)``."""
        seeds = {t.id: (t, tuple(a if s > 1 else None for a, s in enumerate(t.shape))) for t in self.g.tensors
                 if t.kind in ("param", "buffer") and t.name and t.name in self.stored}
        return {tid: (src, axes) for tid, (src, axes, _o) in _follow_views(self.g, seeds).items()}

    # -- protection rules that do not depend on the decision
    def static_protection(self) -> None:
        ca, g = self.ca, self.g
        for t in g.outputs:
            self.protect(self.info_atoms(t), "its channels reach a model output")
        for name, li in ca.layers.items():
            if li.kind == "experts":  # narrowed through its stored 3-D parameter (removal/expert_cuts.py)
                continue
            if li.kind not in ("conv", "conv_transpose", "linear", "embedding") or not all(
                    _narrowable(g.nodes[i]) for i in li.nodes):
                for rep in li.inputs:
                    self.protect(rep, f"it feeds '{name}' ({li.kind}), which shrink does not narrow")
                self.protect(ca.layer_atoms(name), f"'{name}' ({li.kind}) is not narrowed by shrink")
                continue
            for idx in li.nodes:
                node = g.nodes[idx]
                w = _weight_args(node)[0]
                if idx in self.std:  # a recognised weight standardisation (removal/stdconv.py)
                    continue
                if not isinstance(w, TensorInfo) or w.kind != "param" or not w.name or w.name not in self.stored:
                    why = (f"the weight of '{name}' is computed (a parametrization, weight standardisation ...), "
                           "not a stored tensor shrink can narrow")
                    self.protect(ca.layer_atoms(name), why)
                    for rep in li.inputs:
                        self.protect(rep, why)
        for node in g.nodes:
            self._protect_param_uses(node)

    def _protect_head_dim(self, node: OpNode, atom_removed: np.ndarray) -> bool:
        """SDPA without ``scale`` divides by √(head_dim of q): narrowing that axis would change every score."""
        changed = False
        for t in node.inputs[:2]:
            ci = self.ca.info(t)
            if ci is None or t.ndim - 1 not in ci.axes:
                continue
            rows, gone, _ = axis_positions(ci, t.ndim - 1, atom_removed)
            lost = rows[gone]  # positions that would leave the axis
            if lost.size:
                changed |= self.protect(lost, f"scaled_dot_product_attention in '{node.module}' scales by "
                                        "1/sqrt(head_dim): removing in-head positions would change every score")
        return changed

    def _protect_param_uses(self, node: OpNode) -> None:
        name = node.name
        if _narrowable(node) or name in _NORM_AXIS or name == "embedding" or name in EXPERT_OPS:
            return
        derived = [t for t in node.inputs if t.id in self.derived]
        if not derived:
            return
        chan = [t for t in list(node.inputs) + list(node.outputs) if self.ca.info(t) is not None]
        if not chan:
            return
        if name == "prelu":
            return
        if name in ELEMENTWISE and self._elementwise_ok(node, derived):
            return
        if name in _CATS and _cat_views(self, node, derived) is not None:  # a class token: cut with the channels
            return
        why = f"'{name}' combines them with a tensor derived from parameter '{self.derived[derived[0].id][0]}'"
        for t in chan:
            self.protect(self.info_atoms(t), why)

    def _elementwise_ok(self, node: OpNode, derived: list[TensorInfo]) -> bool:
        out = node.outputs[0] if node.outputs else None
        ci = self.ca.info(out) if out is not None else None
        if ci is None:
            return True
        for t in derived:
            fqn, src_axis = self.derived[t.id]
            for _a, pa in _aligned(out, ci, t):
                if len(ci.axes) != 1:
                    return False
                if t.kind not in ("param", "buffer") and src_axis != pa and self._view_axis(t, pa) is None:
                    return False
        return True

    def _view_axis(self, t: TensorInfo, axis: int) -> tuple[TensorInfo, int] | None:
        """``(stored tensor, its axis)`` when ``t`` is a pure view of a stored tensor whose ``axis`` is a whole
        axis of it (CaiT's ``cls_token.expand(B, -1, -1)`` added to the attention output), else None."""
        view = self.views.get(t.id)
        if view is None or view[1][axis] is None:
            return None
        src, pa = view[0], view[1][axis]
        return (src, pa) if src.shape[pa] == t.shape[axis] else None

    # -- rules that depend on the decision
    def layer_keeps(self, atom_removed: np.ndarray, name: str) -> tuple[np.ndarray, list[np.ndarray]]:
        li = self.ca.layers[name]
        out_keep = ~atom_removed[li.atom_start: li.atom_start + li.out_channels]
        ins = [np.where(r >= 0, ~atom_removed[np.maximum(r, 0)], True) for r in li.inputs]
        return out_keep, ins

    def value_protection(self, atom_removed: np.ndarray) -> bool:
        """Removed channels must reach every op that loses them as exact zeros (as-pruned), or as constants a
        layer can fold into its bias; otherwise they stay (:mod:`prunescope.topology.values`)."""
        self.folds = {}
        if not atom_removed.any():
            return False
        ca, g = self.ca, self.g
        vs = self.states(atom_removed) if self.states is not None else value_states(ca, atom_removed,
                                                                                       self.const_ids)
        changed = False
        for name, li in ca.layers.items():
            if li.depthwise:  # input channel c feeds only output channels of c, which are tied to it: removed too
                continue
            for idx, rep, tid in zip(li.nodes, li.inputs, li.input_ids):
                st = vs.states.get(tid)
                node = g.nodes[idx]
                x = next((t for t in node.inputs if t.id == tid), None)
                if st is None or x is None:
                    continue
                ci = ca.info(x)
                ax = _read_axis(node, x)
                if ci is None or ax not in ci.axes or len(rep) != x.shape[ax]:
                    continue
                col = np.moveaxis(st, ci.axes.index(ax), 0).reshape(x.shape[ax], -1).max(1)
                why = vs.explain.get(tid, "?")
                unknown = col == UNKNOWN
                if unknown.any():
                    changed |= self.protect(rep[unknown], f"removed channels would reach '{name}' with values that "
                                            f"depend on the input ({why}); in the as-pruned model they are not zero")
                const = col == CONST
                if const.any():
                    fold, refusal = self._foldable(name, li, node)
                    if fold is None:
                        changed |= self.protect(rep[const], f"removed channels reach '{name}' as a constant ({why}) "
                                                f"that cannot be folded into its bias exactly: {refusal}")
                    else:
                        fold.columns = const
                        self.folds[name] = fold
        for node in g.nodes:  # contractions between activations lose a removed position: it must be zero
            if node.index in self._layer_nodes or node.name not in _CONTRACTIONS:
                continue
            pairs = _contracted_pairs(node)
            if pairs is None:  # einsum, baddbmm ...: every removed position of an operand must be zero
                pairs = [(t, None, None, None) for t in node.inputs]
            for a, ax_a, b, ax_b in pairs:
                bad = _nonzero_contracted(ca, vs, a, ax_a, b, ax_b)
                for t, atoms in bad:
                    changed |= self.protect(atoms, f"removed channels reach '{node.name}' in '{node.module}', which "
                                            f"sums over them, not as zeros ({vs.explain.get(t.id, '?')})")
        for _node, x, atoms, text in ca.neutral_checks:  # sums over channels: neutral only for exact zeros
            st = vs.states.get(x.id)
            if st is not None and st.shape == atoms.shape and (st >= CONST).any():
                changed |= self.protect(atoms[st >= CONST], text)
        if changed:
            self.folds = {}
        return changed

    def _foldable(self, name: str, li: Any, node: OpNode) -> tuple[Fold | None, str]:
        """A :class:`Fold` for constants reaching layer ``name`` (columns set by the caller), or why not."""
        if li.kind not in ("conv", "linear") or not _narrowable(node):
            return None, f"'{name}' is a {li.kind} layer (only linear layers and convolutions fold)"
        if node.index in self.std:
            return None, (f"the weight of '{name}' is standardised over its input columns: the narrowed layer "
                          "standardises over the kept ones, a removed column has no weight to fold with")
        if len(li.nodes) > 1:
            return None, f"'{name}' is called {len(li.nodes)} times (one bias for several inputs)"
        if node.name in _CONV:
            pad = _arg(node, 4, "padding", 0)
            pads = [pad] if isinstance(pad, int) else list(pad) if isinstance(pad, (tuple, list)) else None
            if pad != "valid" and (pads is None or any(p != 0 for p in pads)):
                return None, (f"'{name}' pads with zeros: its border outputs see the padding's zeros, not the "
                              "constant")
        if not self.values_known:
            return None, ("the constant's value is needed and this model has none (meta device) or its example "
                          "input cannot be rebuilt")
        b = _weight_args(node)[1]
        if isinstance(b, TensorInfo):
            if b.kind != "param" or not b.name or b.name not in self.stored:
                return None, f"the bias of '{name}' is computed, not a stored parameter"
            return Fold(name, node.index, np.zeros(0, bool), b.name), ""
        mod = self.g.modules.get(name)
        if b is None and isinstance(mod, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and mod.bias is None:
            return Fold(name, node.index, np.zeros(0, bool), None), ""
        return None, f"'{name}' has no bias parameter to fold the constant into"

    def dynamic_protection(self, atom_removed: np.ndarray) -> bool:
        changed = expert_protection(self, atom_removed)  # fused experts: equal units per expert
        ca = self.ca
        for name, li in ca.layers.items():
            if li.kind not in ("conv", "conv_transpose") or li.groups <= 1:
                continue
            out_keep, ins = self.layer_keeps(atom_removed, name)
            gr = li.groups
            for in_keep in ins[:1]:
                if li.depthwise:
                    mult = li.out_channels // max(1, li.in_channels)
                    per = out_keep.reshape(-1, mult)
                    ok = (per.all(1) | ~per.any(1)) & (per.any(1) == in_keep)
                    if not ok.all():
                        bad = np.nonzero(~ok)[0]
                        outs = (bad[:, None] * mult + np.arange(mult)).reshape(-1)
                        changed |= self.protect(ca.layer_atoms(name)[outs],
                                                f"depthwise '{name}' would lose an output channel whose input stays")
                        changed |= self.protect(li.inputs[0][bad], f"depthwise '{name}' keeps its input channel")
                    continue
                oc = out_keep.reshape(gr, -1).sum(1)
                ic = in_keep.reshape(gr, -1).sum(1)
                if len(set(oc.tolist())) > 1 or (oc == 0).any():
                    changed |= self.protect(ca.layer_atoms(name), f"grouped '{name}' ({gr} groups) would keep "
                                            f"unequal output channels per group {sorted(set(oc.tolist()))}")
                if len(set(ic.tolist())) > 1 or (ic == 0).any():
                    changed |= self.protect(li.inputs[0], f"grouped '{name}' ({gr} groups) would keep unequal "
                                            f"input channels per group {sorted(set(ic.tolist()))}")
        for node in self.g.nodes:
            if node.name == "scaled_dot_product_attention" and _arg(node, 6, "scale") is None:
                changed |= self._protect_head_dim(node, atom_removed)
            if node.name != "group_norm":
                continue
            ci = self.ca.info(node.inputs[0])
            if ci is None or 1 not in ci.axes:
                continue
            keep = self.axis_keep(ci, 1, atom_removed)
            if keep is None:
                changed |= self.protect(ci.atoms, f"group_norm in '{node.module}': channels are mixed")
                continue
            groups = _arg(node, 1, "num_groups")
            n = int(keep.sum())
            if isinstance(groups, int) and n != len(keep) and (n == 0 or n % groups):
                changed |= self.protect(ci.atoms, f"GroupNorm '{node.module}' has {groups} groups, which do not "
                                        f"divide {n} channels")
        return changed or self.value_protection(atom_removed)

    @staticmethod
    def axis_keep(ci: Any, axis: int, atom_removed: np.ndarray) -> np.ndarray | None:
        """Keep per position of ``axis``; None if a position mixes removed and kept atoms."""
        _, gone, mixed = axis_positions(ci, axis, atom_removed)
        if mixed.any():
            return None
        return ~gone

    def decide(self, static: bool = True) -> np.ndarray:
        """Atoms removed. ``static=False``: the mask-independent protection is already in ``prot`` (a planner
        reused for many masks, :class:`prunescope.flops.plancost.PlanCost`)."""
        if static:
            self.static_protection()
        for _ in range(100):
            atom_removed = decide_removal(self.ca, self.masked, self.prot)
            if not self.dynamic_protection(atom_removed):
                return atom_removed
        return decide_removal(self.ca, self.masked, self.prot)


def plan_removal(graph: ModelGraph, masks: Mapping[str, Any], *, check_pins: bool = True) -> RemovalPlan:
    """The :class:`RemovalPlan` of ``masks`` (NNI layout, ``{layer: {'weight': t, 'bias': t}}``) on ``graph``."""
    pl = Planner(graph, masks)
    return assemble_plan(pl, pl.decide(), check_pins=check_pins)


def assemble_plan(pl: Planner, atom_removed: np.ndarray, *, check_pins: bool = True) -> RemovalPlan:
    """The :class:`RemovalPlan` of a planner's decision ``atom_removed`` (``pl.decide()``: its masks, reasons
    and folds are the decision's): which layers keep masked channels and why, the cuts and the folds. A planner
    reused for many masks (:class:`prunescope.flops.plancost.PlanCost`) builds the plan of each this way."""
    graph, ca = pl.g, pl.ca
    removed = {name: atom_removed[li.atom_start: li.atom_start + li.out_channels].copy()
               for name, li in ca.layers.items()}
    plan = RemovalPlan(graph, ca, removed, atom_removed, ignored=pl.ignored)
    for name, li in ca.layers.items():
        cls = ca.root[ca.layer_atoms(name)]
        mine = pl.masked[li.atom_start: li.atom_start + li.out_channels] & ~removed[name]
        if mine.any():
            rs = sorted({pl.reasons[int(c)] for c in np.unique(cls[mine]).tolist() if int(c) in pl.reasons})
            if rs:
                plan.protected[name] = rs
    if check_pins:
        pins = pinned_removals(plan)
        if pins:
            raise pin_error(*pins[0])
        check_not_empty(plan)
    if plan.removed_count:
        _make_cuts(plan, pl)
        plan.folds = dict(pl.folds)
        for f in plan.folds.values():
            out_keep = ~plan.removed[f.layer]
            if f.bias is None and not out_keep.all():  # the created bias narrows with the layer's outputs
                fqn = f"{f.layer}.bias" if f.layer else "bias"
                plan.cuts[fqn] = Cut(fqn, (len(out_keep),), {0: out_keep})
        expert_cuts(plan, pl)
    return plan


def pinned_removals(plan: RemovalPlan) -> list[tuple[str, str]]:
    """``(layer, reason)`` for every layer whose removed channels the engine pins (``not_safe_to_prune``)."""
    ca = plan.atoms
    notes = getattr(ca, "class_notes", {})
    out = []
    for name, rem in plan.removed.items():
        if not rem.any():
            continue
        for c in np.unique(ca.root[ca.layer_atoms(name)[rem]]).tolist():
            if c in notes:
                out.append((name, notes[c][0]))
                break
    return out


def value_pinned_removals(plan: RemovalPlan) -> list[tuple[str, str]]:
    """``(layer, reason)`` for removed channels the engine pins for their *values* (a mean or softmax over the
    channel axis, topk routing): the narrowed model would run and compute something else, so no physical try
    can clear these pins."""
    ca = plan.atoms
    pins = [a[a >= 0] for a in getattr(ca, "value_pins", None) or []]
    if not pins:
        return []
    cls = set(np.unique(ca.root[np.concatenate(pins)]).tolist())
    out = []
    for name, rem in plan.removed.items():
        if not rem.any():
            continue
        for c in np.unique(ca.root[ca.layer_atoms(name)[rem]]).tolist():
            if c in cls:
                out.append((name, ca.class_notes.get(c, ["its channels are used by value"])[0]))
                break
    return out


def check_not_empty(plan: RemovalPlan) -> None:
    """Refuse masks that remove every output channel of a layer."""
    for name, rem in plan.removed.items():
        if rem.size and rem.all():
            raise ShrinkError(f"the masks remove all {rem.size} output channels of layer '{name}'; a layer keeps "
                              "at least one (drop the layer from the model instead)", name)


def pin_error(layer: str, reason: str) -> ShrinkError:
    return ShrinkError(f"cannot remove channels of layer '{layer}': it is unsafe to prune ({reason})", layer, reason)


def _aligned(out: TensorInfo, ci: Any, t: TensorInfo) -> list[tuple[int, int]]:
    """``(output channel axis, axis of t)`` pairs where operand ``t`` is not broadcast (right-aligned shapes)."""
    off = out.ndim - t.ndim
    return [(a, a - off) for a in ci.axes if a - off >= 0 and t.shape[a - off] != 1]


def _put(plan: RemovalPlan, t: TensorInfo, axis: int, keep: np.ndarray, where: str) -> None:
    if keep.all() or not t.name:
        return
    c = plan.cuts.get(t.name)
    if c is None:
        c = plan.cuts[t.name] = Cut(t.name, tuple(t.shape))
    c.merge(axis, keep, where)


def _make_cuts(plan: RemovalPlan, pl: Planner) -> None:
    g, ca = plan.graph, plan.atoms
    ar = plan.atom_removed
    for name, li in ca.layers.items():
        if li.kind == "embedding":
            out_keep = ~ar[li.atom_start: li.atom_start + li.out_channels]
            if not out_keep.all():
                _put(plan, _weight_args(g.nodes[li.nodes[0]])[0], 1, out_keep, name)
                plan.attrs.setdefault(name, {})["embedding_dim"] = int(out_keep.sum())
            continue
        if li.kind not in ("conv", "conv_transpose", "linear"):
            continue
        out_keep, ins = pl.layer_keeps(ar, name)
        in_keep = ins[0] if ins else np.ones(li.in_channels, bool)
        for more in ins[1:]:
            if not np.array_equal(more, in_keep):
                raise ShrinkError(f"layer '{name}' is called on inputs that lose different channels", name)
        if out_keep.all() and in_keep.all():
            continue
        node = g.nodes[li.nodes[0]]
        w, _, w_out, w_in = _weight_args(node)
        std = [pl.std[i] for i in li.nodes if i in pl.std]
        if std:  # weight standardisation: the stored weight narrows, and the per-filter affine with its rows
            w = std[0].weight
            for s in std:
                for t, ax in s.affine:
                    _put(plan, t, ax, out_keep, name)
        gr = max(1, li.groups)
        attrs = plan.attrs.setdefault(name, {})
        if li.kind == "linear":
            _put(plan, w, w_out, out_keep, name)
            _put(plan, w, w_in, in_keep, name)
            if node.name == "addmm":  # Conv1D(nf, nx): the forward reads nf
                attrs.update(nx=int(in_keep.sum()), nf=int(out_keep.sum()))
            else:
                attrs.update(in_features=int(in_keep.sum()), out_features=int(out_keep.sum()))
        elif li.depthwise:
            _put(plan, w, 0, out_keep, name)
            attrs.update(in_channels=int(in_keep.sum()), out_channels=int(out_keep.sum()),
                         groups=int(in_keep.sum()))
        elif gr == 1:
            oa, ia = (1, 0) if li.kind == "conv_transpose" else (0, 1)
            _put(plan, w, oa, out_keep, name)
            _put(plan, w, ia, in_keep, name)
            attrs.update(in_channels=int(in_keep.sum()), out_channels=int(out_keep.sum()))
        else:
            oa, ia = (1, 0) if li.kind == "conv_transpose" else (0, 1)
            if w.name in plan.cuts:
                raise ShrinkError(f"grouped layer '{name}' shares its weight with another layer", name)
            plan.cuts[w.name] = Cut(w.name, tuple(w.shape), grouped=(gr, oa, ia, out_keep, in_keep))
            attrs.update(in_channels=int(in_keep.sum()), out_channels=int(out_keep.sum()))
        for idx in li.nodes:  # a weight shared by several modules: every call's own bias narrows too
            b = _weight_args(g.nodes[idx])[1]
            if isinstance(b, TensorInfo):
                _put(plan, b, 0, out_keep, name)
    for node in g.nodes:
        if node.name in _NORM_AXIS:
            _norm_cuts(plan, pl, node)
        elif node.name == "prelu":
            w = node.inputs[1] if len(node.inputs) > 1 else None
            ci = ca.info(node.inputs[0])
            x = node.inputs[0]
            if w is not None and w.numel() > 1 and ci is not None:
                ax = 1 if x.ndim >= 2 else 0
                if ax in ci.axes:
                    keep = pl.axis_keep(ci, ax, ar)
                    if keep is not None and not keep.all():
                        _put(plan, w, 0, keep, f"prelu in '{node.module}'")
                        plan.attrs.setdefault(node.module, {})["num_parameters"] = int(keep.sum())
        elif node.name in _CATS:
            _cat_cuts(plan, pl, node)
        else:
            _elementwise_cuts(plan, pl, node)


def _norm_cuts(plan: RemovalPlan, pl: Planner, node: OpNode) -> None:
    x = node.inputs[0]
    ci = plan.atoms.info(x)
    if ci is None:
        return
    ln = _NORM_AXIS[node.name] < 0  # LayerNorm, RMSNorm: normalized_shape (argument 1) names the trailing axes
    params = [t for t in node.inputs[1:] if t.kind in ("param", "buffer") and t.name]
    new_shape: list[int] | None = None
    if ln:
        ns = _arg(node, 1, "normalized_shape")
        ns = [ns] if isinstance(ns, int) else list(ns) if ns is not None else []
        new_shape = list(ns)
    for a in ci.axes:
        keep = pl.axis_keep(ci, a, plan.atom_removed)
        if keep is None:
            raise ShrinkError(f"{node.name} in '{node.module}' mixes removed and kept channels on one axis",
                              node.module, node.name)
        if keep.all():
            continue
        if ln:
            pa = a - (x.ndim - len(new_shape or []))
            if new_shape is None or pa < 0:
                continue  # layer_norm over other axes: channels are batch-like there
            new_shape[pa] = int(keep.sum())
        else:
            if a != (1 if x.ndim > 1 else 0):
                continue
            pa = 0
        for t in params:
            _put(plan, t, pa, keep, f"{node.name} in '{node.module}'")
        attrs = plan.attrs.setdefault(node.module, {})
        if ln:
            attrs["normalized_shape"] = tuple(new_shape or [])
        elif node.name == "group_norm":
            attrs["num_channels"] = int(keep.sum())
        else:
            attrs["num_features"] = int(keep.sum())


def _elementwise_cuts(plan: RemovalPlan, pl: Planner, node: OpNode) -> None:
    if node.name not in ELEMENTWISE:
        return
    derived = [t for t in node.inputs if t.id in pl.derived]
    if not derived or not node.outputs:
        return
    out = node.outputs[0]
    ci = plan.atoms.info(out)
    if ci is None:
        return
    for t in derived:
        fqn, _src_axis = pl.derived[t.id]
        for a, pa in _aligned(out, ci, t):
            keep = pl.axis_keep(ci, a, plan.atom_removed)
            if keep is None or keep.all():
                continue
            if t.kind in ("param", "buffer"):
                _put(plan, t, pa, keep, f"{node.name} in '{node.module}'")
            elif (view := pl._view_axis(t, pa)) is not None:  # a pure view of a stored tensor: narrow it itself
                _put(plan, view[0], view[1], keep, f"{node.name} in '{node.module}'")
            else:  # a pure reshape of a 1-D parameter: narrow the parameter itself
                src = next((s for s in plan.graph.tensors if s.name == fqn and s.kind in ("param", "buffer")),
                           None)
                if src is not None:
                    _put(plan, src, 0, keep, f"{node.name} in '{node.module}'")


def _view_axes(name: str, x: TensorInfo, o: TensorInfo, amap: tuple[int | None, ...]) -> tuple[int | None, ...] | None:
    """The axis map (:meth:`Planner._param_views`) of ``o = name(x)``, or None when ``o`` is not a pure view of
    ``x`` with every long axis kept whole (a reshape that merges or splits a long axis, a ``repeat`` that tiles
    one)."""
    if name in RESHAPE_LIKE:
        if o.numel() != x.numel():
            return None
        big_in = [a for a, s in enumerate(x.shape) if s > 1]
        big_out = [a for a, s in enumerate(o.shape) if s > 1]
        if [x.shape[a] for a in big_in] != [o.shape[a] for a in big_out]:
            return None
        axes: list[int | None] = [None] * o.ndim
        for ai, ao in zip(big_in, big_out):
            axes[ao] = amap[ai]
        return tuple(axes)
    off = o.ndim - x.ndim
    if off < 0:
        return None
    axes = [None] * o.ndim
    for ao in range(o.ndim):
        ai = ao - off
        if ai < 0:
            continue
        if x.shape[ai] == o.shape[ao]:
            axes[ao] = amap[ai]
        elif x.shape[ai] != 1:  # repeat tiling a long axis: every channel twice
            return None
    return tuple(axes)


def param_view_shapes(plan: RemovalPlan) -> dict[int, tuple[int, ...]]:
    """``{tensor id: shape after narrowing}`` of the pure views (reshapes, ``expand``, ``repeat`` along size-1
    axes) of the stored tensors the plan cuts: a class token's ``expand(B, -1, -1)`` narrows with the token."""
    views: dict[int, tuple[Cut, tuple[int | None, ...]]] = {}
    for t in plan.graph.tensors:
        cut = plan.cuts.get(t.name or "") if t.kind in ("param", "buffer") else None
        if isinstance(cut, Cut) and cut.changes() and not cut.grouped:  # an ExpertCut narrows through its own views
            views[t.id] = (cut, tuple(range(t.ndim)))
    out: dict[int, tuple[int, ...]] = {}
    for tid, (cut, axes, o) in _follow_views(plan.graph, views).items():
        if o is None:  # a cut tensor itself
            continue
        new = cut.new_shape()
        shape = tuple(new[pa] if pa is not None and pa in cut.keep else s for s, pa in zip(o.shape, axes))
        if shape != tuple(o.shape):
            out[tid] = shape
    return out


def _follow_views(graph: ModelGraph, seeds: dict[int, tuple[Any, tuple[int | None, ...]]]
                  ) -> dict[int, tuple[Any, tuple[int | None, ...], TensorInfo | None]]:
    """``seeds`` (tensor id -> (payload, per axis the source axis or None)) and every pure view of them
    (reshapes, ``expand``, ``repeat`` along size-1 axes), in graph order: id -> (payload, axes, the view's
    tensor; None for a seed)."""
    out: dict[int, tuple[Any, tuple[int | None, ...], TensorInfo | None]] = {
        k: (p, a, None) for k, (p, a) in seeds.items()}
    if not out:
        return out
    for node in graph.nodes:
        tins = [t for t in node.inputs if t.kind != "const"]
        if len(tins) != 1 or tins[0].id not in out or len(node.outputs) != 1:
            continue
        if node.name not in RESHAPE_LIKE and node.name not in _BROADCASTS:
            continue
        payload, amap, _ = out[tins[0].id]
        o = node.outputs[0]
        axes = _view_axes(node.name, tins[0], o, amap)
        if axes is not None:
            out[o.id] = (payload, axes, o)
    return out


def _cat_views(pl: Planner, node: OpNode, derived: list[TensorInfo]) -> list[tuple[TensorInfo, int, int]] | None:
    """``(stored tensor, output channel axis, its axis)`` for every parameter-derived operand of a concatenation
    along a non-channel axis (each a pure view whose axes include every channel axis of the output, not
    broadcast), or None when the concatenation cannot be narrowed by cutting those tensors."""
    out = node.outputs[0] if node.outputs else None
    ci = pl.ca.info(out) if out is not None else None
    dim = _arg(node, 1, "dim", 0)
    if ci is None or not isinstance(dim, int) or not ci.axes:
        return None
    if dim % out.ndim in ci.axes:
        return None  # along the channel axis: the parameter's rows would be channels themselves
    res: list[tuple[TensorInfo, int, int]] = []
    for t in derived:
        view = pl.views.get(t.id)
        if view is None or t.ndim != out.ndim or pl.ca.info(t) is not None:
            return None
        src, axes = view
        for a in ci.axes:
            pa = axes[a]
            if pa is None or t.shape[a] != out.shape[a] or src.shape[pa] != out.shape[a]:
                return None
            res.append((src, a, pa))
    return res


def _cat_cuts(plan: RemovalPlan, pl: Planner, node: OpNode) -> None:
    derived = [t for t in node.inputs if t.id in pl.derived]
    if not derived:
        return
    views = _cat_views(pl, node, derived)
    if views is None:
        return
    ci = plan.atoms.info(node.outputs[0])
    for src, a, pa in views:
        keep = pl.axis_keep(ci, a, plan.atom_removed)
        if keep is None:
            raise ShrinkError(f"{node.name} in '{node.module}' mixes removed and kept channels on one axis",
                              node.module, node.name)
        _put(plan, src, pa, keep, f"{node.name} in '{node.module}'")
