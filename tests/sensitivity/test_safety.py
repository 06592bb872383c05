"""The user's model is never lost: restore after errors and Ctrl-C, bad input rejected up front."""

import math

import numpy as np
import pytest
import sens_models as M
import torch
from sens_helpers import Counting, hook_counts, modes, state_bytes
from torch import nn

from prunescope.errors import ConfigError
from prunescope.sensitivity import MetricError, ModelStateError, SensitivityAnalysis


def make(val, **kw):
    model = M.build_cnn()
    kw.setdefault("progress", False)
    return model, SensitivityAnalysis(model, val, sparsities=[0.25, 0.5, 0.75], **kw)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_restored_after_exception_inside_val_func(exc, one_thread):
    val = Counting(M.loss, fail_at=6, exc=exc)  # baseline + conv1 x3 + conv2 at 0.25 ok, 0.5 raises
    model, sa = make(val)
    before, mode_before, hooks_before = state_bytes(model), modes(model), hook_counts(model)
    with pytest.raises(type(exc)):
        sa.analysis([model])
    assert state_bytes(model) == before
    assert modes(model) == mode_before and not model.training
    assert hook_counts(model) == hooks_before
    assert list(sa.sensitivities["conv1"]) == [0.25, 0.5, 0.75]
    assert list(sa.sensitivities["conv2"]) == [0.25]


def test_buffers_restored_when_val_func_trains_batchnorm(one_thread):
    def val(m):
        m.train()
        with torch.no_grad():
            m(torch.randn(4, 1, 12, 12))
        m.eval()
        return M.loss(m)

    model, sa = make(val)
    before = state_bytes(model)
    sa.analysis([model])
    assert state_bytes(model) == before


def test_training_other_layers_is_an_error(one_thread):
    def val(m):
        with torch.no_grad():
            m.fc.weight.add_(1.0)
        return 1.0

    model, sa = make(val)
    with pytest.raises(ModelStateError, match="fc.weight"):
        sa.analysis([model])


@pytest.mark.parametrize("bad", [float("nan"), math.inf, "0.5", None, torch.ones(2)])
def test_bad_metric_names_layer_and_sparsity(bad, tmp_path, one_thread):
    ck = tmp_path / "ck.jsonl"
    val = Counting(M.loss, fail_at=3, returns=bad)  # baseline, conv1@0.25, conv1@0.5 -> bad
    model, sa = make(val, checkpoint=ck)
    before = state_bytes(model)
    with pytest.raises(MetricError, match=r"layer 'conv1' at sparsity 0.5"):
        sa.analysis([model])
    assert state_bytes(model) == before
    lines = ck.read_text().splitlines()
    assert len(lines) == 3  # header, baseline, conv1@0.25 kept


def test_metric_types_coerced(one_thread):
    for ret in (torch.tensor(0.5), np.float32(0.5), np.float64(0.5), 1, np.array(0.5)):
        model, sa = make(lambda m, r=ret: r)
        res = sa.analysis([model])
        assert type(res["conv1"][0.25]) is float and type(sa.ori_metric) is float


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsities": [0.0, 0.5]}, r"sparsity 0.0 is outside \(0, 1\)"),
    ({"sparsities": [0.5, 1.0]}, r"sparsity 1.0 is outside"),
    ({"sparsities": [0.001]}, r"rounds to 0.0"),
    ({"sparsities": [float("nan")]}, "finite number"),
    ({"sparsities": []}, "empty"),
    ({"prune_type": "fine-grained"}, "unknown prune_type 'fine-grained'"),
    ({"early_stop_mode": "bogus", "early_stop_value": 1}, "unknown early_stop_mode 'bogus'"),
    ({"early_stop_mode": "dropped"}, "needs an early_stop_value"),
    ({"layer_types": (nn.BatchNorm2d,)}, "cannot prune BatchNorm2d"),
    ({"device": "cpu"}, "needs workers"),
    ({"workers": -1}, "non-negative"),
])
def test_bad_input_rejected_before_any_evaluation(kwargs, match):
    val = Counting(M.loss)
    with pytest.raises(ConfigError, match=match):
        SensitivityAnalysis(M.build_cnn(), val, **kwargs)
    assert val.calls == 0


def test_unknown_specified_layers_rejected_before_any_evaluation():
    val = Counting(M.loss)
    model, sa = make(val)
    with pytest.raises(ConfigError, match=r"'nope' \(no such module\).*'fc' \(not a target"):
        sa.analysis([model], specified_layers=["conv1", "nope", "fc"])
    assert val.calls == 0


def test_update_already_pruned_changes_real_sparsity(one_thread):
    model, sa = make(M.loss)
    sa.update_already_pruned("conv2", 0.5)
    res = sa.analysis([model], specified_layers=["conv2"])
    model2, sa2 = make(M.loss)
    sa2.sparsities = [0.63]  # (1 - 0.5) * 0.25 + 0.5 = 0.625 -> int(16 * 0.625) = 10 filters
    ref = sa2.analysis([model2], specified_layers=["conv2"])
    assert res["conv2"][0.25] == ref["conv2"][0.63]
    with pytest.raises(ConfigError):
        sa.update_already_pruned("fc", 0.1)
    assert sa.layers_count == 3 and list(sa.target_layer) == ["conv1", "conv2", "conv3"]
