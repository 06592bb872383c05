"""Issue 19's last gaps, on hand-built modules with a physically narrowed reference.

* SK-ResNet's selective kernel: a softmax over the *paths* axis of ``(N, paths, C, 1, 1)`` normalises each
  channel's paths among themselves, so removing a channel (from every path and from the attention's
  ``fc_select`` rows of every path) leaves the other channels' weights as they were: the set is prunable.
  A softmax over the channels within a path stays pinned. The block's ``in_channels`` (read as
  ``in_channels // num_paths`` for the input split) equals both the input's width and the paths' width; the two
  shrink differently, and shrink sets the value each block needs.
* CaiT's talking-heads attention: ``proj_l`` mixes the heads before a softmax over the keys; a removed
  ``proj_l`` output is ``softmax(0) = 1/N`` in the as-pruned model, a constant folded into ``proj_w``'s bias.
  ``prunable_sets`` (which narrows a ``meta`` copy, without values) offers it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from prunescope import not_safe_to_prune, unit_masks
from prunescope.graph import trace
from prunescope.narrow import as_pruned, shrink
from prunescope.narrow.prunable import prunable_sets


class SelectiveKernel(nn.Module):
    """timm's ``SelectiveKernel`` (split input, two 3x3 paths, attention over the paths), in miniature."""

    def __init__(self, in_channels: int, out_channels: int, rd: int, over_paths: bool = True) -> None:
        super().__init__()
        self.in_channels, self.num_paths, self.over_paths = in_channels, 2, over_paths
        self.paths = nn.ModuleList(nn.Conv2d(in_channels // 2, out_channels, 3, padding=1 + k, dilation=1 + k)
                                   for k in range(2))
        self.fc_reduce = nn.Conv2d(out_channels, rd, 1)
        self.fc_select = nn.Conv2d(rd, out_channels * 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(x, self.in_channels // self.num_paths, 1)
        x = torch.stack([p(xi) for p, xi in zip(self.paths, pieces)], dim=1)
        a = self.fc_select(torch.relu(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
        b, c, h, w = a.shape
        a = torch.softmax(a.view(b, self.num_paths, c // self.num_paths, h, w), dim=1 if self.over_paths else 2)
        return torch.sum(x * a, dim=1)


class SKNet(nn.Module):
    def __init__(self, width: tuple[int, int] = (8, 8), over_paths: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width[0], 3, padding=1)
        self.sk = SelectiveKernel(width[0], width[1], 4, over_paths)
        self.head = nn.Conv2d(width[1], 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.sk(torch.relu(self.stem(x)))))


def _kept(masks: dict, name: str) -> torch.Tensor:
    return torch.nonzero(masks[name]["bias"]).flatten()


def test_softmax_over_the_paths_axis_is_prunable_and_narrows_like_a_hand_built_model() -> None:
    torch.manual_seed(0)
    net, x = SKNet((12, 12)).eval(), torch.randn(2, 3, 10, 10)
    g = trace(net, x)
    p = prunable_sets(net, g, x)
    assert ("sk.paths.0", "sk.paths.1", "sk.fc_select") in p.sets, p.excluded
    assert ("stem",) in p.sets and ("sk.fc_reduce",) in p.sets
    # stem 12 -> 10 (a unit is one channel of each piece of the split), paths 12 -> 9: sk.in_channels (12, the
    # width of both) must become 10, not 9
    masks = unit_masks(net, x, 0.25, graph=g)
    ks, kp, kr = _kept(masks, "stem"), _kept(masks, "sk.paths.0"), _kept(masks, "sk.fc_reduce")
    assert torch.equal(kp, _kept(masks, "sk.paths.1")) and len(kp) == 9 and len(ks) == 10
    assert torch.equal(_kept(masks, "sk.fc_select"), torch.cat([kp, kp + 12]))  # a channel's row in every path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no conflict fix, no kept channel
        small = shrink(net, masks, x, graph=g)
    assert small.sk.in_channels == 10 and net.sk.in_channels == 12

    # the reference: the same architecture built at the narrow widths, kept weights copied by hand
    ref = SKNet((10, 9)).eval()
    ref.sk.fc_reduce = nn.Conv2d(9, len(kr), 1)
    ref.sk.fc_select = nn.Conv2d(len(kr), 18, 1)
    sd = net.state_dict()
    half = [ks[ks < 6], ks[ks >= 6] - 6]  # the kept input channels of each piece of the split
    with torch.no_grad():
        ref.stem.weight.copy_(sd["stem.weight"][ks])
        ref.stem.bias.copy_(sd["stem.bias"][ks])
        for i in range(2):
            ref.sk.paths[i].weight.copy_(sd[f"sk.paths.{i}.weight"][kp][:, half[i]])
            ref.sk.paths[i].bias.copy_(sd[f"sk.paths.{i}.bias"][kp])
        ref.sk.fc_reduce.weight.copy_(sd["sk.fc_reduce.weight"][kr][:, kp])
        ref.sk.fc_reduce.bias.copy_(sd["sk.fc_reduce.bias"][kr])
        rows = torch.cat([kp, kp + 12])
        ref.sk.fc_select.weight.copy_(sd["sk.fc_select.weight"][rows][:, kr])
        ref.sk.fc_select.bias.copy_(sd["sk.fc_select.bias"][rows])
        ref.head.weight.copy_(sd["head.weight"][:, kp])
        ref.head.bias.copy_(sd["head.bias"])
        want, got, dense = ref(x), small(x), net(x)
        with as_pruned(net, masks, x, graph=g) as m:
            masked = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-6)
    assert (dense - want).abs().max() > 1e-2  # the pruning changed the output: the comparison means something


def test_softmax_over_the_channels_of_a_path_stays_pinned() -> None:
    net, x = SKNet(over_paths=False).eval(), torch.randn(1, 3, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unsafe = not_safe_to_prune(net, x, with_reasons=True)
    assert isinstance(unsafe, dict)
    assert "sk.paths.0" in unsafe and "'softmax' mixes the channels" in unsafe["sk.paths.0"][0]
    with pytest.raises(Exception, match="unsafe"):
        unit_masks(net, x, 0.25, layers=["sk.paths.0"])


class TalkingHeads(nn.Module):
    """CaiT's ``TalkingHeadAttn``: heads mixed by ``proj_l`` before the softmax and by ``proj_w`` after it."""

    def __init__(self, dim: int = 8, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj_l, self.proj_w = nn.Linear(heads, heads), nn.Linear(heads, heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.proj_w(attn.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def test_talking_heads_proj_l_is_offered_and_folds_its_constant() -> None:
    torch.manual_seed(0)
    net, x = TalkingHeads().eval(), torch.randn(2, 5, 8)
    g = trace(net, x)
    p = prunable_sets(net, g, x)
    assert ("proj_l",) in p.sets, p.excluded
    masks = unit_masks(net, x, 0.5, layers=["proj_l"], graph=g)
    kl = _kept(masks, "proj_l")
    gone = torch.tensor([h for h in range(4) if h not in kl.tolist()])
    small = shrink(net, masks, x, graph=g)
    ref = TalkingHeads().eval()
    ref.load_state_dict(net.state_dict())
    ref.proj_l, ref.proj_w = nn.Linear(4, 2), nn.Linear(2, 4)
    with torch.no_grad():
        ref.proj_l.weight.copy_(net.proj_l.weight[kl])
        ref.proj_l.bias.copy_(net.proj_l.bias[kl])
        ref.proj_w.weight.copy_(net.proj_w.weight[:, kl])
        # a removed head of proj_l is softmax(0) = 1/N over the N keys: its proj_w column times 1/N, in the bias
        ref.proj_w.bias.copy_(net.proj_w.bias + net.proj_w.weight[:, gone].sum(1) / x.shape[1])
        want, got = ref(x), small(x)
        with as_pruned(net, masks, x, graph=g) as m:
            masked = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-6)
    assert (net(x) - want).abs().max() > 1e-3


class TwoBlocks(nn.Module):
    """Two selective kernels: the first's ``in_channels`` (12) is its input's width and its paths' width, the
    second's (12) its input's width only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.sk1 = SelectiveKernel(12, 12, 4)
        self.mid = nn.Conv2d(12, 12, 1)
        self.sk2 = SelectiveKernel(12, 16, 4)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.sk1(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.sk2(torch.relu(self.mid(x)))))


def test_one_attribute_takes_different_new_sizes_in_different_blocks() -> None:
    torch.manual_seed(0)
    net, x = TwoBlocks().eval(), torch.randn(2, 3, 10, 10)
    g = trace(net, x)
    masks = unit_masks(net, x, 0.25, graph=g)
    # stem and mid 12 -> 10 (pairs of split pieces), sk1's paths 12 -> 9, sk2's paths 16 -> 12
    assert [len(_kept(masks, n)) for n in ("stem", "sk1.paths.0", "mid", "sk2.paths.0")] == [10, 9, 10, 12]
    small = shrink(net, masks, x, graph=g)
    # sk1: 12 became 10 (its input) and 9 (its paths): the split needs 10; sk2: 12 became 10 only
    assert (small.sk1.in_channels, small.sk2.in_channels) == (10, 10)
    with torch.no_grad(), as_pruned(net, masks, x, graph=g) as m:
        torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-6)
