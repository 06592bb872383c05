"""Sub-commands of the ``prunescope`` command line, one module each.

Each module defines ``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the
parsed arguments and returning an exit code).
"""

COMMANDS = ("flops", "deps", "masks", "shrink", "sensitivity", "report")
