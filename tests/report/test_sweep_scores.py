"""The report's sweep measures what ships (issue 17.3) and ranks units by a chosen score (issue 17.2): every sweep
point, when reconstructing, is the reconstructed model of that set alone; a data-aware score gives the masks that
``unit_masks`` gives, in the sweep and in the shipped model; without calibration nothing changes. Every value is
re-measured here on models built by hand."""

import warnings

import pytest
import torch

from prunescope.cli import main
from prunescope.errors import ConfigError
from prunescope.examples import digits
from prunescope.masks import load_masks
from prunescope.masks.pruners import group_masks
from prunescope.narrow import as_pruned, reconstruct, unit_masks
from prunescope.report import run_report
from prunescope.sensitivity import load_sensitivity

X = torch.ones(digits.INPUT_SIZE)


def first_inputs(n):
    out, k = [], 0
    for b in digits.calibration_batches():
        if k >= n:
            break
        out.append(b)
        k += b.shape[0]
    return out


def test_reconstructed_sweep_point_is_the_set_alone_reconstructed(tmp_path):
    model = digits.load_trained()
    batches = first_inputs(128)
    res = run_report(model, digits.evaluate, X, tmp_path, flops_target=0.6, sparsities=[0.5], plan_evals=2,
                     progress=False, console=None, calibrate=batches, calibration_samples=128, score="l1")
    s, sweep = res.summary, res.stages.sweep
    assert (s["sweep_metric"], s["unit_score"], s["sensitivity_semantics"]) == ("reconstructed", "l1",
                                                                                 "reconstructed")
    assert sweep.analysis is None and len(sweep.curves) == 4
    mods = dict(model.named_modules())
    for name, curve in sweep.curves.items():  # by hand: the set's L1 masks, shrunk + refit, evaluated
        members = name.split("+")
        masks = dict(zip(members, group_masks([mods[m] for m in members], 0.5, "l1")))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = reconstruct(model, masks, X, batches)
        assert curve[0.5] == digits.evaluate(ref), name
    assert load_sensitivity(tmp_path / "sensitivity.csv") == {k: dict(v) for k, v in sweep.curves.items()}
    page = (tmp_path / "report.html").read_text()
    assert "reconstructed (the shrunk model with the layers that lost channels refit" in page


def test_activation_score_is_swept_and_shipped_with_the_same_masks(tmp_path):
    model = digits.load_trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = first_inputs(128)
    res = run_report(model, digits.evaluate, X, tmp_path, flops_target=0.6, sparsities=[0.5], plan_evals=2,
                     progress=False, console=None, calibrate=batches, calibration_samples=128,
                     score="activation", reconstruct_sweep=False)
    s, sweep = res.summary, res.stages.sweep
    assert (s["sweep_metric"], s["unit_score"], s["plan_metric"]) == ("as-pruned", "activation", "reconstructed")

    def reference(name, sp):  # unit_masks' activation-weighted choice of the set's units
        return unit_masks(model, X, sp, layers=[name.split("+")[0]], prune_type="activation", calibration=batches)

    for name, curve in sweep.curves.items():
        ref = reference(name, 0.5)
        assert sorted(ref) == sorted(name.split("+"))
        with as_pruned(model, ref, X):
            assert curve[0.5] == digits.evaluate(model), name
    shipped = load_masks(tmp_path / "masks.pth")
    want = {}
    for name, sp in s["plan"].items():
        want.update(reference(name, sp))
    assert sorted(shipped) == sorted(want)
    for k, m in want.items():
        assert torch.equal(shipped[k]["weight"].bool(), m["weight"].bool()), k
    # activation masks differ from L1 masks somewhere (else this test could not tell the scores apart)
    mods = dict(model.named_modules())
    l1 = {k: group_masks([mods[m] for m in k.split("+")], 0.5, "l1") for k in sweep.curves}
    assert any(not torch.equal(l1[k][0]["weight"], reference(k, 0.5)[k.split("+")[0]]["weight"]) for k in l1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model comes back


def test_a_data_aware_score_without_calibration_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--score activation ranks units by what removing them costs on "
                                          "calibration inputs, and there are none"):
        run_report(digits.load_trained(), digits.evaluate, X, tmp_path / "a", score="activation",
                   progress=False, console=None)
    with pytest.raises(ConfigError, match="unknown unit score 'l3'"):
        run_report(digits.load_trained(), digits.evaluate, X, tmp_path / "b", score="l3", calibrate=[X],
                   progress=False, console=None)
    assert main(["report", "--no-recovery", "--score", "reconstruction", "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--score reconstruction ranks units by what removing them costs on calibration inputs" in err
    assert "--no-recovery drops the example's" in err
    assert not (tmp_path / "c").exists()
