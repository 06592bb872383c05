"""Small real models on real data that ship with the packages (no download), for demos and tests.

:data:`EXAMPLES` names the embedded examples of ``prunescope report`` (run without a model);
:func:`load_example` gives everything the report needs for one of them: the trained model, its evaluation,
an example input, its calibration inputs and its fine-tuning function.

>>> sorted(EXAMPLES)
['digits', 'vit-digits']
>>> EXAMPLES["vit-digits"].title
'digits ViT (embedded example)'
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from . import digits, vit_digits

__all__ = ["Example", "ExampleJob", "EXAMPLES", "load_example"]


@dataclass(frozen=True)
class Example:
    """An embedded example: ``module`` has ``load_trained``, ``evaluate``, ``INPUT_SIZE``, ``calibration_batches``,
    ``finetune`` and ``cache_dir``."""

    name: str
    module: ModuleType
    description: str
    title: str  # the report's model name


EXAMPLES = {
    "digits": Example("digits", digits, "residual CNN on scikit-learn's digits", "digits CNN (embedded default)"),
    "vit-digits": Example("vit-digits", vit_digits, "tiny Vision Transformer (heads and MLP units) on "
                          "scikit-learn's digits", "digits ViT (embedded example)"),
}


@dataclass(frozen=True)
class ExampleJob:
    """What ``prunescope report`` runs for an embedded example (the arguments of
    :func:`prunescope.report.run_report`)."""

    example: Example
    model: nn.Module
    evaluate: Callable[[nn.Module], float]
    dummy_input: torch.Tensor
    calibrate: Callable[[], Any] | None
    finetune: Callable[..., Any] | None
    metric_name: str = "accuracy"

    @property
    def model_name(self) -> str:
        return self.example.title


def load_example(name: str | None = None, *, recovery: bool = True, finetune: bool = True,
                 progress: bool = True) -> ExampleJob:
    """The embedded example ``name`` (default ``digits``), trained (from the cache, or trained once with a line
    per epoch on stderr unless ``progress=False``). ``recovery=False``: no calibration inputs and no fine-tuning
    (the shrunk model ships as it is); ``finetune=False``: calibration inputs only (the reconstructed model
    ships). An unknown name raises :class:`~prunescope.errors.ConfigError` naming the choices."""
    key = name or "digits"
    ex = EXAMPLES.get(key)
    if ex is None:
        raise ConfigError(f"unknown example {key!r}: choose one of {', '.join(sorted(EXAMPLES))}")
    m = ex.module
    return ExampleJob(ex, m.load_trained(progress=progress), m.evaluate, torch.ones(m.INPUT_SIZE),
                      m.calibration_batches if recovery else None,
                      m.finetune if recovery and finetune else None)
