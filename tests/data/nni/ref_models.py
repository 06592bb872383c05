"""Reference models shared by prunescope's tests and the NNI reference generators (pure torch).

Importable from both virtual environments; the same torch version and seed give identical weights, which
the tests prove with :func:`param_checksum`.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class SmallCNN(nn.Module):
    """A small CNN: three convs (one without bias), BN, pooling, two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 24, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class TiedNet(nn.Module):
    """Convs whose filter norms tie on purpose, to check that ties prune more (NNI's ``<=`` rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 1)
        self.lin = nn.Linear(4, 6)
        with torch.no_grad():
            # L1 per filter: 2, 2, 2, 4, 4, 6, 8, 8 ; values with mixed signs
            vals = torch.tensor([1.0, -1.0, 1.0, 2.0, -2.0, 3.0, 4.0, -4.0])
            self.conv.weight.copy_(vals.view(8, 1, 1, 1).expand(8, 2, 1, 1))
            self.conv.bias.copy_(torch.arange(8.0))
            w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, 1.0, -1.0, 1.0], [2.0, 0.0, 0.0, 2.0],
                              [0.5, 0.5, 0.5, 0.5], [3.0, -3.0, 0.0, 0.0], [0.5, -0.5, 0.5, -0.5]])
            self.lin.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class GroupNet(nn.Module):
    """A grouped conv (groups=4) fed by, and feeding, plain convs, plus a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.conv4 = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(a))
        c = self.conv3(b) + a
        return self.conv4(torch.relu(c))


def build(name: str, seed: int = 0) -> nn.Module:
    """A reference model with deterministic weights: ``smallcnn``, ``tied``, ``groupnet`` or ``resnet18``."""
    torch.manual_seed(seed)
    if name == "smallcnn":
        model: nn.Module = SmallCNN()
    elif name == "tied":
        model = TiedNet()
    elif name == "groupnet":
        model = GroupNet()
    elif name == "resnet18":
        import torchvision

        model = torchvision.models.resnet18()
    else:
        raise KeyError(name)
    return model.eval()


INPUT_SIZES = {"smallcnn": (1, 3, 16, 16), "tied": (1, 2, 4, 4), "groupnet": (1, 3, 8, 8),
               "resnet18": (1, 3, 64, 64)}


def param_checksum(model: nn.Module) -> dict[str, str]:
    """``{'sum': repr(float64 sum of all parameters), 'sha256': hash of their bytes in order}``."""
    total = 0.0
    h = hashlib.sha256()
    for p in model.parameters():
        t = p.detach().cpu().contiguous()
        total += float(t.double().sum())
        h.update(t.numpy().tobytes())
    return {"sum": repr(total), "sha256": h.hexdigest()}
