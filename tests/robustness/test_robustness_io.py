"""atomic_write (prunescope._io): modes kept, symlinks written through, temp files of killed writers removed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from prunescope._io import atomic_open, atomic_write


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_existing_file_keeps_its_mode(tmp_path):
    p = tmp_path / "secret.csv"
    p.write_text("old")
    os.chmod(p, 0o600)
    atomic_write(p, "new")
    assert p.read_text() == "new" and _mode(p) == 0o600
    os.chmod(p, 0o640)
    atomic_write(p, b"newer")
    assert p.read_bytes() == b"newer" and _mode(p) == 0o640


def test_new_file_gets_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o640


def test_symlink_is_written_through(tmp_path):
    target = tmp_path / "real" / "data.csv"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    atomic_write(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "real"]
    assert os.listdir(target.parent) == ["data.csv"]


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.csv"
    link.symlink_to(tmp_path / "made.csv")
    atomic_write(link, "x")
    assert link.is_symlink() and (tmp_path / "made.csv").read_text() == "x"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / f".out.csv.ps{_dead_pid()}-deadbeef.tmp"
    dead.write_text("partial")
    live = tmp_path / f".out.csv.ps{os.getppid()}-cafebabe.tmp"  # a running process: maybe writing right now
    live.write_text("in progress")
    other = tmp_path / ".other.csv.ps1-00000000.tmp"  # another file's temp: not ours to judge
    other.write_text("x")
    atomic_write(tmp_path / "out.csv", "done")
    assert not dead.exists()
    assert live.exists() and other.exists()
    assert (tmp_path / "out.csv").read_text() == "done"


def test_sigkill_mid_write_leaves_a_temp_file_the_next_write_removes(tmp_path):
    out = tmp_path / "result.csv"
    code = textwrap.dedent(f"""
        import sys, time
        from prunescope._io import atomic_open
        with atomic_open({str(out)!r}, "w") as f:
            f.write("half")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".result.csv.ps")  # findable by name
    assert not out.exists()
    atomic_write(out, "full")
    assert os.listdir(tmp_path) == ["result.csv"] and out.read_text() == "full"


def test_failed_block_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "keep.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError, match="inside"):
        with atomic_open(p, "w") as f:
            f.write("new")
            raise RuntimeError("inside")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]


def test_concurrent_writers_do_not_remove_each_others_temp_files(tmp_path):
    """A temp file of this very process is never judged stale (another thread may be writing it)."""
    mine = tmp_path / f".x.csv.ps{os.getpid()}-01234567.tmp"
    mine.write_text("busy")
    start = time.time()
    atomic_write(tmp_path / "x.csv", "y")
    assert mine.exists() and time.time() - start < 5
