"""The op catalogue (prunescope/ops.py): one place for op knowledge, consistent with the analyses that read it."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import prunescope
from prunescope import ops
from prunescope.errors import ConfigError
from prunescope.flops.formulas import FORMULAS
from prunescope.topology.rules import RULES, elementwise, layer_op, norm_op, passthrough

ROOT = Path(prunescope.__file__).parent


def test_every_norm_and_layer_op_has_a_formula_and_a_channel_rule():
    """The "adding an op" checklist, checked for the ops the catalogue lists: cost formula and channel rule."""
    for name in ops.NORM_AXIS:
        assert RULES[name] is norm_op and FORMULAS[name].category == "norm", name
    for name in ops.LAYER_OPS:
        assert RULES[name] is layer_op and name in FORMULAS, name
    for name in ops.CONV_OPS | ops.LINEAR_OPS | ops.RNN_OPS:
        assert FORMULAS[name].default_mode, name  # counted as MACs
    assert {FORMULAS[n].category for n in ops.CONV_OPS} == {"conv"}
    assert ops.NORM_AXIS["rms_norm"] == ops.NORM_AXIS["layer_norm"] == -1


def test_the_tables_are_consistent():
    assert not ops.ELEMENTWISE & ops.UNARY
    assert ops.ZERO_PRESERVING <= ops.UNARY and ops.FACTORY_LIKE <= ops.UNARY
    assert ops.ZERO_ABSORBING <= ops.ZERO_PRESERVING_BINARY <= ops.ELEMENTWISE
    assert ops.CONV_TRANSPOSE_OPS < ops.CONV_OPS and ops.MATMUL_OPS < ops.CONTRACTION_OPS
    assert all(RULES[n] is elementwise for n in ops.ELEMENTWISE - ops.REDUCTIONS)
    assert all(RULES[n] is passthrough for n in ops.UNARY)


def test_op_name():
    assert ops.op_name(torch.nn.functional.conv2d) == "conv2d"
    assert ops.op_name(torch.ops.aten.add.Tensor) == ops.op_name(torch.ops.aten.add) == "add"
    assert ops.op_name(torch.ops.quantized.conv2d) == "quantized::conv2d"  # never the float conv2d
    assert ops.op_name(torch.Tensor.T.__get__) == "T"
    seen = []

    class Names(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(ops.op_name(func))
            return func(*args, **(kwargs or {}))

    x = torch.ones(2)
    with Names():
        torch.ops.aten.mul.Tensor(x, 2.0)
        twice(x)  # a torch.library custom op (an OpOverload): its qualified name, not 'pstest_ops.twice.default::'
    assert seen == ["mul", "pstest_ops::twice"]


@torch.library.custom_op("pstest_ops::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_arg_reads_keyword_then_position_then_default():
    node = SimpleNamespace(args=(1, 2), kwargs={"groups": 4})
    assert ops.arg(node, 6, "groups", 1) == 4
    assert ops.arg(node, 1, "weight") == 2
    assert ops.arg(node, 5, "bias", "none") == "none"


def test_add_to_family_moves_an_op_between_families():
    name = "pstest_ops::act"
    try:
        ops.add_to_family(name, "unary", zero_preserving=True)
        assert name in ops.UNARY and name in ops.ZERO_PRESERVING
        ops.add_to_family(name, "elementwise")
        assert name in ops.ELEMENTWISE and name not in ops.UNARY | ops.ZERO_PRESERVING | ops.ZERO_PRESERVING_BINARY
        with pytest.raises(ConfigError, match="unknown op family 'binary'"):
            ops.add_to_family(name, "binary")
    finally:
        for table in (ops.UNARY, ops.ZERO_PRESERVING, ops.ELEMENTWISE, ops.ZERO_PRESERVING_BINARY):
            table.discard(name)


def test_op_knowledge_is_written_once():
    """No module but ops.py spells a convolution op name or defines the op-argument/op-name helpers (they were
    written in graph.py, topology/rules.py, removal/plan.py and flops/formulas.py before the catalogue)."""
    convs = set(ops.CONV_OPS)  # a quoted name; a docstring mentioning 'conv2d' in prose is fine
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "ops.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in convs:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.FunctionDef) and node.name in ("arg", "_arg", "op_name", "_op_name"):
                found.append(f"{rel}:{node.lineno} def {node.name}")
    assert not found, found
