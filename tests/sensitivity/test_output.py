"""CSV bytes and read-back, plot, DataFrame, and the command line."""

import json

import pytest
import sens_models as M
from sens_helpers import NNI_DATA

from prunescope.cli import main
from prunescope.sensitivity import SensitivityAnalysis, load_sensitivity


@pytest.fixture
def done(one_thread):
    model = M.build_cnn()
    sa = SensitivityAnalysis(model, M.loss, sparsities=[0.25, 0.5, 0.75], early_stop_mode="minimize",
                             early_stop_value=1.188, progress=False)
    sa.analysis([model])
    return sa


def test_csv_bytes_and_load_roundtrip(done, tmp_path):
    p = tmp_path / "s.csv"
    done.export(p)
    assert p.read_bytes() == (NNI_DATA / "sensitivity" / "cnn_minimize.csv").read_bytes()
    assert load_sensitivity(p) == done.sensitivities
    assert load_sensitivity(NNI_DATA / "sensitivity" / "cnn_minimize.csv") == done.sensitivities
    assert not list(tmp_path.glob(".prunescope-*"))  # no temporary file left behind


def test_plot_writes_png(done, tmp_path):
    pytest.importorskip("matplotlib")
    done.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dataframe(done):
    pytest.importorskip("pandas")
    df = done.to_dataframe()
    assert list(df.columns) == ["layer", "sparsity", "metric", "delta"]
    assert len(df) == sum(len(v) for v in done.sensitivities.values())


def test_progress_bar_can_be_on(capsys, one_thread):
    model = M.build_cnn()
    SensitivityAnalysis(model, M.loss, sparsities=[0.5], progress=True).analysis([model])
    assert "sensitivity" in capsys.readouterr().err


def test_cli(tmp_path, capsys, one_thread):
    out, png, ck = tmp_path / "s.csv", tmp_path / "s.png", tmp_path / "ck.jsonl"
    rc = main(["sensitivity", "--model", "sens_models:build_cnn", "--val", "sens_models:loss",
               "--sparsities", "0.25,0.5,0.75", "--early-stop", "minimize:1.188", "--checkpoint", str(ck),
               "--out", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert out.read_bytes() == (NNI_DATA / "sensitivity" / "cnn_minimize.csv").read_bytes()
    assert png.exists() and json.loads(ck.read_text().splitlines()[0])["format"]
    rc = main(["sensitivity", "--model", "sens_models:build_cnn", "--val", "sens_models:loss",
               "--layers", "conv9", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "conv9" in err and "Traceback" not in err
    rc = main(["sensitivity", "--model", "sens_models:build_cnn", "--val", "sens_models:loss",
               "--early-stop", "dropped", "--out", str(out)])
    assert rc == 2 and "MODE:VALUE" in capsys.readouterr().err
