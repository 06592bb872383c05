"""The FLOPs/params counter: per-op formulas summed per module call of one recorded trace."""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .._io import atomic_write
from ..errors import ConfigError, UnsupportedModelError
from ..graph import ModelGraph, ModuleCall, OpNode, TensorInfo, check_graph_of, quantized_kind, trace
from ..masks.files import validate_masks
from ..masks.layers import has_filters, num_filters
from .formulas import FORMULAS, MAC_CATEGORIES, Formula

__all__ = ["LayerRow", "FlopsReport", "flops_report", "count_flops_params"]

MODES = ("default", "full")


@dataclass
class LayerRow:
    """One module call with the cost of the ops it ran itself (children have their own rows)."""

    name: str
    module_type: str
    call_number: int
    flops: int  # MACs (+ elementary ops in full mode)
    flops_fp: int  # floating-point operations: 2 × MACs + elementary ops
    params: int
    weight_size: tuple[int, ...] | int
    input_size: tuple[int, ...] | None
    output_size: tuple[int, ...] | None
    ops: dict[str, int] = field(default_factory=dict)  # op name -> MACs/ops charged here
    effective_params: int | None = None


@dataclass
class FlopsReport:
    """Everything the counter found. ``total_flops`` is in MACs (multiply-accumulates)."""

    rows: list[LayerRow]
    total_flops: int
    total_flops_fp: int
    total_params: int
    mode: str
    uncounted: dict[str, list[str]]  # op name -> modules that ran it (full mode)
    by_category: dict[str, int]
    effective: bool = False

    # ---- NNI-compatible views ---------------------------------------------------------------------
    def results(self) -> dict[str, dict[str, list[Any]]]:
        """NNI's documented layout: ``{layer: {'flops': [..], 'params': [..], 'weight_size': [..],
        'input_size': [..], 'output_size': [..], 'module_type': [..]}}``, one list entry per call."""
        out: dict[str, dict[str, list[Any]]] = {}
        for r in self.rows:
            d = out.setdefault(r.name, {k: [] for k in
                                        ("flops", "params", "weight_size", "input_size", "output_size", "module_type")})
            d["flops"].append(r.flops)
            d["params"].append(r.params)
            d["weight_size"].append(r.weight_size)
            d["input_size"].append(r.input_size)
            d["output_size"].append(r.output_size)
            d["module_type"].append(r.module_type)
        return out

    # ---- formatting ---------------------------------------------------------------------------------
    def table(self) -> str:
        """A plain-text table (Index, Name, Type, Weight Shape, Input Size, Output Size, FLOPs, #Params,
        and #Calls when a module ran more than once) followed by the totals."""
        multi = len({r.name for r in self.rows}) != len(self.rows)
        head = ["Index", "Name", "Type", "Weight Shape", "Input Size", "Output Size", "FLOPs (MACs)", "#Params"]
        if multi:
            head.append("#Calls")
        body = []
        for i, r in enumerate(self.rows):
            line = [str(i), r.name or "(model)", r.module_type, _fmt_shape(r.weight_size), _fmt_shape(r.input_size),
                    _fmt_shape(r.output_size), f"{r.flops:,}", f"{r.params:,}"]
            if multi:
                line.append(str(r.call_number))
            body.append(line)
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

        def fmt(cells: list[str]) -> str:
            parts = []
            for i, (c, w) in enumerate(zip(cells, widths)):
                parts.append(" " + (c.ljust(w) if i in (1, 2) else c.rjust(w)) + " ")
            return "|" + "|".join(parts) + "|"

        lines = [sep, fmt(head), sep, *(fmt(b) for b in body), sep]
        unit = "MACs, multiply-accumulates; bias adds not counted" if self.mode == "default" else \
            "MACs + elementary ops of the other layers"
        lines.append(f"FLOPs total: {self.total_flops:,} ({unit}; floating-point operations: "
                     f"{self.total_flops_fp:,})")
        lines.append(f"#Params total: {self.total_params:,}")
        if self.uncounted:
            ops = ", ".join(f"{k} ({len(v)}×)" for k, v in sorted(self.uncounted.items()))
            lines.append(f"Uncounted ops (no formula, not included above): {ops}")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["index", "name", "type", "call", "weight_shape", "input_size", "output_size", "flops_macs",
                    "flops_fp", "params"])
        for i, r in enumerate(self.rows):
            w.writerow([i, r.name, r.module_type, r.call_number, _fmt_shape(r.weight_size), _fmt_shape(r.input_size),
                        _fmt_shape(r.output_size), r.flops, r.flops_fp, r.params])
        text = buf.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "effective": self.effective,
            "unit": "MACs",
            "total_flops": self.total_flops,
            "total_flops_fp": self.total_flops_fp,
            "total_params": self.total_params,
            "by_category": self.by_category,
            "uncounted": self.uncounted,
            "layers": [asdict(r) for r in self.rows],
        }

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=list)
        if path is not None:
            atomic_write_text(path, text)
        return text


def atomic_write_text(path: str | os.PathLike[str], text: str, newline: str | None = None) -> None:
    """Write ``text`` to ``path`` atomically (see :mod:`prunescope._io`)."""
    atomic_write(path, text, newline=newline)


def _fmt_shape(s: Any) -> str:
    if s is None:
        return "-"
    if isinstance(s, tuple):
        return "(" + ", ".join(str(x) for x in s) + ")"
    return str(s)


CUSTOM_OPS_CONTRACT = ("fn(module, inputs, output) -> int >= 0 (or a dict {'flops': int >= 0, "
                       "'params': int >= 0})")


def _type_name(cls: Any) -> str:
    return getattr(cls, "__qualname__", None) or getattr(cls, "__name__", None) or repr(cls)


def check_custom_ops(custom: Any) -> dict[type, Callable[..., Any]]:
    """Validate ``custom_ops`` up front: keys are module classes, values callables taking three arguments.

    Raises :class:`~prunescope.errors.ConfigError` naming ``custom_ops``, the key and the contract.
    """
    if custom is None:
        return {}
    if not isinstance(custom, Mapping):
        raise ConfigError(f"custom_ops must be a dict {{ModuleClass: fn}}, got {type(custom).__name__}; "
                          f"each fn is {CUSTOM_OPS_CONTRACT}")
    out: dict[type, Callable[..., Any]] = {}
    for k, fn in custom.items():
        if not (isinstance(k, type) and issubclass(k, nn.Module)):
            raise ConfigError(
                f"custom_ops: key {k!r} ({type(k).__name__}) is not a module class; keys are nn.Module "
                f"subclasses such as torch.nn.Conv2d (not names), values {CUSTOM_OPS_CONTRACT}")
        if not callable(fn):
            raise ConfigError(f"custom_ops[{_type_name(k)}]: {fn!r} is not callable; expected {CUSTOM_OPS_CONTRACT}")
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            sig = None  # builtins without a signature: checked when called
        if sig is not None:
            try:
                sig.bind(None, (), None)
            except TypeError as e:
                raise ConfigError(f"custom_ops[{_type_name(k)}]: {getattr(fn, '__name__', fn)!r} cannot be called "
                                  f"with three arguments ({e}); expected {CUSTOM_OPS_CONTRACT}") from None
        out[k] = fn
    return out


def _custom_value(v: Any, field_name: str, where: str) -> int:
    """A custom_ops count as an int >= 0, or a ConfigError naming custom_ops, the module and the contract."""
    x = v
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.device.type != "meta" and not x.is_complex():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        ok = False
    elif isinstance(x, numbers.Integral):
        ok = int(x) >= 0
    else:
        ok = math.isfinite(float(x)) and float(x) >= 0
    if not ok:
        raise ConfigError(f"{where} returned {field_name} {v!r} ({type(v).__name__}); expected "
                          f"{CUSTOM_OPS_CONTRACT}")
    return int(x)


def _custom_for(module: nn.Module, custom: Mapping[type, Callable[..., Any]]) -> tuple[type, Callable[..., Any]] | None:
    for cls in type(module).__mro__:  # most specific class first
        if cls in custom:
            return cls, custom[cls]
    return None


def _run_custom(cls: type, fn: Callable[..., Any], call: ModuleCall, module: nn.Module) -> tuple[int, int]:
    where = f"custom_ops[{_type_name(cls)}] for module '{call.name}' ({type(module).__name__})"
    try:
        res = fn(module, tuple(_meta(t) for t in call.inputs), _meta(call.outputs[0]) if call.outputs else None)
    except Exception as e:
        raise ConfigError(f"{where} raised {type(e).__name__}: {e}; expected {CUSTOM_OPS_CONTRACT}") from e
    if isinstance(res, Mapping):
        extra = set(res) - {"flops", "params"}
        if extra or "flops" not in res:
            raise ConfigError(f"{where} returned a dict with keys {sorted(map(str, res))}; expected "
                              f"{CUSTOM_OPS_CONTRACT}")
        flops = _custom_value(res["flops"], "flops", where)
        p = res.get("params")
        params = _custom_value(p, "params", where) if p is not None else sum(x.numel() for x in module.parameters())
    else:
        flops = _custom_value(res, "flops", where)
        params = sum(x.numel() for x in module.parameters())
    return flops, params


# ---- quantized modules -----------------------------------------------------------------------------------
# A quantized Linear/Conv runs one opaque kernel on packed int8 weights (torch.ops.quantized.*), so it is counted
# per module, exactly as its float counterpart: the same MACs formula, weight and bias elements as parameters.


def _quantized_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = module.weight()  # type: ignore[operator]
    b = module.bias() if callable(getattr(module, "bias", None)) else None  # type: ignore[operator]
    return w, b


def _quantized_cost(kind: str, call: ModuleCall, module: nn.Module) -> tuple[int, str, int, tuple[int, ...]]:
    """(MACs, category, params, weight shape) of one call of a quantized Linear/Conv, as its float counterpart."""
    w, b = _quantized_tensors(module)
    params = w.numel() + (b.numel() if isinstance(b, torch.Tensor) else 0)
    x = call.inputs[0] if call.inputs else None
    out = call.outputs[0] if call.outputs else None
    if kind == "linear":  # float: numel(input) * out_features
        macs = x.numel() * w.shape[0] if x is not None else 0
        return macs, "gemm", params, tuple(w.shape)
    k = math.prod(module.kernel_size)  # type: ignore[attr-defined]
    g = module.groups  # type: ignore[attr-defined]
    if kind == "conv":  # float: numel(output) * in_channels/groups * kernel
        macs = out.numel() * (module.in_channels // g) * k if out is not None else 0  # type: ignore[attr-defined]
    else:  # float transposed: numel(input) * out_channels/groups * kernel
        macs = x.numel() * (module.out_channels // g) * k if x is not None else 0  # type: ignore[attr-defined]
    return macs, "conv", params, tuple(w.shape)


def _quantized_params(model: nn.Module) -> int:
    """Weight and bias elements held packed by quantized Linear/Conv modules (not in ``parameters()``)."""
    n = 0
    seen: set[int] = set()
    for m in model.modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        if quantized_kind(m) in ("linear", "conv", "conv_transpose"):
            w, b = _quantized_tensors(m)
            n += w.numel() + (b.numel() if isinstance(b, torch.Tensor) else 0)
    return n


def _meta(t: TensorInfo) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _mask_fractions(masks: Mapping[str, Any] | None, model: nn.Module) -> dict[str, float]:
    """Weight-parameter FQN -> fraction of output filters kept, counted NNI's way (nnz // filter size)."""
    if not masks:
        return {}

    modules = dict(model.named_modules())
    out: dict[str, float] = {}
    for layer, m in validate_masks(masks, model, "count_flops_params masks").items():
        w = m["weight"]
        mod = modules[layer]
        weight = mod.weight
        nnz = int(torch.count_nonzero(w).item())
        n_filters = num_filters(mod) if has_filters(mod) else weight.shape[0]
        filter_size = weight.numel() // max(1, n_filters)
        out[f"{layer}.weight"] = (nnz // filter_size) / n_filters if n_filters else 1.0
    return out


def flops_report(
    model: nn.Module,
    x: Any = None,
    custom_ops: Mapping[type, Callable[..., Any]] | None = None,
    mode: str = "default",
    *,
    masks: Mapping[str, Any] | None = None,
    effective: bool = False,
    graph: ModelGraph | None = None,
) -> FlopsReport:
    """Count MACs and parameters of ``model`` on input ``x`` and return a :class:`FlopsReport`.

    See :func:`count_flops_params` for the arguments. ``graph`` reuses an existing trace.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}: use 'default' or 'full'")
    check_custom_ops(custom_ops)
    check_graph_of(graph, model, "flops_report")
    if effective:
        from .effective import effective_report

        return effective_report(model, x, custom_ops=custom_ops, mode=mode, masks=masks, graph=graph)
    g = graph if graph is not None else trace(model, x)
    fractions = _mask_fractions(masks, model)
    return _build(g, model, custom_ops or {}, mode, fractions, None)


def _op_cost(node: OpNode, mode: str) -> tuple[int, int, str | None, Formula | None]:
    """(count, fp_ops, category, formula) of one op in ``mode``; category None = not counted."""
    f = FORMULAS.get(node.name)
    if f is None:
        return 0, 0, None, None
    if mode == "default" and not f.default_mode:
        return 0, 0, None, f
    n = int(f.fn(node))
    fp = 2 * n if f.category in MAC_CATEGORIES else n
    if mode == "full":
        gates = FORMULAS.get(f"{node.name}::gates")
        if gates is not None:
            extra = int(gates.fn(node))
            n += extra
            fp += extra
    return n, fp, f.category, f


def _build(
    g: ModelGraph,
    model: nn.Module,
    custom: Mapping[type, Callable[..., Any]],
    mode: str,
    fractions: Mapping[str, float],
    op_scale: Callable[[OpNode], tuple[float, int | None]] | None,
) -> FlopsReport:
    custom = check_custom_ops(custom)
    rows: list[LayerRow] = []
    uncounted: dict[str, list[str]] = {}
    by_cat: dict[str, int] = {}
    covered: set[int] = set()  # module calls inside a custom-counted module call
    root_call = ModuleCall(-1, "", type(model).__name__, None, 1)
    root_call.ops = [n.index for n in g.nodes if n.call is None]
    calls = list(g.calls)
    if root_call.ops:
        calls = [root_call] + calls
    for call in calls:
        if call.index in covered:
            covered.update(call.children)
            continue
        module = g.modules.get(call.name, model)
        found = _custom_for(module, custom) if custom and call.index >= 0 else None
        if found is not None:
            covered.update(call.children)
            flops, params = _run_custom(found[0], found[1], call, module)
            rows.append(_row(call, module, flops, 2 * flops, params, {type(module).__name__: flops}))
            by_cat["custom"] = by_cat.get("custom", 0) + flops
            continue
        qkind = quantized_kind(module) if call.index >= 0 else None
        if qkind == "other":
            raise UnsupportedModelError(
                f"module '{call.name}' is a quantized {type(module).__name__} ({type(module).__module__}), "
                "which prunescope cannot count; count the float model (before quantization) or give "
                f"custom_ops={{{type(module).__name__}: fn}}", module=call.name)
        if qkind is not None:
            covered.update(call.children)
            macs, cat, params, wshape = _quantized_cost(qkind, call, module)
            fp = 2 * macs
            if op_scale is not None:
                raise UnsupportedModelError(
                    f"module '{call.name}' is a quantized {type(module).__name__}: effective counts need float "
                    "layers that masks can narrow; count the float model", module=call.name)
            row = _row(call, module, macs, fp, params, {type(module).__name__: macs})
            row.weight_size = wshape
            rows.append(row)
            by_cat[cat] = by_cat.get(cat, 0) + macs
            continue
        total = fp_total = 0
        op_counts: dict[str, int] = {}
        used_params: dict[int, TensorInfo] = {}
        counted_any = False
        eff_params = 0
        for i in call.ops:
            node = g.nodes[i]
            n, fp, cat, f = _op_cost(node, mode)
            if cat is None:
                if f is None and mode == "full":
                    uncounted.setdefault(node.name, []).append(call.name)
                continue
            if cat == "data":
                continue
            counted_any = True
            if op_scale is not None:
                scale, p_eff = op_scale(node)
                n = int(round(n * scale))
                fp = int(round(fp * scale))
                if p_eff is not None:
                    eff_params += p_eff
            else:
                for t in node.params:
                    frac = fractions.get(t.name or "")
                    if frac is not None:
                        n = int(n * frac)
                        fp = int(fp * frac)
                        break
            total += n
            fp_total += fp
            op_counts[node.name] = op_counts.get(node.name, 0) + n
            by_cat[cat] = by_cat.get(cat, 0) + n
            for t in node.params:
                used_params[t.id] = t
        if counted_any:
            params = sum(t.numel() for t in used_params.values())
            row = _row(call, module, total, fp_total, params, op_counts)
            if op_scale is not None:
                row.effective_params = eff_params
            rows.append(row)
    total_params = sum(p.numel() for p in model.parameters()) + _quantized_params(model)
    return FlopsReport(rows, sum(r.flops for r in rows), sum(r.flops_fp for r in rows), total_params, mode,
                       {k: sorted(set(v)) for k, v in uncounted.items()}, by_cat, op_scale is not None)


def _row(call: ModuleCall, module: nn.Module, flops: int, fp: int, params: int, ops: dict[str, int]) -> LayerRow:
    weight = getattr(module, "weight", None)
    wsize: tuple[int, ...] | int = tuple(weight.shape) if isinstance(weight, torch.Tensor) else 0
    if wsize == 0:
        for name, p in module.named_parameters(recurse=False):
            if "weight" in name:
                wsize = tuple(p.shape)
                break
    ins = tuple(call.inputs[0].shape) if call.inputs else None
    outs = tuple(call.outputs[0].shape) if call.outputs else None
    return LayerRow(call.name, call.module_type, call.call_number, flops, fp, params, wsize, ins, outs, ops)


def count_flops_params(
    model: nn.Module,
    x: Any,
    custom_ops: Mapping[type, Callable[..., Any]] | None = None,
    verbose: bool = True,
    mode: str = "default",
    *,
    masks: Mapping[str, Any] | None = None,
    effective: bool = False,
) -> tuple[int, int, dict[str, dict[str, list[Any]]]]:
    """Count the FLOPs (as **MACs**, multiply-accumulates) and parameters of ``model``; NNI-compatible.

    Args:
        model: the model. It is run once (eval mode, no autograd) and left exactly as it was.
        x: an input size tuple (a tensor of ones is made on the model's device), a tensor, a tuple of
           tensors (positional inputs) or a dict (keyword inputs). Tensors may be on ``meta``.
        custom_ops: ``{ModuleType: fn(module, inputs, output)}`` returning the module call's FLOPs (an int
           >= 0, or a dict with ``'flops'`` and optionally ``'params'``); replaces the module's whole count.
           ``inputs`` and ``output`` are meta tensors with the recorded shapes. Keys that are not module
           classes, functions that do not take three arguments, and results that are not counts >= 0 raise
           :class:`~prunescope.errors.ConfigError` naming ``custom_ops`` and the module.
        verbose: print the per-layer table and totals.
        mode: ``'default'`` counts convolutions, linear layers, matrix products, attention and recurrent
           gates (MACs); ``'full'`` also counts norms, activations, pooling, upsampling, elementwise ops and
           softmax (see :mod:`prunescope.flops.formulas`), and lists ops without a formula as uncounted.
        masks: NNI masks ``{layer: {'weight': mask, 'bias': mask or None}}``; each layer's remaining output
           filters are counted as NNI does (``effective=False``).
        effective: count the network as it will be once masked channels are physically removed, input
           channels of the consumers included (see :mod:`prunescope.flops.effective`).

    Returns:
        ``(flops, params, results)``: total MACs of the whole input (all samples), the model's true
        parameter total (shared parameters once), and ``{layer: {'flops': [...], 'params': [...],
        'weight_size': [...], 'input_size': [...], 'output_size': [...], 'module_type': [...]}}`` with one
        list entry per call.

    >>> import torch
    >>> from prunescope import count_flops_params
    >>> net = torch.nn.Sequential()
    >>> net.add_module("conv", torch.nn.Conv2d(3, 5, 1)); net.add_module("conv2", torch.nn.Conv2d(5, 5, 1))
    >>> flops, params, results = count_flops_params(net, (1, 3, 2, 2), verbose=False)
    >>> flops, params, results["conv"]["flops"], results["conv2"]["params"]
    (160, 50, [60], [30])
    """
    rep = flops_report(model, x, custom_ops, mode, masks=masks, effective=effective)
    if verbose:
        print(rep.table())
    return rep.total_flops, rep.total_params, rep.results()


