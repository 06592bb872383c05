"""Channel semantics on small hand-written models: every answer derived by hand."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunescope.errors import ConfigError, TraceError
from prunescope.graph import trace
from prunescope.removal import ReshapeDependency, not_safe_to_prune
from prunescope.topology import (
    ChannelDependency,
    ChannelInfo,
    GroupDependency,
    InputChannelDependency,
    TopologyWarning,
    channel_atoms,
    map_channels,
)

X = torch.ones(1, 3, 8, 8)


def sets(model: nn.Module, x=X, **kw) -> list[list[str]]:
    return ChannelDependency(model, x, **kw).sets


class SE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.gate = nn.Conv2d(8, 1, 1)  # a per-sample/per-pixel scalar: ties nothing

    def forward(self, x):
        y = self.a(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = y * s  # (N, 8, 1, 1) scale: ties fc2 to a
        y = y * torch.sigmoid(self.gate(y))  # (N, 1, H, W): no tie
        return y * 2.0 + torch.ones(1, 8, 1, 1)  # constants tie nothing


def test_se_broadcasting() -> None:
    assert sets(SE()) == [["a", "fc2"], ["fc1"], ["gate"]]


class Residual(nn.Module):
    def __init__(self, inplace: str = "add") -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.inplace = inplace

    def forward(self, x):
        y = self.a(x)
        z = self.b(y)
        if self.inplace == "iadd":
            z += y
        elif self.inplace == "add_":
            z.add_(y)
        else:
            z = torch.add(z, y)
        return self.c(z)


@pytest.mark.parametrize("mode", ["add", "iadd", "add_"])
def test_inplace_adds(mode: str) -> None:
    assert sets(Residual(mode)) == [["a", "b"], ["c"]]


class Functional(nn.Module):
    """F.conv2d with the module's own parameter, a module called twice, data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 1, 1))
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.other = nn.Conv2d(3, 8, 1)
        self.never = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = F.conv2d(x, self.weight)
        if x.sum() > 0:  # data-dependent: the traced branch is what counts
            y = y + self.shared(y)
        else:
            y = y + self.never(y)
        z = self.shared(self.other(x))  # second call of `shared`
        return y, z


def test_functional_shared_and_control_flow() -> None:
    m = Functional()
    # a parameter of the root module names its layer by the parameter itself; `shared` reads the outputs of
    # `weight` and `other` with the same input columns, so their channels are pruned together
    assert sets(m) == [["weight", "shared", "other"]]
    assert sets(m, -X) == [["weight", "never"], ["other"], ["shared"]]
    g = trace(m, X)
    ca = channel_atoms(g)
    assert len(ca.layers["shared"].inputs) == 2
    # the shared conv reads two tensors: their channels must be pruned alike (input-channel dependency)
    assert InputChannelDependency(m, X).sets == [["weight", "other"], ["shared"]]


def test_multiple_inputs_and_dict_io() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(5, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x, y):
            s = self.a(x) - self.b(y)
            return {"out": self.c(s), "aux": s}

    m = Two()
    inputs = (torch.ones(1, 3, 4, 4), torch.ones(1, 5, 4, 4))
    assert sets(m, inputs) == [["a", "b"], ["c"]]
    assert sets(m, {"x": inputs[0], "y": inputs[1]}) == [["a", "b"], ["c"]]


class Cat(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 8, 1)
        self.dim = dim

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], self.dim)
        return self.c(y) + y if self.dim == 1 else y


def test_cat() -> None:
    # along channels: no tie between a and b, but c's channels 0-3 tie to a, 4-7 to b
    m = Cat(1)
    assert sets(m) == [["a", "b", "c"]]
    ca = channel_atoms(trace(m, X))
    assert ca.channels(ca.graph.outputs[0])[5] == [("b", 1), ("c", 5)]
    assert sets(Cat(2)) == [["a", "b"]]  # along a spatial axis: ties a and b


def test_depthwise_and_groups() -> None:
    """The research doc's example: conv a → group conv g (4) → depthwise dw → group conv g2 (2)."""
    m = nn.Sequential()
    m.add_module("a", nn.Conv2d(3, 16, 1))
    m.add_module("g", nn.Conv2d(16, 16, 3, groups=4))
    m.add_module("dw", nn.Conv2d(16, 16, 3, groups=16))
    m.add_module("g2", nn.Conv2d(16, 8, 1, groups=2))
    gd = GroupDependency(m, X)
    assert gd.dependency == {"a": 4, "g": 4, "dw": 2, "g2": 2}
    assert gd.min_groups == {"a": 1, "g": 4, "dw": 1, "g2": 2}
    assert sets(m) == [["a"], ["g", "dw"], ["g2"]]  # depthwise: output tied to input
    mult = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4))  # depth multiplier 2
    ca = channel_atoms(trace(mult, X))
    assert [m_ for m_, _ in ca.class_members(ca.atom("0", 1))] == ["0", "1", "1"]
    assert ca.class_members(ca.atom("1", 3)) == [("0", 1), ("1", 2), ("1", 3)]


def test_group_export(tmp_path: Path) -> None:
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1, groups=2), nn.GroupNorm(4, 8))
    gd = GroupDependency(m, X)
    # conv 1 (groups 2) constrains itself and conv 0; the GroupNorm (4 groups) itself and conv 1
    assert gd.dependency == {"0": 2, "1": 4, "2": 4}
    assert gd.min_groups == {"0": 1, "1": 2, "2": 4}
    gd.export(tmp_path / "g.csv")
    assert (tmp_path / "g.csv").read_bytes() == b"Conv Layer Name,Group\r\n0,2\r\n1,4\r\n2,4\r\n"


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.c(y)


def test_channel_shuffle_exact() -> None:
    m = Shuffle()
    ca = channel_atoms(trace(m, X))
    c = ca.layers["c"]
    # after the shuffle, c reads a0, b0, a1, b1, ...; a_j and b_j are in one shuffle group (tied)
    names = [ca.atom_name(int(a)) for a in c.inputs[0]]
    expected = [ca.atom_class(ca.atom("a", j)) for j in (0, 0, 1, 1, 2, 2, 3, 3)]
    assert [ca.atom_class(ca.atom(*n)) for n in names] == expected
    assert ca.class_members(ca.atom("b", 2)) == [("a", 2), ("b", 2)]
    assert sets(m) == [["a", "b"], ["c"]]
    assert not_safe_to_prune(m, X) == []


def test_map_channels_helper() -> None:
    g = trace(nn.Sequential(nn.Conv2d(3, 6, 1), nn.Flatten()), torch.ones(1, 3, 1, 2))
    view = g.nodes[1]
    info = ChannelInfo((1,), np.arange(10, 16))
    (out,) = map_channels(view, [info])
    assert out.axes == (1,) and out.atoms.tolist() == [10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15]


class Reshapes(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.conv, self.other = nn.Conv2d(3, 16, 3), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(64, 2)
        self.mode = mode

    def forward(self, x):
        y = self.conv(x)  # (N, 16, 2, 2)
        if self.mode == "fixed":
            y = y.view(-1, 64)
        elif self.mode == "flatten":
            y = torch.flatten(y, 1)
        else:
            y = y.view(y.size(0), -1)
        return self.fc(y), self.other(x)


def test_not_safe_to_prune() -> None:
    x = torch.ones(1, 3, 4, 4)
    assert not_safe_to_prune(Reshapes("fixed"), x) == ["conv"]
    reasons = not_safe_to_prune(Reshapes("fixed"), x, with_reasons=True)
    assert "'view' writes the size 64" in reasons["conv"][0] and "op #1" in reasons["conv"][0]
    assert not_safe_to_prune(Reshapes("flatten"), x) == []
    assert not_safe_to_prune(Reshapes("n-1"), x) == []
    # flatten into Linear: fc's input column j holds conv channel j // 4
    ca = channel_atoms(trace(Reshapes("flatten"), x))
    assert [ca.atom_name(int(a)) for a in ca.layers["fc"].inputs[0][:6]] == [("conv", 0)] * 4 + [("conv", 1)] * 2
    dep = ReshapeDependency(Reshapes("fixed"), x)
    assert list(dep.dependency.values()) == [["conv"]]


def test_unknown_op_stops_with_warning() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=1))

    with pytest.warns(TopologyWarning, match=r"'cumsum'.*layers made unsafe: a"):
        reasons = not_safe_to_prune(Odd(), X, with_reasons=True)
    assert list(reasons) == ["a"] and "cumsum" in reasons["a"][0]


def test_graph_reuse_meta_and_errors() -> None:
    with torch.device("meta"):
        m = Residual()
    g = trace(m, torch.ones(1, 3, 8, 8, device="meta"))
    assert ChannelDependency(traced_model=g).sets == ChannelDependency(graph=g).sets == [["a", "b"], ["c"]]
    with pytest.raises(TypeError, match="ModelGraph"):
        ChannelDependency(m, X, traced_model=object())
    with pytest.raises(ConfigError):
        ChannelDependency(traced_model=g, prune_type="Nope")

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(TraceError, match="conv2d.*'conv'"):
        ChannelDependency(Bad(), X)


def test_batchnorm_prune_type() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    assert ChannelDependency(m, X, prune_type="Batchnorm").sets == [["1"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ChannelDependency(m, X).sets == [["0"]]
