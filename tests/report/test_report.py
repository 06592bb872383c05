"""The main job end to end on the embedded default (fast settings), checked against independent recomputation."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from prunescope import count_flops_params
from prunescope.cli import main
from prunescope.examples import digits
from prunescope.masks import load_masks
from prunescope.report import run_report
from prunescope.shrink import as_pruned, load_pruned

FILES = ["report.html", "sensitivity.csv", "sensitivity.png", "macs_per_layer.png", "flops.csv", "dependencies.csv",
         "plan.json", "masks.pth", "pruned.pt", "summary.json"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    model = digits.load_trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = run_report(model, digits.evaluate, torch.ones(digits.INPUT_SIZE), out, flops_target=0.6, plan_evals=4,
                     sparsities=[0.25, 0.5, 0.75], progress=False, console=None, metric_name="accuracy")
    return model, before, res, out


def test_all_files_and_summary(report):
    model, before, res, out = report
    for f in FILES:
        assert (out / f).stat().st_size > 0, f
    s = json.loads((out / "summary.json").read_text())
    for key in ("flops_before", "flops_after", "params_before", "params_after", "metric_before",
                "metric_after_predicted", "metric_after_measured"):
        assert key in s
    assert s["target_met"] and s["flops_after"] <= 0.6 * s["flops_before"]
    assert s["params_after"] < s["params_before"]


def test_numbers_recomputed_independently(report):
    model, before, res, out = report
    s = res.summary
    x = torch.ones(digits.INPUT_SIZE)
    masks = load_masks(out / "masks.pth")
    dense = count_flops_params(model, x, verbose=False)
    eff = count_flops_params(model, x, masks=masks, effective=True, verbose=False)
    assert (s["flops_before"], s["params_before"]) == dense[:2]
    assert (s["flops_after"], s["params_after"]) == eff[:2]
    assert s["metric_before"] == digits.evaluate(model)
    # the measured metric is the shipped (shrunk) model's: reload it from pruned.pt into a fresh DigitsNet
    small = load_pruned(digits.DigitsNet(), out / "pruned.pt")
    assert s["metric_after_measured"] == digits.evaluate(small)
    assert (s["flops_after"], s["params_after"]) == count_flops_params(small, x, verbose=False)[:2]
    # ... which is the masked model with as-pruned semantics, not the NNI-masked one
    with as_pruned(model, masks, x):
        assert s["metric_after_measured"] == digits.evaluate(model)
    assert s["latency_before_ms"] > 0 and s["latency_after_ms"] > 0
    # the model is left exactly as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_is_config_list_and_matches_masks(report):
    model, before, res, out = report
    plan = json.loads((out / "plan.json").read_text())
    masks = load_masks(out / "masks.pth")
    assert plan and all(set(e) == {"sparsity", "op_names"} for e in plan)
    for entry in plan:
        kept = [int(masks[n]["weight"].flatten(1).any(1).sum()) for n in entry["op_names"]]
        assert len(set(kept)) == 1  # the same channel count in every member of a dependency set
        # the same channels, too
        rows = [masks[n]["weight"].flatten(1).any(1) for n in entry["op_names"]]
        assert all(torch.equal(rows[0], r) for r in rows)
    assert "fc2" not in {n for e in plan for n in e["op_names"]}  # the classifier is never pruned


def test_infeasible_target_says_why(tmp_path):
    model = digits.load_trained()
    res = run_report(model, digits.evaluate, torch.ones(digits.INPUT_SIZE), tmp_path, flops_target=0.02,
                     sparsities=[0.25], progress=False, console=None)
    assert not res.summary["target_met"]
    assert "cannot reach the FLOPs target 2%" in res.summary["note"]


def test_cli_main_job(tmp_path, capsys):
    code = main(["report", "--out", str(tmp_path), "--sparsities", "0.3,0.6", "--flops-target", "0.7",
                 "--plan-evals", "4", "--no-recovery"])
    out = capsys.readouterr().out
    assert code == 0
    assert "[5/6] verify" in out and "[6/6] recover" in out and "report:" in out
    assert (tmp_path / "report.html").exists()


def test_cli_bad_input(capsys, tmp_path):
    assert main(["report", "resnet18", "--out", str(tmp_path)]) == 2
    assert "MODEL needs --input-size and --val" in capsys.readouterr().err


def test_cache_roundtrip(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = digits.load_trained()
    files = os.listdir(tmp_path / "prunescope")
    assert len(files) == 1 and files[0].endswith(".pt")
    # a first run says that it trains, with a line per epoch, instead of silence
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("training the digitsnet example on scikit-learn's digits (first run only")
    assert [line.split()[1] for line in err if line.strip().startswith("epoch")] == [f"{k}/5" for k in range(1, 6)]
    assert err[-1].startswith("trained in ")
    b = digits.load_trained()
    assert capsys.readouterr().err == ""  # loaded from the cache: nothing to say
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert digits.evaluate(b) > 0.9  # a real model on real held-out data


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    _, _, _, out = report
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (out / "report.html").as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    for table in ("plan", "recovery", "candidates", "sensitivity", "dependencies", "flops"):
        assert f'<table id="{table}">' in dom
    assert dom.count('src="data:image/png;base64,') == 2  # MACs per layer, sensitivity curves
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600", url],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a rendered page with a plot, not a blank one


def test_train_mode_model_comes_back_exactly(tmp_path):
    model = digits.load_trained().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_report(model, digits.evaluate, torch.ones(digits.INPUT_SIZE), tmp_path / "r", flops_target=0.8,
               sparsities=[0.5], progress=False, console=None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics included
    assert all(m.training for m in model.modules())


def test_folder_is_replaced_as_a_whole_and_foreign_folders_refused(tmp_path):
    from prunescope.errors import ConfigError

    out = tmp_path / "r"
    kw = dict(flops_target=0.8, sparsities=[0.5], progress=False, console=None, plan_evals=2)
    first = run_report(digits.load_trained(), digits.evaluate, torch.ones(digits.INPUT_SIZE), out, **kw)
    (tmp_path / ".r.tmp-999999999-x").mkdir()  # left by a killed run (no such PID)
    second = run_report(digits.load_trained(), digits.evaluate, torch.ones(digits.INPUT_SIZE), out, **kw)
    assert first.summary["run_id"] != second.summary["run_id"]
    assert json.loads((out / "summary.json").read_text())["run_id"] == second.summary["run_id"]
    assert (out / ".prunescope-report").read_text().strip() == second.summary["run_id"]
    assert second.summary["run_id"] in (out / "report.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary folder left behind
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="other files"):
        run_report(digits.load_trained(), digits.evaluate, torch.ones(digits.INPUT_SIZE), mine, **kw)
    assert (mine / "notes.txt").read_text() == "keep me"
    old = tmp_path / "old"  # a report folder written before the marker existed is replaced
    old.mkdir()
    (old / "summary.json").write_text("{}")
    (old / "report.html").write_text("<html></html>")
    run_report(digits.load_trained(), digits.evaluate, torch.ones(digits.INPUT_SIZE), old, **kw)
    assert (old / ".prunescope-report").exists() and (old / "pruned.pt").exists()


@pytest.mark.parametrize("bad", ["0.9", True, float("nan"), torch.ones(2)])
def test_val_func_returning_a_non_number_is_refused_naming_the_evaluation(tmp_path, bad):
    from prunescope.sensitivity.engine import MetricError

    with pytest.raises(MetricError, match="for the dense model"):
        run_report(digits.load_trained(), lambda m: bad, torch.ones(digits.INPUT_SIZE), tmp_path / "r",
                   progress=False, console=None)
    assert not (tmp_path / "r").exists()  # nothing written
