"""Sensitivity at scale (issue 11): one evaluation per job, any completion order, Dask on separate processes,
a worker killed mid-sweep, the sweeping process SIGKILLed and resumed; every result against NNI 2.10.1's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import pytest
import sens_models as M
from sens_helpers import NNI_DATA, Slow, state_bytes

from prunescope.sensitivity import SensitivityAnalysis

Q = [0.25, 0.5, 0.75]
FILTERS = {"conv1": 8, "conv2": 16, "conv3": 12}  # SmallCNN's output channels


def nni(name: str) -> dict:
    return json.loads((NNI_DATA / "sensitivity" / f"{name}.json").read_text())


def reprs(sens: dict) -> dict:
    return {k: [[repr(s), repr(v)] for s, v in r.items()] for k, r in sens.items()}


def dense_values(metric: str) -> dict:
    """Every (layer, sparsity) value without early stop, serially: the reference for speculative records."""
    model = M.build_cnn()
    sa = SensitivityAnalysis(model, getattr(M, metric), sparsities=Q, progress=False)
    return sa.analysis([model])


class ShuffledExecutor(Executor):
    """Runs submitted calls on one background thread, each time a random one of those waiting (seeded):
    evaluations finish in an order unrelated to the order they were submitted in."""

    def __init__(self, seed: int, max_workers: int = 3) -> None:
        self._max_workers = max_workers
        self._rng = random.Random(seed)
        self._pending: list[tuple] = []
        self._cv = threading.Condition()
        self._stop = False
        self.order: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        with self._cv:
            self._pending.append((fut, fn, args, kwargs))
            self._cv.notify()
        return fut

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if not self._pending:
                    return
                self._cv.wait(0.005)  # let the parent fill its window, then pick any
                fut, fn, args, kwargs = self._pending.pop(self._rng.randrange(len(self._pending)))
            if fut.set_running_or_notify_cancel():
                self.order.append((args[0].key, args[0].index))
                try:
                    fut.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001
                    fut.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(10)


@pytest.mark.parametrize("name", ["cnn_minimize", "cnn_maximize", "cnn_dropped", "cnn_raised", "cnn_strict"])
@pytest.mark.parametrize("seed", [0, 1])
def test_any_completion_order_gives_nni_results(name, seed, tmp_path, one_thread):
    ref = nni(name)
    cfg = ref["config"]
    model = M.build_cnn()
    before = state_bytes(model)
    ex = ShuffledExecutor(seed)
    ck = tmp_path / "ck.jsonl"
    try:
        sa = SensitivityAnalysis(model, getattr(M, cfg["val"]), sparsities=cfg["sparsities"], executor=ex,
                                 early_stop_mode=cfg["early_stop_mode"], early_stop_value=cfg["early_stop_value"],
                                 checkpoint=ck, progress=False)
        res = sa.analysis([model])
    finally:
        ex.shutdown()
    assert reprs(res) == ref["results"] and list(res) == list(ref["results"])
    assert repr(sa.ori_metric) == ref["ori_metrics"][0]
    sa.export(tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_bytes() == (NNI_DATA / "sensitivity" / f"{name}.csv").read_bytes()
    assert state_bytes(model) == before
    # every finished evaluation is in the checkpoint, speculative ones included, each with its true value
    dense = dense_values(cfg["val"])
    recs = [json.loads(x) for x in ck.read_text().splitlines()[1:]]
    evals = [(r["layer"], r["i"]) for r in recs if "layer" in r]
    assert len(evals) == len(set(evals)) == len(ex.order) - 1
    assert all(dense[r["layer"]][r["sparsity"]] == r["value"] for r in recs if "layer" in r)


def test_thread_pool_executor_gives_each_thread_its_model(tmp_path, one_thread):
    ref = nni("cnn_default_l2_loss")
    model = M.build_cnn()
    before = state_bytes(model)
    with ThreadPoolExecutor(3) as ex:
        sa = SensitivityAnalysis(model, M.loss, prune_type="l2", executor=ex, progress=False)
        res = sa.analysis([model])
    assert reprs(res) == ref["results"]
    assert state_bytes(model) == before


# -- Dask: scheduler and workers as separate processes on 127.0.0.1 -------------------------------------
@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    pytest.importorskip("distributed")
    from dask_loopback import loopback_cluster

    with loopback_cluster(3, tmp_path_factory.mktemp("dask")) as (cluster, client):
        yield cluster, client


@pytest.mark.slow
def test_dask_separate_processes_early_stop_equals_nni(dask_cluster, one_thread):
    _, client = dask_cluster
    ref = nni("cnn_raised")
    model = M.build_cnn()
    sa = SensitivityAnalysis(model, Slow("loss", 0.02), sparsities=Q, early_stop_mode="raised",
                             early_stop_value=0.001, executor=client.get_executor(), progress=False)
    assert reprs(sa.analysis([model])) == ref["results"]


@pytest.mark.slow
def test_dask_worker_killed_mid_sweep(dask_cluster, tmp_path, one_thread):
    cluster, client = dask_cluster
    ref = nni("cnn_default_l1")
    ck = tmp_path / "ck.jsonl"
    model = M.build_cnn()
    sa = SensitivityAnalysis(model, Slow("accuracy", 0.15), checkpoint=ck, executor=client.get_executor(),
                             progress=False)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(res=sa.analysis([model])), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while (not ck.exists() or len(ck.read_text().splitlines()) < 6) and time.monotonic() < deadline:  # 1 + 1 + 4
        time.sleep(0.01)
    victim = cluster.workers[0]
    os.kill(victim.pid, signal.SIGKILL)  # every worker has an evaluation running (and one queued)
    t.join(60)
    assert not t.is_alive(), "the sweep did not finish after a worker died"
    assert victim.wait(10) == -signal.SIGKILL
    assert reprs(out["res"]) == ref["results"]
    recs = [json.loads(x) for x in ck.read_text().splitlines()[1:]]
    evals = [(r["layer"], r["i"]) for r in recs if "layer" in r]
    assert sum("baseline" in r for r in recs) == 1
    assert sorted(evals) == sorted((k, i) for k in FILTERS for i in range(9))  # each once, none lost


# -- the sweeping process SIGKILLed, resumed ------------------------------------------------------------
SCRIPT = """
import json, sys
sys.path[:0] = {paths!r}
import sens_models as M
from sens_helpers import Slow
from prunescope.sensitivity import SensitivityAnalysis
model = M.build_cnn()
sa = SensitivityAnalysis(model, Slow("loss", 0.1, log={log!r}), sparsities={q!r}, early_stop_mode="minimize",
                         early_stop_value=1.188, workers=2, checkpoint={ck!r}, progress=False)
res = sa.analysis([model])
print(json.dumps({{k: [[repr(s), repr(v)] for s, v in r.items()] for k, r in res.items()}}))
"""


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _fingerprint(rec: dict) -> str:
    """The zero-filter counts the evaluation of a checkpoint record sees (what Slow's log writes)."""
    if "baseline" in rec:
        return "0,0,0"
    return ",".join(str(int(n * rec["sparsity"]) if k == rec["layer"] else 0) for k, n in FILTERS.items())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_during_worker_sweep_then_resume(tmp_path, one_thread):
    from dask_loopback import PATHS

    ck, log = tmp_path / "ck.jsonl", tmp_path / "evals.log"
    script = tmp_path / "sweep.py"
    script.write_text(SCRIPT.format(paths=PATHS, log=str(log), q=Q, ck=str(ck)))
    log.touch()
    kills = 0
    for kill_at in (2, 5, None):  # records in the checkpoint when the sweeping process is SIGKILLed
        before = ck.read_text().splitlines()[1:] if ck.exists() else []
        start = log.stat().st_size
        p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        workers: list[int] = []
        try:
            if kill_at is not None:
                deadline = time.monotonic() + 60
                while p.poll() is None and time.monotonic() < deadline:
                    if ck.exists() and len(ck.read_text().splitlines()) - 1 >= kill_at:
                        break
                    time.sleep(0.005)
                assert p.poll() is None, "the sweep ended before the kill point"
                workers = _children(p.pid)
                os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
                kills += 1
                deadline = time.monotonic() + 10  # its worker processes must exit with it
                while any(map(_alive, workers)) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert workers and not any(map(_alive, workers)), "worker processes outlived their parent"
            else:
                stdout, stderr = p.communicate(timeout=60)
                assert p.returncode == 0, stderr.decode()[-2000:]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            for w in filter(_alive, workers):  # only if the test failed: leave no orphan behind
                os.kill(w, signal.SIGKILL)
        with open(log, "rb") as f:
            f.seek(start)
            ran = [ln.split()[1] for ln in f.read().decode().splitlines()]
        finished_before = {_fingerprint(json.loads(r)) for r in before}
        assert not finished_before & set(ran), "a resumed sweep repeated a finished evaluation"
    assert kills == 2
    assert json.loads(stdout.decode().strip().splitlines()[-1]) == nni("cnn_minimize")["results"]


# -- scheduling rules --------------------------------------------------------------------------------------
def test_schedule_longest_layer_first_then_by_measured_time():
    from prunescope.sensitivity.schedule import SweepState

    # resumed: 'a' has 3 of 4 values, 'b' 1 of 4, 'c' none -> c (4 left), b (3 left), a (1 left)
    st = SweepState(["a", "b", "c"], 4, None, None, baseline=1.0,
                    known={"a": {0: 1.0, 1: 1.0, 2: 1.0}, "b": {0: 1.0}})
    assert [st.next_task() for _ in range(3)] == [("c", 0), ("b", 1), ("c", 1)]
    # a layer measured 10x slower counts as 10x longer
    st = SweepState(["a", "b"], 4, None, None, baseline=1.0)
    st.finish("a", 0, 1.0, seconds=10.0)
    st.finish("b", 0, 1.0, seconds=1.0)
    assert st.next_task() == ("a", 1)
    assert st.counts() == (3, 9)


def test_schedule_speculates_only_when_nothing_certain_is_left():
    from prunescope.sensitivity.schedule import BASELINE, SweepState

    st = SweepState(["a", "b"], 3, "dropped", 0.1)
    # the baseline first; 'dropped' cannot decide a stop without it, but evaluations may already run
    assert st.next_task() == (BASELINE, -1)
    assert [st.next_task() for _ in range(3)] == [("a", 0), ("b", 0), ("a", 1)]  # depth 0, 0, then 1
    st.finish("a", 1, 0.5)  # would stop 'a' at index 1 - but the baseline is unknown: nothing decided yet
    assert st.needed("a", 2) and not st.done()
    st.finish(BASELINE, -1, 1.0)  # 0.5 < 1.0 - 0.1: 'a' stops at 1 at the latest; index 2 is dropped
    assert not st.needed("a", 2) and st.needed("a", 1)
    st.finish("a", 0, 0.95)
    assert st.layer_done("a") and st.result("a") == [0.95, 0.5]
    st.finish("b", 0, 0.8)  # 'b' stops at 0: nothing else is needed
    assert st.done() and st.result("b") == [0.8] and st.next_task() is None
    assert st.counts() == (4, 4)


def test_progress_bar_counts_busy_and_eta(capsys, one_thread):
    model = M.build_cnn()
    sa = SensitivityAnalysis(model, Slow("loss", 0.05), sparsities=Q, early_stop_mode="minimize",
                             early_stop_value=1.188, workers=2)
    sa.analysis([model])
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert "7/7" in err[-1] and "2 busy" in err[-1]  # evaluations done/total (the total shrank at the stops)
    assert any("/10 [" in ln for ln in err)  # it started at 1 + 3 x 3 before any stop was known
    assert all("<" in ln and "eval/s" in ln for ln in err[1:])  # elapsed<ETA, rate


@pytest.mark.slow
def test_local_worker_killed_pool_is_restarted(tmp_path, caplog, one_thread):
    ref = nni("cnn_default_l2_loss")
    log = tmp_path / "evals.log"
    model = M.build_cnn()
    sa = SensitivityAnalysis(model, Slow("loss", 0.05, log=str(log)), prune_type="l2", workers=2, progress=False)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(res=sa.analysis([model])), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while (not log.exists() or len(log.read_text().splitlines()) < 4) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(int(log.read_text().split()[0]), signal.SIGKILL)  # a worker process, mid-sweep
    t.join(60)
    assert not t.is_alive()
    assert reprs(out["res"]) == ref["results"]
    assert "a worker process died; restarting the pool (1/3)" in caplog.text
