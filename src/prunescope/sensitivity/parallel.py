"""Running sensitivity evaluations elsewhere: local worker processes, thread pools, Dask, any Executor.

The model, ``val_func``, ``val_args`` and ``val_kwargs`` are pickled **together, once** (a "bundle"), so
references between them survive: ``val_args=[model]`` unpickles as the worker's own copy of the model,
the one that the evaluation prunes. A bundle is unpickled once per worker *thread* and cached (keyed by
its SHA-256 and device): every evaluation restores the model before it returns, so the cached copy stays
pristine, and two threads of one process (a thread pool, a Dask worker with several threads) never share
a model copy.

* ``workers=N``: a ``ProcessPoolExecutor`` (``fork`` on Linux while CUDA is not initialised, else
  ``spawn``; one torch thread per worker) whose initializer receives the bundle once; evaluations carry
  only its digest. ``device=[...]`` gives worker k the device ``device[k % len(device)]``. The workers
  exit when the main process dies, even by SIGKILL (``PR_SET_PDEATHSIG`` on Linux, and a watchdog thread
  that polls the parent's pid everywhere).
* Dask (``Client(...).get_executor()``): the bundle is scattered to every worker once (``broadcast``) and
  evaluations name it; Dask moves the work of a worker that dies to another one.
* Any other ``concurrent.futures.Executor`` (``ThreadPoolExecutor`` included): each evaluation carries the
  bundle bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import torch

from ..errors import ConfigError
from .jobs import Eval, run_eval

_LOCAL = threading.local()  # per-thread cache: {f"{digest}@{device}": (model, val_func, args, kwargs)}
_WORKER: dict[str, Any] = {}


def make_bundle(model: Any, val_func: Any, val_args: Any, val_kwargs: Any) -> tuple[str, bytes]:
    """Pickle model, val_func and arguments in one go; a clear error names what cannot be pickled."""
    obj = (model, val_func, list(val_args), dict(val_kwargs))
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as first:  # noqa: BLE001 - lambdas, closures, local classes: try cloudpickle when available
        try:
            import cloudpickle  # type: ignore[import-not-found]

            data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001
            culprit = "the bundle"
            for name, part in (("model", model), ("val_func", val_func), ("val_args", val_args),
                               ("val_kwargs", val_kwargs)):
                try:
                    pickle.dumps(part)
                except Exception:  # noqa: BLE001
                    culprit = name
                    break
            raise ConfigError(
                f"cannot send {culprit} to worker processes: it is not picklable ({first}). Define "
                "val_func at module level and pass picklable arguments, or run without workers/executor"
            ) from first
    return hashlib.sha256(data).hexdigest(), data


def _load(digest: str, data: bytes | None, device: str | None) -> tuple[Any, ...]:
    cache: dict[str, tuple[Any, ...]] | None = getattr(_LOCAL, "cache", None)
    if cache is None:
        cache = _LOCAL.cache = {}
    key = f"{digest}@{device}"
    if key not in cache:
        if data is None:
            data = _WORKER["bundles"][digest]
        for k in [k for k in cache if not k.startswith(f"{digest}@")]:
            del cache[k]  # a new sweep: drop the previous sweep's models
        model, val_func, args, kwargs = pickle.loads(data)
        if device is not None:
            model.to(device)  # moves parameters in place: val_args still point at this model
        cache[key] = (model, val_func, args, kwargs)
    return cache[key]


def remote_eval(ev: Eval, digest: str, data: bytes | None = None) -> float:
    """The evaluation function on a worker: load (or reuse) this thread's copy of the bundle, run
    :func:`prunescope.sensitivity.jobs.run_eval`. Errors travel back to the parent as exceptions."""
    device = ev.device if ev.device is not None else _WORKER.get("device")
    model, val_func, args, kwargs = _load(digest, data, device)
    return run_eval(model, val_func, args, kwargs, ev)


# -- local worker processes ---------------------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    """Make this worker process exit when ``parent`` dies (SIGKILL included)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # no libc / no prctl: the watchdog below still works
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="prunescope-parent-watchdog", daemon=True).start()


def worker_init(digest: str, data: bytes, threads: int, devices: list[str] | None, counter: Any,
                parent: int) -> None:
    """ProcessPoolExecutor initializer: die with the parent, one torch thread, this worker's device."""
    _die_with_parent(parent)
    torch.set_num_threads(threads)
    _WORKER["bundles"] = {digest: data}
    _WORKER["device"] = None
    if devices:
        with counter.get_lock():
            k = counter.value
            counter.value += 1
        _WORKER["device"] = devices[k % len(devices)]


def process_pool(workers: int, digest: str, data: bytes, devices: list[str] | None) -> Any:
    """A ProcessPoolExecutor whose workers hold the bundle, use one torch thread and die with this process."""
    from concurrent.futures import ProcessPoolExecutor

    # fork starts workers in milliseconds (no second torch import); it is unsafe once CUDA is initialised
    # and unavailable off Linux, where spawn is used.
    method = "fork" if sys.platform == "linux" and not devices and not torch.cuda.is_initialized() else "spawn"
    ctx = mp.get_context(method)
    counter = ctx.Value("i", 0)
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init,
                               initargs=(digest, data, 1, list(devices) if devices else None, counter,
                                         os.getpid()))


def kill_pool(pool: Any) -> None:
    """Stop a ProcessPoolExecutor now: terminate its workers (their running evaluations are not needed)."""
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            p.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


# -- executors ------------------------------------------------------------------------------------------
class Backend:
    """Submits evaluations to an executor and says how many it can run at once.

    ``slots()`` is how many evaluations run at once: the number of worker processes, the thread pool's
    size, or (Dask) the total number of worker threads, followed as workers join or die; ``window()`` is
    how many the parent keeps submitted.
    """

    def __init__(self, executor: Executor, digest: str, data: bytes, own: bool, workers: int | None = None) -> None:
        self.executor = executor
        self.digest = digest
        self.own = own
        self.threads_pool = isinstance(executor, ThreadPoolExecutor)
        self._client = _dask_client(executor)
        self._data: Any = None if own else data
        if self._client is not None:  # one copy per Dask worker, not one per evaluation
            self._data = self._client.scatter(data, broadcast=True, hash=False)
        self._workers = workers
        self._slots = 1
        self._closed = threading.Event()
        if self._client is not None:
            self._count_threads()
            threading.Thread(target=self._watch_threads, name="prunescope-dask-slots", daemon=True).start()

    def _count_threads(self) -> None:
        with contextlib.suppress(Exception):
            self._slots = max(1, sum(self._client.nthreads().values()))

    def _watch_threads(self) -> None:
        """Follow the Dask cluster's thread count (workers joining, dying) once a second."""
        while not self._closed.wait(1.0):
            self._count_threads()

    @property
    def kind(self) -> str:
        if self.own:
            return "processes"
        return "dask" if self._client is not None else ("threads" if self.threads_pool else "executor")

    def slots(self) -> int:
        if self._workers:
            return self._workers
        if self._client is not None:
            return self._slots  # kept current by the watcher thread: no round trip on the hot path
        n = getattr(self.executor, "_max_workers", None)
        return n if isinstance(n, int) and n > 0 else (os.cpu_count() or 1)

    def window(self) -> int:
        """How many evaluations to keep submitted: one per worker thread, and with Dask one more queued per
        thread, so that a worker starts its next evaluation without waiting for the round trip through this
        process (measured: 4 workers x 0.15 s evaluations, 1.22 s -> 1.13 s for 28 evaluations)."""
        n = self.slots()
        return 2 * n if self._client is not None else n

    def submit(self, ev: Eval) -> Future[float]:
        return self.executor.submit(remote_eval, ev, self.digest, self._data)

    def close(self, abort: bool) -> None:
        """Release the scattered bundle; an own process pool is shut down (``abort``: without waiting)."""
        self._closed.set()
        if self._client is not None and self._data is not None:
            with contextlib.suppress(Exception):
                self._data.release()
        self._data = None
        if self.own:
            if abort:
                kill_pool(self.executor)
            else:
                self.executor.shutdown(wait=True, cancel_futures=True)


def _dask_client(executor: Executor) -> Any:
    if type(executor).__module__.startswith("distributed"):
        return getattr(executor, "_client", None)
    return None
