"""Post-training reconstruction (issue 17): least-squares refit of the narrowed layers from unlabeled inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunescope
from prunescope.errors import ConfigError
from prunescope.shrink import reconstruct, shrink


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1)).eval()


def _mask(n_out: int, shape: tuple[int, ...], drop: list[int]) -> dict[str, torch.Tensor]:
    keep = torch.ones(n_out)
    keep[drop] = 0
    return {"weight": keep.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone(), "bias": keep}


def test_public_api_and_user_model_untouched() -> None:
    net = _conv_net()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    calib = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    masks = {"0": _mask(8, (8, 3, 3, 3), [0, 1, 2])}
    small = prunescope.reconstruct(net, masks, x, calib)
    assert small[0].out_channels == 5 and small[3].in_channels == 5
    small2, res = shrink(net, masks, x, calibration=calib, return_result=True)
    assert res.reconstruction.layers == ["0", "3"]
    for a, b in zip(small.state_dict().values(), small2.state_dict().values()):
        assert torch.equal(a, b)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert not net._forward_hooks and not net[0]._forward_hooks and not net[0]._forward_pre_hooks


def test_bad_calibration_is_refused() -> None:
    net = _conv_net()
    masks = {"0": _mask(8, (8, 3, 3, 3), [0])}
    with pytest.raises(ConfigError, match="empty"):
        reconstruct(net, masks, torch.randn(1, 3, 8, 8), [])
    with pytest.raises(ConfigError, match="iterable of batches"):
        reconstruct(net, masks, torch.randn(1, 3, 8, 8), torch.randn(4, 3, 8, 8))
