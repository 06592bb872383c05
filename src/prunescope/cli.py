"""The ``prunescope`` command line. Each sub-command lives in :mod:`prunescope.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import COMMANDS

#: one example per sub-command, shown at the end of its ``--help``
EXAMPLES = {
    "flops": "prunescope flops resnet18 --input-size 1,3,224,224 --format csv --out flops.csv",
    "deps": "prunescope deps resnet50 --input-size 1,3,224,224 --csv deps.csv --include-linear",
    "unsafe": "prunescope unsafe vit_b_16 --input-size 1,3,224,224 --device meta",
    "masks": "prunescope masks resnet18 --pruner l1 --sparsity 0.5 --input-size 1,3,224,224 --fix --out masks.pth",
    "shrink": "prunescope shrink resnet18 --input-size 1,3,224,224 --masks masks.pth --out small.pt",
    "sensitivity": "prunescope sensitivity mymodel:build --val mymodel:evaluate --sparsities 0.25,0.5,0.75 "
                   "--out sens.csv\n  (mymodel.py in the current folder: build() returns the model, evaluate(model) "
                   "a number)",
    "report": "prunescope report --out report                      # embedded example, 50% of the MACs\n"
              "  prunescope report mymodel:build --input-size 1,3,32,32 --val mymodel:evaluate --out report",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless there is none, it is a flag, or the help already says it) and keeps
    the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (d is None or d is False or d is argparse.SUPPRESS or "default" in text
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``prunescope`` parser with every sub-command that is installed."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="prunescope",
        description="Analyse PyTorch models for pruning: FLOPs, dependencies, masks, sensitivity, reports.",
        epilog="MODEL is a torchvision model name (random weights) or package.module:callable, looked up in the "
               "current folder first (like python -m). `prunescope COMMAND --help` shows each command's options.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"prunescope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"prunescope.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"prunescope.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    for name, p in sub.choices.items():
        p.formatter_class = HelpFormatter
        if name in EXAMPLES and not p.epilog:
            p.epilog = "example:\n  " + EXAMPLES[name]
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line. Errors prunescope raises on purpose (:class:`~prunescope.errors.PrunescopeError`,
    the commands' ``CLIError``) and failures to read or write a file become one line on stderr and exit code 2;
    an interrupt exits 130 without a traceback. This is the only place errors are translated: any other
    exception (a ``ValueError`` or ``TypeError`` from a bug) keeps its traceback."""
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
