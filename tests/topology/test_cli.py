from __future__ import annotations

from pathlib import Path

import pytest

from prunescope.cli import main


def test_deps_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deps", "resnet18", "--input-size", "1,3,64,64", "--device", "meta"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Dependency Set,Convolutional Layers"
    assert out[1] == "Set 1,conv1,layer1.0.conv2,layer1.1.conv2" and len(out) == 13
    csv = tmp_path / "d.csv"
    assert main(["deps", "resnet18", "--input-size", "1,3,64,64", "--csv", str(csv), "--include-linear"]) == 0
    assert csv.read_text().splitlines()[-1] == "Set 13,fc"


def test_unsafe_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["unsafe", "vit_b_16", "--input-size", "1,3,224,224", "--device", "meta"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("conv_proj: 'reshape' writes the size 768") and len(out) == 25
    assert main(["unsafe", "resnet18", "--input-size", "1,3,64,64"]) == 0
    assert "all layers are safe" in capsys.readouterr().out
    assert main(["deps", "resnet18", "--input-size", "1,-3"]) == 2
    assert "malformed --input-size" in capsys.readouterr().err
    # a model failing on the input: one line naming the module and the op
    assert main(["deps", "resnet18", "--input-size", "1,4,32,32"]) == 2
    assert "op 'conv2d' failed in module 'conv1'" in capsys.readouterr().err
