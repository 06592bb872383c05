"""fix_mask_conflict: NNI 2.10.1 equality (union, one pass) and the behaviour beyond NNI."""

from __future__ import annotations

import contextlib

import pytest
import torch
from maskref_helpers import build_checked, decode_masks, load_ref
from torch import nn

from prunescope.errors import MaskError
from prunescope.graph import trace
from prunescope.masks import (
    FixedMasks,
    L1FilterPruner,
    LevelPruner,
    apply_masks,
    fix_mask_conflict,
    fix_masks_with,
    layer_mask,
    save_masks,
)
from prunescope.masks.layers import filter_keep
from prunescope.topology import ChannelDependency, GroupDependency

CASES = load_ref("fix_mask_conflict.json")["cases"]


def _keep(model: nn.Module, masks: dict, name: str) -> torch.Tensor:
    return filter_keep(dict(model.named_modules())[name], masks[name]["weight"])


def assert_consistent(model: nn.Module, masks: dict, x: torch.Tensor) -> None:
    """Every dependency set keeps the same channels; every group constraint holds; bias follows weight."""
    g = trace(model, x)
    dep = ChannelDependency(model, x, traced_model=g, include_linear=True)
    for s in dep.dependency_sets:
        if len(s) < 2 or not any(n in masks for n in s):
            continue
        # channels of the same class (tied by the topology engine) are all kept or all pruned
        seen: dict[int, set[bool]] = {}
        for n in s:
            keep = _keep(model, masks, n).tolist() if n in masks else [True] * len(dep.atoms.layer_classes(n))
            for c, k in zip(dep.atoms.layer_classes(n).tolist(), keep):
                seen.setdefault(c, set()).add(k)
        assert all(len(v) == 1 for v in seen.values()), s
    gd = GroupDependency(model, x, traced_model=g)
    for name, gmax in gd.dependency.items():
        if name in masks:
            pruned = (~_keep(model, masks, name)).view(gmax, -1).sum(dim=1)
            gmin = gd.min_groups.get(name, 1)
            whole = (~_keep(model, masks, name)).view(gmin, -1).all(dim=1)
            assert len(set(pruned.tolist())) == 1 or whole.any(), (name, pruned.tolist())
    modules = dict(model.named_modules())
    for name, m in masks.items():
        if m["bias"] is not None:
            assert torch.equal(m["bias"] != 0, _keep(model, masks, name)), name
        assert modules[name].weight.shape == m["weight"].shape


@pytest.mark.parametrize("case", CASES, ids=[f"{c['model']}-{i}" for i, c in enumerate(CASES)])
def test_equal_to_nni_single_pass(case: dict) -> None:
    """NNI's union fix, one pass: weight masks equal NNI's exactly; bias masks follow the weights."""
    model = build_checked(case)
    inp = decode_masks(case["input_masks"])
    ref = decode_masks(case["fixed_masks"])
    x = torch.randn(*case["input_size"])
    # NNI's output for the second groupnet case breaks conv1's group constraint again (its channel step runs
    # after the group step and is not repeated): one pass reproduces that, and says so
    broken = case["model"] == "groupnet" and case["config_list"][0]["sparsity"] == 0.4
    with pytest.warns(UserWarning, match="group constraints") if broken else contextlib.nullcontext():
        out = fix_mask_conflict(inp, model, x, max_iter=1)
    assert sorted(out) == sorted(ref)
    for name in ref:
        assert torch.equal(out[name]["weight"], ref[name]["weight"]), name
        if ref[name]["bias"] is not None:
            # NNI's group step never restores the bias (hasattr(dict, 'bias') is always False): ours follows
            # the weight, which equals NNI's bias wherever NNI's is consistent
            assert torch.equal(out[name]["bias"] != 0, _keep(model, out, name)), name
            if torch.equal(ref[name]["bias"] != 0, _keep(model, ref, name)):
                assert torch.equal(out[name]["bias"], ref[name]["bias"]), name
    assert out.changed  # every reference case has conflicts
    changed_layers = {n for c in out.changed for n in c.members}
    assert {n for n in ref if not torch.equal(ref[n]["weight"], inp[n]["weight"])} <= changed_layers


@pytest.mark.parametrize("case", CASES, ids=[f"{c['model']}-{i}" for i, c in enumerate(CASES)])
def test_iterated_fix_satisfies_both_constraints(case: dict) -> None:
    model = build_checked(case)
    inp = decode_masks(case["input_masks"])
    ref = decode_masks(case["fixed_masks"])
    x = torch.randn(*case["input_size"])
    out = fix_mask_conflict(inp, model, x)
    assert_consistent(model, out, x)
    for name in ref:  # iterating only ever keeps more than NNI's single pass
        assert bool((out[name]["weight"] >= ref[name]["weight"]).all()), name


def test_caller_dict_not_mutated_unless_inplace(tmp_path) -> None:
    case = CASES[0]
    model = build_checked(case)
    inp = decode_masks(case["input_masks"])
    snapshot = {n: {k: (v.clone() if v is not None else None) for k, v in m.items()} for n, m in inp.items()}
    x = torch.randn(*case["input_size"])
    g = trace(model, x)
    out = fix_mask_conflict(inp, model, x, traced=g)
    assert isinstance(out, FixedMasks) and isinstance(out, dict) and out is not inp
    for n in inp:
        assert torch.equal(inp[n]["weight"], snapshot[n]["weight"])
    same = fix_mask_conflict(inp, model, x, traced=g, inplace=True)
    assert same is inp
    for n in out:
        assert torch.equal(inp[n]["weight"], out[n]["weight"])
    # a path works too, and returns a report
    path = tmp_path / "m.pth"
    save_masks(snapshot, path)
    res, changed, skipped = fix_mask_conflict(str(path), model, x, traced=g, return_report=True)
    assert [c.members for c in changed] == [c.members for c in out.changed] and skipped == []
    assert all(torch.equal(res[n]["weight"], out[n]["weight"]) for n in out)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x)
        return self.c3(a + self.c2(torch.relu(a)))


def _filter_mask(module: nn.Module, keep: list[int]) -> dict:
    k = torch.tensor(keep, dtype=torch.bool)
    from prunescope.masks.layers import expand_filters

    w = expand_filters(module, k, torch.ones_like(module.weight))
    return {"weight": w, "bias": k.float() if module.bias is not None else None}


def test_policies() -> None:
    torch.manual_seed(1)
    model = Residual().eval()
    x = torch.randn(1, 3, 6, 6)
    masks = {"c1": _filter_mask(model.c1, [1, 1, 1, 1, 0, 0, 0, 0]),
             "c2": _filter_mask(model.c2, [0, 0, 1, 1, 1, 1, 1, 1])}
    union = fix_mask_conflict(masks, model, x)
    assert _keep(model, union, "c1").tolist() == [True] * 8
    inter = fix_mask_conflict(masks, model, x, policy="intersection")
    assert _keep(model, inter, "c1").int().tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    l1 = fix_mask_conflict(masks, model, x, policy="l1")
    score = model.c1.weight.abs().sum(dim=(1, 2, 3)) + model.c2.weight.abs().sum(dim=(1, 2, 3))
    expected = torch.ones(8, dtype=torch.bool)
    expected[torch.argsort(score)[:3]] = False  # mean sparsity (0.5 + 0.25) / 2 → int(8 * 0.375) = 3
    assert _keep(model, l1, "c1").tolist() == expected.tolist()
    for out in (union, inter, l1):
        assert_consistent(model, out, x)
        assert [c.members for c in out.changed] == [("c1", "c2")]
    # an unmasked member: union keeps everything; intersection adds a mask for it
    only = {"c1": masks["c1"]}
    assert _keep(model, fix_mask_conflict(only, model, x), "c1").all()
    inter = fix_mask_conflict(only, model, x, policy="intersection")
    assert sorted(inter) == ["c1", "c2"] and _keep(model, inter, "c2").int().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    with pytest.raises(Exception, match="policy"):
        fix_mask_conflict(masks, model, x, policy="max")


class TransposedAndLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up1(x) + self.up2(x)
        z = y.mean(dim=(2, 3))
        return self.fc1(z) + self.fc2(z)


def test_convtranspose_and_linear_members() -> None:
    """NNI raises RuntimeError for a masked ConvTranspose2d in a set; here it works (filter = dim 1)."""
    torch.manual_seed(0)
    model = TransposedAndLinear().eval()
    x = torch.randn(1, 4, 3, 3)
    masks = L1FilterPruner(model, [{"sparsity": 0.5, "op_types": ["ConvTranspose2d", "Linear"]}]).compute_masks()
    out = fix_mask_conflict(masks, model, x)
    assert {c.members for c in out.changed} >= {("up1", "up2"), ("fc1", "fc2")}
    assert_consistent(model, out, x)
    keep = _keep(model, out, "up1")
    assert torch.equal(out["up1"]["weight"].amax(dim=(0, 2, 3)) != 0, keep)  # dim 1 is the filter axis


def test_fine_grained_sets_are_skipped() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(1, 3, 6, 6)
    masks = LevelPruner(model, [{"sparsity": 0.5, "op_names": ["c1"]}]).compute_masks()
    masks["c2"] = layer_mask(model.c2, 0.5, "l1")
    out = fix_mask_conflict(masks, model, x)
    assert not out.changed and [c.members for c in out.skipped] == [("c1", "c2")]
    for n in masks:
        assert torch.equal(out[n]["weight"], masks[n]["weight"])


def test_errors_name_the_problem() -> None:
    model = Residual().eval()
    with pytest.raises(MaskError, match="empty"):
        fix_masks_with({}, model, [])
    with pytest.raises(MaskError, match="'c9'"):
        fix_masks_with({"c9": {"weight": torch.ones(1), "bias": None}}, model, [])
    masks = {"c1": _filter_mask(model.c1, [1, 0] * 4), "c3": _filter_mask(model.c3, [1, 0, 1, 1])}
    with pytest.raises(MaskError, match="different channel counts"):
        fix_masks_with(masks, model, [{"c1", "c3"}])
    with pytest.raises(MaskError, match="'c1': 8 filters cannot be split into 3"):
        fix_masks_with(masks, model, [], {"c1": 3})
    w = torch.ones_like(model.c2.weight)
    w[:, :5] = 0  # input-channel (dim 1) masks
    with pytest.raises(MaskError, match="input channels"):
        fix_masks_with({"c2": {"weight": w, "bias": None}}, model, [])


def test_group_step_rules() -> None:
    """NNI's group rule: equalise pruned counts per group by un-pruning later indices; whole groups exempt."""
    model = nn.ModuleDict({"c": nn.Conv2d(1, 8, 1)})
    m = {"c": _filter_mask(model["c"], [0, 0, 1, 1, 0, 1, 1, 1])}  # groups of 4: pruned {0,1} and {4}
    out = fix_masks_with(m, model, [], {"c": 2}, {"c": 1})
    assert _keep(model, out, "c").int().tolist() == [0, 1, 1, 1, 0, 1, 1, 1]
    assert out["c"]["bias"].tolist() == [0, 1, 1, 1, 0, 1, 1, 1]  # bias follows (NNI leaves it pruned)
    m = {"c": _filter_mask(model["c"], [0, 0, 0, 0, 0, 1, 1, 1])}  # first group entirely pruned: exempt
    out = fix_masks_with(m, model, [], {"c": 2}, {"c": 2})
    assert _keep(model, out, "c").int().tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_unmaskable_member_pins_its_set() -> None:
    model = nn.ModuleDict({"a": nn.Conv2d(1, 4, 1), "attn": nn.Identity()})
    m = {"a": _filter_mask(model["a"], [1, 0, 1, 0])}
    out = fix_masks_with(m, model, [{"a", "attn"}], policy="intersection")
    assert _keep(model, out, "a").all() and "cannot be masked" in out.changed[0].reason
    with pytest.raises(MaskError, match="'attn'.*Identity"):
        fix_masks_with({"attn": {"weight": torch.ones(1), "bias": None}}, model, [])


class BNResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b1(self.c1(x)) + self.b2(self.c2(x))


def test_batchnorm_masks() -> None:
    """NNI's 'Batchnorm' prune type: when every mask is on a BatchNorm, BN sets are merged."""
    model = BNResidual().eval()
    bn = lambda k: {"weight": torch.tensor(k, dtype=torch.float), "bias": torch.tensor(k, dtype=torch.float)}  # noqa: E731
    masks = {"b1": bn([1, 1, 0, 0, 1, 1]), "b2": bn([0, 1, 1, 0, 1, 1])}
    out = fix_mask_conflict(masks, model, torch.randn(1, 3, 4, 4))
    assert out["b1"]["weight"].tolist() == out["b2"]["weight"].tolist() == [1, 1, 1, 0, 1, 1]
    assert out["b1"]["bias"].tolist() == [1, 1, 1, 0, 1, 1]


def test_torch_save_of_result_loads_safely(tmp_path) -> None:
    """NNI users torch.save the fixed dict; the FixedMasks subclass must not make the file unloadable."""
    from prunescope.masks import load_masks

    model = Residual().eval()
    masks = {"c1": _filter_mask(model.c1, [1, 0] * 4), "c2": _filter_mask(model.c2, [1, 1, 0, 0] * 2)}
    out = fix_mask_conflict(masks, model, torch.randn(1, 3, 4, 4))
    torch.save(out, tmp_path / "f.pth")
    back = load_masks(tmp_path / "f.pth")
    assert list(back) == list(out) and torch.equal(back["c1"]["weight"], out["c1"]["weight"])


@pytest.mark.parametrize("policy", ["union", "intersection", "l1"])
def test_partial_ties_channel_shuffle(policy: str) -> None:
    """shufflenet: cat + channel shuffle + chunk tie channels across layers of different widths; NNI's
    set-level merge cannot express that (its sets have unequal channel counts), the per-class merge can."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5().eval()
    x = torch.randn(1, 3, 64, 64)
    masks = L1FilterPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}]).compute_masks()
    out = fix_mask_conflict(masks, model, x, policy=policy)
    assert_consistent(model, out, x)
    modules = dict(model.named_modules())
    widths = [{modules[n].out_channels for n in c.members} for c in out.changed if c.kind == "channel"]
    assert any(len(w) > 1 for w in widths), "expected a fixed set whose members have different widths"
    with apply_masks(model, out):  # the masked model still runs
        model(x)


def test_all_filters_pruned_is_not_taken_for_input_channel_masks() -> None:
    model = nn.ModuleDict({"wide": nn.Conv2d(16, 2, 1), "b": nn.Conv2d(1, 2, 1)})
    masks = {"wide": {"weight": torch.zeros(2, 16, 1, 1), "bias": torch.zeros(2)},
             "b": _filter_mask(model["b"], [1, 1])}
    out = fix_masks_with(masks, model, [{"wide", "b"}])
    assert out["wide"]["bias"].tolist() == [1, 1]  # union with b, which keeps both
