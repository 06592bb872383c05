"""The pin probe (removal/probe.py): a size read from ``x.shape`` at run time is not a literal.

Every answer the probe changes is checked physically here: a cleared pin is removed from a real CPU copy
(weights narrowed by the removal plan) and the narrowed model must compute exactly what the masked model
computes; a kept pin must break when removed.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from prunescope import as_pruned
from prunescope.graph import trace
from prunescope.removal import ReshapeDependency, not_safe_to_prune
from prunescope.removal.narrow import apply_plan
from prunescope.removal.plan import plan_removal
from prunescope.removal.probe import probe_pins
from prunescope.topology import ChannelDependency, channel_atoms


class Windows(nn.Module):
    """swin's window partition and merge, with the channel count read from ``y.shape``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        b, h, w, c = y.shape
        y = y.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        y = y * y.sum(1, keepdim=True)  # mixes the 4 pixels of a window, per channel
        return self.b(y.view(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c))


class LiteralView(nn.Module):
    """A size written in the code: ``view(n, l * 16)``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(4, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return self.o(self.q(x).view(n, length * 16).view(n, length, 16))


class FixedSlice(nn.Module):
    """``y[..., 4:12]``: removing a channel outside the slice keeps its size but shifts what it selects."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(4, 16), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(x)[..., 4:12])


class DataDependent(nn.Module):
    """A forward that reads values (cannot run on meta): nothing can be probed, the pins stay."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        b, h, w, c = y.shape
        if float(y.sum()) > -1e30:
            y = y.reshape(b, h * w, c).reshape(b, h, w, c)
        return self.b(y.view(b, h // 2, 2, w // 2, 2, c).reshape(b, h, w, c))


def _remove(model: nn.Module, g, layer: str, channel: int) -> tuple[nn.Module, dict]:
    """A CPU copy with ``channel`` of ``layer`` (and its class) physically removed, pins not checked."""
    w = model.get_submodule(layer).weight
    m = torch.ones_like(w)
    m[channel] = 0
    bias = torch.ones(w.shape[0])
    bias[channel] = 0
    masks = {layer: {"weight": m, "bias": bias}}
    plan = plan_removal(g, masks, check_pins=False)
    assert plan.removed[layer][channel]
    small = copy.deepcopy(model)
    apply_plan(small, plan)
    return small, masks


def test_size_from_shape_is_cleared_and_removal_is_exact():
    torch.manual_seed(0)
    model, x = Windows().eval(), torch.randn(2, 4, 4, 3)
    g = trace(model, x)
    assert list(channel_atoms(g).unsafe) == ["a"]  # the engine alone: 6 looks like a literal
    res = probe_pins(g, x)
    assert res.unsafe == {} and res.cleared_layers == ["a"] and res.probes == 1
    assert len(res.cleared) == 6  # one probe, the five other channels follow by the group argument
    for ch in (0, 3, 5):  # every channel, not only the probed one: removed physically == masked
        small, masks = _remove(model, g, "a", ch)
        assert small.a.out_features == 5 and small.b.in_features == 5
        with torch.no_grad(), as_pruned(model, masks, x) as masked:
            want = masked(x)
        with torch.no_grad():
            got = small(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_wired_into_not_safe_to_prune():
    model, x = Windows().eval(), torch.ones(1, 4, 4, 3)
    assert not_safe_to_prune(model, x) == []
    assert not_safe_to_prune(model, x, probe=False) == ["a"]
    g = trace(model, x)
    # inputs rebuilt from the recorded graph when only the graph is given (the report and the CLI do that)
    assert not_safe_to_prune(None, None, traced_model=g) == []
    dep = ReshapeDependency(traced_model=g)
    assert dep.probe is not None and dep.probe.cleared_layers == ["a"]
    # ChannelDependency (the topology layer, below the removal plan) gives the engine's answer alone
    assert set(ChannelDependency(model, x, include_linear=True).unsafe) == {"a"}


def test_literal_size_stays_pinned_and_really_breaks():
    model, x = LiteralView().eval(), torch.ones(2, 3, 4)
    g = trace(model, x)
    res = probe_pins(g, x)
    assert list(res.unsafe) == ["q"] and res.cleared == {}
    assert all("the forward fails" in why for why in res.kept.values())
    small, _ = _remove(model, g, "q", 0)
    with pytest.raises(RuntimeError):
        small(x)
    with_reasons = not_safe_to_prune(model, x, with_reasons=True)
    assert "writes the size" in with_reasons["q"][0]


def test_fixed_slice_is_caught_by_the_channel_grids():
    model, x = FixedSlice().eval(), torch.ones(2, 4)
    g = trace(model, x)
    res = probe_pins(g, x)
    assert list(res.unsafe) == ["q"] and not res.cleared
    assert any("selects other channels" in why for why in res.kept.values())
    # physically: removing channel 0 runs, and what the slice reads moved by one channel
    torch.manual_seed(0)
    xr = torch.randn(2, 4)
    small, masks = _remove(model, g, "q", 0)
    with torch.no_grad(), as_pruned(model, masks, xr) as masked:
        want = masked(xr)
    assert not torch.allclose(small(xr), want)


def test_swin_t_residual_stays_unsafe_the_qkv_reshape_reads_c_over_heads():
    torchvision = pytest.importorskip("torchvision")
    from prunescope.commands.common import build_on_meta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_on_meta(lambda: torchvision.models.swin_t())
    x = torch.empty(1, 3, 224, 224, device="meta")
    g = trace(model, x)
    res = probe_pins(g, x)
    # removing one first-stage residual channel: C // num_heads = 95 // 3 = 31, but qkv still has 3 * 96 rows
    assert "features.1.0.attn.proj" in res.unsafe
    ca = channel_atoms(g)
    cls = int(ca.layer_classes("features.0.0")[0])
    assert "reshape" in res.kept[cls] and "31" in res.kept[cls]
    assert res.probes <= 32


def test_data_dependent_forward_probes_nothing():
    model, x = DataDependent().eval(), torch.ones(1, 4, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = trace(model, x)
    res = probe_pins(g, x)
    assert set(res.unsafe) == set(channel_atoms(g).unsafe) and not res.cleared
    assert all("meta" in why for why in res.kept.values())


def test_keyword_inputs_are_rebuilt_from_the_trace():
    model, x = Windows().eval(), torch.ones(1, 4, 4, 3)
    g = trace(model, {"x": x})
    res = probe_pins(g)  # no dummy_input: the keyword tensor is rebuilt on meta from the recorded shape
    assert res.cleared_layers == ["a"] and res.unsafe == {}
