"""Crash-safe checkpoint of a sensitivity sweep: JSON lines, one finished evaluation per line.

Layout (UTF-8, ``\\n``-terminated lines)::

    {"format": "prunescope-sensitivity-checkpoint", "version": 1, "fingerprint": {...}}
    {"baseline": 0.912}
    {"layer": "conv1", "i": 0, "sparsity": 0.1, "value": 0.91}
    ...

* The header is created atomically (written to a temporary file, fsync'ed, ``os.replace``'d).
* Each record is appended with a single ``os.write`` on an ``O_APPEND`` descriptor and fsync'ed, so a
  crash leaves at most one torn last line; it is ignored (and cut off) when the file is read back.
* Floats are written with ``repr`` by :mod:`json` and read back bit for bit. No pickle.
* ``fingerprint`` names everything the numbers depend on (a SHA-256 of the model's parameters and
  buffers, target layers, sparsities, prune type, early stop, already-pruned ratios, grouping). A file
  with a different fingerprint is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ..errors import ConfigError

FORMAT = "prunescope-sensitivity-checkpoint"


def state_hash(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and raw bytes of every parameter and buffer."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Checkpoint:
    """Records of finished evaluations, keyed by (layer key, index into the sparsity list)."""

    def __init__(self, path: str | os.PathLike[str], fingerprint: dict[str, Any]) -> None:
        self.path = os.fspath(path)
        self.fingerprint = fingerprint
        self.baseline: float | None = None
        self.values: dict[str, dict[int, float]] = {}
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            self._load()
        else:
            self._create()

    # -- reading ---------------------------------------------------------------------------------
    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        good = data[: data.rfind(b"\n") + 1]  # a torn last line (crash mid-write) is dropped
        lines = good.decode("utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ConfigError(f"checkpoint {self.path!r} is not a prunescope sensitivity checkpoint")
        theirs = header.get("fingerprint", {})
        if theirs != self.fingerprint:
            keys = sorted(set(theirs) | set(self.fingerprint))
            diff = [k for k in keys if theirs.get(k) != self.fingerprint.get(k)]
            what = ", ".join("model weights" if k == "weights" else k for k in diff)
            raise ConfigError(
                f"checkpoint {self.path!r} was written for a different model or configuration "
                f"(differs in: {what}); delete it or pass another checkpoint path")
        for ln in lines[1:]:
            rec = json.loads(ln)
            if "baseline" in rec:
                self.baseline = float(rec["baseline"])
            else:
                self.values.setdefault(rec["layer"], {})[int(rec["i"])] = float(rec["value"])
        if len(good) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(good))
                f.flush()
                os.fsync(f.fileno())

    def done(self, key: str, n: int) -> tuple[float, ...]:
        """The contiguous run of finished values for ``key`` from index 0 (at most ``n``)."""
        got = self.values.get(key, {})
        out: list[float] = []
        while len(out) < n and len(out) in got:
            out.append(got[len(out)])
        return tuple(out)

    # -- writing ---------------------------------------------------------------------------------
    def _create(self) -> None:
        header = {"format": FORMAT, "version": 1, "fingerprint": self.fingerprint}
        atomic_write(self.path, json.dumps(header, sort_keys=True) + "\n")

    def _append(self, records: Iterable[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode("utf-8")
        if not data:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def add_baseline(self, value: float) -> None:
        self.baseline = value
        self._append([{"baseline": value}])

    def add(self, key: str, items: Iterable[tuple[int, float, float]]) -> None:
        """Append ``(index, sparsity, value)`` records for ``key`` (one write, one fsync)."""
        recs = []
        for i, s, v in items:
            self.values.setdefault(key, {})[i] = v
            recs.append({"layer": key, "i": i, "sparsity": s, "value": v})
        self._append(recs)
