"""FLOP formulas: pure functions of the recorded shapes and arguments of one op, in one registry.

Convention: every formula returns **MACs** (multiply-accumulates) for multiply-accumulate ops (convolutions,
matrix products, attention, recurrent gates), and the number of elementary operations for the others
(``full`` mode only). Bias additions are not counted, as in NNI's default mode and torchvision's published
figures. Counts cover the whole input as given (every sample of the batch).

Default mode (category ``conv``, ``gemm``, ``attention``, ``rnn``):

==============================  ===========================================================================
op                              MACs
==============================  ===========================================================================
conv1d/2d/3d                    numel(output) · (C_in / groups) · prod(kernel)
conv_transpose1d/2d/3d          numel(input) · (C_out / groups) · prod(kernel)
linear                          numel(input) · out_features  (every leading dimension: batch *and* tokens)
bilinear                        prod(leading) · out · in1 · in2
matmul, @, mm, bmm, addmm, ...  numel(output) · contracted size
einsum                          sum over the left-to-right pairwise contractions of the product of the
                                sizes of all indices taking part in the step
scaled_dot_product_attention    (numel(output) / E_v) · S · (E_qk + E_v)
multi_head_attention_forward    q/k/v projections + Q·Kᵀ + A·V + output projection (also the fused
                                ``_native_multi_head_attention`` kernel)
lstm / gru / rnn (+ cells)      steps · Σ numel(W_ih, W_hh, W_hr) over layers and directions
==============================  ===========================================================================

Full mode adds (operations, not MACs):

==============================  ===========================================================================
batch_norm                      2 · numel(input) in eval mode (folded scale and shift); 5 · numel in training
layer/group/instance_norm       (4 + 1 if affine) · numel(input): mean, subtract, variance, normalise, affine
activations                     numel(output) (relu, gelu, silu, sigmoid, tanh, hardswish, leaky_relu, ...)
elementwise arithmetic          numel(output) (add, sub, mul, div, pow, exp, sqrt, where, ...)
softmax / log_softmax           3 · numel(output) (exp, sum, divide)
max/avg pooling                 numel(output) · prod(kernel)
adaptive pooling, mean, sum     numel(input)
interpolate / upsample          numel(output) · taps: nearest 0, linear 2, bilinear 4, bicubic 16, trilinear 8
lstm / gru / rnn gates          per step and unit: LSTM 4 activations + 3 products + 1 sum = 8 (+8 bias adds),
                                GRU 3 + 3 + 3 = 9 (+6 bias adds), RNN 1 (+2 bias adds)
data movement                   0 (view, reshape, cat, permute, slicing, dropout in eval, padding, ...)
==============================  ===========================================================================

An op that ran and has no formula is reported as *uncounted* by the counter (full mode), never counted as
a silent zero. Register more with :func:`register_formula`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..graph import OpNode, TensorInfo
from ..ops import CONV_OPS, CONV_TRANSPOSE_OPS, LINEAR_OPS, NORM_AXIS, RNN_GATES, RNN_OPS, arg

__all__ = ["Formula", "FORMULAS", "register_formula", "formula_for", "MAC_CATEGORIES"]

#: categories whose count is multiply-accumulates (counted in default mode; FLOPs = 2 × MACs)
MAC_CATEGORIES = frozenset({"conv", "gemm", "attention", "rnn"})


@dataclass(frozen=True)
class Formula:
    name: str
    category: str
    fn: Callable[[OpNode], int]

    @property
    def default_mode(self) -> bool:
        return self.category in MAC_CATEGORIES


FORMULAS: dict[str, Formula] = {}


def register_formula(*names: str, category: str) -> Callable[[Callable[[OpNode], int]], Callable[[OpNode], int]]:
    """Register ``fn(node) -> int`` as the formula of the op ``names`` (recorded op names).

    ``category`` is one of ``conv``, ``gemm``, ``attention``, ``rnn`` (MACs, counted in default mode) or
    ``norm``, ``activation``, ``pointwise``, ``pool``, ``upsample``, ``reduction``, ``rnn_gates``, ``data``
    (full mode only). A later registration overrides an earlier one.

    >>> from prunescope.flops import register_formula
    >>> @register_formula("my_op", category="pointwise")
    ... def _my_op(node):
    ...     return node.outputs[0].numel()
    """

    def deco(fn: Callable[[OpNode], int]) -> Callable[[OpNode], int]:
        for n in names:
            FORMULAS[n] = Formula(n, category, fn)
        return fn

    return deco


def formula_for(node: OpNode) -> Formula | None:
    return FORMULAS.get(node.name)


# ---- argument helpers (the op-argument helper ``arg`` is the catalogue's, prunescope.ops) ----------------


def _prod(xs: Any) -> int:
    return int(math.prod(int(x) for x in xs))


def _shape(x: Any) -> tuple[int, ...]:
    if isinstance(x, TensorInfo):
        return x.shape
    raise TypeError(f"expected a tensor argument, got {type(x).__name__}")


def _out(node: OpNode) -> TensorInfo:
    return node.outputs[0]


# ---- convolutions and matrix products (default mode) -------------------------------------------------


@register_formula(*sorted(CONV_OPS - CONV_TRANSPOSE_OPS), category="conv")
def _conv(node: OpNode) -> int:
    w = _shape(arg(node, 1, "weight"))
    return _out(node).numel() * _prod(w[1:])


@register_formula(*sorted(CONV_TRANSPOSE_OPS), category="conv")
def _conv_t(node: OpNode) -> int:
    x = _shape(arg(node, 0, "input"))
    w = _shape(arg(node, 1, "weight"))
    return _prod(x) * _prod(w[1:])


@register_formula("convolution", "_convolution", category="conv")
def _convolution(node: OpNode) -> int:
    if arg(node, 6, "transposed", False):
        return _conv_t(node)
    return _conv(node)


@register_formula(*sorted(LINEAR_OPS), category="gemm")
def _linear(node: OpNode) -> int:
    x = _shape(arg(node, 0, "input"))
    w = _shape(arg(node, 1, "weight"))
    out_f = w[0] if len(w) == 2 else 1
    return _prod(x) * out_f


@register_formula("bilinear", category="gemm")
def _bilinear(node: OpNode) -> int:
    x1 = _shape(arg(node, 0, "input1"))
    w = _shape(arg(node, 2, "weight"))
    return _prod(x1[:-1]) * _prod(w)


def _contracting(pos: int) -> Callable[[OpNode], int]:
    """MACs of a matrix product whose first factor is argument ``pos``: numel(output) · contracted size."""

    def fn(node: OpNode) -> int:
        a = _shape(node.args[pos])
        return _out(node).numel() * (a[-1] if a else 1)

    return fn


register_formula("matmul", "__matmul__", "mm", "bmm", "mv", "dot", "vdot", "inner", category="gemm")(_contracting(0))
register_formula("__rmatmul__", category="gemm")(_contracting(1))  # other @ self
register_formula("addmm", "baddbmm", "addmv", "addmm_", "baddbmm_", category="gemm")(_contracting(1))


@register_formula("_grouped_mm", "grouped_mm", category="gemm")
def _grouped_mm(node: OpNode) -> int:
    """Grouped matrix product (mixture-of-experts kernels: ``torch._grouped_mm``, ``F.grouped_mm``).

    ``(S, K) x (G, K, N)`` with ``offs`` (rows sorted by group, each row multiplied by its group's weight only):
    ``S·K·N`` — every token-expert pair once, not ``G`` times. ``(G, M, K) x (G, K, N)``: ``G·M·K·N``.
    ``(M, K) x (K, N)`` grouped along ``K`` (output ``(G, M, N)``): ``M·K·N``. In general every output element
    contracts ``K`` (the last size of the first factor), except the ``K``-grouped 2-D x 2-D form.
    """
    a, b = _shape(arg(node, 0, "mat_a", arg(node, 0, "input"))), _shape(arg(node, 1, "mat_b", arg(node, 1, "weight")))
    if len(a) == 2 and len(b) == 2:
        return a[0] * a[1] * b[1]
    return _out(node).numel() * (a[-1] if a else 1)


@register_formula("addbmm", category="gemm")
def _addbmm(node: OpNode) -> int:
    b1 = _shape(node.args[1])
    b2 = _shape(node.args[2])
    return b1[0] * b1[1] * b1[2] * b2[2]


@register_formula("outer", "ger", category="gemm")
def _outer(node: OpNode) -> int:
    return _out(node).numel()


@register_formula("tensordot", category="gemm")
def _tensordot(node: OpNode) -> int:
    a = _shape(node.args[0])
    b = _shape(node.args[1])
    return _prod(a) * _prod(b) // max(1, _out(node).numel()) if _out(node).numel() else 0


def _einsum_operands(node: OpNode) -> tuple[str, list[tuple[int, ...]]]:
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    return str(eq), [_shape(o) for o in ops]


@register_formula("einsum", category="gemm")
def _einsum(node: OpNode) -> int:
    eq, shapes = _einsum_operands(node)
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    sizes: dict[str, int] = {}
    letters: list[list[str]] = []
    free = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    ell: list[str] = []
    max_ell = max((len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes)), default=0)
    ell = [next(free) for _ in range(max_ell)]
    for t, s in zip(terms, shapes):
        if "..." in t:
            pre, post = t.split("...")
            n_ell = len(s) - len(pre) - len(post)
            labels = list(pre) + ell[max_ell - n_ell :] + list(post)
        else:
            labels = list(t)
        for lab, dim in zip(labels, s):
            sizes[lab] = max(sizes.get(lab, 1), int(dim))
        letters.append(labels)
    if "->" in eq:
        out = set(rhs.replace("...", "".join(ell)))
    else:
        counts: dict[str, int] = {}
        for labels in letters:
            for lab in labels:
                counts[lab] = counts.get(lab, 0) + 1
        out = {lab for lab, c in counts.items() if c == 1} | set(ell)
    if len(letters) == 1:
        involved = set(letters[0])
        return _prod(sizes[x] for x in involved) if involved - out else 0
    total = 0
    cur = set(letters[0])
    for i in range(1, len(letters)):
        nxt = set(letters[i])
        step = cur | nxt
        total += _prod(sizes[x] for x in step)
        later = set().union(*[set(lt) for lt in letters[i + 1 :]]) if i + 1 < len(letters) else set()
        cur = {x for x in step if x in out or x in later}
    return total


@register_formula("scaled_dot_product_attention", category="attention")
def _sdpa(node: OpNode) -> int:
    q = _shape(arg(node, 0, "query"))
    k = _shape(arg(node, 1, "key"))
    v = _shape(arg(node, 2, "value"))
    out = _out(node)
    ev = v[-1]
    queries = out.numel() // max(1, ev)
    return queries * k[-2] * (q[-1] + ev)


def _mha_cost(L: int, S: int, N: int, E: int, Ek: int, Ev: int, extra_keys: int) -> int:
    proj = L * N * E * E + S * N * Ek * E + S * N * Ev * E
    s = S + extra_keys
    attn = 2 * N * L * s * E
    out = L * N * E * E
    return proj + attn + out


@register_formula("multi_head_attention_forward", category="attention")
def _mha(node: OpNode) -> int:
    q = _shape(arg(node, 0, "query"))
    k = _shape(arg(node, 1, "key"))
    v = _shape(arg(node, 2, "value"))
    E = int(arg(node, 3, "embed_dim_to_check"))
    N = q[1] if len(q) == 3 else 1
    extra = (1 if arg(node, 7, "bias_k") is not None else 0) + (1 if arg(node, 9, "add_zero_attn", False) else 0)
    return _mha_cost(q[0], k[0], N, E, k[-1], v[-1], extra)


@register_formula("_native_multi_head_attention", category="attention")
def _native_mha(node: OpNode) -> int:
    q = _shape(arg(node, 0, "query"))
    k = _shape(arg(node, 1, "key"))
    v = _shape(arg(node, 2, "value"))
    E = int(arg(node, 3, "embed_dim"))
    N = q[0] if len(q) == 3 else 1
    return _mha_cost(q[-2], k[-2], N, E, k[-1], v[-1], 0)


def _rnn_parts(node: OpNode) -> tuple[int, list[TensorInfo], bool]:
    """(steps × batch, weight matrices, has_biases) of a recorded ``_VF.lstm/gru/rnn_*`` call."""
    x = node.args[0]
    packed = len(node.args) > 1 and isinstance(node.args[1], TensorInfo) and node.args[1].ndim == 1 \
        and not node.args[1].dtype.is_floating_point
    tokens = x.shape[0] if packed else _prod(x.shape[:-1])
    weights: list[TensorInfo] = []
    has_bias = True
    for a in node.args[1:]:
        if isinstance(a, (list, tuple)) and a and all(isinstance(t, TensorInfo) for t in a):
            if all(t.ndim in (1, 2) for t in a) and any(t.ndim == 2 for t in a) and len(a) >= 2:
                weights = [t for t in a if t.ndim == 2]
                has_bias = any(t.ndim == 1 for t in a)
    return tokens, weights, has_bias


@register_formula(*sorted(RNN_OPS), category="rnn")
def _rnn(node: OpNode) -> int:
    tokens, weights, _ = _rnn_parts(node)
    return tokens * sum(w.numel() for w in weights)


@register_formula("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", category="rnn")
def _rnn_cell(node: OpNode) -> int:
    x = _shape(node.args[0])
    batch = _prod(x[:-1])
    ws = [a for a in node.args[1:] if isinstance(a, TensorInfo) and a.ndim == 2 and a.kind == "param"]
    if not ws:  # hx tuples come first for lstm_cell; weights are the 2-D params
        ws = [a for a in node.inputs if a.ndim == 2 and a.kind == "param"]
    return batch * sum(w.numel() for w in ws)


# ---- full mode ---------------------------------------------------------------------------------------

_GATE_OPS = {"lstm": (8, 8), "gru": (9, 6), "rnn_tanh": (1, 2), "rnn_relu": (1, 2)}


def _rnn_gates(node: OpNode) -> int:
    tokens, weights, has_bias = _rnn_parts(node)
    per_unit, bias_ops = _GATE_OPS[node.name]
    if not weights:
        return 0
    g = _gates(node.name)
    hidden = weights[0].shape[0] // g
    # every layer/direction has W_ih and W_hh with gates·H rows (a projection W_hr has fewer)
    layer_dirs = sum(1 for w in weights if w.shape[0] == g * hidden) // 2
    return tokens * layer_dirs * hidden * (per_unit + (bias_ops if has_bias else 0))


def _gates(name: str) -> int:
    return RNN_GATES.get(name, 1)


def _numel_out(node: OpNode) -> int:
    return sum(o.numel() for o in node.outputs[:1])


def _numel_in(node: OpNode) -> int:
    x = node.args[0] if node.args else None
    return x.numel() if isinstance(x, TensorInfo) else _numel_out(node)


_ACTIVATIONS = """relu relu_ relu6 leaky_relu leaky_relu_ gelu silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish
hardswish_ hardsigmoid hardsigmoid_ elu elu_ selu selu_ celu mish softplus softsign prelu rrelu hardtanh
hardtanh_ logsigmoid tanhshrink softshrink hardshrink threshold threshold_ glu""".split()
_POINTWISE = """add sub mul div true_divide add_ sub_ mul_ div_ __add__ __radd__ __iadd__ __sub__ __rsub__
__isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__ __floordiv__ __rfloordiv__ __mod__
__neg__ neg pow __pow__ __rpow__ sqrt rsqrt exp log log2 log1p abs clamp clamp_ clip clamp_min clamp_max
maximum minimum where addcmul addcdiv reciprocal square sin cos erf sign lerp floor ceil round trunc
__and__ __or__ __xor__ __invert__ logical_not logical_and logical_or __eq__ __ne__ __lt__ __le__ __gt__ __ge__
eq ne lt le gt ge masked_fill masked_fill_ bitwise_and bitwise_or isnan isinf nan_to_num fmod remainder
""".split()
_DATA = """view view_as reshape reshape_as flatten unflatten permute transpose t T mT H contiguous cat concat
concatenate stack hstack vstack chunk split split_with_sizes tensor_split unbind __getitem__ __setitem__ expand
expand_as squeeze unsqueeze dropout dropout_ dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
pad to type type_as float double half bfloat16 int long bool clone detach detach_ roll repeat repeat_interleave
narrow select index_select gather scatter tile flip movedim moveaxis swapaxes unfold fold new_zeros new_ones
new_empty new_full new_tensor zeros ones empty full arange linspace zeros_like ones_like empty_like full_like
rand randn rand_like randn_like tensor as_tensor as_strided copy_ fill_ zero_ channel_shuffle pixel_shuffle
pixel_unshuffle data narrow_copy embedding one_hot tril triu diag diagonal meshgrid broadcast_to
broadcast_tensors cumsum argmax argmin topk sort argsort index_put_ index_put index_add masked_select nonzero
split_copy identity histc bincount""".split()


register_formula(*_ACTIVATIONS, category="activation")(_numel_out)
register_formula(*_POINTWISE, category="pointwise")(_numel_out)
register_formula(*_DATA, category="data")(lambda node: 0)


@register_formula("batch_norm", category="norm")
def _batch_norm(node: OpNode) -> int:
    training = bool(arg(node, 5, "training", False))
    return _numel_in(node) * (5 if training else 2)


@register_formula(*sorted(set(NORM_AXIS) - {"batch_norm"}), category="norm")
def _norm(node: OpNode) -> int:
    affine = any(t.kind == "param" for t in node.inputs)
    per = 3 if node.name == "rms_norm" else 4
    return _numel_in(node) * (per + (1 if affine else 0))


@register_formula("softmax", "log_softmax", "softmin", "_softmax", category="activation")
def _softmax(node: OpNode) -> int:
    return 3 * _numel_out(node)


def _kernel(node: OpNode, dims: int) -> int:
    k = arg(node, 1, "kernel_size")
    if isinstance(k, int):
        return k**dims
    return _prod(k)


def _pool(dims: int) -> Callable[[OpNode], int]:
    def fn(node: OpNode) -> int:
        return _numel_out(node) * _kernel(node, dims)

    return fn


for _d in (1, 2, 3):
    register_formula(f"max_pool{_d}d", f"avg_pool{_d}d", f"max_pool{_d}d_with_indices", f"lp_pool{_d}d",
                     category="pool")(_pool(_d))
    register_formula(f"adaptive_avg_pool{_d}d", f"adaptive_max_pool{_d}d", f"adaptive_max_pool{_d}d_with_indices",
                     category="pool")(_numel_in)

register_formula("mean", "sum", "amax", "amin", "max", "min", "prod", "var", "std", "norm", "logsumexp",
                 "var_mean", "std_mean", "all", "any", category="reduction")(_numel_in)

_TAPS = {"nearest": 0, "nearest-exact": 0, "linear": 2, "bilinear": 4, "bicubic": 16, "trilinear": 8}


@register_formula("interpolate", "upsample", "upsample_bilinear", "upsample_nearest", category="upsample")
def _interpolate(node: OpNode) -> int:
    mode = arg(node, 3, "mode", "nearest")
    if node.name == "upsample_bilinear":
        mode = "bilinear"
    elif node.name == "upsample_nearest":
        mode = "nearest"
    if mode == "area":
        return _numel_in(node)
    return _numel_out(node) * _TAPS.get(str(mode), 1)


for _name in sorted(RNN_OPS):
    FORMULAS[f"{_name}::gates"] = Formula(f"{_name}::gates", "rnn_gates", _rnn_gates)
