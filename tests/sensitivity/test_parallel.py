"""workers=N and executor= (a real Dask LocalCluster) give exactly the serial results."""

import json
import os
import sys

import pytest
import sens_models as M
import torch
from sens_helpers import BadAt, Counting, RaiseAt, state_bytes

from prunescope.errors import ConfigError
from prunescope.sensitivity import MetricError, SensitivityAnalysis

KW = {"sparsities": [0.25, 0.5, 0.75], "early_stop_mode": "minimize", "early_stop_value": 1.188}


def serial():
    model = M.build_cnn()
    sa = SensitivityAnalysis(model, M.loss, progress=False, **KW)
    return sa.analysis([model]), sa.ori_metric


def test_workers_equal_serial(tmp_path, one_thread):
    ref, ori = serial()
    model = M.build_cnn()
    before = state_bytes(model)
    ck = tmp_path / "ck.jsonl"
    sa = SensitivityAnalysis(model, M.loss, workers=2, checkpoint=ck, progress=False, **KW)
    res = sa.analysis(val_args=[model])
    assert res == ref and list(res) == list(ref) and sa.ori_metric == ori
    assert state_bytes(model) == before
    # everything is in the checkpoint: a rerun evaluates nothing
    val = Counting(M.loss)
    model = M.build_cnn()
    sa = SensitivityAnalysis(model, val, checkpoint=ck, progress=False, **KW)
    assert sa.analysis([model]) == ref and val.calls == 0


def test_worker_error_keeps_finished_results(tmp_path, one_thread):
    model = M.build_cnn()
    ref = SensitivityAnalysis(M.build_cnn(), M.loss, progress=False, sparsities=[0.25, 0.5, 0.75])
    ref.analysis([ref.model])
    val = BadAt(M.loss, zeros=(0, 8, 0))  # conv2 at 0.5 (8 of 16 filters) returns NaN
    ck = tmp_path / "ck.jsonl"
    sa = SensitivityAnalysis(model, val, workers=2, checkpoint=ck, progress=False, sparsities=[0.25, 0.5, 0.75])
    with pytest.raises(MetricError, match="'conv2' at sparsity 0.5"):
        sa.analysis([model])
    # header first; the baseline record may land anywhere (it is evaluated while workers already run)
    lines = [json.loads(x) for x in ck.read_text().splitlines()[1:]]
    assert sum("baseline" in r for r in lines) == 1
    recs = [r for r in lines if "baseline" not in r]
    assert recs, "finished evaluations must be in the checkpoint"
    for r in recs:  # every finished value is the serial one
        assert ref.sensitivities[r["layer"]][r["sparsity"]] == r["value"]
    for k, v in sa.sensitivities.items():
        assert v == {s: ref.sensitivities[k][s] for s in v}


def test_unpicklable_arguments_rejected_up_front():
    model = M.build_cnn()
    val = Counting(M.loss)
    sa = SensitivityAnalysis(model, val, workers=2, progress=False)
    import threading

    with pytest.raises(ConfigError, match="cannot send val_args to worker processes"):
        sa.analysis([model, threading.Lock()])
    assert val.calls == 0


@pytest.mark.slow
def test_dask_local_cluster_equals_serial(one_thread):
    distributed = pytest.importorskip("distributed")
    ref, _ = serial()
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        model = M.build_cnn()
        sa = SensitivityAnalysis(model, M.loss, executor=client.get_executor(), progress=False, **KW)
        res = sa.analysis(val_args=[model])
    assert res == ref and list(res) == list(ref)
    assert torch.get_num_threads() == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_in_worker_mode_stops_workers_and_keeps_model(tmp_path, one_thread):
    def children() -> set[int]:
        out = set()
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                out.add(int(d))
        return out

    before_children = children()
    model = M.build_cnn()
    before = state_bytes(model)
    val = RaiseAt(M.loss, zeros=(0, 8, 0), exc=KeyboardInterrupt())  # Ctrl-C while conv2 is at 0.5
    ck = tmp_path / "ck.jsonl"
    sa = SensitivityAnalysis(model, val, workers=2, checkpoint=ck, progress=False, sparsities=[0.25, 0.5, 0.75])
    with pytest.raises(KeyboardInterrupt):
        sa.analysis([model])
    assert state_bytes(model) == before and not model.training
    assert children() - before_children == set()  # the pool's processes are gone
    ref = SensitivityAnalysis(M.build_cnn(), M.loss, progress=False, sparsities=[0.25, 0.5, 0.75])
    ref.analysis([ref.model])
    for r in map(json.loads, ck.read_text().splitlines()[1:]):  # what landed before the interrupt is right
        if "layer" in r:
            assert ref.sensitivities[r["layer"]][r["sparsity"]] == r["value"]
