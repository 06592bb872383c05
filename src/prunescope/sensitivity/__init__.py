"""Layer-wise pruning sensitivity (NNI's ``SensitivityAnalysis``), plus checkpointing, workers, plots.

>>> from prunescope.sensitivity import SensitivityAnalysis, load_sensitivity
"""

from __future__ import annotations

from .analysis import SensitivityAnalysis
from .checkpoint import CheckpointError
from .jobs import MetricError, ModelStateError
from .results import load_sensitivity

__all__ = ["CheckpointError", "MetricError", "ModelStateError", "SensitivityAnalysis", "load_sensitivity"]
