"""Pruners produce exactly NNI 2.10.1's masks (references: tests/data/nni/make_mask_refs.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from maskref_helpers import assert_masks_equal, build_checked, decode_masks, load_ref
from torch import nn

from prunescope.errors import ConfigError
from prunescope.masks import FPGMPruner, L1FilterPruner, L2FilterPruner, LevelPruner, layer_mask

PRUNERS = {"l1": L1FilterPruner, "l2": L2FilterPruner, "fpgm": FPGMPruner, "level": LevelPruner}
CASES = load_ref("pruners.json")["cases"]


def _id(case: dict) -> str:
    cfg = case["config_list"]
    return f"{case['model']}-{case['pruner']}-{cfg[0].get('sparsity')}-{len(cfg)}entries"


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if (c["model"], c["pruner"]) == ("resnet18", "fpgm") else c
     for c in CASES],
    ids=[_id(c) for c in CASES],
)
def test_equal_to_nni(case: dict) -> None:
    model = build_checked(case)
    before = copy.deepcopy(model.state_dict())
    masks = PRUNERS[case["pruner"]](model, case["config_list"]).compute_masks()
    n = assert_masks_equal(masks, decode_masks(case["masks"]), _id(case))
    assert n >= 1
    for k, v in model.state_dict().items():  # compute_masks() does not modify the model
        assert torch.equal(v, before[k]), k
    assert not any("mask" in n for n, _ in model.named_buffers())


def test_reference_coverage() -> None:
    """The references cover what the issue asks: L1 and L2 at 0.2/0.5/0.8 on both models, Level, ties."""
    seen = {(c["model"], c["pruner"], c["config_list"][0].get("sparsity")) for c in CASES}
    for model in ("smallcnn", "resnet18"):
        for p in ("l1", "l2"):
            for s in (0.2, 0.5, 0.8):
                assert (model, p, s) in seen
    assert any(c["pruner"] == "level" and c["model"] == "smallcnn" for c in CASES)
    assert sum(len(c["masks"]) for c in CASES) >= 220


def test_ties_prune_more() -> None:
    # L1 norms 2,2,2,4,4,6,8,8 (tied model): sparsity 0.2 → num_prune 1, but all three tied filters go
    case = next(c for c in CASES
                if (c["model"], c["pruner"], c["config_list"][0]["sparsity"]) == ("tied", "l1", 0.2))
    model = build_checked(case)
    m = layer_mask(model.conv, 0.2, "l1")
    assert m["weight"].amax(dim=(1, 2, 3)).tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert m["bias"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("prune_type", ["l1", "l2", "fpgm"])
def test_small_layers_and_sparsities_keep_all(prune_type: str) -> None:
    conv = nn.Conv2d(3, 1, 3)
    assert layer_mask(conv, 0.9, prune_type)["weight"].all()  # n_filters < 2
    conv = nn.Conv2d(3, 4, 3)
    assert layer_mask(conv, 0.2, prune_type)["weight"].all()  # int(4*0.2) = 0


@pytest.mark.parametrize(
    "layer",
    [nn.Conv1d(3, 10, 3), nn.Conv3d(2, 10, 3), nn.Linear(5, 10), nn.ConvTranspose2d(4, 10, 3),
     nn.ConvTranspose2d(4, 10, 3, groups=2), nn.ConvTranspose1d(3, 10, 2)],
    ids=["conv1d", "conv3d", "linear", "convT2d", "convT2d-groups", "convT1d"],
)
@pytest.mark.parametrize("prune_type", ["l1", "l2", "fpgm"])
def test_other_layer_types_prune_whole_output_channels(layer: nn.Module, prune_type: str) -> None:
    m = layer_mask(layer, 0.5, prune_type)
    w = m["weight"]
    assert w.shape == layer.weight.shape
    # the output of the masked layer has exactly 5 channels that are identically zero (bias masked too)
    x = torch.randn(2, *(layer.weight.shape[1:2] if not isinstance(layer, nn.ConvTranspose2d | nn.ConvTranspose1d)
                          else (layer.weight.shape[0],)), *([6] * (layer.weight.dim() - 2)))
    if isinstance(layer, nn.Linear):
        x = torch.randn(2, 5)
    with torch.no_grad():
        saved = (layer.weight.clone(), layer.bias.clone())
        layer.weight.mul_(w)
        layer.bias.mul_(m["bias"])
        y = layer(x)
        layer.weight.copy_(saved[0])
        layer.bias.copy_(saved[1])
    zero = (y.transpose(0, 1).reshape(10, -1) == 0).all(dim=1)
    assert int(zero.sum()) == 5
    assert zero.tolist() == (m["bias"] == 0).tolist()


def test_convtranspose_scores_output_channels() -> None:
    layer = nn.ConvTranspose2d(3, 4, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, 0] = 0.1  # output channels 0 and 1 are the weakest
        layer.weight[:, 1] = 1.0
        layer.weight[:, 2] = 5.0
        layer.weight[:, 3] = 2.0
    m = layer_mask(layer, 0.5, "l1")["weight"]
    assert m.amax(dim=(0, 2, 3)).tolist() == [0, 0, 1, 1]


def test_level_rule() -> None:
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -0.2, 0.3, 0.3], [-0.3, 0.5, 0.6, 0.0]]))
    m = layer_mask(lin, 0.5, "level")  # k = 4, threshold = 0.3 → ties included → 5 pruned
    assert m["weight"].tolist() == [[0, 0, 0, 0], [0, 1, 1, 0]]
    assert m["bias"].tolist() == [1, 1]


def test_config_override_and_exclude() -> None:
    model = nn.Sequential(nn.Conv2d(3, 10, 1), nn.Conv2d(10, 10, 1), nn.Linear(10, 10))
    cfg = [{"sparsity": 0.5, "op_types": ["default"]}, {"sparsity": 0.8, "op_names": ["1"]},
           {"exclude": True, "op_types": ["Linear"]}]
    masks = L1FilterPruner(model, cfg).compute_masks()
    assert sorted(masks) == ["0", "1"]
    assert int(masks["0"]["bias"].sum()) == 5 and int(masks["1"]["bias"].sum()) == 2


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ([{"sparsity": 1.0, "op_types": ["Conv2d"]}], r"config_list\[0\].*0 < sparsity < 1"),
        ([{"sparsity": 0.5}], r"config_list\[0\].*op_types"),
        ([{"op_types": ["Conv2d"]}], r"config_list\[0\].*'sparsity' is required"),
        ([{"sparsity": 0.5, "op_types": ["Conv2d"]}, {"sparsity": 0.5, "op_type": ["Conv2d"]}],
         r"config_list\[1\].*unknown key"),
        ([{"sparsity": 0.5, "op_types": "Conv2d"}], r"list of strings"),
        ([], "empty"),
        ([{"sparsity": 0.5, "op_types": ["BatchNorm2d"]}], r"'1'.*BatchNorm2d.*only prunes"),
    ],
)
def test_bad_config(cfg: list, match: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=match):
        L1FilterPruner(model, cfg).compute_masks()


def test_layer_mask_errors() -> None:
    with pytest.raises(ConfigError, match="prune type"):
        layer_mask(nn.Linear(2, 2), 0.5, "l3")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        layer_mask(nn.Linear(2, 2), 1.5, "l1")
    with pytest.raises(ConfigError, match="no weight"):
        layer_mask(nn.ReLU(), 0.5, "level")


def test_nni_call_forms(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 10, 1))
    cfg = [{"sparsity": 0.5, "op_types": ["Conv2d"]}]
    masks = L1FilterPruner(model, cfg, None).export_masks(tmp_path / "m.pth")  # NNI v1: optimizer=None
    assert (tmp_path / "m.pth").exists() and int(masks["0"]["bias"].sum()) == 5
    with pytest.raises(ConfigError, match="dependency_aware"):
        L1FilterPruner(model, cfg, dependency_aware=True, dummy_input=torch.ones(1, 3, 2, 2))
