"""Effective counts equal the dense count of hand-narrowed networks (the channels physically removed)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunescope import count_flops_params
from prunescope.flops import flops_report


def filt_mask(conv: nn.Module, keep: list[int]) -> dict:
    w = torch.zeros_like(conv.weight)
    w[keep] = 1
    b = None
    if getattr(conv, "bias", None) is not None:
        b = torch.zeros_like(conv.bias)
        b[keep] = 1
    return {"weight": w, "bias": b}


def both(full, masks, narrow, x, mode="default"):
    eff = flops_report(full, x, masks=masks, effective=True, mode=mode)
    dense = flops_report(narrow, x, mode=mode)
    return eff, dense


class Chain(nn.Module):
    def __init__(self, c=(3, 8, 6, 4)):
        super().__init__()
        self.conv1 = nn.Conv2d(c[0], c[1], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c[1])
        self.conv2 = nn.Conv2d(c[1], c[2], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c[2])
        self.conv3 = nn.Conv2d(c[2], c[3], 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.conv3(x)


@pytest.mark.parametrize("mode", ["default", "full"])
def test_conv_chain(mode):
    full = Chain()
    masks = {"conv1": filt_mask(full.conv1, [0, 2, 3, 7]), "conv2": filt_mask(full.conv2, [1, 4])}
    eff, dense = both(full, masks, Chain((3, 4, 2, 4)), (1, 3, 8, 8), mode)
    assert eff.total_flops == dense.total_flops
    assert eff.total_params == dense.total_params
    nni = flops_report(full, (1, 3, 8, 8), masks=masks, mode=mode)
    assert nni.total_flops > eff.total_flops  # NNI ignores the removed input channels of conv2/conv3


class Res(nn.Module):
    def __init__(self, w=8, mid=8):
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(w)
        self.conv1 = nn.Conv2d(w, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.head = nn.Conv2d(w, 5, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(y)) + x)
        return self.head(x)


def test_residual_block_consistent_and_partial_masks():
    full = Res()
    keep = [0, 1, 5]
    masks = {"stem": filt_mask(full.stem, keep), "conv2": filt_mask(full.conv2, keep),
             "conv1": filt_mask(full.conv1, [2, 3, 4, 6])}
    eff, dense = both(full, masks, Res(w=3, mid=4), (2, 3, 6, 6), "full")
    assert (eff.total_flops, eff.total_params) == (dense.total_flops, dense.total_params)
    # pruning only one side of the residual add removes nothing of the tied width (the add keeps it)
    partial = {"stem": filt_mask(full.stem, keep)}
    eff2, dense2 = both(full, partial, Res(), (2, 3, 6, 6))
    assert eff2.total_flops == dense2.total_flops


class DW(nn.Module):
    def __init__(self, c=8, e=16):
        super().__init__()
        self.expand = nn.Conv2d(c, e, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(e)
        self.dw = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False)
        self.bn2 = nn.BatchNorm2d(e)
        self.project = nn.Conv2d(e, c, 1, bias=False)

    def forward(self, x):
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return self.project(y)


@pytest.mark.parametrize("mask_dw", [False, True])
def test_depthwise_block(mask_dw):
    full = DW()
    keep = [0, 3, 4, 9, 10, 15]
    masks = {"expand": filt_mask(full.expand, keep)}
    if mask_dw:
        masks["dw"] = filt_mask(full.dw, keep)
    eff, dense = both(full, masks, DW(e=len(keep)), (1, 8, 5, 5), "full")
    assert (eff.total_flops, eff.total_params) == (dense.total_flops, dense.total_params)


class Cat(nn.Module):
    def __init__(self, a=6, b=4):
        super().__init__()
        self.a = nn.Conv2d(3, a, 1, bias=False)
        self.b = nn.Conv2d(3, b, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(a + b)
        self.c = nn.Conv2d(a + b, 7, 3)

    def forward(self, x):
        return self.c(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


def test_concat_block():
    full = Cat()
    masks = {"a": filt_mask(full.a, [1, 2, 5]), "b": filt_mask(full.b, [0])}
    eff, dense = both(full, masks, Cat(3, 1), (1, 3, 7, 7), "full")
    assert (eff.total_flops, eff.total_params) == (dense.total_flops, dense.total_params)


class FlatLinear(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(2, c, 3, padding=1)
        self.fc = nn.Linear(c * 4 * 4, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        x = torch.flatten(F.relu(self.conv(x)), 1)
        return self.out(F.relu(self.fc(x)))


def test_conv_flatten_linear():
    full = FlatLinear()
    masks = {"conv": filt_mask(full.conv, [0, 4]), "fc": filt_mask(full.fc, [1, 2, 3, 8, 9])}
    narrow = FlatLinear(c=2)
    narrow.fc = nn.Linear(2 * 16, 5)
    narrow.out = nn.Linear(5, 3)
    eff, dense = both(full, masks, narrow, (3, 2, 4, 4), "full")
    assert (eff.total_flops, eff.total_params) == (dense.total_flops, dense.total_params)


def test_unstructured_masks_save_nothing_and_docstring_numbers():
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
    m = (torch.rand(4, 3, 1, 1) > 0.5).float()
    m[:, 0] = 1  # every filter keeps a weight
    flops, params, _ = count_flops_params(net, (1, 3, 2, 2), masks={"0": {"weight": m}}, effective=True,
                                          verbose=False)
    assert (flops, params) == (4 * 3 * 4 + 2 * 4 * 4, 12 + 8)


@pytest.mark.parametrize("effective", [False, True])
def test_bad_masks_name_the_layer(effective):
    from prunescope.errors import MaskError

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(MaskError, match="layer 'nope'"):
        count_flops_params(net, (1, 3, 2, 2), masks={"nope": {"weight": torch.ones(1)}}, effective=effective,
                           verbose=False)
    with pytest.raises(MaskError, match="layer '0'.*shape"):
        count_flops_params(net, (1, 3, 2, 2), masks={"0": {"weight": torch.ones(4, 3)}}, effective=effective,
                           verbose=False)
    with pytest.raises(MaskError, match="layer '1'.*cannot be masked"):
        count_flops_params(net, (1, 3, 2, 2), masks={"1": {"weight": torch.ones(1)}}, effective=effective,
                           verbose=False)
    with pytest.raises(MaskError, match="other than 0 and 1"):
        count_flops_params(net, (1, 3, 2, 2), masks={"0": {"weight": torch.full((4, 3, 1, 1), 0.5)}},
                           effective=effective, verbose=False)
