"""Engine internals that the topology answers rest on: incremental union-find, axis pins.

References: a plain recursive union-find (classes must equal whatever order the edges are solved in), and
hand-built grids whose pinned classes follow from the definition (a class pins an axis when it holds a whole
slice across it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from prunescope.graph import trace
from prunescope.topology import channel_atoms
from prunescope.topology.engine import UnionFind


def _reference(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def test_incremental_union_find_equals_one_shot() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 200))
        edges = [tuple(int(v) for v in rng.integers(0, n, 2)) for _e in range(int(rng.integers(0, 2 * n)))]
        uf = UnionFind()
        grown = 0
        for k in range(0, len(edges), 7):  # solve every 7 edges, with the element count growing
            chunk = edges[k:k + 7]
            uf.union(np.array([a for a, _ in chunk]), np.array([b for _, b in chunk]))
            grown = max(grown, max(max(a, b) for a, b in chunk) + 1)
            np.testing.assert_array_equal(uf.solve(grown), _reference(grown, edges[:k + 7]))
        np.testing.assert_array_equal(uf.solve(n), _reference(n, edges))


class Heads(nn.Module):
    """A head split followed by a reshape that writes one of the two grid sizes."""

    def __init__(self, split: str, written: str) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(8, 8), nn.Linear(8, 8)
        self.split, self.written = split, written

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.q(x).view(b, n, -1, 4) if self.split == "head_size" else self.q(x).view(b, n, 2, -1)
        h = h.reshape(b, n, 2, -1) if self.written == "heads" else h.reshape(b, n, -1, 4)
        return self.o(h.reshape(b, n, -1))


def test_written_size_pins_only_the_axis_a_unit_can_shrink() -> None:
    x = torch.ones(1, 3, 8)
    # whole heads are the units: writing head_dim is harmless, writing the head count pins
    assert channel_atoms(trace(Heads("head_size", "head_dim"), x)).unsafe == {}
    assert list(channel_atoms(trace(Heads("head_size", "heads"), x)).unsafe) == ["q"]
    # in-head positions are the units: the reverse
    assert channel_atoms(trace(Heads("head_count", "heads"), x)).unsafe == {}
    assert list(channel_atoms(trace(Heads("head_count", "head_dim"), x)).unsafe) == ["q"]
