"""The report folder is replaced as a whole: a reader never sees files of two different runs.

Every file is written into a fresh temporary folder beside the target (``.NAME.tmp-PID-RANDOM``); when all are
written the folder is swapped in with two renames (the old folder is moved aside, the new one moved in, the
old one removed). A run that is killed leaves only its temporary folder, which the next run removes (its PID is
no longer alive); a concurrent run builds its own and the last swap wins. A target folder that holds files
prunescope did not write (no ``.prunescope-report`` marker, and files other than a report's) is refused
instead of replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid

from ..errors import ConfigError

__all__ = ["ReportFolder", "MARKER"]

MARKER = ".prunescope-report"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReportFolder:
    """``with ReportFolder(out) as tmp: write files into tmp`` — then ``out`` is replaced atomically."""

    def __init__(self, out: str | os.PathLike[str], names: tuple[str, ...] = ()) -> None:
        self.names = names  # files a report writes: a folder holding only these (an older report) is replaced
        self.out = os.path.abspath(os.fspath(out))
        self.parent = os.path.dirname(self.out)
        self.base = os.path.basename(self.out)
        self.run_id = uuid.uuid4().hex[:12]
        self.tmp = ""

    def check(self) -> None:
        """Refuse a target that is a file, or a non-empty folder prunescope did not write."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"--out {self.out!r} is a file, not a folder")
        if os.path.isdir(self.out):
            entries = [e for e in os.listdir(self.out) if e != MARKER]
            ours = set(self.names)
            if entries and not os.path.exists(os.path.join(self.out, MARKER)) and not set(entries) <= ours:
                raise ConfigError(f"--out {self.out!r} is a folder with other files in it ({entries[0]!r}, ...); "
                                  "the report replaces its folder as a whole, so give a new or a report folder")
        if not os.path.isdir(self.parent):
            raise ConfigError(f"--out {self.out!r}: folder {self.parent!r} does not exist")
        if not os.access(self.parent, os.W_OK):
            raise ConfigError(f"--out {self.out!r}: folder {self.parent!r} is not writable")
        try:  # os.access says yes to root everywhere, and /proc, read-only mounts ... refuse only when tried
            os.rmdir(tempfile.mkdtemp(prefix=f".{self.base}.probe-", dir=self.parent))
        except OSError as e:
            raise ConfigError(f"--out {self.out!r}: cannot create a folder in {self.parent!r} "
                              f"({e.strerror or type(e).__name__})") from None

    def _clean_stale(self) -> None:
        for e in os.listdir(self.parent):
            prefix = next((p for p in (f".{self.base}.tmp-", f".{self.base}.old-") if e.startswith(p)), None)
            if prefix is None:
                continue
            try:
                pid = int(e[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if not _alive(pid):
                shutil.rmtree(os.path.join(self.parent, e), ignore_errors=True)

    def __enter__(self) -> str:
        self.check()
        self._clean_stale()
        self.tmp = tempfile.mkdtemp(prefix=f".{self.base}.tmp-{os.getpid()}-", dir=self.parent)
        os.chmod(self.tmp, 0o777 & ~_umask())
        with open(os.path.join(self.tmp, MARKER), "w") as f:
            f.write(self.run_id + "\n")
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if os.path.isdir(self.out):
            old = tempfile.mkdtemp(prefix=f".{self.base}.old-{os.getpid()}-", dir=self.parent)
            os.rmdir(old)
            os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except OSError:
            if old is not None:
                with contextlib.suppress(OSError):
                    os.replace(old, self.out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def final(self, name: str) -> str:
        """The path a file will have once the folder is in place."""
        return os.path.join(self.out, name)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
