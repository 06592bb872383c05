"""A size the forward derives from two attributes (issue 19.2): SK-ResNet splits its input with
``torch.split(x, self.in_channels // self.num_paths, 1)``. Shrink narrows ``in_channels`` so that the split
follows the removed channels, and the narrowed model computes what the masked one does."""

from __future__ import annotations

import torch
from torch import nn

from prunescope import unit_masks
from prunescope.graph import trace
from prunescope.narrow import as_pruned, shrink
from prunescope.narrow.prunable import prunable_sets


class SplitPaths(nn.Module):
    def __init__(self, in_channels: int, num_paths: int = 2) -> None:
        super().__init__()
        self.in_channels, self.num_paths = in_channels, num_paths
        self.paths = nn.ModuleList(nn.Conv2d(in_channels // num_paths, 8, 3, padding=1) for _ in range(num_paths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(x, self.in_channels // self.num_paths, 1)
        return sum(p(xi) for p, xi in zip(self.paths, pieces))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.sk = SplitPaths(12, 2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.sk(torch.relu(self.stem(x)))))


def test_split_size_derived_from_two_attributes_is_narrowed() -> None:
    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(2, 3, 8, 8)
    g = trace(net, x)
    p = prunable_sets(net, g, x)
    assert ("stem",) in p.sets, p.excluded
    masks = unit_masks(net, x, 0.5, layers=["stem"], graph=g)
    kept = masks["stem"]["bias"]
    assert int(kept[:6].sum()) == int(kept[6:].sum()) == 3  # as many from each piece of the split
    small = shrink(net, masks, x, graph=g)
    assert small.stem.out_channels == 6 and small.sk.in_channels == 6 and net.sk.in_channels == 12
    with torch.no_grad(), as_pruned(net, masks, x, graph=g) as ref:
        want = ref(x)
    torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-6)
