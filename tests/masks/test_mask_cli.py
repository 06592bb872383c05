"""``prunescope masks``: writes NNI-layout mask files equal to the library's; --fix; one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from prunescope.cli import main
from prunescope.masks import L1FilterPruner, LevelPruner, fix_mask_conflict, load_masks

SMALL = "ref_models:SmallCNN"


@pytest.fixture(autouse=True)
def _ref_models_on_path(monkeypatch):
    from maskref_helpers import NNI_DIR

    monkeypatch.syspath_prepend(NNI_DIR)


def _model():
    import ref_models

    torch.manual_seed(3)
    return ref_models.SmallCNN()


def test_l1_masks_file_equals_library(tmp_path, capsys) -> None:
    out = tmp_path / "m.pth"
    code = main(["masks", SMALL, "--pruner", "l1", "--sparsity", "0.5", "--seed", "3", "--out", str(out)])
    assert code == 0
    masks = load_masks(out)
    ref = L1FilterPruner(_model(), [{"sparsity": 0.5, "op_types": ["Conv2d"]}]).compute_masks()
    assert list(masks) == ["conv1", "conv2", "conv3"]
    for n in ref:
        assert torch.equal(masks[n]["weight"], ref[n]["weight"])
    text = capsys.readouterr().out
    assert "conv2" in text and "16/32" in text and "written to" in text


def test_level_default_types_and_exclude(tmp_path, capsys) -> None:
    out = tmp_path / "m.pth"
    code = main(["masks", SMALL, "--pruner", "level", "--sparsity", "0.3", "--exclude", "fc2", "--seed", "3",
                 "--out", str(out), "--quiet"])
    assert code == 0 and capsys.readouterr().out == ""
    masks = load_masks(out)
    ref = LevelPruner(_model(), [{"sparsity": 0.3, "op_types": ["default"]},
                                 {"exclude": True, "op_names": ["fc2"]}]).compute_masks()
    assert list(masks) == list(ref) == ["conv1", "conv2", "conv3", "fc1"]
    assert all(torch.equal(masks[n]["weight"], ref[n]["weight"]) for n in ref)


def test_fix_and_config_file(tmp_path, capsys) -> None:
    cfg = [{"sparsity": 0.5, "op_types": ["Conv2d"]}, {"sparsity": 0.2, "op_names": ["conv1"]}]
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "m.pth"
    code = main(["masks", "resnet18", "--config", str(cfg_path), "--seed", "0", "--input-size", "1,3,32,32",
                 "--fix", "--out", str(out)])
    assert code == 0
    assert "fix_mask_conflict changed 4 dependency set(s)" in capsys.readouterr().out
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    ref = fix_mask_conflict(L1FilterPruner(model, cfg).compute_masks(), model, torch.ones(1, 3, 32, 32))
    masks = load_masks(out)
    assert all(torch.equal(masks[n]["weight"], ref[n]["weight"]) for n in ref)


@pytest.mark.parametrize(
    ("argv", "msg"),
    [
        (["--sparsity", "1.5"], "0 < sparsity < 1"),
        ([], "give --sparsity"),
        (["--sparsity", "0.5", "--fix"], "--fix needs --input-size"),
        (["--sparsity", "0.5", "--op-types", "BatchNorm2d"], "only prunes"),
        (["--sparsity", "0.5", "--op-types", "Conv3d"], "selects no layer"),
    ],
)
@pytest.mark.filterwarnings("ignore:config_list")
def test_bad_input_is_one_line(tmp_path, capsys, argv: list[str], msg: str) -> None:
    code = main(["masks", SMALL, "--out", str(tmp_path / "m.pth"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and err.count("\n") == 1
    assert not (tmp_path / "m.pth").exists()
