"""Atomic file writes, shared by every module that writes a result file.

A file is written to a temporary file in the same folder, flushed and fsync'ed, then moved into place with
``os.replace``: a reader sees the old file or the whole new one, never a torn one, also when the writer crashes.

* **Permissions.** A new file gets the usual ``0666`` less the umask (the kernel applies the umask when the
  temporary file is created, so no process-wide ``os.umask`` dance); a file that already exists keeps its mode
  (a ``0600`` file stays ``0600``).
* **Symbolic links.** Writing to a symlink writes the file it points to; the link stays a link.
* **Crashes.** Temporary files are named ``.<name>.ps<pid>-<random>.tmp``. A writer killed with SIGKILL cannot
  remove its own; the next write to the same path removes those whose process is gone.
* **Errors** name the path the caller gave, never the temporary file: :class:`~prunescope.errors.OutputError`
  (an ``OSError``) for a path that is a directory, a folder that is missing or is a file, no permission, ...
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import IO, Any, Iterator

from .errors import OutputError

__all__ = ["atomic_open", "atomic_write", "check_writable"]


def _tmp_prefix(base: str) -> str:
    return f".{base}.ps"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: never judge, keep the file
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _remove_stale(folder: str, base: str) -> None:
    """Remove temporary files of ``base`` left by writers that no longer run (killed mid-write)."""
    prefix = _tmp_prefix(base)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    me = os.getpid()
    for n in names:
        if not (n.startswith(prefix) and n.endswith(".tmp")):
            continue
        pid_text = n[len(prefix):-len(".tmp")].partition("-")[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == me or _pid_alive(pid):  # ours (another thread may be writing it) or a live writer's
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, n))


def _resolve(given: str) -> str:
    """The file to replace: ``given``, or the final target when it is a symbolic link."""
    return os.path.realpath(given) if os.path.islink(given) else given


def check_writable(path: str | os.PathLike[str], what: str = "output") -> str:
    """Raise :class:`OutputError` if ``path`` cannot be written as a file (is a directory, its folder is
    missing or is a file, or the folder is not writable); return the path that will be replaced.

    >>> check_writable(".")
    Traceback (most recent call last):
    ...
    prunescope.errors.OutputError: cannot write output '.': it is a directory; give a file path
    """
    given = os.fspath(path)
    target = _resolve(given)
    if os.path.isdir(target):
        raise OutputError(f"cannot write {what} {given!r}: it is a directory; give a file path", given)
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        anc = folder
        while anc and not os.path.exists(anc) and os.path.dirname(anc) != anc:
            anc = os.path.dirname(anc)
        if os.path.exists(anc) and not os.path.isdir(anc):
            raise OutputError(f"cannot write {what} {given!r}: {anc!r} is a file, not a folder", given)
        raise OutputError(f"cannot write {what} {given!r}: the folder {folder!r} does not exist", given)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {given!r}: no permission to write in {folder!r}", given)
    return target


def _fail(given: str, e: OSError) -> OutputError:
    reason = e.strerror or str(e)
    return OutputError(f"cannot write {given!r}: {reason}", given)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """``with atomic_open(path, 'w') as f: ...`` — ``path`` is replaced only if the block succeeds."""
    given = os.fspath(path)
    target = check_writable(given)
    folder = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)
    _remove_stale(folder, base)
    try:
        keep_mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        keep_mode = None
    except OSError as e:
        raise _fail(given, e) from e
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f"{_tmp_prefix(base)}{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise _fail(given, e) from e
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise OutputError(f"cannot write {given!r}: no free temporary file name", given)
    try:
        if keep_mode is not None and hasattr(os, "fchmod"):
            with contextlib.suppress(OSError):
                os.fchmod(fd, keep_mode)
        with os.fdopen(fd, mode, **kwargs) as f:
            try:
                yield f
            except OSError as e:
                if e.errno is not None and not isinstance(e, OutputError):  # a real I/O error of this file
                    raise _fail(given, e) from e
                raise
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise _fail(given, e) from e
        try:
            os.replace(tmp, target)
        except OSError as e:
            raise _fail(given, e) from e
    except BaseException:
        with contextlib.suppress(OSError):
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
