"""RMSNorm over channels: the channel engine follows ``rms_norm`` (the op catalogue's norm table), shrink narrows
the norm with the layer that feeds it, and the result is what ``as_pruned`` computes and what a hand-narrowed
model computes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunescope import count_flops_params, flops_report, load_pruned, save_pruned, shrink
from prunescope.graph import trace
from prunescope.narrow import as_pruned
from prunescope.topology import channel_atoms

DROP = [1, 4, 5]
KEEP = [i for i in range(8) if i not in DROP]


class TokenMLP(nn.Module):
    """Linear(6, 8) -> RMSNorm(8) over the channels -> GELU -> Linear(8, 3), on (N, L, 6) tokens."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.RMSNorm(8, eps=1e-6, elementwise_affine=affine), \
            nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


class ChannelsLastConv(nn.Module):
    """Conv -> RMSNorm over the channels of the channels-last view (a ConvNeXt-style norm) -> Conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm, self.conv2 = nn.Conv2d(3, 8, 3), nn.RMSNorm(8, eps=1e-6), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.norm(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(y)


def _setup(kind: str):
    torch.manual_seed(0)
    if kind == "conv":
        net, x, first = ChannelsLastConv(), torch.randn(2, 3, 9, 9), "conv1"
    else:
        net, x, first = TokenMLP(affine=kind == "tokens"), torch.randn(2, 4, 6), "fc1"
    if net.norm.weight is not None:
        with torch.no_grad():
            net.norm.weight.uniform_(-1.5, 1.5)
    w = getattr(net, first).weight
    mask = torch.ones_like(w).index_fill(0, torch.tensor(DROP), 0)
    return net.eval(), x, first, {first: {"weight": mask, "bias": mask.flatten(1)[:, 0].clone()}}


def _by_hand(net, x, kind: str) -> torch.Tensor:
    """The narrowed model's output computed directly: the kept channels only, RMSNorm over those."""
    w = net.norm.weight[KEEP] if net.norm.weight is not None else None
    if kind == "conv":
        h = F.conv2d(x, net.conv1.weight[KEEP], net.conv1.bias[KEEP]).permute(0, 2, 3, 1)
        h = F.rms_norm(h, (len(KEEP),), w, 1e-6).permute(0, 3, 1, 2)
        return F.conv2d(h, net.conv2.weight[:, KEEP], net.conv2.bias)
    h = F.rms_norm(F.linear(x, net.fc1.weight[KEEP], net.fc1.bias[KEEP]), (len(KEEP),), w, 1e-6)
    return F.linear(F.gelu(h), net.fc2.weight[:, KEEP], net.fc2.bias)


@pytest.mark.parametrize("kind", ["tokens", "no-affine", "conv"])
def test_shrink_narrows_an_rmsnorm_over_removed_channels(kind, tmp_path):
    net, x, first, masks = _setup(kind)
    ca = channel_atoms(trace(net, x))
    assert not ca.unsafe  # rms_norm used to stop the analysis: every layer feeding it was unsafe
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = shrink(net, masks, x)
    assert getattr(small, first).weight.shape[0] == len(KEEP)
    assert tuple(small.norm.normalized_shape) == (len(KEEP),)
    if net.norm.weight is not None:
        assert torch.equal(small.norm.weight, net.norm.weight[KEEP])
    with torch.no_grad():
        got = small(x)
        assert torch.allclose(got, _by_hand(net, x, kind), rtol=1e-4, atol=1e-6)
        with as_pruned(net, masks, x):
            assert torch.allclose(got, net(x), rtol=1e-4, atol=1e-6)
    for mode in ("default", "full"):
        eff = flops_report(net, x, masks=masks, effective=True, mode=mode)
        flops, params, _ = count_flops_params(small, x, verbose=False, mode=mode)
        assert (eff.total_flops, eff.total_params) == (flops, params), mode
    if kind == "tokens":  # the narrowed RMSNorm's size attribute travels with the saved model
        save_pruned(small, tmp_path / "m.pt")
        again = load_pruned(TokenMLP(), tmp_path / "m.pt").eval()
        assert tuple(again.norm.normalized_shape) == (len(KEEP),)
        with torch.no_grad():
            assert torch.equal(again(x), got)


def test_llama_rmsnorm_is_traced_as_its_arithmetic():
    """Hugging Face's LlamaRMSNorm computes ``x * rsqrt(x.pow(2).mean(-1) + eps)`` itself: the trace sees those
    ops, not ``rms_norm``, so its hidden size stays pinned by the mean (removing a channel changes the mean)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaModel(cfg).eval()
    g = trace(model, {"input_ids": torch.randint(0, 50, (1, 5))})
    norm = g.calls_of("layers.0.input_layernorm")[0]
    names = [n.name for n in g.ops_in(norm)]
    assert "rms_norm" not in names and {"pow", "mean", "rsqrt"} <= set(names)
    ca = channel_atoms(g)
    assert any(r.startswith("'mean' reduces over channel axis 2") for rs in ca.unsafe.values() for r in rs)
