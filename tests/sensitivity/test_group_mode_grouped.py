"""group_dependencies=True on grouped convolutions (issue 19.1): the sweep removes as many units from every group
of a grouped convolution and sweeps only the sets shrink can narrow, so every mask it measures is one that
``fix_mask_conflict`` leaves as it is, ``shrink`` builds without a conflict warning, and the as-pruned metric at
each point is the shrunk model's metric (an independent reference: the physically narrowed network)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from prunescope import SensitivityAnalysis
from prunescope.graph import trace
from prunescope.masks import fix_mask_conflict
from prunescope.narrow import ShrinkWarning, shrink

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _metric(model: nn.Module) -> float:
    with torch.no_grad():
        return model(X).abs().sum().item()


def _masks_of(model: nn.Module, names: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor | None]]:
    """The masks the sweep applied, read off the zeroed filters (random weights have no zero filter)."""
    out = {}
    for n in names:
        m = model.get_submodule(n)
        keep = (m.weight.detach().flatten(1).abs().sum(1) > 0).float()
        out[n] = {"weight": keep.view(-1, *[1] * (m.weight.dim() - 1)).expand_as(m.weight).clone(),
                  "bias": keep.clone() if m.bias is not None else None}
    return out


@pytest.mark.parametrize("arch", ["regnet_x_400mf", "resnext50_32x4d"])
def test_sweep_masks_need_no_fix_and_measure_the_shrunk_model(arch: str, one_thread: None) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    g = trace(model, X)
    seen: list[tuple[str, dict, float]] = []
    swept: dict[str, tuple[str, ...]] = {}

    def val(m: nn.Module) -> float:
        value = _metric(m)
        for key, members in swept.items():  # the set being pruned: its first member has zeroed filters
            first = m.get_submodule(members[0]).weight
            if bool((first.detach().flatten(1).abs().sum(1) == 0).any()):
                seen.append((key, _masks_of(m, members), value))
        return value

    sa = SensitivityAnalysis(model, val, sparsities=[0.25, 0.5], group_dependencies=True, dummy_input=X,
                             as_pruned=True, graph=g, progress=False)
    assert sa.chunks, "a grouped convolution's set is swept group by group"
    assert all(k in sa.groups for k in sa.chunks)
    assert "fc" not in sa.groups and not any("fc" == k for k in sa.excluded)  # Linear: not a target type
    grouped = list(sa.chunks)[:2]
    swept.update((k, sa.groups[k]) for k in grouped)
    sa.analysis(val_args=[model], specified_layers=grouped)
    assert [k for k, _, _ in seen] == [k for k in grouped for _ in range(2)]
    for key, masks, value in seen:
        removed = [int((mk["weight"].flatten(1).sum(1) == 0).sum()) for mk in masks.values()]
        assert min(removed) > 0  # something was pruned in every member
        fixed = fix_mask_conflict(masks, model, X, traced=g)
        assert not fixed.changed, (key, [c.members for c in fixed.changed])
        assert all(torch.equal(fixed[n]["weight"], masks[n]["weight"]) for n in masks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            small, res = shrink(model, masks, X, graph=g, return_result=True)
        assert not [w for w in caught if issubclass(w.category, ShrinkWarning)]
        assert not res.fixed and not res.protected
        assert value == pytest.approx(_metric(small), rel=1e-5)


def test_a_set_shrink_cannot_narrow_is_named_not_swept(one_thread: None) -> None:
    from prunescope.errors import ConfigError

    model = torchvision.models.regnet_x_400mf().eval()
    sa = SensitivityAnalysis(model, _metric, sparsities=[0.5], layer_types=(nn.Conv2d, nn.Linear),
                             group_dependencies=True, dummy_input=X, progress=False)
    assert sa.excluded["fc"] == "its channels reach the model output"
    with pytest.raises(ConfigError, match="dependency set fc is not swept: its channels reach the model output"):
        sa.analysis(val_args=[model], specified_layers=["fc"])
