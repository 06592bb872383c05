"""Unit masks (prunescope.masks.units): on CNN sets whose units are single channels they are NNI's group rule bit
for bit; where the engine ties several channels of a layer into one unit, whole units go, scored by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from prunescope import unit_masks
from prunescope.errors import ConfigError
from prunescope.examples.digits import DigitsNet
from prunescope.graph import trace
from prunescope.masks import fix_mask_conflict, group_masks
from prunescope.masks.units import channel_units, is_trivial
from prunescope.narrow import shrink
from prunescope.topology import channel_atoms

X = torch.ones(1, 1, 8, 8)


def _net(ties: bool = False) -> DigitsNet:
    torch.manual_seed(0)
    net = DigitsNet().eval()
    if ties:  # integer weights with repeated filters: NNI's '<= threshold' rule then prunes more than int(n*s)
        with torch.no_grad():
            for conv in (net.conv1, net.conv3):
                w = torch.randint(-2, 3, conv.weight.shape).float()
                w[1::3] = w[0]
                conv.weight.copy_(w)
    return net


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("prune_type", ["l1", "l2", "fpgm"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_single_channel_units_are_nni_group_rule(ties: bool, prune_type: str, sparsity: float) -> None:
    net = _net(ties)
    ca = channel_atoms(trace(net, X))
    members = ["conv1", "conv3"]  # tied by the residual add: one channel of each per class
    units = channel_units(ca, members)
    assert units is not None and is_trivial(units)
    mods = [net.conv1, net.conv3]
    ref = group_masks(mods, sparsity, prune_type)  # NNI v2's dependency-aware rule (sum of scores)
    got = group_masks(mods, sparsity, prune_type, units=[u.tolist() for u in units])
    for a, b in zip(ref, got):
        assert torch.equal(a["weight"], b["weight"])
        assert a["bias"] is None and b["bias"] is None
    if 0 < sparsity < 1:
        via_model = unit_masks(net, X, sparsity, layers=["conv1"], prune_type=prune_type)
        assert sorted(via_model) == members
        for name, a in zip(members, ref):
            assert torch.equal(via_model[name]["weight"], a["weight"])


def test_single_layer_set_is_layer_mask() -> None:
    net = _net()
    from prunescope.masks import layer_mask

    got = unit_masks(net, X, 0.5, layers=["conv2", "fc1"])
    for name in ("conv2", "fc1"):
        ref = layer_mask(getattr(net, name), 0.5, "l1")
        assert torch.equal(got[name]["weight"], ref["weight"])


class Shuffle(nn.Module):
    """A channel shuffle after ``a``: the engine ties a's channels c and c + 4 (same in-group index). The sizes
    are read from the tensor (``literal=True``: written as numbers, which shrink cannot update)."""

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.literal = literal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        y = self.a(x)
        c = 8 if self.literal else y.shape[1]
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(y)


def test_units_spanning_channels_of_one_layer_go_whole() -> None:
    torch.manual_seed(0)
    net = Shuffle().eval()
    x = torch.ones(1, 3, 4, 4)
    ca = channel_atoms(trace(net, x))
    units = channel_units(ca, ["a"])
    assert units is not None and not is_trivial(units)
    unit_of = units[0].tolist()
    assert len(set(unit_of)) == 4 and all(unit_of[c] == unit_of[c + 4] for c in range(4))
    masks = unit_masks(net, x, 0.5, layers=["a"])
    keep = masks["a"]["bias"].bool()
    # by hand: unit score = |w| of both channels of the unit; the 2 lowest of 4 units go
    l1 = net.a.weight.detach().abs().sum(dim=(1, 2, 3)).double()
    score = {u: sum(float(l1[c]) for c in range(8) if unit_of[c] == u) for u in set(unit_of)}
    lowest = sorted(score, key=score.get)[:2]
    assert keep.tolist() == [unit_of[c] not in lowest for c in range(8)]
    fixed = fix_mask_conflict(masks, net, x)
    assert torch.equal(fixed["a"]["weight"], masks["a"]["weight"])  # whole classes: nothing to fix
    small = shrink(net, masks, x, fix_conflicts=False)
    assert small.a.out_channels == 4 and small(x).shape == net(x).shape


def test_units_shrink_cannot_narrow_are_not_offered() -> None:
    """The same shuffle with its sizes written as numbers: shrink cannot narrow ``a``, so no unit is offered
    (and naming the layer says why; an empty answer comes with a warning that says why, at the caller's line)."""
    net = Shuffle(literal=True).eval()
    x = torch.ones(1, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"unit_masks: no dependency set may be pruned.*a: shrink cannot remove") \
            as rec:
        assert unit_masks(net, x, 0.5) == {}
    assert [w.filename for w in rec if "no dependency set" in str(w.message)] == [__file__]
    with pytest.raises(ConfigError, match="dependency set a may not be pruned: shrink cannot remove"):
        unit_masks(net, x, 0.5, layers=["a"])


def test_unit_masks_refuses() -> None:
    net = _net()
    with pytest.raises(ConfigError, match="filter prune type"):
        unit_masks(net, X, 0.5, prune_type="level")
    with pytest.raises(ConfigError, match="not conv/linear layers"):
        unit_masks(net, X, 0.5, layers=["bn1"])
    with pytest.raises(ConfigError, match="reach the model output"):
        unit_masks(net, X, 0.5, layers=["fc2"])
    with pytest.raises(ConfigError, match="unit id per output channel"):
        group_masks([net.conv1], 0.5, "l1", units=[[0, 1]])
    assert "fc2" not in unit_masks(net, X, 0.5)  # default: every prunable set, the classifier left alone


class Grouped(nn.Module):
    """A ResNeXt-like bottleneck: ``a`` feeds a 4-group conv ``g``, whose output feeds ``c``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.g(torch.relu(self.a(x)))))


def test_grouped_units_go_equally_per_group() -> None:
    """By hand: 4 groups of 4 channels, 50 % -> the 2 lowest-L1 filters of every group go, so the conflict
    fixer changes nothing and shrink removes every masked channel (a global choice would unbalance groups)."""
    torch.manual_seed(0)
    net = Grouped().eval()
    x = torch.randn(1, 3, 6, 6)
    masks = unit_masks(net, x, 0.5)
    assert sorted(masks) == ["a", "g"]
    for name in ("a", "g"):
        l1 = getattr(net, name).weight.detach().abs().sum(dim=(1, 2, 3)).view(4, 4)
        want = torch.ones(4, 4, dtype=torch.bool)
        want.scatter_(1, l1.argsort(1)[:, :2], False)
        assert masks[name]["bias"].bool().view(4, 4).tolist() == want.tolist()
    fixed = fix_mask_conflict(masks, net, x)
    assert not fixed.changed and all(torch.equal(fixed[k]["weight"], masks[k]["weight"]) for k in masks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ShrinkWarning: nothing fixed, nothing kept
        small = shrink(net, masks, x)
    assert (small.a.out_channels, small.g.in_channels, small.g.out_channels, small.c.in_channels) == (8, 8, 8, 8)


def test_unit_chunks_reasons() -> None:
    from prunescope.narrow.prunable import unit_chunks

    u = [np.arange(8)]
    assert unit_chunks(u, [8], [2]).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # one channel of every group per unit (ResNeSt's radix splits): any choice keeps the groups equal
    assert unit_chunks([np.array([0, 1, 2, 3, 0, 1, 2, 3])], [8], [2]) is None
    assert "unevenly" in unit_chunks([np.array([0, 0, 1, 2, 0, 1, 2, 3])], [8], [2])
    assert "one unit" in unit_chunks(u, [8], [8])  # removing a unit would empty a group
    assert "cannot be split" in unit_chunks(u, [8], [3])


class LayerScaled(nn.Module):
    """ConvNeXt's ``gamma.reshape(1, -1, 1, 1)`` and timm's layer scale keeping its shape as an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.shape = (8, 1, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) * self.gamma.reshape(1, -1, 1, 1)
        return self.b(y * self.scale.view(self.shape))


def test_reshaped_per_channel_parameters_are_narrowed() -> None:
    torch.manual_seed(0)
    net = LayerScaled().eval()
    x = torch.randn(1, 3, 5, 5)
    masks = unit_masks(net, x, 0.5)
    assert sorted(masks) == ["a"]
    small = shrink(net, masks, x)
    keep = masks["a"]["bias"].bool()
    assert small.gamma.shape == (4,) and torch.equal(small.gamma, net.gamma[keep])
    assert small.shape == (4, 1, 1) and net.shape == (8, 1, 1)
    with torch.no_grad():
        want = net.b(net.a(x) * (net.gamma * keep).reshape(1, -1, 1, 1) * net.scale.view(8, 1, 1))
        assert torch.allclose(small(x), want, rtol=1e-5, atol=1e-6)
