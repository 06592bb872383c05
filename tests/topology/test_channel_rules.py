"""register_channel_rule: a user's custom op gets channel semantics the way the built-in ops get theirs.

The custom ops are ``torch.library`` ops (recorded as ``'<namespace>::<op>'``), each defined once for this
module under its own namespace, so registering their rules here changes nothing for any other test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import prunescope
from prunescope import (
    ChannelDependency,
    ShrinkError,
    count_flops_params,
    not_safe_to_prune,
    register_channel_rule,
    shrink,
)
from prunescope.errors import ConfigError
from prunescope.flops import flops_report
from prunescope.graph import trace
from prunescope.narrow import as_pruned
from prunescope.ops import ELEMENTWISE, UNARY, ZERO_PRESERVING, ZERO_PRESERVING_BINARY
from prunescope.topology import channel_atoms, moe
from prunescope.topology.rules import RULES, elementwise, passthrough


@torch.library.custom_op("pstest_rules::gated_sum", mutates_args=())
def gated_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + tanh(b): elementwise, and zero where both operands are zero."""
    return a + torch.tanh(b)


@gated_sum.register_fake
def _(a, b):
    return torch.empty_like(a)


@torch.library.custom_op("pstest_rules::shifted", mutates_args=())
def shifted(x: torch.Tensor) -> torch.Tensor:
    """x + 1 per element: keeps the channels, but a zero channel becomes a constant."""
    return x + 1


@shifted.register_fake
def _(x):
    return torch.empty_like(x)


class TwoBranches(nn.Module):
    """conv1 and conv2 meet in the custom op, conv3 reads the result."""

    op = staticmethod(gated_sum)  # a class attribute: the op is not copied with the model (shrink copies it)

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        return self.conv3(self.op(self.conv1(x), self.conv2(x)))


class Chain(nn.Module):
    op = None

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv2(self.op(self.conv1(x)))


def chain(op) -> Chain:
    """conv1 -> op -> conv2, the op a class attribute (not copied with the model)."""
    return type("Chain", (Chain,), {"op": staticmethod(op)})()


def _masks(layers, drop, out=6, cin=3, k=3):
    m = torch.ones(out, cin, k, k)
    m[drop] = 0
    b = torch.ones(out)
    b[drop] = 0
    return {name: {"weight": m.clone(), "bias": b.clone()} for name in layers}


def test_an_elementwise_custom_op_ties_its_operands_and_shrinks_once_registered():
    torch.manual_seed(0)
    net = TwoBranches().eval()
    x = torch.randn(2, 3, 10, 10)
    masks = _masks(["conv1", "conv2"], [1, 4])
    # before: the op stops the analysis; both layers feeding it are unsafe and shrink refuses to narrow them
    assert "pstest_rules::gated_sum" not in RULES
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert not_safe_to_prune(net, x) == ["conv1", "conv2"]
        with pytest.raises(ShrinkError, match="'conv1': it is unsafe.*'pstest_rules::gated_sum' has no known"):
            shrink(net, masks, x)
    assert any("pstest_rules::gated_sum" in str(m.message) for m in w)

    register_channel_rule("pstest_rules::gated_sum", family="elementwise", zero_preserving=True)
    assert RULES["pstest_rules::gated_sum"] is elementwise
    assert "pstest_rules::gated_sum" in ELEMENTWISE and "pstest_rules::gated_sum" in ZERO_PRESERVING_BINARY
    # after: the two layers are one dependency set, nothing is unsafe, and shrink narrows all three layers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown-op warning any more
        assert not_safe_to_prune(net, x) == []
        assert ChannelDependency(net, x).sets == [["conv1", "conv2"], ["conv3"]]
        small = shrink(net, masks, x)
    assert (small.conv1.out_channels, small.conv2.out_channels, small.conv3.in_channels) == (4, 4, 4)
    with torch.no_grad(), as_pruned(net, masks, x):
        want = net(x)
    with torch.no_grad():
        assert torch.allclose(small(x), want, rtol=1e-4, atol=1e-5)
    dense_eff = flops_report(net, x, masks=masks, effective=True)
    flops, params, _ = count_flops_params(small, x, verbose=False)
    assert (dense_eff.total_flops, dense_eff.total_params) == (flops, params)


def test_a_unary_family_without_zero_preservation_folds_the_constant_or_keeps_the_channel():
    """``shifted(0) = 1``: a removed channel reaches conv2 as a constant. conv2 (1x1, no padding) folds it into
    its bias, so shrink still narrows, and the shrunk model equals the as-pruned one."""
    torch.manual_seed(0)
    net = chain(shifted).eval()
    x = torch.randn(2, 3, 5, 5)
    masks = _masks(["conv1"], [0, 5], k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not_safe_to_prune(net, x) == ["conv1"]
    register_channel_rule("pstest_rules::shifted", family="unary")
    assert "pstest_rules::shifted" in UNARY and "pstest_rules::shifted" not in ZERO_PRESERVING
    assert not_safe_to_prune(net, x) == []
    small = shrink(net, masks, x)
    assert (small.conv1.out_channels, small.conv2.in_channels) == (4, 4)
    with torch.no_grad(), as_pruned(net, masks, x):
        want = net(x)
    with torch.no_grad():
        assert torch.allclose(small(x), want, rtol=1e-4, atol=1e-5)
        # by hand: the removed channels read shifted(0) = 1 everywhere, so conv2's bias takes W2[:, c] * 1
        assert torch.allclose(small.conv2.bias, net.conv2.bias + net.conv2.weight[:, [0, 5], 0, 0].sum(1))


def test_a_rule_of_your_own_describes_channels_only():
    """The decorator form: the engine follows the channels through the op, the value analysis does not know
    what the op makes of a removed channel, so shrink keeps those channels (and says why)."""

    @torch.library.custom_op("pstest_rules::own", mutates_args=())
    def own(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @own.register_fake
    def _(x):
        return torch.empty_like(x)

    calls = []

    @register_channel_rule("pstest_rules::own")
    def own_rule(ca, node, ins):
        calls.append(node.name)
        ca.set_info(node.outputs[0], ins[0])  # the output carries the input's channels unchanged

    torch.manual_seed(0)
    net = chain(own).eval()
    x = torch.randn(2, 3, 5, 5)
    ca = channel_atoms(trace(net, x))
    assert calls == ["pstest_rules::own"] and not ca.unsafe
    masks = _masks(["conv1"], [0, 5], k=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        small, result = shrink(net, masks, x, return_result=True)
    assert small.conv1.out_channels == 6
    assert "values that depend on the input ('pstest_rules::own'" in result.protected["conv1"][0]
    assert any("masked channels of 1 layers stay" in str(m.message) for m in w)


def test_bad_registrations_are_refused():
    with pytest.raises(ConfigError, match="unknown family 'pointwise'"):
        register_channel_rule("pstest_rules::x", family="pointwise")
    with pytest.raises(ConfigError, match="zero_preserving applies to a family"):
        register_channel_rule("pstest_rules::x", zero_preserving=True)
    with pytest.raises(ConfigError, match="needs op names"):
        register_channel_rule()
    with pytest.raises(ConfigError, match="must be a function"):
        register_channel_rule("pstest_rules::x")(42)
    with pytest.raises(ConfigError, match="either family= or the decorator"):
        register_channel_rule("pstest_rules::y", family="unary")(passthrough)
    assert "pstest_rules::x" not in RULES


def test_the_builtin_and_moe_rules_are_registered_through_it():
    assert prunescope.register_channel_rule is register_channel_rule
    assert RULES["topk"] is moe.topk_rule
    assert RULES["_grouped_mm"] is RULES["grouped_mm"] is moe.grouped_mm_rule
    assert RULES["bmm"] is not RULES["matmul"]  # bmm of gathered expert weights, wrapped around the matmul rule
    assert RULES["relu"] is passthrough and RULES["add"] is elementwise
