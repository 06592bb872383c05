"""The ``prunescope`` command line. Each sub-command lives in :mod:`prunescope.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunescope",
        description="Analyse PyTorch models for pruning: FLOPs, dependencies, masks, sensitivity, reports.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"prunescope.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"prunescope.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Errors prunescope raises on purpose (and failures to write an output) become one
    line on stderr and exit code 2; an interrupt exits 130 without a traceback."""
    from .commands.common import CLIError, one_line
    from .errors import PrunescopeError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (PrunescopeError, CLIError, OSError) as e:
        print(f"prunescope: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunescope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
