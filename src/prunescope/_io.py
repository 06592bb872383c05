"""Atomic file writes, shared by every module that writes a result file.

A file is written to a temporary file in the same folder, flushed and fsync'ed, given the usual permissions
(``0666`` less the umask; ``mkstemp`` would leave ``0600``), then moved into place with ``os.replace``: a
reader sees the old file or the whole new one, never a torn one, also when the writer crashes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Any, Iterator

__all__ = ["atomic_open", "atomic_write"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """``with atomic_open(path, 'w') as f: ...`` — ``path`` is replaced only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], data: str | bytes, newline: str | None = None) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    if isinstance(data, bytes):
        with atomic_open(path, "wb") as f:
            f.write(data)
    else:
        with atomic_open(path, "w", newline=newline, encoding="utf-8") as f:
            f.write(data)
