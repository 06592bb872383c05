"""Weight-standardised convolutions (timm ``StdConv2d`` / ``ScaledStdConv2d(Same)``): shrink narrows them exactly.

The reference is a model built by hand from fresh timm layers of the kept widths holding the kept slices of the
dense weights (``ScaledStdConv2d.scale`` kept at its constructed value, as shrink documents); the shrunk model
equals it, ``as_pruned`` equals it (each filter standardised over its kept input columns), the effective count
equals the shrunk model's dense count, and the input model is left as it was.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("timm")

from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d  # noqa: E402

from prunescope import SensitivityAnalysis, unit_masks  # noqa: E402
from prunescope.errors import ShrinkWarning  # noqa: E402
from prunescope.flops import count_flops_params  # noqa: E402
from prunescope.graph import trace  # noqa: E402
from prunescope.masks.pruners import group_masks  # noqa: E402
from prunescope.narrow import as_pruned, load_pruned, reconstruct, save_pruned, shrink  # noqa: E402
from prunescope.removal.plan import plan_removal  # noqa: E402


class Net(nn.Module):
    def __init__(self, c: int = 8, mid: int = 12) -> None:
        super().__init__()
        self.a = ScaledStdConv2d(3, c, 3)
        self.b = StdConv2d(c, c, 3, groups=2)  # grouped; b(y) + y ties a and b
        self.d = ScaledStdConv2d(c, mid, 1)
        self.e = ScaledStdConv2dSame(mid, c, 3, stride=2, gamma=1.7)  # TF "same" padding: a pad op first
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(y) + y)
        return self.head(torch.relu(self.e(torch.relu(self.d(y)))))


def make() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for m in (net.a, net.d, net.e):
            m.gain.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return net


X = torch.randn(2, 3, 8, 8)


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask.reshape(mask.shape[0], -1).ne(0).any(1)).reshape(-1)


def _cols(w: torch.Tensor, groups: int, keep_in: torch.Tensor) -> torch.Tensor:
    """Weight ``w`` (rows already chosen per group, equal rows per group) with the kept input channels per group."""
    n_in = w.shape[1] * groups
    alive = torch.zeros(n_in, dtype=torch.bool)
    alive[keep_in] = True
    per = alive.reshape(groups, -1)
    rows = w.reshape(groups, -1, *w.shape[1:])
    return torch.cat([rows[g][:, per[g]] for g in range(groups)])


def hand_narrowed(net: Net, ka: torch.Tensor, kd: torch.Tensor, ke: torch.Tensor) -> Net:
    """A fresh Net of the kept widths holding the kept slices (independent of the removal plan)."""
    ref = Net.__new__(Net)
    nn.Module.__init__(ref)
    na, nd, ne = len(ka), len(kd), len(ke)
    ref.a = ScaledStdConv2d(3, na, 3)
    ref.b = StdConv2d(na, na, 3, groups=2)
    ref.d = ScaledStdConv2d(na, nd, 1)
    ref.e = ScaledStdConv2dSame(nd, ne, 3, stride=2, gamma=1.7)
    ref.head = nn.Conv2d(ne, 4, 1)
    with torch.no_grad():
        ref.a.weight.copy_(net.a.weight[ka])
        ref.a.gain.copy_(net.a.gain[ka])
        ref.a.bias.copy_(net.a.bias[ka])
        ref.b.weight.copy_(_cols(net.b.weight[ka], 2, ka))
        ref.d.weight.copy_(net.d.weight[kd][:, ka])
        ref.d.gain.copy_(net.d.gain[kd])
        ref.d.bias.copy_(net.d.bias[kd])
        ref.e.weight.copy_(net.e.weight[ke][:, kd])
        ref.e.gain.copy_(net.e.gain[ke])
        ref.e.bias.copy_(net.e.bias[ke])
        ref.head.weight.copy_(net.head.weight[:, ke])
        ref.head.bias.copy_(net.head.bias)
    for name in "ade":  # the constructed scale (gamma / sqrt(dense fan-in)) stays, as shrink documents
        getattr(ref, name).scale = getattr(net, name).scale
    return ref.eval()


def test_unit_masks_shrink_equals_hand_built_and_as_pruned(tmp_path):
    net = make()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = trace(net, X)
    masks = unit_masks(net, X, 0.3, graph=g)
    assert set(masks) == {"a", "b", "d", "e"}  # every standardised conv is offered (the head reaches the output)
    small, res = shrink(net, masks, X, graph=g, return_result=True)
    assert not res.protected and not res.fixed
    ka, kd, ke = (_kept(masks[n]["weight"]) for n in "ade")
    assert torch.equal(_kept(masks["b"]["weight"]), ka)  # tied by the residual add
    assert (len(ka), len(kd), len(ke)) == (6, 9, 6)  # 8 - 2 per group of b, 12 - 3, 8 - 2
    ref = hand_narrowed(net, ka, kd, ke)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert small.d.scale == net.d.scale and small.e.scale == net.e.scale
    with torch.no_grad():
        want = ref(X)
        got = small(X)
        with as_pruned(net, masks, X, graph=g) as m:
            emulated = m(X)
        dense = net(X)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale
    assert float((emulated - want).abs().max()) <= 1e-4 * scale
    # the emulation matters: standardising over the dense fan-in (zeros in the removed columns) is another model
    assert float((dense - want).abs().max()) > 1e-2 * scale
    eff = count_flops_params(net, X, verbose=False, masks=masks, effective=True)[:2]
    assert eff == count_flops_params(small, X, verbose=False)[:2]
    assert eff == count_flops_params(ref, X, verbose=False)[:2]
    eff_full = count_flops_params(net, X, verbose=False, masks=masks, effective=True, mode="full")[:2]
    assert eff_full == count_flops_params(small, X, verbose=False, mode="full")[:2]  # the standardisation too
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    # a pruned file loads into a fresh dense model: its constructed scale is the one the shrunk model kept
    path = tmp_path / "small.pt"
    save_pruned(small, path)
    with torch.no_grad():
        assert torch.equal(load_pruned(make(), path)(X), got)


def test_without_emulation_as_pruned_would_differ():
    """The as-pruned value of a consumer that loses input columns is the kept-column standardisation: without it
    (masked weights, zero inputs) the output differs from the shrunk model's."""
    net = make()
    masks = {"d": {"weight": torch.ones_like(net.d.weight)}}
    masks["d"]["weight"][[0, 4, 7]] = 0
    masks["d"]["bias"] = masks["d"]["weight"].reshape(12, -1)[:, 0].clone()
    small = shrink(net, masks, X)
    assert small.e.in_channels == 9 and small.e.weight.shape == (8, 9, 3, 3)
    with torch.no_grad():
        with as_pruned(net, masks, X) as m:
            y = m(X)
        assert torch.allclose(y, small(X), rtol=1e-4, atol=1e-5)
        net.d.weight[[0, 4, 7]] = 0
        net.d.bias[[0, 4, 7]] = 0
        plain = net(X)
    assert not torch.allclose(plain, small(X), rtol=1e-3, atol=1e-3)


def test_as_pruned_sweep_standardises_consumers_over_kept_columns():
    net = make()
    metric_x = torch.randn(2, 3, 8, 8)

    def metric(model):
        with torch.no_grad():
            return model(metric_x).abs().sum().item()

    sa = SensitivityAnalysis(net, metric, sparsities=[0.25], layer_types=(nn.Conv2d,), group_dependencies=True,
                             dummy_input=X, as_pruned=True, progress=False)
    sens = sa.analysis(val_args=[net], specified_layers=["d"])
    masks = dict(zip(["d"], group_masks([net.d], 0.25, "l1")))
    small = shrink(net, masks, X)
    assert small.e.in_channels == 9
    assert sens["d"][0.25] == pytest.approx(metric(small), rel=1e-5)


def test_parametrized_weight_stays_protected():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3)),
                        nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    g = trace(net, X)
    m = torch.ones(8, 3, 3, 3)
    m[:3] = 0
    plan = plan_removal(g, {"0": {"weight": m}})
    assert not plan.removed["0"].any()
    assert any("the weight of '2' is computed" in r for r in plan.protected["0"])


class ColumnStdConv(nn.Conv2d):
    """Standardised per *input* channel (over output filters and kernel): not the recipe shrink narrows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.transpose(0, 1)
        w = nn.functional.batch_norm(w.reshape(1, self.in_channels, -1), None, None, training=True, eps=1e-6)
        return self._conv_forward(x, w.reshape_as(self.weight.transpose(0, 1)).transpose(0, 1), self.bias)


def test_other_standardisation_stays_protected():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), ColumnStdConv(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    m = torch.ones(8, 8, 3, 3)
    m[:3] = 0
    plan = plan_removal(trace(net, X), {"2": {"weight": m}})
    assert not plan.removed["2"].any()
    assert any("the weight of '2' is computed" in r for r in plan.protected["2"])


def test_reconstruct_leaves_standardised_layers_and_refits_the_rest():
    """A least-squares weight would be standardised again by the layer's forward: those layers are skipped, with
    the reason; the plain head that lost input columns is refit and the error to the dense model drops."""
    net = make()
    torch.manual_seed(1)
    calibration = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    masks = unit_masks(net, X, 0.3)
    small = shrink(net, masks, X)
    with pytest.warns(ShrinkWarning, match="4 layers were not refit.*standardised"):
        rec, res = reconstruct(net, masks, X, calibration, ridge=1e-3, return_result=True)
    skipped = res.reconstruction.skipped
    assert set(skipped) == {"a", "b", "d", "e"} and all("standardised" in why for why in skipped.values())
    assert torch.equal(rec.e.weight, small.e.weight)
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        dense = net(x)
        assert (rec(x) - dense).pow(2).mean() < (small(x) - dense).pow(2).mean()
