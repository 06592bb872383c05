"""Reconstruction block by block (issue 17): the same refit as rerunning the whole model, at a cost linear in depth.

The reference is the whole-model path of the same function (``block_cache_mb=0``: every pass reruns the shrunk
model from its input, the sequential definition: each layer sees the shrunk model's input after every earlier
layer was refit). The block path must give the same weights up to float noise, and run every block a number of
times that does not grow with depth.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from prunescope import unit_masks
from prunescope.narrow import ShrinkWarning, refit, shrink


class _Block(nn.Module):
    calls = 0

    def __init__(self, c: int, inplace: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.conv2 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.inplace = inplace

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        type(self).calls += 1
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        if self.inplace:  # writes into its input: a cached input would not survive a replay
            return x.add_(y)
        return x + scale * y


class _Net(nn.Module):
    def __init__(self, depth: int, inplace: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(_Block(8, inplace) for _ in range(depth))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for b in self.blocks:
            h = b(h, scale=0.5)
        return self.head(h.mean((2, 3)))


def _net(depth: int, inplace: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = _Net(depth, inplace).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    return net


def _run(net: nn.Module, *block_cache_mb: float) -> list[tuple[nn.Module, object, int]]:
    """Shrink once, then refit a copy per ``block_cache_mb``: (model, ReconstructResult, block forwards of the
    refit) each."""
    x = torch.randn(1, 3, 6, 6)
    calib = [torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    masks = unit_masks(net, x, 0.5, layers=[n for n, _ in net.named_modules() if n.endswith("conv1")] + ["stem"])
    small, res = shrink(net, masks, x, return_result=True)
    out = []
    for mb in block_cache_mb:
        s = copy.deepcopy(small)
        _Block.calls = 0
        r = refit(net, s, res.plan, calib, block_cache_mb=mb)
        out.append((s, r, _Block.calls))
    return out


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, rtol=1e-5, atol=1e-6), k


def test_cnn_blocks_equal_whole_model_and_linear_cost() -> None:
    costs = {}
    for depth in (2, 4):
        net = _net(depth)
        (fast, rf, calls_fast), (slow, rs, calls_slow) = _run(net, 4096, 0)
        assert rf.blocks == [f"blocks.{i}" for i in range(depth)] and rs.blocks == []
        assert rf.layers == rs.layers and "stem" in rf.layers and "head" in rf.layers  # outside the chain
        assert all(f"blocks.{i}.conv2" in rf.layers for i in range(depth))
        _assert_same(fast, slow)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
        costs[depth] = (calls_fast, calls_slow)
    # With 3 batches the chain path runs each block 3 (call order) + 2 (probe: shrunk, dense) + 3 x 2 (its two
    # passes on the shrunk block) + 3 (one dense run: targets and next input) + 3 (advancing the shrunk input)
    # + 6 (whole-model runs for the head outside the chain: shrunk input, dense target) = 23 times, whatever the
    # depth; the last block is not advanced (3 fewer). The whole-model path reruns every earlier block for every
    # later pass: quadratic in depth.
    assert costs[2][0] == 23 * 2 - 3 and costs[4][0] == 23 * 4 - 3, costs
    assert costs[4][1] - costs[2][1] > costs[4][0] - costs[2][0], costs


def test_no_chain_when_blocks_write_into_their_input_or_cache_too_small() -> None:
    net = _net(3, inplace=True)
    (fast, rf, _), (slow, _, _) = _run(net, 4096, 0)
    assert rf.blocks == []  # replaying a block on its cached input would see the modified input
    _assert_same(fast, slow)
    net = _net(3)
    ((_, rt, _),) = _run(net, 1e-6)
    assert rt.blocks == [] and "block_cache_mb" in rt.notes[0]


def test_tiny_llama_blocks_equal_whole_model() -> None:
    transformers = pytest.importorskip("transformers")
    from prunescope import head_masks
    from prunescope.graph import trace

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = {"input_ids": torch.randint(0, 64, (2, 16))}
    g = trace(model, x)
    masks = head_masks(model, x, 0.5, graph=g)
    masks.update(unit_masks(model, x, 0.5, graph=g,
                            layers=[n for n, _ in model.named_modules() if n.endswith("up_proj")]))
    calib = [{"input_ids": torch.randint(0, 64, (4, 16))} for _ in range(3)]
    fast, res = shrink(model, masks, x, graph=g, return_result=True)
    slow = copy.deepcopy(fast)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShrinkWarning)
        rf = refit(model, fast, res.plan, calib)
        rs = refit(model, slow, res.plan, calib, block_cache_mb=0)
    assert rf.blocks == [f"model.layers.{i}" for i in range(3)]
    assert rf.layers == rs.layers and len(rf.layers) == 3 * 7  # q k v o gate up down per layer
    _assert_same(fast, slow)
    held = torch.randint(0, 64, (4, 16))
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=held).logits, slow(input_ids=held).logits, atol=1e-5)
