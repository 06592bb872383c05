"""Exceptions raised by prunescope.

Every error names the thing that is wrong (a layer, an op, a value), so that a user can fix their input
without reading a traceback.
"""

from __future__ import annotations


class PrunescopeError(Exception):
    """Base class of every error prunescope raises on purpose."""


class TraceError(PrunescopeError):
    """The model could not be run on the example input.

    ``module`` is the dotted name of the innermost module that was running ('' for the root model) and
    ``op`` the tensor operation that failed, when one did.
    """

    def __init__(self, message: str, module: str | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.module = module
        self.op = op
        self.recorded: int | None = None  # ops recorded before the failure, when raised by a trace


class MaskError(PrunescopeError, ValueError):
    """A mask is malformed: unknown layer, wrong shape, values other than 0/1, unsupported layer type."""


class ConfigError(PrunescopeError, ValueError):
    """An argument or configuration value is out of range or unknown."""


class UnsupportedModelError(TraceError, TypeError):
    """The model (or one of its modules) is of a kind prunescope cannot analyse, e.g. TorchScript.

    ``module`` names the offending module ('' for the root model).
    """


class OutputError(PrunescopeError, OSError):
    """A result file cannot be written; the message names the path the caller gave."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:  # OSError's own __str__ would format errno/filename fields we do not set
        return str(self.args[0]) if self.args else ""


class ShrinkError(PrunescopeError, ValueError):
    """The masks cannot be turned into a physically smaller model (a pinned layer, a model that no longer runs).

    ``layer`` names the layer concerned, ``op`` the op that pins it or failed, when known.
    """

    def __init__(self, message: str, layer: str | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer
        self.op = op


class ShrinkWarning(UserWarning):
    """Masks were changed before shrinking (conflicts fixed) or some masked channels had to be kept."""
