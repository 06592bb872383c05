"""A real multi-process Dask cluster on 127.0.0.1: ``dask scheduler`` and ``dask worker`` started as separate
processes (what a multi-machine run does, on one host), always torn down. Used by the tests and the bench."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATHS = [str(ROOT / "tests" / "data" / "nni"), str(ROOT / "tests" / "sensitivity"), str(ROOT / "bench"),
         str(ROOT / "src")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask() -> list[str]:
    exe = Path(sys.executable).with_name("dask")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "distributed.cli.dask_scheduler"]


class Loopback:
    """Scheduler + worker processes; ``add_worker`` starts one more, ``procs`` are the worker processes."""

    def __init__(self, log_dir: Path) -> None:
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(PATHS + [env.get("PYTHONPATH", "")])
        env["OMP_NUM_THREADS"] = "1"
        env["DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL"] = "10s"
        self.env = env
        self.scheduler = self._start(["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--no-dashboard"], "scheduler")
        self.workers: list[subprocess.Popen[bytes]] = []

    def _start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(_dask() + args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def add_worker(self, name: str) -> subprocess.Popen[bytes]:
        """One single-thread worker process without a nanny (a SIGKILL kills the worker itself)."""
        p = self._start(["worker", self.address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                         "--host", "127.0.0.1", "--name", name, "--memory-limit", "0"], f"worker-{name}")
        self.workers.append(p)
        return p

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in [*self.workers, self.scheduler]:
            with contextlib.suppress(Exception):
                p.wait(timeout=10)


def _warm() -> int:
    import sens_models  # noqa: F401
    import torch  # noqa: F401 - long-lived workers have torch imported already

    return os.getpid()


@contextlib.contextmanager
def loopback_cluster(n_workers: int, log_dir: Path, timeout: float = 60.0) -> Iterator[tuple[Loopback, object]]:
    """``(cluster, client)`` with ``n_workers`` single-thread workers connected and torch imported on each."""
    from distributed import Client

    cl = Loopback(log_dir)
    client = None
    try:
        for k in range(n_workers):
            cl.add_worker(f"w{k}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = Client(cl.address, timeout=5, set_as_default=False)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        client.wait_for_workers(n_workers, timeout=timeout)
        client.run(_warm)
        yield cl, client
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=5)
        cl.close()
