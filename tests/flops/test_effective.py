"""Effective counts equal the dense count of hand-narrowed networks (the channels physically removed)."""

import pytest
import torch
from torch import nn

from narrow_models import DW, Cat, Chain, FlatLinear, Res, filt_mask
from prunescope import count_flops_params
from prunescope.flops import flops_report


def both(full, masks, narrow, x, mode="default"):
    eff = flops_report(full, x, masks=masks, effective=True, mode=mode)
    dense = flops_report(narrow, x, mode=mode)
    return eff, dense


@pytest.mark.parametrize("mode", ["default", "full"])
def test_conv_chain(mode):
    full = Chain()
    masks = {"conv1": filt_mask(full.conv1, [0, 2, 3, 7]), "conv2": filt_mask(full.conv2, [1, 4])}
    eff, dense = both(full, masks, Chain((3, 4, 2, 4)), (1, 3, 8, 8), mode)
    assert eff.total_flops == dense.total_flops
    assert eff.total_params == dense.total_params
    nni = flops_report(full, (1, 3, 8, 8), masks=masks, mode=mode)
    assert nni.total_flops > eff.total_flops  # NNI ignores the removed input channels of conv2/conv3


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


@pytest.mark.parametrize("mask_dw", [False, True])
def test_depthwise_block(mask_dw):
    full = DW()
    keep = [0, 3, 4, 9, 10, 15]
    masks = {"expand": filt_mask(full.expand, keep)}
    if mask_dw:
        masks["dw"] = filt_mask(full.dw, keep)
    eff, dense = both(full, masks, DW(e=len(keep)), (1, 8, 5, 5), "full")
    assert (eff.total_flops, eff.total_params) == (dense.total_flops, dense.total_params)


def test_concat_block():
    full = Cat()
    masks = {"a": filt_mask(full.a, [1, 2, 5]), "b": filt_mask(full.b, [0])}
    eff, dense = both(full, masks, Cat(3, 1), (1, 3, 7, 7), "full")
    assert (eff.total_flops, eff.total_params) == (dense.total_flops, dense.total_params)


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
