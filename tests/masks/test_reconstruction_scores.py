"""``unit_masks(prune_type='reconstruction')`` (issue 17.2): units chosen by the consumers' least-squares refit
error on calibration inputs.

The reference is independent of the code under test: the refit residual of every candidate subset, solved with
NumPy's ``lstsq`` (with an intercept, as the reconstruction fits it) on the consumer's actual inputs, brute force.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from prunescope import unit_masks
from prunescope.errors import ConfigError


def _residual(x: np.ndarray, y: np.ndarray, keep: list[int]) -> float:
    """min over W, c of ‖x[:, keep] W + c - y‖²: the refit error with only the ``keep`` columns."""
    a = np.concatenate([x[:, keep], np.ones((len(x), 1))], 1)
    sol = np.linalg.lstsq(a, y, rcond=None)[0]
    return float(((a @ sol - y) ** 2).sum())


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():  # hidden unit 5 = 3 x hidden unit 1 (ReLU commutes with a positive scale): redundant,
        net[0].weight[1] *= 4  # and both have the largest weights, so weight norms keep them
        net[0].bias[1] *= 4
        net[0].weight[5] = 3 * net[0].weight[1]
        net[0].bias[5] = 3 * net[0].bias[1]
    return net


def test_one_unit_removed_is_the_brute_force_optimum() -> None:
    """Removing one of 6 hidden units: the chosen unit's refit residual is the least of all 6 (NumPy lstsq), i.e.
    one of the two redundant units, which L1 and the activation-weighted norm both keep."""
    net = _mlp()
    calib = [torch.randn(100, 4, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    x = torch.relu(net[0](torch.cat(calib))).detach().double().numpy()
    y = x @ net[2].weight.detach().double().numpy().T
    res = [_residual(x, y, [c for c in range(6) if c != u]) for u in range(6)]
    best = int(np.argmin(res))
    assert best in (1, 5) and res[best] < 1e-9 * min(r for u, r in enumerate(res) if u not in (1, 5))
    removed = {}
    for pt in ("reconstruction", "activation", "l1"):
        m = unit_masks(net, torch.ones(1, 4), 0.2, prune_type=pt, calibration=calib)
        removed[pt] = (~m["0"]["bias"].bool()).nonzero().flatten().tolist()
    assert len(removed["reconstruction"]) == 1 and res[removed["reconstruction"][0]] == pytest.approx(res[best],
                                                                                                   abs=1e-9)
    assert not {1, 5} & set(removed["l1"] + removed["activation"]), removed


def test_greedy_subset_on_a_conv_consumer_is_near_the_brute_force_optimum() -> None:
    """Half of 8 channels of a conv read by a 3x3 conv: the greedy choice's refit residual (NumPy lstsq on the
    consumer's unfolded input patches) is within 2 % of the best of all 70 subsets and below what the L1 and
    activation choices leave."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1)).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(2)]
    h = torch.relu(net[0](torch.cat(calib))).detach().double()
    x = torch.nn.functional.unfold(h, 3, padding=1).transpose(1, 2).reshape(-1, 8 * 9).numpy()
    y = x @ net[2].weight.detach().double().reshape(5, -1).numpy().T

    def cols(kept: list[int]) -> list[int]:
        return [c * 9 + k for c in kept for k in range(9)]

    res = {s: _residual(x, y, cols(list(s))) for s in itertools.combinations(range(8), 4)}
    got = {}
    for pt in ("reconstruction", "activation", "l1"):
        m = unit_masks(net, torch.ones(1, 3, 8, 8), 0.5, prune_type=pt, calibration=calib)
        got[pt] = res[tuple(m["0"]["bias"].bool().nonzero().flatten().tolist())]
    assert got["reconstruction"] <= 1.02 * min(res.values()), (got, min(res.values()))
    assert got["reconstruction"] < min(got["l1"], got["activation"]), got


def test_needs_calibration_and_leaves_the_model_as_it_was() -> None:
    net = _mlp().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match="calibration"):
        unit_masks(net, torch.ones(1, 4), 0.5, prune_type="reconstruction")
    with pytest.raises(ConfigError, match="iterable of batches"):
        unit_masks(net, torch.ones(1, 4), 0.5, prune_type="reconstruction", calibration=torch.randn(8, 4))
    with pytest.raises(ConfigError, match="empty"):
        unit_masks(net, torch.ones(1, 4), 0.5, prune_type="reconstruction", calibration=[])
    unit_masks(net, torch.ones(1, 4), 0.5, prune_type="reconstruction", calibration=[torch.randn(8, 4)])
    assert net.training and all(m.training for m in net.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_heads_of_a_vit() -> None:
    """Whole heads go (the output projection's columns of a head are one unit), as many as with L1."""
    from prunescope import head_masks
    from prunescope.examples.vit_digits import DigitsViT

    torch.manual_seed(0)
    model = DigitsViT().eval()
    calib = [torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))]
    rec = head_masks(model, torch.ones(1, 1, 8, 8), 0.5, prune_type="reconstruction", calibration=calib)
    l1 = head_masks(model, torch.ones(1, 1, 8, 8), 0.5)
    assert sorted(rec) == sorted(l1)
    for name, m in rec.items():
        keep = m["weight"][:, 0].view(-1, 16).bool()
        assert (keep.all(1) | ~keep.any(1)).all() and int(m["bias"].sum()) == int(l1[name]["bias"].sum()), name


def test_gram_budget_splits_the_passes_not_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget smaller than one reader's Gram matrix every set is scored in its own pass over the
    calibration batches (a generator, read once) and the masks are the same."""
    from prunescope.masks import units

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    calib = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    calls = []
    real = units.input_grams
    monkeypatch.setattr(units, "input_grams", lambda *a: calls.append(a[2]) or real(*a))
    one = unit_masks(net, torch.ones(1, 3, 12, 12), 0.5, prune_type="reconstruction", calibration=iter(calib))
    monkeypatch.setattr(units, "GRAM_BUDGET_MB", 1e-6)
    split = unit_masks(net, torch.ones(1, 3, 12, 12), 0.5, prune_type="reconstruction", calibration=iter(calib))
    assert calls == [["2", "4"], ["2"], ["4"]]
    assert sorted(one) == sorted(split) == ["0", "2"]
    assert all(torch.equal(one[k]["weight"], split[k]["weight"]) for k in one)
