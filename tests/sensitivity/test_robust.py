"""Bad inputs to the sensitivity sweep are refused clearly, naming the culprit (issue 12), before any
evaluation runs: damaged checkpoints (file and line), duplicate sparsities, unwritable --out, a --val that
returns text; and hostile layer names plot as literal text."""

from __future__ import annotations

import json

import pytest
import sens_helpers as H
import sens_models as M
import torch
from torch import nn

from prunescope.cli import main
from prunescope.errors import ConfigError, PrunescopeError
from prunescope.sensitivity import CheckpointError, SensitivityAnalysis

Q = [0.25, 0.5, 0.75]
GOOD = {"layer": "conv1", "i": 0, "sparsity": 0.25, "value": 1.0}


def rec(**change) -> bytes:
    r = {**GOOD, **change}
    for k in [k for k, v in change.items() if v is KeyError]:
        del r[k]
    return json.dumps(r).encode()


@pytest.fixture
def ckpt(tmp_path, one_thread):
    """A finished checkpoint of the SmallCNN sweep: header, baseline, 9 records."""
    path = tmp_path / "ck.jsonl"
    model = M.build_cnn()
    SensitivityAnalysis(model, M.loss, sparsities=Q, checkpoint=path, progress=False).analysis([model])
    return path


@pytest.mark.parametrize("line, match", [
    (b"\xff\xfe garbage", "not UTF-8"),
    (b'{"layer": "conv1", "i": 0,', "not a JSON record"),
    (b"[1, 2]", "expected a JSON object"),
    (rec(value=KeyError), "lacks 'value'"),
    (rec(layer=KeyError, i=KeyError), "lacks 'layer', 'i'"),
    (rec(i="0"), "sparsity index '0'"),
    (rec(i=True), "sparsity index True"),
    (rec(i=3), "sparsity index 3"),
    (rec(layer=5), "layer 5 is not a target"),
    (rec(layer="conv9"), "layer 'conv9' is not a target"),
    (rec(sparsity=0.3), "does not match index 0"),
    (rec(value="0.5"), "value is '0.5' \\(str\\)"),
    (rec(value=None), "value is None"),
    (b'{"layer": "conv1", "i": 0, "sparsity": 0.25, "value": NaN}', "value is nan; a recorded metric must be finite"),
    (b'{"layer": "conv1", "i": 0, "sparsity": 0.25, "value": -Infinity}', "value is -inf"),
    (b'{"baseline": NaN}', "baseline is nan"),
    (b'{"baseline": "x"}', "baseline is 'x'"),
])
def test_damaged_checkpoint_line_names_file_and_line(ckpt, line, match):
    lines = ckpt.read_bytes().split(b"\n")
    lines[4] = line  # the 5th line: a record in the middle of the file
    ckpt.write_bytes(b"\n".join(lines))
    val = H.Counting(M.loss)
    model = M.build_cnn()
    sa = SensitivityAnalysis(model, val, sparsities=Q, checkpoint=ckpt, progress=False)
    with pytest.raises(CheckpointError, match=match) as info:
        sa.analysis([model])
    assert isinstance(info.value, PrunescopeError)
    assert f"{str(ckpt)!r}, line 5:" in str(info.value)
    assert val.calls == 0


def test_damaged_header_is_refused(ckpt):
    ckpt.write_bytes(b"\x80\x81\n" + ckpt.read_bytes())
    model = M.build_cnn()
    with pytest.raises(CheckpointError, match="not a prunescope sensitivity checkpoint.*line 1"):
        SensitivityAnalysis(model, M.loss, sparsities=Q, checkpoint=ckpt, progress=False).analysis([model])


def test_damaged_checkpoint_on_the_command_line(ckpt, tmp_path, capsys):
    ckpt.write_bytes(ckpt.read_bytes().replace(b'"value": ', b'"value": NaN, "x": ', 1))
    rc = main(["sensitivity", "--model", "sens_models:build_cnn", "--val", "sens_models:loss", "--sparsities",
               "0.25,0.5,0.75", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s.csv"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "line 3" in err and str(ckpt) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("sparsities, named", [
    ([0.5, 0.5], r"0.5 \(given as 0.5, 0.5\)"),
    ([0.25, 0.501, 0.5], r"0.5 \(given as 0.5, 0.501\)"),
    ([0.124, 0.125, 0.3, 0.333, 0.33], r"0.12 \(given as 0.124, 0.125\); 0.33 \(given as 0.33, 0.333\)"),
])
def test_duplicate_sparsities_refused_naming_them(sparsities, named):
    val = H.Counting(M.loss)
    with pytest.raises(ConfigError, match=f"duplicate sparsities.*{named}"):
        SensitivityAnalysis(M.build_cnn(), val, sparsities=sparsities)
    assert val.calls == 0


def test_mathtext_layer_names_plot_as_text(tmp_path, one_thread):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    name = "a$\\frac{x$"
    model = nn.Sequential()
    model.add_module(name, nn.Conv2d(1, 4, 3))
    model.add_module("b$", nn.Conv2d(4, 2, 3))
    x = torch.randn(2, 1, 8, 8)
    sa = SensitivityAnalysis(model, lambda m: m(x).abs().mean().item(), sparsities=[0.5], progress=False)
    sa.analysis([model])
    sa.plot(tmp_path / "s.png", title="net $x")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    with pytest.raises(ValueError):  # the same label given to matplotlib as is: mathtext fails (the old crash)
        fig, ax = plt.subplots()
        try:
            ax.plot([0, 1], [0, 1], label=name)
            ax.legend()
            fig.savefig(tmp_path / "raw.png")
        finally:
            plt.close(fig)


def _cli(tmp_path, out, *extra):
    return main(["sensitivity", "--model", "sens_models:build_cnn", "--val", "sens_helpers:counted_loss",
                 "--sparsities", "0.5", "--out", str(out), "--no-progress", *extra])


@pytest.mark.parametrize("where", ["missing folder", "directory", "under a file", "plot under a file"])
def test_cli_unwritable_output_refused_before_any_evaluation(where, tmp_path, capsys, one_thread):
    (tmp_path / "f.txt").write_text("x")
    out, extra = tmp_path / "s.csv", []
    if where == "missing folder":
        out = tmp_path / "nope" / "s.csv"
    elif where == "directory":
        out = tmp_path
    elif where == "under a file":
        out = tmp_path / "f.txt" / "s.csv"
    else:
        extra = ["--plot", str(tmp_path / "f.txt" / "s.png")]
    H.CALLS.clear()
    rc = _cli(tmp_path, out, *extra)
    err = capsys.readouterr().err
    assert rc == 2 and ("--plot" if extra else "--out") in err and "Traceback" not in err
    assert H.CALLS == []  # refused before the first evaluation


def test_cli_val_returning_text_names_val(tmp_path, capsys, one_thread):
    rc = main(["sensitivity", "--model", "sens_models:build_cnn", "--val", "sens_helpers:string_metric",
               "--sparsities", "0.5", "--out", str(tmp_path / "s.csv"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--val 'sens_helpers:string_metric'" in err and "'0.5' (str)" in err
    assert "could not convert" not in err and "Traceback" not in err
    assert not (tmp_path / "s.csv").exists()
