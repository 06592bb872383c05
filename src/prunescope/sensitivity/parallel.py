"""Running sensitivity jobs on other processes: local workers or any ``concurrent.futures.Executor``.

The model, ``val_func``, ``val_args`` and ``val_kwargs`` are pickled **together, once** (a "bundle"), so
references between them survive: ``val_args=[model]`` unpickles as the worker's own copy of the model,
the one that the job prunes. The bundle is unpickled once per worker process and cached (keyed by its
SHA-256); every job restores the model before it returns, so the cached copy stays pristine.

* ``workers=N``: a ``ProcessPoolExecutor`` (``fork`` on Linux while CUDA is not initialised, else
  ``spawn``; one torch thread per worker) whose initializer
  receives the bundle once; jobs carry only its digest. ``device=[...]`` gives worker k the device
  ``device[k % len(device)]``.
* ``executor=``: any ``concurrent.futures.Executor`` - e.g. Dask's ``Client(...).get_executor()``. Each
  job carries the bundle bytes (an executor has no per-worker initializer); device assignment is round
  robin over jobs.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import pickle
import sys
from typing import Any

import torch

from ..errors import ConfigError
from .engine import Job, JobResult, run_job

_CACHE: dict[str, tuple[Any, ...]] = {}
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
    key = f"{digest}@{device}"
    if key not in _CACHE:
        if data is None:
            data = _WORKER["bundles"][digest]
        _CACHE.clear()  # keep one model per worker process
        model, val_func, args, kwargs = pickle.loads(data)
        if device is not None:
            model.to(device)  # moves parameters in place: val_args still point at this model
        _CACHE[key] = (model, val_func, args, kwargs)
    return _CACHE[key]


def worker_init(digest: str, data: bytes, threads: int, devices: list[str] | None, counter: Any) -> None:
    """ProcessPoolExecutor initializer: one torch thread, this worker's device, the bundle."""
    torch.set_num_threads(threads)
    _WORKER["bundles"] = {digest: data}
    _WORKER["device"] = None
    if devices:
        with counter.get_lock():
            k = counter.value
            counter.value += 1
        _WORKER["device"] = devices[k % len(devices)]


def remote_job(job: Job, digest: str, data: bytes | None = None) -> JobResult:
    """The job function on a worker: load (or reuse) the bundle, run :func:`run_job`.

    Errors raised by ``val_func`` are returned in ``JobResult.error`` together with the values finished
    before them, so that the parent can checkpoint those first.
    """
    device = job.device if job.device is not None else _WORKER.get("device")
    model, val_func, args, kwargs = _load(digest, data, device)
    done: list[float] = list(job.done)

    def collect(_job: Job, i: int, value: float) -> None:
        done.append(value)

    try:
        return run_job(model, val_func, args, kwargs, job, on_result=collect)
    except Exception as e:  # noqa: BLE001 - sent back to the parent with the partial values
        return JobResult(job.key, values=done, error=e)


def process_pool(workers: int, digest: str, data: bytes, devices: list[str] | None) -> Any:
    """A ProcessPoolExecutor whose workers hold the bundle and one torch thread each."""
    from concurrent.futures import ProcessPoolExecutor

    # fork starts workers in milliseconds (no second torch import); it is unsafe once CUDA is initialised
    # and unavailable off Linux, where spawn is used.
    method = "fork" if sys.platform == "linux" and not devices and not torch.cuda.is_initialized() else "spawn"
    ctx = mp.get_context(method)
    counter = ctx.Value("i", 0)
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init,
                               initargs=(digest, data, 1, list(devices) if devices else None, counter))
