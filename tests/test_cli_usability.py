"""The command line as a newcomer meets it: their own module found in the current folder, one spelling of MODEL
everywhere, --help with defaults and an example per command, --version."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import textwrap

import pytest

import prunescope
from prunescope.cli import EXAMPLES, build_parser, main

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

MYMODEL = textwrap.dedent('''
    import torch
    from torch import nn


    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


    def evaluate(model):
        torch.manual_seed(1)
        with torch.no_grad():
            return float(model(torch.randn(4, 3, 8, 8)).abs().mean())
''')


@pytest.fixture()
def user_folder(tmp_path):
    """A folder with the user's ``mymodel.py`` and, elsewhere, a launcher that starts the CLI the way the
    installed ``prunescope`` console script does: ``sys.path[0]`` is the launcher's own folder, not the current
    folder (``python -m`` and ``python -c`` would put the current folder there and hide the problem)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mymodel.py").write_text(MYMODEL)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    launcher = bindir / "prunescope_launcher.py"
    launcher.write_text("import sys\nfrom prunescope.cli import main\nsys.exit(main())\n")
    return work, launcher


def _cli(launcher, cwd, *args):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(launcher), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_module_in_the_current_folder_is_found_like_python_m(user_folder):
    work, launcher = user_folder
    probe = _cli(launcher, work, "flops", "mymodel:build", "--input-size", "1,3,8,8", "--format", "csv")
    assert probe.returncode == 0, probe.stderr
    macs = {row["name"]: int(row["flops_macs"]) for row in csv.DictReader(probe.stdout.splitlines())}
    assert macs == {"0": 3 * 8 * 9 * 64, "2": 8 * 8 * 9 * 64, "6": 8 * 4}  # by hand: k*k*c_in*c_out*h*w
    r = _cli(launcher, work, "sensitivity", "mymodel:build", "--val", "mymodel:evaluate", "--sparsities", "0.5",
             "--no-progress", "--out", "sens.csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(open(work / "sens.csv")))
    assert [row[0] for row in rows[1:]] == ["0", "2"]  # the two Conv2d layers of the user's model


def test_missing_module_error_says_where_it_looked(user_folder):
    work, launcher = user_folder
    r = _cli(launcher, work, "flops", "notthere:build", "--input-size", "1,3,8,8")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "no module named 'notthere'" in err
    assert f"looked in {work}" in err  # the current folder, searched first
    r = _cli(launcher, work, "flops", "mymodel.py:build", "--input-size", "1,3,8,8")
    assert r.returncode == 2 and "not a file path (e.g. mymodel:build" in r.stderr


def test_error_inside_the_users_module_is_not_called_missing(tmp_path, user_folder):
    work, launcher = user_folder
    (work / "broken.py").write_text("import not_a_real_dependency_xyz\n\ndef build():\n    pass\n")
    r = _cli(launcher, work, "flops", "broken:build", "--input-size", "1,3,8,8")
    assert r.returncode == 2
    assert "module 'broken'" in r.stderr and "was found but importing it failed" in r.stderr
    assert "not_a_real_dependency_xyz" in r.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_has_help_on_every_option_an_example_and_shows_defaults():
    subs = _subparsers(build_parser())
    assert set(subs) == {"flops", "deps", "unsafe", "masks", "shrink", "sensitivity", "report"}
    for name, p in subs.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), f"{name} {a.option_strings or a.dest} has no help"
        text = p.format_help()
        assert "example:\n  prunescope " + name in text, name
        assert EXAMPLES[name].split()[1] == name
    flat = {name: " ".join(p.format_help().split()) for name, p in subs.items()}  # argparse wraps lines
    assert "(default: l1)" in flat["sensitivity"]
    assert "timed runs per model (interleaved; median) (default: 15)" in flat["shrink"]
    assert "(default: table)" in flat["flops"]
    assert "(default: None)" not in "".join(flat.values()) and "(default: False)" not in "".join(flat.values())


def test_model_is_positional_everywhere_and_sensitivity_keeps_the_old_option():
    subs = _subparsers(build_parser())
    for name in ("flops", "deps", "unsafe", "masks", "shrink", "sensitivity", "report"):
        positional = [a.dest for a in subs[name]._actions if not a.option_strings]
        assert positional == ["model"], name
    p = build_parser()
    assert p.parse_args(["sensitivity", "m:b", "--val", "m:e", "--out", "s.csv"]).model == "m:b"
    assert p.parse_args(["sensitivity", "--model", "m:b", "--val", "m:e", "--out", "s.csv"]).model_option == "m:b"


def test_sensitivity_model_given_twice_or_not_at_all(tmp_path, capsys):
    out = str(tmp_path / "s.csv")
    assert main(["sensitivity", "a:b", "--model", "c:d", "--val", "m:e", "--out", out]) == 2
    assert "two models given" in capsys.readouterr().err
    assert main(["sensitivity", "--val", "m:e", "--out", out]) == 2
    assert "give the model" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"prunescope {prunescope.__version__}"


@pytest.mark.parametrize("error", [ValueError, TypeError])
def test_a_bug_surfaces_as_a_traceback_not_as_one_line(monkeypatch, capsys, error):
    """Errors are translated once, in cli.main, and only those raised on purpose (PrunescopeError, CLIError, an
    output that cannot be written): a ValueError or TypeError from a bug keeps its traceback."""
    import prunescope.commands.flops as flops_cmd

    def buggy(a):
        raise error("a bug inside prunescope")

    monkeypatch.setattr(flops_cmd, "_run", buggy)
    with pytest.raises(error, match="a bug inside prunescope"):
        main(["flops", "resnet18", "--input-size", "1,3,32,32"])
    assert "prunescope: error" not in capsys.readouterr().err


def test_an_error_raised_on_purpose_is_one_line_exit_2(monkeypatch, capsys):
    import prunescope.commands.flops as flops_cmd
    from prunescope.errors import ConfigError

    def refuses(a):
        raise ConfigError("sparsity 2 is out of\nrange")

    monkeypatch.setattr(flops_cmd, "_run", refuses)
    assert main(["flops", "resnet18", "--input-size", "1,3,32,32"]) == 2
    assert capsys.readouterr().err == "prunescope: error: sparsity 2 is out of range\n"
