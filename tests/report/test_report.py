"""The main job end to end on the embedded default (fast settings), checked against independent recomputation."""

import dataclasses
import html
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

from prunescope import count_flops_params
from prunescope.cli import main
from prunescope.examples import digits
from prunescope.masks import load_masks
from prunescope.narrow import as_pruned, load_pruned
from prunescope.report import run_report
from prunescope.report.page import decision_sentence, latency_note
from prunescope.report.records import CandidateRecord, RecoveryStep, Summary
from prunescope.report.stages import proxy_fit

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
    # the decision, as the browser shows it, is the page's first paragraph, and one candidate is highlighted
    decision = _decision(dom)
    s = json.loads((out / "summary.json").read_text())
    assert decision.startswith("Ship candidate #") and f"{s['flops_after']:,} MACs" in decision
    assert dom.index('id="decision"') < dom.index('class="cards"') < dom.index("<h2>")
    assert dom.count('<tr class="chosen">') == 1
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
    from prunescope.sensitivity.jobs import MetricError

    with pytest.raises(MetricError, match="for the dense model"):
        run_report(digits.load_trained(), lambda m: bad, torch.ones(digits.INPUT_SIZE), tmp_path / "r",
                   progress=False, console=None)
    assert not (tmp_path / "r").exists()  # nothing written


def _decision(page: str) -> str:
    m = re.search(r'<p class="decision" id="decision">(.*?)</p>', page, re.S)
    assert m, "no decision sentence on the page"
    return html.unescape(m.group(1))


def test_page_states_the_decision_first_and_highlights_the_shipped_candidate(report):
    _, _, res, out = report
    s = res.summary
    page = (out / "report.html").read_text()
    text = _decision(page)
    assert page.index('id="decision"') < page.index('class="cards"') < page.index("<h2>")  # first, at the top
    chosen = next(i for i, c in enumerate(s["plan_candidates"]) if c["plan"] == s["plan"])
    assert text.startswith(f"Ship candidate #{chosen + 1} ({s['plan_source']}; {len(s['plan'])} of ")
    assert (f"{s['flops_after']:,} MACs, {s['flops_after'] / s['flops_before']:.1%} of the dense model's "
            f"{s['flops_before']:,} (target 60%)") in text
    assert f"accuracy {s['metric_final']:.4f} for the shipped model (shrunk, no recovery)" in text
    assert f"against {s['metric_before']:.4f} for the dense model" in text
    uni = sorted(set(s["uniform_plan"].values()))
    assert len(uni) == 1
    assert (f"the uniform plan (every set at sparsity {uni[0]:g}, {s['uniform_flops_after']:,} MACs) measures "
            f"{s['uniform_metric_measured']:.4f} against {s['metric_after_measured']:.4f} for this plan, both shrunk, "
            "before recovery") in text
    table = page[page.index('<table id="candidates">'):]
    table = table[: table.index("</table>")]
    rows = re.findall(r'<tr( class="chosen")?><td class="n">(\d+)</td>', table)
    assert len(rows) == len(s["plan_candidates"])
    assert [int(n) for mark, n in rows if mark] == [chosen + 1]  # the shipped one, and only it
    # every metric column says which model it describes
    assert "accuracy (of this row&#x27;s model)" in page and "Measured accuracy (as-pruned)" in page
    assert "MACs (shipped, shrunk)" in page


def _summary(**kw) -> Summary:
    """A finished run's summary as the page reads it (hand-made numbers): the plan 0.81 shrunk at 400 MACs, the
    uniform plan 0.77 at 410, no recovery; ``kw`` replaces fields."""
    base = Summary(
        run_id="r", model="m", metric="accuracy", flops_unit="MACs", flops_target=0.5, flops_before=1000,
        flops_after=400, params_before=100, params_after=40, metric_before=0.9, metric_after_predicted=0.8,
        metric_after_measured=0.81, metric_after_reconstructed=None, plan_metric="as-pruned",
        metric_after_calibrated=None, metric_after_finetuned=None, metric_final=0.81, recovery_steps=(),
        latency_before_ms=1.0, latency_after_ms=0.96, latency_device="cpu", measured_on="", prediction_method="",
        plan_source="neighbour: c lighter, a+b heavier", plan_candidates=(), target_met=True, note="",
        plan={"a+b": 0.5, "c": 0.25}, uniform_plan={"a+b": 0.375, "c": 0.375}, uniform_flops_after=410,
        uniform_params_after=41, uniform_latency_ms=0.97, uniform_metric_measured=0.77,
        uniform_metric_reconstructed=None, uniform_metric_final=0.77, uniform_recovery_steps=(),
        sensitivity_semantics="as pruned", excluded_sets={}, set_units={"a+b": 8, "c": 8, "d": 8}, sparsity_unit="",
        seconds=1.0, plan_order=6, prunable_sets=3, graph_ops=10)
    return dataclasses.replace(base, **kw)


def test_decision_sentence_names_the_model_behind_every_number():
    steps = (RecoveryStep("batchnorm", "BatchNorm re-estimation (3 batches)", 0.86, 0.1),
             RecoveryStep("finetune", "fine-tuning", 0.88, 2.0))
    label = "shrunk, then BatchNorm re-estimation (3 batches) and fine-tuning"
    run = _summary(recovery_steps=steps, metric_final=0.88, recovery_label=label)
    text = decision_sentence(run)
    assert text == (  # the shipped plan measured 0.81 shrunk, 0.88 after recovery; uniform 0.77 shrunk, not recovered
        "Ship candidate #7 (neighbour: c lighter, a+b heavier; 2 of 3 prunable sets pruned at sparsities "
        "0.25–0.5): 400 MACs, 40.0% of the dense model's 1,000 (target 50%), accuracy 0.8800 for the shipped "
        "model (shrunk, then BatchNorm re-estimation (3 batches) and fine-tuning) against 0.9000 for the dense "
        "model; at the same budget the uniform plan (every set at sparsity 0.375, 410 MACs) measures 0.7700 "
        "against 0.8100 for this plan, both shrunk, before recovery (0.0400 better) (the uniform model is not "
        "recovered, so the two are not compared after recovery).")
    # the uniform baseline recovered the same way (reconstruction in the report): compared after recovery
    both = decision_sentence(dataclasses.replace(run, uniform_recovery_steps=(RecoveryStep("finetune", "fine-tuning",
                                                                                           0.9, 2.0),),
                                                 uniform_metric_final=0.9))
    assert both.endswith("measures 0.9000 against 0.8800 for this plan, both after the same recovery (shrunk, then "
                         "BatchNorm re-estimation (3 batches) and fine-tuning) (0.0200 worse).")
    lower = decision_sentence(_summary(higher_is_better=False, uniform_plan=None))  # a loss; no uniform plan
    assert lower.endswith("no uniform plan meets the budget, so there is no uniform baseline.")
    missed = decision_sentence(_summary(target_met=False, note="cannot reach the FLOPs target"))
    assert missed.startswith("The FLOPs target (50% of the dense MACs) is not met (cannot reach the FLOPs target)")


def test_latency_that_does_not_move_is_explained_from_the_measurements():
    # 1.0 ms dense at 1000 MACs, 0.96 ms at 400: k = 0.04/600 ms per MAC, so 0.067 ms (7%) of the dense forward
    # scales with MACs and 0.933 ms is fixed: 93.3 µs for each of the 10 ops
    text = latency_note(_summary())
    assert text.startswith("CPU latency (median of interleaved runs on the example input): dense model 1.000 ms, "
                           "shipped model 0.960 ms (96% of dense) for 40% of the MACs. Latency does not follow the "
                           "MACs here (it does not move: within 5%)")
    assert ("puts 0.067 ms (7%) of the dense forward in work that scales with the MACs and 0.933 ms in a fixed cost "
            "of running its 10 recorded tensor ops (93.3 µs per op)") in text
    slower = latency_note(_summary(latency_after_ms=1.02))
    assert "finds no part that scales with the MACs: all 1.000 ms are in a fixed cost" in slower
    fast = latency_note(_summary(latency_after_ms=0.5))
    assert fast.endswith("Latency falls with the MACs (latency ratio / MACs ratio = 1.25).")
    assert latency_note(_summary(latency_before_ms=float("nan"))) == ""
    capped = latency_note(_summary(latency_runs=3, latency_budget_s=0.25))
    assert capped.startswith("CPU latency (median of 3 interleaved runs, timing capped at 0.25 s per model on the "
                             "example input): dense model 1.000 ms")
    assert latency_note(_summary(latency_runs=15)).startswith("CPU latency (median of 15 interleaved runs on the")


def test_proxy_fit_against_hand_computed_statistics():
    # predicted vs measured over 4 plans: |errors| 0.02, 0.01, 0.03, 0.00 -> mean 0.015; the ranks of predicted
    # (1, 2, 3, 4) against measured (1, 3, 2, 4) -> Spearman 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    rows = [CandidateRecord({}, "u", 1, 0.70, 0.72, 0.50, 0.72, 0.80), CandidateRecord({}, "k", 1, 0.80, 0.81, 0.55,
                                                                                       0.81, None),
            CandidateRecord({}, "n1", 1, 0.83, 0.80, 0.40, 0.80, 0.86), CandidateRecord({}, "n2", 1, 0.90, 0.90, 0.60,
                                                                                        0.90, None)]
    f = proxy_fit(rows, 1.0)
    assert f["proxy_candidates"] == 4 and f["proxy_prediction_mae"] == pytest.approx(0.015)
    assert f["proxy_prediction_spearman"] == pytest.approx(0.8)
    # two fine-tuned: measured 0.72 / 0.80 against final 0.80 / 0.86 -> |0.08|, |0.06| -> 0.07; as pruned 0.50 /
    # 0.40 -> 0.30, 0.46 -> 0.38; measured and final order the two alike, as pruned does not (but is not the proxy)
    assert f["proxy_final_candidates"] == 2 and f["proxy_final_mae"] == pytest.approx(0.07)
    assert f["proxy_as_pruned_final_mae"] == pytest.approx(0.38) and f["proxy_final_same_order"] is True
    assert proxy_fit(rows[:2], -1.0)["proxy_prediction_spearman"] is None  # fewer than 3 plans: not defined
    swapped = [dataclasses.replace(rows[0], finetuned=0.9), rows[2]]
    assert proxy_fit(swapped, 1.0)["proxy_final_same_order"] is False


def test_page_and_summary_say_how_well_the_proxy_predicted(report):
    _, _, res, out = report
    s = res.summary
    rows = [c for c in s["plan_candidates"] if c["predicted"] is not None]
    assert s["proxy_candidates"] == len(rows) >= 2
    assert s["proxy_prediction_mae"] == pytest.approx(
        sum(abs(c["predicted"] - c["measured"]) for c in rows) / len(rows), abs=1e-6)
    assert s["proxy_metric"] == s["plan_metric"] and s["proxy_final_candidates"] == 0  # no fine-tuning here
    page = html.unescape((out / "report.html").read_text())
    assert (f"over the {s['proxy_candidates']} candidate plans measured, the search's prediction was off the "
            f"measured {s['plan_metric']} accuracy by {s['proxy_prediction_mae']:.4f} on average") in page


def test_sensitivity_plot_stays_readable_with_many_sets():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prunescope.sensitivity.results import sensitivity_figure

    sens = {f"set {i}: layer{i}.conv +2": {0.25: 0.9 - i / 100, 0.5: 0.8 - i / 50} for i in range(24)}
    fig = sensitivity_figure(sens, baseline=0.95)
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        assert len(lines) == 25  # 24 curves and the baseline
        styles = {(matplotlib.colors.to_hex(ln.get_color()), ln.get_linestyle(), ln.get_marker()) for ln in lines[:24]}
        assert len(styles) == 24  # no two curves look alike
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()][:24] == list(sens)  # every set is named
        fig.canvas.draw()
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # beside the axes, never over a curve
    finally:
        plt.close(fig)


def test_finetune_progress_goes_through_the_report_console(tmp_path):
    """A fine-tuning function with a ``log`` parameter prints through the console the stages use, in the recover
    stage; one without it is called with the model alone."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(32, 2)).eval()
    x = torch.ones(1, 1, 6, 6)
    calls: list[str] = []

    def ft(model, log):
        calls.append(type(model).__name__)
        for k in (1, 2):
            log(f"  epoch {k}/2")

    lines: list[str] = []
    kw = dict(sparsities=[0.5], progress=False, plan_evals=2, calibrate=[torch.randn(4, 1, 6, 6)])
    run_report(net, lambda m: float(m(x).sum().detach()), x, tmp_path / "a", console=lines.append, finetune=ft, **kw)
    verify = next(i for i, t in enumerate(lines) if t.startswith("[5/6]"))
    recover = next(i for i, t in enumerate(lines) if t.startswith("[6/6]"))
    assert lines[verify + 1:recover] == ["  fine-tuning the shrunk model ...", "  epoch 1/2", "  epoch 2/2",
                                         "  fine-tuning the uniform baseline ...", "  epoch 1/2", "  epoch 2/2"]
    assert calls == ["Sequential", "Sequential"]  # the shrunk plan and the uniform baseline, not the dense model
    plain: list[nn.Module] = []
    res = run_report(net, lambda m: float(m(x).sum().detach()), x, tmp_path / "b", console=None,
                     finetune=plain.append, **kw)
    assert len(plain) == 2 and res.summary["recovery_steps"][-1]["step"] == "fine-tuning"


def test_embedded_examples_are_chosen_in_examples_not_in_the_cli():
    from prunescope.errors import ConfigError
    from prunescope.examples import EXAMPLES, load_example

    job = load_example("digits", progress=False)
    assert isinstance(job.model, digits.DigitsNet) and job.evaluate is digits.evaluate
    assert tuple(job.dummy_input.shape) == digits.INPUT_SIZE and job.model_name == EXAMPLES["digits"].title
    assert job.calibrate is digits.calibration_batches and job.finetune is digits.finetune
    no_ft = load_example("digits", finetune=False, progress=False)
    assert no_ft.calibrate is not None and no_ft.finetune is None
    bare = load_example(None, recovery=False, progress=False)
    assert bare.example.name == "digits" and bare.calibrate is None and bare.finetune is None
    with pytest.raises(ConfigError, match="unknown example 'resnet'.*digits, vit-digits"):
        load_example("resnet")


def test_every_stage_shows_progress(tmp_path, capsys):
    """With ``progress`` every stage that can take seconds on a large model draws a bar on stderr, the topology
    stage's steps by name (the shrink probe included); with ``progress=False`` nothing is drawn."""
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(32, 2)).eval()
    x = torch.ones(1, 1, 6, 6)
    score = lambda m: float(m(x).sum().detach())  # noqa: E731
    run_report(net, score, x, tmp_path / "a", sparsities=[0.5], console=None, plan_evals=2, progress=True)
    err = capsys.readouterr().err
    for shown in ("cost", "tracing", "topology", "dependency sets", "prunable sets (shrink probe)", "sensitivity",
                  "plan search", "verify", "folder"):
        assert shown in err, shown
    run_report(net, score, x, tmp_path / "b", sparsities=[0.5], console=None, plan_evals=2, progress=False)
    assert capsys.readouterr().err == ""


class _Slow(nn.Module):
    """A forward of a known 20 ms: a time budget must cut the latency runs (a fast model would never reach it)."""

    def forward(self, x):
        import time

        time.sleep(0.02)
        return x


def test_latency_timing_is_bounded_per_model_and_says_so():
    from prunescope.narrow.latency import MIN_RUNS, time_models

    # 2 models x 20 ms per round against a 10 ms per-model budget: stopped after the minimum runs, not 15
    t = time_models({"a": _Slow(), "b": _Slow()}, torch.ones(1), runs=15, warmup=1, per_model_s=0.01)
    assert (t.runs, t.capped, t.budget_s) == (MIN_RUNS, True, 0.02)
    assert 19 <= t.ms["a"] <= 60 and 19 <= t.ms["b"] <= 60
    full = time_models({"a": nn.Identity()}, torch.ones(1), runs=5, warmup=1, per_model_s=10.0)
    assert (full.runs, full.capped) == (5, False)


def test_sweep_reuses_the_prunable_sets_the_topology_computed(monkeypatch):
    # the report's prunable sets handed to the sweep give the sets, units and exclusions it computes itself
    from prunescope.errors import ConfigError
    from prunescope.graph import trace
    from prunescope.report.stages import report_layer_types, report_prunable
    from prunescope.sensitivity import SensitivityAnalysis

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    x = torch.randn(1, 3, 8, 8)
    g = trace(net, x)
    kw = dict(sparsities=[0.5], layer_types=report_layer_types(), group_dependencies=True, dummy_input=x,
              progress=False, as_pruned=True, graph=g)
    own = SensitivityAnalysis(net, lambda m: 0.0, **kw)
    computed = report_prunable(net, g, x)

    def again(*a, **k):
        raise AssertionError("the prunable sets were computed again")

    monkeypatch.setattr("prunescope.sensitivity.analysis.prunable_sets", again)
    given = SensitivityAnalysis(net, lambda m: 0.0, prunable=computed, **kw)
    assert given.groups == own.groups and given.units == own.units and given.chunks == own.chunks
    # the two convolutions around the grouped one are removed group by group, the output layer is left alone
    assert set(own.chunks) == {"0", "2"} and own.excluded == {"8": "its channels reach the model output"}
    assert list(own.groups) == ["0", "2", "4", "6"]
    # computed for every report layer, handed to a conv-only sweep: refused
    with pytest.raises(ConfigError, match="'6', which is not a target layer"):
        SensitivityAnalysis(net, lambda m: 0.0, prunable=computed, **{**kw, "layer_types": (nn.Conv2d,)})


def test_plan_equal_to_the_uniform_one_is_shrunk_once(tmp_path, monkeypatch):
    # one prunable set and one sparsity: the uniform plan is the only plan; the baseline is the same shrunk model,
    # built once (shrink called once in the whole report) and a copy of its own (recovering one leaves the other)
    from prunescope.report import stages

    calls = []
    real = stages.shrink

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(stages, "shrink", counted)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 3)).eval()
    x = torch.randn(1, 1, 8, 8)
    res = run_report(net, lambda m: float(m(x).sum().detach()), x, str(tmp_path / "r"), sparsities=[0.5],
                     flops_target=0.5, progress=False, console=None, plan_evals=2)
    s, v = res.summary, res.stages.verification
    assert s["plan"] == s["uniform_plan"] == {"0": 0.5} and len(calls) == 1
    assert (s["uniform_flops_after"], s["uniform_metric_measured"], s["uniform_latency_ms"]) == \
        (s["flops_after"], s["metric_after_measured"], s["latency_after_ms"])
    assert v.baseline.model is not v.shipped.model and v.shipped.model[0].out_channels == 4
    assert torch.equal(v.baseline.model[0].weight, v.shipped.model[0].weight)


@pytest.mark.parametrize("fails", [True, False])
def test_plan_measurements_give_the_model_back_exactly_when_user_code_changes_it_or_raises(fails):
    # the as-pruned masks are applied inside the lending: what val_func changes (a masked layer's weights through
    # .data, another layer's bias, the training flags) comes back bit for bit, also when it raises mid-measure
    from prunescope.report import stages as S
    from prunescope.report.context import Context

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 1, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ctx = Context(net, lambda m: float(m(x).sum().detach()), x, console=None, progress=False)
    d = S.dense_cost(ctx)
    t = S.topology(ctx, d)
    pm = S.plan_masks(ctx, d, t)
    sw = S.sweep(ctx, d, t, [0.25, 0.5], None, pm)
    seen = []

    def meddle(m):
        seen.append(bool((m[0].weight == 0).all(dim=(1, 2, 3)).any()))  # measured as pruned: rows zeroed
        m[0].weight.data.add_(1.0)
        m[2].bias.data.zero_()
        m.train()
        if fails:
            raise RuntimeError("user code failed")
        return float(m(x).sum().detach())

    ctx.val_func = meddle
    if fails:
        with pytest.raises(RuntimeError, match="user code failed"):
            S.choose(ctx, d, t, sw, pm, 4)
    else:
        S.choose(ctx, d, t, sw, pm, 4)
    assert seen and any(seen)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m.training for m in net.modules())


def test_a_recovery_step_that_lowers_the_metric_is_undone_and_the_model_before_it_ships(tmp_path):
    """Fine-tuning that makes the metric worse (here: it zeroes every weight) is measured, reported as not kept,
    and undone: the file the report writes holds the model before it, whose metric is the one reported as final.
    One that helps (doubles the output the metric grows with) is kept. The uniform baseline follows the same rule."""
    import copy

    from prunescope import load_pruned

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(32, 2)).eval()
    x = torch.randn(4, 1, 6, 6)

    def metric(m):
        with torch.no_grad():
            return float(m(x).abs().sum())

    def worse(model):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()

    def better(model):
        with torch.no_grad():
            model[-1].weight.mul_(2)
            model[-1].bias.mul_(2)

    kw = dict(sparsities=[0.5], progress=False, plan_evals=2, calibrate=[torch.randn(4, 1, 6, 6)], console=None)
    res = run_report(net, metric, x, tmp_path / "bad", finetune=worse, **kw)
    bad = res.summary
    steps = bad["recovery_steps"]
    assert [s["kept"] for s in steps] == [True, False] and steps[-1]["metric"] == 0.0
    assert bad["metric_final"] == steps[0]["metric"] > 0  # the reconstructed model ships
    assert res.stages.summary.recovery_label.endswith("(fine-tuning undone: it lowered the metric)")
    shipped = load_pruned(copy.deepcopy(net), tmp_path / "bad" / "pruned.pt")
    assert metric(shipped) == pytest.approx(bad["metric_final"], rel=1e-6)
    assert [s["kept"] for s in bad["uniform_recovery_steps"]] == [True, False]
    assert bad["uniform_metric_final"] == bad["uniform_recovery_steps"][0]["metric"]
    good = run_report(net, metric, x, tmp_path / "good", finetune=better, **kw).summary
    assert [s["kept"] for s in good["recovery_steps"]] == [True, True]
    assert good["metric_final"] == pytest.approx(2 * good["recovery_steps"][0]["metric"], rel=1e-5)
    shipped = load_pruned(copy.deepcopy(net), tmp_path / "good" / "pruned.pt")
    assert metric(shipped) == pytest.approx(good["metric_final"], rel=1e-6)
