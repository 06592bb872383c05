"""Small models for the robustness tests (importable by the CLI as ``robust_models:<name>``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-bn-relu, a residual add, a shared module called twice, flatten -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()  # shared: called three times
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)
        self.fail = False  # the forward raises when set (integrity tests)
        self.interrupt = False  # the forward raises KeyboardInterrupt when set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        if self.fail:
            raise RuntimeError("forward failed on purpose")
        if self.interrupt:
            raise KeyboardInterrupt
        y = self.act(self.bn2(self.conv2(y)) + y)
        y = self.act(self.conv3(y))
        return self.fc(self.pool(y).flatten(1))


class ParamNet(nn.Module):
    """The same layers as :class:`PlainNet`; ``conv3`` gets a weight-norm parametrization."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.conv3 = nn.Conv2d(6, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv3(torch.relu(self.conv1(x)))).flatten(1))


def plain_net() -> ParamNet:
    torch.manual_seed(0)
    return ParamNet()


def param_net() -> ParamNet:
    net = plain_net()
    nn.utils.parametrizations.weight_norm(net.conv3)
    return net


def scripted() -> nn.Module:
    torch.manual_seed(0)
    return torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))


def bn1d_net() -> nn.Module:
    """A model whose inner BatchNorm1d refuses a 1-D (unbatched) input."""
    return nn.Sequential(nn.Identity(), nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 2)))


def small_val(model: nn.Module) -> float:
    """A metric for ``small_cnn`` (the CLI's ``--val robust_models:small_val``)."""
    with torch.no_grad():
        return float(model(torch.ones(1, 3, 8, 8)).mean())


NOT_BATCHES = 5  # ``--calibrate robust_models:NOT_BATCHES``: not an iterable of batches
