"""Record what a model really does on an example input: the shared :class:`ModelGraph`.

Every analysis in prunescope (FLOPs, channel dependencies, mask conflicts, effective FLOPs) is a function of
one recorded forward pass. This module is the only place that runs the user's model for that purpose.

Mechanism (and why)
-------------------
We record at the **torch-function level** with a :class:`torch.overrides.TorchFunctionMode`, and keep a stack
of running modules with PyTorch's *global* module pre/post forward hooks, which are removed again when the
recording ends. Compared with the alternatives:

* ``torch.jit.trace`` (NNI) is deprecated, specialises and breaks on many models (ViT), and names ops by
  scope strings.
* ``torch.fx`` symbolic tracing fails on data-dependent control flow and hides wrapped functions.
* ATen-level ``TorchDispatchMode`` sees every kernel, but loses intent: ``F.linear`` on a 3-D input becomes
  ``view → mm → _unsafe_view``, and eval-mode fast paths (``_native_multi_head_attention``, CPU flash
  attention) appear as opaque fused kernels.

The function level sees exactly what the Python code called — ``F.conv2d``, ``F.linear``, ``@``, ``einsum``,
``scaled_dot_product_attention``, ``x += y``, ``x.view(...)``, ``torch.cat`` — with their real arguments, on
any device including ``meta``. An active function mode also makes PyTorch skip the fused
``nn.MultiheadAttention``/``TransformerEncoderLayer`` fast paths (they check ``has_torch_function``), so the
math path that the fused kernel implements is what we record. Calls that return no tensor (``size()``,
``shape``, ``dim()``) are not recorded: a tensor used only for its shape carries no channels (the root cause of
NNI's false ties, NNI issue #4160).

A Python-level function that dispatches ``__torch_function__`` itself (``F.layer_norm``, ``F.interpolate``,
``F.multi_head_attention_forward``) is recorded as one op; its internals run with the mode switched off.

Nothing is left on the model: no hooks, attributes or buffers; every module's ``training`` flag is restored,
also when the model raises.

Threads: the function mode is thread-local, and the global module hooks of a recording ignore calls made by any
other thread, so several threads may trace (and count) at once. Traces of *one* model instance are serialised
by a per-model lock, because each one switches the model's train/eval flags for its duration.

Parametrized tensors (``torch.nn.utils.parametrize``, ``weight_norm``): the parametrization's own computation is
not recorded; the tensor it returns is recorded as the parameter ``<layer>.weight`` of the layer that owns it,
so a parametrized ``conv3`` is the layer ``conv3``, exactly as without the parametrization.

Refused with :class:`~prunescope.errors.UnsupportedModelError`: TorchScript modules (``torch.jit.script`` /
``torch.jit.trace``), whose code runs inside the TorchScript interpreter where no Python-level recording sees
it (counting them would silently give 0 MACs).

Example
-------
>>> import torch
>>> from prunescope.graph import trace
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU())
>>> g = trace(net, torch.ones(1, 3, 8, 8))
>>> [(n.name, n.module) for n in g.nodes]
[('conv2d', '0'), ('relu', '1')]
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from .errors import ConfigError, TraceError, UnsupportedModelError
from .ops import CONV_OPS, op_name

__all__ = ["TensorInfo", "OpNode", "ModuleCall", "ModelGraph", "trace", "make_inputs", "model_device",
           "quantized_kind"]


@dataclass(eq=False)
class TensorInfo:
    """One tensor value seen during the recording (a new value for every in-place write)."""

    id: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # 'input' | 'param' | 'buffer' | 'op' | 'const'
    producer: int | None = None  # index of the OpNode that produced it
    out_index: int = 0  # position among the producer's flattened tensor outputs
    name: str | None = None  # parameter/buffer FQN, or input name

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __repr__(self) -> str:
        src = self.name if self.name else (f"op{self.producer}" if self.producer is not None else self.kind)
        return f"T{self.id}<{src} {list(self.shape)}>"


@dataclass(eq=False)
class OpNode:
    """One recorded tensor operation."""

    index: int
    name: str  # function or method name: 'conv2d', 'add', '__iadd__', 'view', 'cat', 'T', ...
    func: Callable[..., Any]
    args: tuple[Any, ...]  # the call's arguments, tensors replaced by TensorInfo
    kwargs: dict[str, Any]
    inputs: list[TensorInfo]  # flattened tensor arguments, in argument order
    outputs: list[TensorInfo]  # flattened tensor results
    module: str  # dotted name of the innermost running module of the model ('' = the root)
    call: int | None  # index of the ModuleCall that ran it
    mutated: list[TensorInfo] = field(default_factory=list)  # inputs this op wrote in place (old values)

    @property
    def params(self) -> list[TensorInfo]:
        return [t for t in self.inputs if t.kind == "param"]

    def __repr__(self) -> str:
        return f"OpNode({self.index}, {self.name!r}, module={self.module!r}, in={self.inputs}, out={self.outputs})"


@dataclass(eq=False)
class ModuleCall:
    """One call of a module of the model."""

    index: int
    name: str  # canonical dotted name ('' = root)
    module_type: str
    parent: int | None
    call_number: int  # 1 for the first call of this module, 2 for the second, ...
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    ops: list[int] = field(default_factory=list)  # ops run directly by this call (not by children)
    children: list[int] = field(default_factory=list)


class ModelGraph:
    """The recorded forward pass: op nodes in execution order, module calls, and data flow.

    Attributes: ``nodes`` (list of :class:`OpNode`), ``calls`` (list of :class:`ModuleCall`), ``inputs`` and
    ``outputs`` (model inputs/outputs as :class:`TensorInfo`), ``model`` (the traced module),
    ``module_names`` (``{id(module): name}``), ``param_names`` (``{id(param): FQN}``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.nodes: list[OpNode] = []
        self.calls: list[ModuleCall] = []
        self.inputs: list[TensorInfo] = []
        self.outputs: list[TensorInfo] = []
        self.tensors: list[TensorInfo] = []
        self.module_names: dict[int, str] = {}
        self.modules: dict[str, nn.Module] = {}
        self.param_names: dict[int, str] = {}
        self._consumers: dict[int, list[OpNode]] | None = None

    # ---- data flow -------------------------------------------------------------------------------------
    def consumers(self, t: TensorInfo | int) -> list[OpNode]:
        """Op nodes that read tensor value ``t`` (each node once, in execution order)."""
        if self._consumers is None:
            cons: dict[int, list[OpNode]] = {}
            for n in self.nodes:
                seen: set[int] = set()
                for i in n.inputs:
                    if i.id not in seen:
                        seen.add(i.id)
                        cons.setdefault(i.id, []).append(n)
            self._consumers = cons
        tid = t if isinstance(t, int) else t.id
        return self._consumers.get(tid, [])

    def producer(self, t: TensorInfo) -> OpNode | None:
        return self.nodes[t.producer] if t.producer is not None else None

    def param_owner(self, t: TensorInfo) -> str | None:
        """Module name that owns parameter/buffer ``t`` (``'layer1.0.conv1'`` for ``'layer1.0.conv1.weight'``)."""
        if t.name is None or t.kind not in ("param", "buffer"):
            return None
        return t.name.rpartition(".")[0]

    def module(self, name: str) -> nn.Module:
        return self.modules[name]

    def calls_of(self, name: str) -> list[ModuleCall]:
        return [c for c in self.calls if c.name == name]

    def ops_in(self, call: ModuleCall) -> Iterator[OpNode]:
        """All ops run inside ``call``, its children included, in execution order."""
        stack = [call]
        idx: list[int] = []
        while stack:
            c = stack.pop()
            idx.extend(c.ops)
            stack.extend(self.calls[i] for i in c.children)
        for i in sorted(idx):
            yield self.nodes[i]

    def __repr__(self) -> str:
        return f"ModelGraph({len(self.nodes)} ops, {len(self.calls)} module calls)"


# Calls that never produce tensors or data flow; skipped without bookkeeping (speed).
_SKIP = frozenset(
    """size dim shape dtype device is_contiguous is_nested is_cuda is_sparse is_quantized is_meta grad_fn
    requires_grad stride storage_offset data_ptr element_size numel __len__ __format__ __repr__ __bool__
    __index__ __int__ __float__ __hash__ layout names ndim ndimension nelement get_device is_floating_point
    is_complex _is_view __contains__ __iter__ _set_grad_enabled is_leaf output_nr _version""".split()
)


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: ModelGraph, infos: WeakIdKeyDictionary, stack: list[ModuleCall]) -> None:
        super().__init__()
        self.g = graph
        self.infos = infos
        self.stack = stack
        self.counter = itertools.count()
        self.hidden = 0  # > 0 while a parametrization computes a tensor (its ops are not recorded)

    # tensor bookkeeping ---------------------------------------------------------------------------------
    def info(self, t: torch.Tensor) -> TensorInfo:
        ti = self.infos.get(t)
        if ti is None:
            name = self.g.param_names.get(id(t))
            kind = "const"
            if name is not None:
                kind = "buffer" if name in self._buffers else "param"
            ti = self.new(t, kind, None, 0, name)
        return ti

    def new(self, t: torch.Tensor, kind: str, producer: int | None, idx: int, name: str | None = None) -> TensorInfo:
        ti = TensorInfo(next(self.counter), tuple(t.shape), t.dtype, kind, producer, idx, name)
        self.infos[t] = ti
        self.g.tensors.append(ti)
        return ti

    _buffers: frozenset[str] = frozenset()

    def _wrap(self, x: Any, inputs: list[TensorInfo], tensors: list[torch.Tensor]) -> Any:
        """``x`` with every tensor replaced by its TensorInfo (lists, tuples and dicts walked; cheaper than
        pytree on the hot path)."""
        if isinstance(x, torch.Tensor):
            ti = self.info(x)
            inputs.append(ti)
            tensors.append(x)
            return ti
        if type(x) in (list, tuple):
            return type(x)(self._wrap(v, inputs, tensors) for v in x)
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple (PackedSequence, ...)
            return type(x)(*(self._wrap(v, inputs, tensors) for v in x))
        if type(x) is dict:
            return {k: self._wrap(v, inputs, tensors) for k, v in x.items()}
        return x

    def _check_batched(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse an unbatched convolution input: ``(C, H, W)`` for ``conv2d`` runs in PyTorch, but every
        analysis reads dim 1 as the channel axis, so it would silently analyse the wrong axis."""
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dim() == w.dim() - 1:
            mod = self.stack[-1].name if self.stack else ""
            where = f"module '{mod}'" if mod else "the model's own forward"
            shape = tuple(x.shape)
            raise TraceError(
                f"op '{name}' in {where} got an input of shape {shape} without a batch dimension ('{name}' "
                f"takes {w.dim()}-D (N, C, ...) inputs); give a batched input size such as {(1, *shape)}",
                module=mod, op=name)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if self.hidden:
            return func(*args, **kwargs)
        name = op_name(func)
        if name in _SKIP:
            return func(*args, **kwargs)
        if name in CONV_OPS:
            self._check_batched(name, args, kwargs)
        try:
            out = func(*args, **kwargs)
        except TraceError:
            raise
        except Exception as e:  # name the op and the module that ran it
            out = _meta_result(name, args, kwargs)
            if out is not None:
                return self._record(name, func, args, kwargs, out)
            mod = self.stack[-1].name if self.stack else ""
            where = f"module '{mod}'" if mod else "the model's own forward"
            raise TraceError(
                f"op '{name}' failed in {where}: {type(e).__name__}: {e}", module=mod, op=name
            ) from e
        return self._record(name, func, args, kwargs, out)

    def _record(self, name: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        is_setitem = name == "__setitem__"
        if not is_setitem and (out is None or isinstance(out, (bool, int, float, torch.Size, str))):
            return out
        out_leaves = pytree.tree_leaves(out) if not isinstance(out, torch.Tensor) else [out]
        out_tensors = [o for o in out_leaves if isinstance(o, torch.Tensor)]
        if not out_tensors and not is_setitem:
            return out
        inputs: list[TensorInfo] = []
        in_tensors: list[torch.Tensor] = []
        wargs = tuple(self._wrap(a, inputs, in_tensors) for a in args)
        wkwargs = {k: self._wrap(v, inputs, in_tensors) for k, v in kwargs.items()}
        index = len(self.g.nodes)
        call = self.stack[-1] if self.stack else None
        node = OpNode(index, name, func, wargs, wkwargs, inputs, [], call.name if call else "",
                      call.index if call else None)
        # in-place writes: an output that *is* an input, or the target of __setitem__
        in_ids = {id(a) for a in in_tensors}
        if is_setitem and isinstance(args[0], torch.Tensor):
            node.mutated.append(self.info(args[0]))
            node.outputs.append(self.new(args[0], "op", index, 0))
        for k, o in enumerate(out_tensors):
            if id(o) in in_ids:
                node.mutated.append(self.infos[o])
            node.outputs.append(self.new(o, "op", index, k))
        self.g.nodes.append(node)
        if call is not None:
            call.ops.append(index)
        return out


# -- ops whose meta kernel refuses what the device kernels run: the output is made here, from the shapes.
# ``_grouped_mm`` (mixture-of-experts layers) has CPU/CUDA kernels for float32 but its meta kernel accepts only
# bfloat16/float16; on meta every input is a shape, so the output shape is all a trace needs.
def _grouped_mm_meta(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    a = args[0] if args else kwargs.get("mat_a", kwargs.get("input"))
    b = args[1] if len(args) > 1 else kwargs.get("mat_b", kwargs.get("weight"))
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    if a.dim() == 2 and b.dim() == 3 and a.shape[1] == b.shape[1]:  # tokens x experts, grouped by offs
        shape: tuple[int, ...] = (a.shape[0], b.shape[2])
    elif a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0] and a.shape[2] == b.shape[1]:
        shape = (a.shape[0], a.shape[1], b.shape[2])
    elif a.dim() == 2 and b.dim() == 2 and isinstance(offs, torch.Tensor) and a.shape[1] == b.shape[0]:
        shape = (offs.shape[0], a.shape[0], b.shape[1])  # grouped along the contracted axis
    else:
        return None
    dtype = kwargs.get("out_dtype") or a.dtype
    return torch.empty(shape, dtype=dtype, device="meta")


_META_SHAPES: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor | None]] = {
    "_grouped_mm": _grouped_mm_meta, "grouped_mm": _grouped_mm_meta}


def _meta_result(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The output of op ``name`` on meta inputs, for an op of :data:`_META_SHAPES` (None: not one of them)."""
    fn = _META_SHAPES.get(name)
    if fn is None:
        return None
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.device.type != "meta" for t in tensors):
        return None
    return fn(args, kwargs)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are ``meta`` tensors (structure only; tied tensors stay
    tied, parameters stay parameters): tracing it costs shapes, not arithmetic."""
    import copy
    import itertools

    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in memo:
            m = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(model, memo)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without either)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def make_inputs(model: nn.Module, x: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn the accepted input forms into ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    * a tuple/list of ints: an input *size*; a tensor of ones of that size is made on the model's device;
    * a tensor: the single positional input;
    * a tuple/list of tensors (or other values): positional inputs;
    * a dict: keyword inputs.
    """
    if isinstance(x, torch.Tensor):
        return (x,), {}
    if isinstance(x, dict):
        return (), dict(x)
    if isinstance(x, (tuple, list)) and len(x) > 0 and all(
            isinstance(v, numbers.Number) and not isinstance(v, bool) for v in x):
        # only numbers: an input *size*. A float in it (224.0) is refused: it is not a size, and treating the
        # tuple as positional inputs would call the model with four numbers.
        for i, v in enumerate(x):
            if not isinstance(v, numbers.Integral):
                raise ConfigError(f"input size {tuple(x)!r}: {v!r} at position {i} is not an integer; "
                                  "a size is integers, e.g. (1, 3, 224, 224)")
        size = tuple(int(v) for v in x)
        if any(v <= 0 for v in size):
            raise ConfigError(f"input size must contain positive integers, got {size}")
        return (torch.ones(size, device=model_device(model)),), {}
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    raise ConfigError(
        f"unsupported input {type(x).__name__}: give a size tuple, a tensor, a tuple of tensors or a dict"
    )


class _Failure:
    """The innermost module of the model that an exception left, so the error can name it."""

    def __init__(self) -> None:
        self.outer = sys.exc_info()[1]  # an exception being handled around the whole trace is not ours
        self.seen: list[tuple[BaseException, str, str]] = []  # (exception, module name, type), innermost first

    def note(self, name: str, module_type: str) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and exc is not self.outer and not any(e is exc for e, _, _ in self.seen):
            self.seen.append((exc, name, module_type))

    def where(self, e: BaseException) -> tuple[str, str] | None:
        chain: list[BaseException] = []
        cur: BaseException | None = e
        while cur is not None and not any(c is cur for c in chain):  # the exception, or those it came from
            chain.append(cur)
            cur = cur.__cause__ or cur.__context__
        for c in chain:
            for exc, name, mtype in self.seen:
                if exc is c:
                    return name, mtype
        return None


def _param_alias(name: str) -> str:
    """``'conv3.parametrizations.weight'`` (a ParametrizationList) -> ``'conv3.weight'``."""
    if name.startswith("parametrizations."):
        return name[len("parametrizations."):]
    owner, _, tensor = name.rpartition(".parametrizations.")
    return f"{owner}.{tensor}"


@contextlib.contextmanager
def _global_module_hooks(model: nn.Module, graph: ModelGraph, rec: _Recorder, stack: list[ModuleCall],
                         failure: _Failure):
    names = graph.module_names
    counts: dict[str, int] = {}
    thread = threading.get_ident()  # global hooks see every thread's module calls; record only ours

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
        if threading.get_ident() != thread:
            return None
        if rec.hidden or isinstance(mod, parametrize.ParametrizationList):
            rec.hidden += 1
            return None
        name = names.get(id(mod))
        if name is None:
            return None
        parent = stack[-1] if stack else None
        counts[name] = counts.get(name, 0) + 1
        mtype = parametrize.type_before_parametrizations(mod).__name__  # 'Conv2d', not 'ParametrizedConv2d'
        call = ModuleCall(len(graph.calls), name, mtype, parent.index if parent else None, counts[name])
        for a in pytree.tree_leaves((args, kwargs or {})):
            if isinstance(a, torch.Tensor):
                call.inputs.append(rec.info(a))
        graph.calls.append(call)
        if parent is not None:
            parent.children.append(call.index)
        stack.append(call)
        return None

    def post(mod: nn.Module, args: Any, kwargs: Any, output: Any = None) -> None:
        if threading.get_ident() != thread:
            return None
        if rec.hidden:
            rec.hidden -= 1
            name = names.get(id(mod))
            if not rec.hidden and name is not None and isinstance(output, torch.Tensor):
                # the parametrized tensor, as the parameter of the layer that owns it
                plist = mod
                kind = "param" if any(isinstance(p, nn.Parameter) for p in plist.parameters(recurse=False)) \
                    else "buffer"
                rec.new(output, kind, None, 0, _param_alias(name))
            return None
        if id(mod) not in names or not stack:
            return None
        call = stack.pop()
        failure.note(call.name, call.module_type)
        for o in pytree.tree_leaves(output):
            if isinstance(o, torch.Tensor):
                ti = rec.infos.get(o)
                if ti is not None:
                    call.outputs.append(ti)
        return None

    h1 = nn.modules.module.register_module_forward_pre_hook(lambda m, a: pre(m, a))
    h2 = nn.modules.module.register_module_forward_hook(
        lambda m, a, o: post(m, a, None, o), always_call=True
    )
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model: nn.Module) -> threading.RLock:
    """One re-entrant lock per model instance: traces of the same model run one at a time."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def quantized_kind(module: nn.Module) -> str | None:
    """What a quantized module is: ``'linear'``, ``'conv'`` or ``'conv_transpose'`` for the quantized (static,
    dynamic or fused) Linear/Conv layers; ``'other'`` for another module holding packed quantized weights
    (quantized LSTM, Embedding ...); None for a module that is not quantized (reference modules included:
    they compute with float weights)."""
    nnq = getattr(getattr(getattr(torch, "ao", None), "nn", None), "quantized", None)
    if nnq is not None:
        if isinstance(module, nnq.Linear):
            return "linear"
        if isinstance(module, nnq.modules.conv._ConvNd):
            return "conv_transpose" if getattr(module, "transposed", False) else "conv"
    mod = type(module).__module__ or ""
    if ".quantized" in mod and ".reference" not in mod and mod.startswith("torch.") and (
            hasattr(module, "_packed_params") or hasattr(module, "_all_weight_values")):
        return "other"
    return None


def _refuse_unsupported(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            what = "the model" if not name else f"module '{name}'"
            raise UnsupportedModelError(
                f"{what} is a TorchScript module ({type(m).__name__}, from torch.jit.script/torch.jit.trace): "
                "its code runs in the TorchScript interpreter, where prunescope cannot record what it does; "
                "analyse the eager model (before scripting)", module=name)


@contextlib.contextmanager
def preserved_training(model: nn.Module, training: bool | None) -> Iterator[None]:
    """Set train/eval mode for the duration, then restore every module's own flag exactly."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        for m, f in flags:
            m.training = f


@contextlib.contextmanager
def _preserved_buffers(model: nn.Module) -> Iterator[None]:
    """A forward in train mode updates buffers (BatchNorm running statistics): put their values back."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    if any(m.training for m in model.modules()):
        seen: set[int] = set()
        for b in model.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                saved.append((b, b.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


def check_graph_of(graph: Any, model: nn.Module, where: str) -> None:
    """Refuse a ``graph=`` argument that was not traced from ``model``: the graph knows its model
    (``graph.model``), and another model's trace would silently answer for this one. A trace of a structural
    copy (the ``meta`` copy the topology analyses trace: same classes, module names, tensor names and shapes)
    describes the same computation and is accepted."""
    if graph is None:
        return
    if not isinstance(graph, ModelGraph):
        raise ConfigError(f"{where}: graph must be a ModelGraph from prunescope.graph.trace, got "
                          f"{type(graph).__name__}")
    other = graph.model
    if other is model:
        return
    diff = _structure_difference(other, model)
    if diff:
        raise ConfigError(f"{where}: graph was traced from another model ({diff}); trace this model "
                          "(prunescope.graph.trace(model, x)) or leave graph out")


def _structure_difference(traced: nn.Module, model: nn.Module) -> str:
    """The first difference between the traced model and ``model`` in classes, module names, tensor names or
    shapes ('' when they have the same structure)."""
    import itertools

    if type(traced) is not type(model):
        return f"a {type(traced).__name__}, the model given is a {type(model).__name__}"
    mods = [(n, type(m)) for n, m in traced.named_modules()]
    own = [(n, type(m)) for n, m in model.named_modules()]
    for (n1, t1), (n2, t2) in itertools.zip_longest(mods, own, fillvalue=("", None)):
        if (n1, t1) != (n2, t2):
            a = f"'{n1}' ({t1.__name__})" if t1 is not None else "nothing"
            b = f"'{n2}' ({t2.__name__})" if t2 is not None else "nothing"
            return f"its modules differ: {a} in the traced model, {b} in the model given"

    def tensors(m: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, tuple(t.shape)) for n, t in itertools.chain(m.named_parameters(), m.named_buffers())]

    for (n1, s1), (n2, s2) in itertools.zip_longest(tensors(traced), tensors(model), fillvalue=("", None)):
        if n1 != n2:
            return f"its tensors differ: '{n1}' in the traced model, '{n2}' in the model given"
        if s1 != s2:
            return f"'{n1}' is {s1} in the traced model, {s2} in the model given"
    return ""


def trace(
    model: nn.Module,
    inputs: Any = None,
    kwargs: dict[str, Any] | None = None,
    *,
    training: bool | None = False,
    grad: bool = False,
) -> ModelGraph:
    """Run ``model`` once on ``inputs`` and record a :class:`ModelGraph`.

    ``inputs`` takes the forms of :func:`make_inputs` (size tuple, tensor, tuple of tensors, dict);
    ``kwargs`` adds keyword inputs. The model runs in eval mode (``training=False``; ``None`` keeps the
    current mode) and without autograd unless ``grad=True``. Inputs may live on any device, ``meta`` included.
    Buffers a train-mode forward updates (BatchNorm statistics) are restored afterwards.

    Raises :class:`~prunescope.errors.TraceError` naming the module and the op when the model fails.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_unsupported(model)
    args, kw = make_inputs(model, inputs) if inputs is not None else ((), {})
    if kwargs:
        kw.update(kwargs)
    g = ModelGraph(model)
    for name, m in model.named_modules():
        g.module_names.setdefault(id(m), name)
        g.modules[name] = m
    buffers = set()
    for name, p in model.named_parameters():
        g.param_names.setdefault(id(p), name)
    for name, b in model.named_buffers():
        if id(b) not in g.param_names:
            g.param_names[id(b)] = name
            buffers.add(name)
    infos = WeakIdKeyDictionary()
    stack: list[ModuleCall] = []
    rec = _Recorder(g, infos, stack)
    rec._buffers = frozenset(buffers)
    for i, a in enumerate(args):
        for t in pytree.tree_leaves(a):
            if isinstance(t, torch.Tensor):
                g.inputs.append(rec.new(t, "input", None, 0, f"input.{i}"))
    for k, a in kw.items():
        for t in pytree.tree_leaves(a):
            if isinstance(t, torch.Tensor):
                g.inputs.append(rec.new(t, "input", None, 0, k))
    grad_ctx = contextlib.nullcontext() if grad else torch.no_grad()
    failure = _Failure()
    try:
        with _model_lock(model), preserved_training(model, training), _preserved_buffers(model), grad_ctx, \
                _global_module_hooks(model, g, rec, stack, failure), rec:
            out = model(*args, **kw)
    except TraceError as e:
        e.recorded = len(g.nodes)  # ops that ran before the failure (shrink's shape check reads it)
        raise
    except Exception as e:
        found = failure.where(e)
        if found is not None:
            mod, mtype = found
            where = f"module '{mod}' ({mtype})" if mod else f"the model's own forward ({mtype})"
        else:
            mod = stack[-1].name if stack else ""
            where = f"module '{mod}'" if mod else "the model's forward"
        err = TraceError(f"the model failed in {where}: {type(e).__name__}: {e}", module=mod)
        err.recorded = len(g.nodes)
        raise err from e
    for o in pytree.tree_leaves(out):
        if isinstance(o, torch.Tensor):
            ti = infos.get(o)
            g.outputs.append(ti if ti is not None else rec.new(o, "const", None, 0))
    return g

