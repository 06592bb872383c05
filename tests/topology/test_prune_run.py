"""Prune-and-run: zeroing one dependency set's channels == physically removing them.

For a chosen set of atom classes, the *masked* model zeroes those output channels in every member layer
(conv weight + bias, and the following BatchNorm's affine parameters, so the channel is exactly 0
everywhere it flows). The *pruned* model removes them physically: member layers lose those filters, norms
those channels, and every consumer the input columns that carry them (found with the channel atoms, which
also map through cat and flatten). Both must give the same output; removing the channels from one tied layer
alone cannot even run.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from prunescope.graph import trace
from prunescope.topology import ChannelDependency, channel_atoms


def _classes(ca, layer: str, channels: list[int]) -> np.ndarray:
    return np.unique(ca.atom_class(np.array([ca.atom(layer, c) for c in channels])))


def masked(model: nn.Module, ca, pruned: np.ndarray) -> nn.Module:
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name in ca.layers:
            drop = np.isin(ca.layer_classes(name), pruned)
            mod = mods[name]
            mod.weight[torch.from_numpy(drop)] = 0
            if getattr(mod, "bias", None) is not None:
                mod.bias[torch.from_numpy(drop)] = 0
        for name, reps in ca.followers.items():
            drop = torch.from_numpy(np.isin(ca.atom_class(reps[0]), pruned))
            mods[name].weight[drop] = 0
            mods[name].bias[drop] = 0
    return m


def pruned_model(model: nn.Module, ca, pruned: np.ndarray, only: str | None = None) -> nn.Module:
    """Slice the weights. ``only``: remove the channels from that one layer's filters alone."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())

    def keep(atoms: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(~np.isin(ca.atom_class(atoms), pruned))

    with torch.no_grad():
        for name, li in ca.layers.items():
            mod = mods[name]
            w = mod.weight
            kin = keep(li.inputs[0])
            kout = keep(ca.layer_atoms(name)) if only in (None, name) else torch.ones(w.shape[0], dtype=torch.bool)
            if only is not None:
                kin = torch.ones_like(kin)
            if li.depthwise:  # one input channel per group: the group count follows the filters
                w = w[kout]
                mod.groups = int(kout.sum())
            else:
                w = w[kout][:, kin] if w.ndim > 1 else w[kout]
            mod.weight = nn.Parameter(w)
            if getattr(mod, "bias", None) is not None:
                mod.bias = nn.Parameter(mod.bias[kout])
        for name, reps in ca.followers.items():
            bn = mods[name]
            k = keep(reps[0]) if only is None else torch.ones(len(reps[0]), dtype=torch.bool)
            bn.weight, bn.bias = nn.Parameter(bn.weight[k]), nn.Parameter(bn.bias[k])
            bn.running_mean, bn.running_var = bn.running_mean[k], bn.running_var[k]
    return m


class CatNet(nn.Module):
    """cat along channels, a residual over the concatenation, flatten into Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.c, self.d = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], 1)
        z = torch.relu(self.c(y) + y)
        return self.fc(torch.flatten(self.pool(self.d(z)), 1))


class ResNetLite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.b2(torch.relu(self.b1(x)))
        x = x * torch.sigmoid(self.dw(x))
        return self.head(x).mean((2, 3))


CASES = [
    (ResNetLite, "stem", [1, 6], (1, 3, 10, 10)),
    (ResNetLite, "b1", [0, 3], (1, 3, 10, 10)),
    (CatNet, "a", [2, 5], (2, 3, 6, 6)),
    (CatNet, "b", [0], (2, 3, 6, 6)),
    (CatNet, "d", [1, 2, 3], (2, 3, 6, 6)),
]


@pytest.mark.parametrize("cls,layer,channels,size", CASES)
def test_mask_equals_removal(cls, layer: str, channels: list[int], size) -> None:
    model = cls().eval()
    x = torch.randn(size)
    ca = channel_atoms(trace(model, x))
    pruned = _classes(ca, layer, channels)
    members = {n for n in ca.layers if np.isin(ca.layer_classes(n), pruned).any()}
    assert members <= set(next(s for s in ChannelDependency(model, x).sets if layer in s))
    ref = masked(model, ca, pruned)(x)
    out = pruned_model(model, ca, pruned)(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, model(x))  # the masking did something


def test_resnet18_mask_equals_removal() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(1, 3, 64, 64)
    ca = channel_atoms(trace(model, x))
    dep = ChannelDependency(traced_model=ca.graph)
    assert dep.sets[0] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    for layer, chans in (("layer1.0.conv2", [0, 7, 33]), ("layer2.0.downsample.0", [5, 100]), ("layer3.0.conv1", [1])):
        pruned = _classes(ca, layer, chans)
        torch.testing.assert_close(pruned_model(model, ca, pruned)(x), masked(model, ca, pruned)(x),
                                   atol=1e-4, rtol=1e-4)
    # pruning one member of a tied set alone cannot be made physical
    pruned = _classes(ca, "layer1.0.conv2", [0, 7])
    with pytest.raises(RuntimeError):
        pruned_model(model, ca, pruned, only="layer1.0.conv2")(x)


def test_tied_layer_alone_breaks() -> None:
    model = CatNet().eval()
    x = torch.randn(2, 3, 6, 6)
    ca = channel_atoms(trace(model, x))
    pruned = _classes(ca, "a", [2])
    with pytest.raises(RuntimeError):
        pruned_model(model, ca, pruned, only="c")(x)
