"""Small seeded models and deterministic validation functions shared by the NNI reference generator
(run with NNI's venv) and prunescope's sensitivity tests. Pure torch + numpy so that both venvs import it.

Everything is seeded and single-threaded: the same torch version gives bit-identical weights, data and
metrics in both environments (``checksum`` proves the weights match).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three Conv2d layers (one with BatchNorm) and a Linear head on 1x12x12 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 12, 3, padding=1, bias=False)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    """Conv1d + Conv2d mix: NNI lists Conv1d layers as targets but never prunes them."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(8 + 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, 2, 16); the 2-d branch sees it as a 1-channel 2x16 image
        a = torch.relu(self.c2(torch.relu(self.c1(x)))).mean(2)
        b = torch.relu(self.c3(x.unsqueeze(1))).mean((2, 3))
        return self.fc(torch.cat([a, b], 1))


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def build_cnn(seed: int = 0) -> SmallCNN:
    """A seeded SmallCNN in eval mode."""
    torch.manual_seed(seed)
    return _perturb(SmallCNN(), seed)  # type: ignore[return-value]


def build_conv1d(seed: int = 0) -> Conv1dNet:
    """A seeded Conv1dNet in eval mode."""
    torch.manual_seed(seed)
    return Conv1dNet().eval()


def _data(shape: tuple[int, ...], seed: int, n: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn((n, *shape), generator=g)


_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _dataset(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels; labels are the unpruned seeded model's predictions (baseline accuracy 1.0)."""
    if kind not in _CACHE:
        if kind == "cnn":
            x, ref = _data((1, 12, 12), 0), build_cnn()
        else:
            x, ref = _data((2, 16), 1), build_conv1d()
        with torch.no_grad():
            y = ref(x).argmax(1)
        _CACHE[kind] = (x, y)
    return _CACHE[kind]


def _kind(model: nn.Module) -> str:
    return "cnn" if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) else "conv1d"


def loss(model: nn.Module) -> float:
    """Mean cross-entropy of ``model`` on its seeded data set (a full-precision float)."""
    torch.set_num_threads(1)
    x, y = _dataset(_kind(model))
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item()


def accuracy(model: nn.Module) -> float:
    """Accuracy blended with a confidence term so that values are distinct full-precision floats."""
    torch.set_num_threads(1)
    x, y = _dataset(_kind(model))
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
        acc = (p.argmax(1) == y).double().mean().item()
        conf = p.gather(1, y[:, None]).double().mean().item()
    return 0.5 * acc + 0.5 * conf


def checksum(model: nn.Module) -> str:
    """sha256 over the state dict's names and raw bytes (proves both venvs start from the same weights)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
