"""The op catalogue: what prunescope knows about recorded ops by name, written once.

Every analysis reads a recorded op by its name (:attr:`prunescope.graph.OpNode.name`, made by :func:`op_name`)
and its arguments (:func:`arg`). Which names are convolutions, which normalise over which axis, which are
elementwise, which are matrix products ... is listed here and nowhere else: the recorder
(:mod:`prunescope.graph`), the channel engine (:mod:`prunescope.topology`), the removal plan and the FLOP
formulas (:mod:`prunescope.flops.formulas`) import these tables. This module imports nothing of prunescope but
:mod:`prunescope.errors` (it is the bottom layer, next to the recorder).

Two tables grow at run time: :data:`ELEMENTWISE` and :data:`UNARY` (with their zero-preservation tables), through
:func:`add_to_family`, which :func:`prunescope.topology.register_channel_rule` calls when a user declares a custom
op to behave like the built-in elementwise or unary ops. Every other table is fixed.

Adding an op to prunescope (the checklist):

1. its cost: a FLOP formula (:func:`prunescope.flops.register_formula`);
2. its channel semantics: a channel rule (:func:`prunescope.topology.register_channel_rule`; a built-in family
   such as ``family="elementwise"`` when it behaves like one; put the name in the family's table here when it
   is a built-in op);
3. its removal cut, when it holds a per-channel parameter that must narrow with the channels (norms: the
   :data:`NORM_AXIS` table and the plan's norm cuts).

>>> from prunescope.ops import NORM_AXIS, CONV_OPS, op_name
>>> NORM_AXIS['rms_norm'], 'conv_transpose2d' in CONV_OPS
(-1, True)
>>> import torch
>>> op_name(torch.ops.aten.add.Tensor), op_name(torch.nn.functional.conv2d)
('add', 'conv2d')
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import torch

from .errors import ConfigError

__all__ = [
    "op_name", "arg", "CONV_OPS", "CONV_TRANSPOSE_OPS", "CONV_KINDS", "LINEAR_OPS", "EMBEDDING_OPS",
    "ATTENTION_OPS", "RNN_GATES", "RNN_OPS", "LAYER_OPS", "NORM_AXIS", "ELEMENTWISE", "UNARY", "ZERO_PRESERVING",
    "ZERO_PRESERVING_BINARY", "ZERO_ABSORBING", "NEUTRAL_ON_ZERO", "FACTORY_LIKE", "REDUCTIONS", "SHAPE_OPS",
    "MATMUL_OPS", "CONTRACTION_OPS", "EXPERT_OPS", "FAMILIES", "add_to_family",
]


# ---- naming and arguments of a recorded call ---------------------------------------------------------------


def op_name(func: Callable[..., Any]) -> str:
    """The name an op is recorded under: a function's ``__name__`` (``'conv2d'``, ``'__iadd__'``), a tensor
    property's name (``'T'``, ``'mT'``), the plain name of an ``aten`` op (``torch.ops.aten.add.Tensor`` ->
    ``'add'``, same arguments as the torch function) and ``'<namespace>::<op>'`` for any other ``torch.ops``
    op (``'quantized::conv2d'`` with packed int8 weights is never taken for the float ``conv2d``; a
    ``torch.library`` custom op ``mylib::act`` is ``'mylib::act'``)."""
    if isinstance(func, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        schema = getattr(func, "_schema", None)  # an overload: 'mylib::act'; a packet: _qualified_op_name
        qual = getattr(func, "_qualified_op_name", None) or getattr(schema, "name", None) or str(func)
        ns, _, op = qual.partition("::")
        op = op.split(".")[0]
        return op if ns == "aten" else f"{ns}::{op}"
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # property of Tensor (x.T, x.mT, x.data ...)
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", None) or "getattr"
    return name


class _Call(Protocol):
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def arg(node: _Call, pos: int, key: str, default: Any = None) -> Any:
    """Argument ``key`` of a recorded call (an :class:`~prunescope.graph.OpNode`), given by keyword or at
    position ``pos`` (``default`` when given neither way)."""
    if key in node.kwargs:
        return node.kwargs[key]
    if len(node.args) > pos:
        return node.args[pos]
    return default


# ---- layers: ops that own a weight and make new channels ----------------------------------------------------

#: every convolution call, transposed ones included
CONV_OPS = frozenset("conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d".split())
#: the transposed convolutions among :data:`CONV_OPS` (weight ``(C_in, C_out / groups, *k)``)
CONV_TRANSPOSE_OPS = frozenset("conv_transpose1d conv_transpose2d conv_transpose3d".split())
#: the layer kinds (``LayerInfo.kind``) the convolution ops make
CONV_KINDS = ("conv", "conv_transpose")
LINEAR_OPS = frozenset({"linear"})
EMBEDDING_OPS = frozenset({"embedding"})
ATTENTION_OPS = frozenset({"multi_head_attention_forward"})
#: recurrent ops and their gate count (rows of ``weight_ih`` per hidden unit)
RNN_GATES: Mapping[str, int] = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
RNN_OPS = frozenset(RNN_GATES)
#: ops that create a layer (new channel atoms), also when their input carries no channels
LAYER_OPS = CONV_OPS | LINEAR_OPS | RNN_OPS | ATTENTION_OPS | EMBEDDING_OPS
#: fused mixture-of-experts products (``torch._grouped_mm``, ``F.grouped_mm``; :mod:`prunescope.topology.moe`)
EXPERT_OPS = frozenset({"_grouped_mm", "grouped_mm"})

# ---- norms --------------------------------------------------------------------------------------------------

#: norm ops and the axis of their per-channel parameters: ``1`` (BatchNorm, InstanceNorm, GroupNorm: ``(N, C,
#: ...)``) or ``-1`` (LayerNorm, RMSNorm: the normalised trailing axes, ``normalized_shape`` at argument 1)
NORM_AXIS: Mapping[str, int] = {"batch_norm": 1, "instance_norm": 1, "group_norm": 1, "layer_norm": -1,
                                "rms_norm": -1}

# ---- elementwise and channel-preserving ops ----------------------------------------------------------------

#: ops combining tensors element by element, with broadcasting (channel axes of all operands are tied)
ELEMENTWISE: set[str] = set(
    """add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub subtract subtract_ mul mul_
    __mul__ __rmul__ __imul__ multiply multiply_ div div_ __truediv__ __rtruediv__ __itruediv__ divide divide_
    true_divide floor_divide __floordiv__ __rfloordiv__ __mod__ remainder fmod pow __pow__ __rpow__ pow_
    addcmul addcmul_ addcdiv addcdiv_ where maximum minimum fmax fmin max min lerp lerp_ logical_and
    logical_or logical_xor logical_and_ logical_or_ logical_xor_ __and__ __or__ __xor__ __iand__ __ior__
    eq ne lt le gt ge __eq__ __ne__ __lt__ __le__ __gt__ __ge__ masked_fill masked_fill_ copysign atan2
    hypot xlogy clamp clamp_ clip clip_ squared_difference""".split()
)
#: ops whose output has the first tensor input's layout (shape may change on non-channel axes only):
#: activations, dropout, pooling, interpolation, casts, softmax ...
UNARY: set[str] = set(
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
#: ops of :data:`UNARY` with f(0) = 0: a removed channel that is exactly zero stays zero through them
#: (:mod:`prunescope.topology.values`; hardtanh/clamp/threshold are decided from their arguments there). Not
#: here: sigmoid, hardsigmoid, exp, cos, softplus, logsigmoid, log, rsqrt, reciprocal, softmax/log_softmax/softmin
#: (a zero channel becomes a constant)
ZERO_PRESERVING: set[str] = set(
    """relu relu_ relu6 leaky_relu leaky_relu_ elu elu_ selu celu gelu silu silu_ mish hardswish hardswish_
    tanh tanh_ softsign tanhshrink prelu rrelu abs abs_ neg neg_ __neg__ __pos__ __abs__ sqrt sqrt_ square
    sign erf sin log1p floor ceil round trunc frac nan_to_num
    dropout dropout_ dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
    max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices lp_pool1d lp_pool2d
    interpolate upsample upsample_nearest upsample_bilinear normalize local_response_norm
    contiguous clone detach detach_ to float half double bfloat16 type type_as cpu cuda requires_grad_
    __deepcopy__""".split()
)
#: ops of :data:`ELEMENTWISE` whose result is 0 where every value operand is 0 (division and pow are decided from
#: their operands in :mod:`prunescope.topology.values`)
ZERO_PRESERVING_BINARY: set[str] = set(
    """add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub subtract subtract_ mul mul_
    __mul__ __rmul__ __imul__ multiply multiply_ div div_ __truediv__ __itruediv__ divide divide_ true_divide
    pow __pow__ pow_ maximum minimum fmax fmin max min where masked_fill masked_fill_ hypot atan2 copysign
    lerp lerp_""".split()
)
#: ops of :data:`ELEMENTWISE` whose result is 0 where any factor is 0
ZERO_ABSORBING = frozenset("mul mul_ __mul__ __rmul__ __imul__ multiply multiply_".split())
#: ops of :data:`UNARY` that make a new tensor of the input's shape (it carries no channels)
FACTORY_LIKE = frozenset(
    "new_zeros new_ones new_full new_empty zeros_like ones_like empty_like full_like rand_like randn_like zero_ "
    "fill_".split()
)

# ---- reductions, shape ops, products ------------------------------------------------------------------------

REDUCTIONS = frozenset("mean sum amax amin max min std var norm logsumexp prod argmax argmin nansum nanmean".split())
#: reductions/cross-channel ops over a channel axis whose value ignores channels that are exactly zero there (a
#: sum, a p-norm, normalize): removing such channels is neutral; any other reduction over a channel axis changes
#: value
NEUTRAL_ON_ZERO = frozenset({"sum", "nansum", "norm", "normalize"})
#: ops that move, select or copy elements without arithmetic (replayed on channel ids by the engine)
SHAPE_OPS = frozenset(
    """view reshape flatten unflatten permute transpose swapaxes swapdims movedim moveaxis t T mT squeeze
    unsqueeze expand expand_as repeat tile chunk split tensor_split split_with_sizes unsafe_split
    unsafe_chunk unbind cat concat concatenate stack hstack vstack __getitem__ __setitem__ narrow select
    index_select roll flip pad constant_pad_nd pixel_shuffle pixel_unshuffle channel_shuffle
    native_channel_shuffle view_as reshape_as ravel diagonal gather take_along_dim repeat_interleave""".split()
)
MATMUL_OPS = frozenset({"matmul", "__matmul__", "__rmatmul__", "mm", "bmm"})
#: products that sum over an index shared by two operands
CONTRACTION_OPS = MATMUL_OPS | {"einsum", "scaled_dot_product_attention", "addmm", "baddbmm"}


# ---- families a custom op can join --------------------------------------------------------------------------

#: ``family -> (its table, the table of its zero-preserving members)``
FAMILIES: Mapping[str, tuple[set[str], set[str]]] = {
    "elementwise": (ELEMENTWISE, ZERO_PRESERVING_BINARY),
    "unary": (UNARY, ZERO_PRESERVING),
}


def add_to_family(name: str, family: str, *, zero_preserving: bool = False) -> None:
    """Record op ``name`` as a member of ``family`` (``'elementwise'`` or ``'unary'``), for every analysis that
    reads the family's table (the value analysis and the removal plan's parameter cuts); ``zero_preserving``:
    the op maps zero operands to exactly zero (f(0) = 0), so a removed channel stays removed through it.
    :func:`prunescope.topology.register_channel_rule` calls this; the channel rule itself is registered there."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown op family {family!r}; choose one of {sorted(FAMILIES)}")
    for other, (table, zeros) in FAMILIES.items():  # one family per op
        if other != family:
            table.discard(name)
            zeros.discard(name)
    table, zeros = FAMILIES[family]
    table.add(name)
    if zero_preserving:
        zeros.add(name)
    else:
        zeros.discard(name)
