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


class MaskError(PrunescopeError, ValueError):
    """A mask is malformed: unknown layer, wrong shape, values other than 0/1, unsupported layer type."""


class ConfigError(PrunescopeError, ValueError):
    """An argument or configuration value is out of range or unknown."""
