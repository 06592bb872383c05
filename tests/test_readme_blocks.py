"""Every runnable block of the README runs as written, in order, with only the context the README itself defines.

```python blocks run in one namespace (as if typed into one session); ```bash blocks run their `prunescope`
commands through the CLI's entry point in this process (the same ``main`` the console script calls, without a
fresh interpreter per command); both in a fresh folder, so that files one block writes are there for the next.
A block preceded by ``<!-- readme-test: file NAME -->`` is written to NAME; one preceded by
``<!-- readme-test: skip: REASON -->`` is not run (the README says why). Any other bash command fails the
test: a README block that cannot run here must be marked, with its reason.
"""

from __future__ import annotations

import re
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from prunescope.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"<!-- readme-test: (?P<kind>skip|file)(?::)? (?P<arg>.+?) -->$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    marker: tuple[str, str] | None  # (kind, argument) of the marker right above the fence


def blocks(text: str) -> list[Block]:
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang = lines[i][3:].strip()
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            m = MARKER.match(lines[i - 1].strip()) if i > 0 else None
            out.append(Block(i + 1, lang, "\n".join(lines[i + 1 : j]) + "\n",
                             (m["kind"], m["arg"]) if m else None))
            i = j + 1
        else:
            i += 1
    return out


def commands(script: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = script.replace("\\\n", " ")
    return [argv for argv in (shlex.split(line, comments=True) for line in joined.splitlines()) if argv]


ALL = blocks(README.read_text())
RUNNABLE = [b for b in ALL if b.lang in ("python", "bash")]


def test_markers_and_blocks_are_well_formed():
    assert len(RUNNABLE) >= 14
    text = README.read_text()
    for line in text.splitlines():
        if "readme-test" in line:
            assert MARKER.match(line.strip()), f"malformed marker: {line!r}"
    for b in RUNNABLE:
        if b.marker and b.marker[0] == "skip":
            assert len(b.marker[1]) > 10, f"README.md:{b.line}: a skip needs its reason"
        if b.lang == "bash":
            assert "[--" not in b.body, f"README.md:{b.line}: optional flags printed in brackets cannot be run"
    skipped = [b.line for b in RUNNABLE if b.marker and b.marker[0] == "skip"]
    assert len(skipped) <= 4, f"most blocks must run; skipped at lines {skipped}"


@pytest.fixture()
def one_thread():
    """One torch thread, as a user's process on a busy machine gets: with two intra-op threads on two cores that
    other processes share, the blocks ran 4x slower (230 s instead of 58 s at a load average of 11)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_readme_blocks_run_in_order(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the current folder first; undone after
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    namespace: dict = {"__name__": "readme"}
    ran = 0
    try:
        for b in RUNNABLE:
            where = f"README.md:{b.line}"
            if b.marker and b.marker[0] == "skip":
                continue
            if b.marker and b.marker[0] == "file":
                (tmp_path / b.marker[1]).write_text(b.body)
                continue
            if b.lang == "python":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ShrinkWarning etc. are part of what the README shows
                    exec(compile(b.body, where, "exec"), namespace)
            else:
                for argv in commands(b.body):
                    assert argv[0] == "prunescope", f"{where}: {argv[0]!r} is not run here; mark the block skip"
                    assert main(argv[1:]) == 0, f"{where}: {shlex.join(argv)} failed"
            ran += 1
    finally:
        sys.modules.pop("mymodel", None)
    assert ran >= 10
    # what the blocks promised is there
    for name in ("myreport/report.html", "small.pt", "masks.pth", "cfg.json", "deps.csv", "sens.csv", "sens.png",
                 "mysens.csv", "mysens.png"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.parametrize("text, expected", [
    ("prunescope a \\\n    --b c   # note\n\n# only a comment\nprunescope d\n", [["prunescope", "a", "--b", "c"],
                                                                           ["prunescope", "d"]]),
])
def test_commands_are_split_as_bash_would(text, expected):
    assert commands(text) == expected
