"""Checkpoint: resume mid-layer equals an uninterrupted run; foreign checkpoints are refused."""

import json

import pytest
import sens_models as M
from sens_helpers import Counting, state_bytes

from prunescope.errors import ConfigError
from prunescope.sensitivity import SensitivityAnalysis


def run(ck, val, **kw):
    model = M.build_cnn()
    sa = SensitivityAnalysis(model, val, sparsities=[0.25, 0.5, 0.75], checkpoint=ck, progress=False, **kw)
    return model, sa, sa.analysis([model])


@pytest.mark.parametrize("fail_at", [2, 3, 5, 6])
def test_resume_mid_layer_equals_uninterrupted(fail_at, tmp_path, one_thread):
    _, _, ref = run(None, M.accuracy, early_stop_mode="maximize", early_stop_value=0.651)
    ck = tmp_path / "ck.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(ck, Counting(M.accuracy, fail_at=fail_at, exc=KeyboardInterrupt()),
            early_stop_mode="maximize", early_stop_value=0.651)
    val = Counting(M.accuracy)
    model, sa, res = run(ck, val, early_stop_mode="maximize", early_stop_value=0.651)
    assert res == ref and list(res) == list(ref)
    total = 1 + sum(len(v) for v in ref.values())
    assert val.calls == total - (fail_at - 1)  # only the unfinished evaluations were run again
    val = Counting(M.accuracy)
    _, sa2, res2 = run(ck, val, early_stop_mode="maximize", early_stop_value=0.651)
    assert res2 == ref and val.calls == 0


def test_torn_last_line_is_ignored(tmp_path, one_thread):
    ck = tmp_path / "ck.jsonl"
    _, _, ref = run(ck, M.loss)
    data = ck.read_bytes().splitlines(keepends=True)
    ck.write_bytes(b"".join(data[:-1]) + data[-1][:10])  # crash in the middle of the last write
    val = Counting(M.loss)
    _, _, res = run(ck, val)
    assert res == ref and val.calls == 1


@pytest.mark.parametrize("change, what", [
    ({"prune_type": "l2"}, "prune_type"),
    ({"sparsities": [0.25, 0.5]}, "sparsities"),
    ({"early_stop_mode": "dropped", "early_stop_value": 0.1}, "early_stop"),
    ("weights", "model weights"),
])
def test_foreign_checkpoint_refused(change, what, tmp_path, one_thread):
    ck = tmp_path / "ck.jsonl"
    run(ck, M.loss)
    model = M.build_cnn()
    kw = {"sparsities": [0.25, 0.5, 0.75]}
    if change == "weights":
        model.conv3.weight.data[0, 0, 0, 0] += 1
    else:
        kw.update(change)
    val = Counting(M.loss)
    sa = SensitivityAnalysis(model, val, checkpoint=ck, progress=False, **kw)
    with pytest.raises(ConfigError, match=f"different model or configuration.*{what}"):
        sa.analysis([model])
    assert val.calls == 0


def test_checkpoint_is_json_lines(tmp_path, one_thread):
    ck = tmp_path / "ck.jsonl"
    model, _, res = run(ck, M.loss)
    recs = [json.loads(x) for x in ck.read_text().splitlines()]
    assert recs[0]["format"] == "prunescope-sensitivity-checkpoint"
    assert recs[2] == {"layer": "conv1", "i": 0, "sparsity": 0.25, "value": res["conv1"][0.25]}
    assert state_bytes(model) == state_bytes(M.build_cnn())
