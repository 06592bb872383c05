"""Small networks and their hand-narrowed counterparts, shared by the effective-count and shrink tests."""

import torch
import torch.nn.functional as F
from torch import nn


def filt_mask(conv: nn.Module, keep: list[int]) -> dict:
    """NNI-layout mask keeping filters ``keep`` of ``conv`` (bias masked alike)."""
    w = torch.zeros_like(conv.weight)
    w[keep] = 1
    b = None
    if getattr(conv, "bias", None) is not None:
        b = torch.zeros_like(conv.bias)
        b[keep] = 1
    return {"weight": w, "bias": b}


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


class Cat(nn.Module):
    def __init__(self, a=6, b=4):
        super().__init__()
        self.a = nn.Conv2d(3, a, 1, bias=False)
        self.b = nn.Conv2d(3, b, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(a + b)
        self.c = nn.Conv2d(a + b, 7, 3)

    def forward(self, x):
        return self.c(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


class FlatLinear(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(2, c, 3, padding=1)
        self.fc = nn.Linear(c * 4 * 4, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        x = torch.flatten(F.relu(self.conv(x)), 1)
        return self.out(F.relu(self.fc(x)))
