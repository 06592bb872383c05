"""Crash-safe checkpoint of a sensitivity sweep: JSON lines, one finished evaluation per line.

Layout (UTF-8, ``\\n``-terminated lines)::

    {"format": "prunescope-sensitivity-checkpoint", "version": 1, "fingerprint": {...}}
    {"baseline": 0.912}
    {"layer": "conv1", "i": 0, "sparsity": 0.1, "value": 0.91}
    ...

* The header is created atomically (written to a temporary file, fsync'ed, ``os.replace``'d).
* Each record is appended with a single ``os.write`` on an ``O_APPEND`` descriptor and fsync'ed the moment
  its evaluation finishes (in every execution mode), so a crash leaves at most one torn last line; it is
  ignored (and cut off) when the file is read back. Evaluations may finish in any order (workers): a
  record names its sparsity index, and a layer may have values past its early stop (speculative
  evaluations), which the sweep ignores.
* Any other damaged line (not UTF-8, not JSON, missing keys, wrong types, NaN or infinite values, a
  sparsity or layer the fingerprint does not know) raises :class:`CheckpointError` naming the file and
  the line number.
* Floats are written with ``repr`` by :mod:`json` and read back bit for bit. No pickle.
* ``fingerprint`` names everything the numbers depend on (a SHA-256 of the model's parameters and
  buffers, target layers, sparsities, prune type, early stop, already-pruned ratios, grouping). A file
  with a different fingerprint is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ..errors import ConfigError

FORMAT = "prunescope-sensitivity-checkpoint"


class CheckpointError(ConfigError):
    """A checkpoint file is damaged or foreign; the message names the file and, for a bad record, the line."""


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
        lines = good.split(b"\n")[:-1]
        try:
            header = json.loads(lines[0].decode("utf-8")) if lines else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {self.path!r} is not a prunescope sensitivity checkpoint "
                                  "(line 1 is not its header)")
        theirs = header.get("fingerprint", {})
        if theirs != self.fingerprint:
            keys = sorted(set(theirs) | set(self.fingerprint)) if isinstance(theirs, dict) else ["fingerprint"]
            diff = [k for k in keys if not isinstance(theirs, dict) or theirs.get(k) != self.fingerprint.get(k)]
            what = ", ".join("model weights" if k == "weights" else k for k in diff)
            raise CheckpointError(
                f"checkpoint {self.path!r} was written for a different model or configuration "
                f"(differs in: {what}); delete it or pass another checkpoint path")
        sparsities = list(self.fingerprint.get("sparsities", []))
        layers = {t[0] for t in self.fingerprint.get("targets", [])}
        for lineno, raw in enumerate(lines[1:], start=2):
            self._read_record(raw, lineno, sparsities, layers)
        if len(good) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(good))
                f.flush()
                os.fsync(f.fileno())

    def _read_record(self, raw: bytes, lineno: int, sparsities: list[float], layers: set[str]) -> None:
        where = f"checkpoint {self.path!r}, line {lineno}"
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where}: not a JSON record ({e.msg}, column {e.colno})") from None
        if not isinstance(rec, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if "baseline" in rec:
            self.baseline = _finite(rec["baseline"], f"{where}: baseline")
            return
        missing = [k for k in ("layer", "i", "sparsity", "value") if k not in rec]
        if missing:
            raise CheckpointError(f"{where}: record lacks {', '.join(map(repr, missing))}")
        layer, i = rec["layer"], rec["i"]
        if not isinstance(layer, str) or layer not in layers:
            raise CheckpointError(f"{where}: layer {layer!r} is not a target of this sweep")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(sparsities):
            raise CheckpointError(f"{where}: sparsity index {i!r} is not an integer in [0, {len(sparsities)})")
        s = _finite(rec["sparsity"], f"{where}: sparsity")
        if s != sparsities[i]:
            raise CheckpointError(f"{where}: sparsity {s!r} does not match index {i} ({sparsities[i]!r})")
        self.values.setdefault(layer, {})[i] = _finite(rec["value"], f"{where}: value")

    def known(self, key: str) -> dict[int, float]:
        """Every finished value of ``key``, by sparsity index (not necessarily contiguous)."""
        return dict(self.values.get(key, {}))

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


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{what} is {value!r} ({type(value).__name__}), not a number")
    if not math.isfinite(value):
        raise CheckpointError(f"{what} is {value!r}; a recorded metric must be finite")
    return float(value)
