"""prunescope: analyse PyTorch models before and during pruning.

The public API keeps NNI's names and signatures, so NNI users can switch by changing an import::

    from prunescope import count_flops_params, ChannelDependency, fix_mask_conflict, SensitivityAnalysis

Names are imported lazily: ``import prunescope`` stays fast and optional extras (plots, Dask) load only
when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "trace": "prunescope.graph",
    "ModelGraph": "prunescope.graph",
    "count_flops_params": "prunescope.flops",
    "FlopsReport": "prunescope.flops",
    "register_formula": "prunescope.flops",
    "ChannelDependency": "prunescope.topology",
    "InputChannelDependency": "prunescope.topology",
    "GroupDependency": "prunescope.topology",
    "ReshapeDependency": "prunescope.removal",
    "not_safe_to_prune": "prunescope.removal",
    "register_channel_rule": "prunescope.topology",
    "L1FilterPruner": "prunescope.masks",
    "L2FilterPruner": "prunescope.masks",
    "LevelPruner": "prunescope.masks",
    "FPGMPruner": "prunescope.masks",
    "flops_report": "prunescope.flops",
    "run_report": "prunescope.report",
    "shrink": "prunescope.narrow",
    "as_pruned": "prunescope.narrow",
    "save_pruned": "prunescope.narrow",
    "load_pruned": "prunescope.narrow",
    "reconstruct": "prunescope.narrow",
    "unit_masks": "prunescope.narrow",
    "head_masks": "prunescope.narrow",
    "ShrinkError": "prunescope.errors",
    "save_masks": "prunescope.masks",
    "load_masks": "prunescope.masks",
    "apply_masks": "prunescope.masks",
    "fix_mask_conflict": "prunescope.masks",
    "SensitivityAnalysis": "prunescope.sensitivity",
    "PrunescopeError": "prunescope.errors",
    "TraceError": "prunescope.errors",
    "MaskError": "prunescope.errors",
    "ConfigError": "prunescope.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'prunescope' has no attribute {name!r}")
    module = importlib.import_module(mod)
    # bind every name the module exports at once (one import per module)
    for n, m in _EXPORTS.items():
        if m == mod:
            globals()[n] = getattr(module, n)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
