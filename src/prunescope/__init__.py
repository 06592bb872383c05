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
    "ReshapeDependency": "prunescope.topology",
    "not_safe_to_prune": "prunescope.topology",
    "register_channel_rule": "prunescope.topology",
    "L1FilterPruner": "prunescope.masks",
    "L2FilterPruner": "prunescope.masks",
    "LevelPruner": "prunescope.masks",
    "FPGMPruner": "prunescope.masks",
    "flops_report": "prunescope.flops",
    "run_report": "prunescope.report",
    "shrink": "prunescope.shrink",
    "as_pruned": "prunescope.shrink",
    "save_pruned": "prunescope.shrink",
    "load_pruned": "prunescope.shrink",
    "reconstruct": "prunescope.shrink",
    "ShrinkError": "prunescope.shrink",
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
    # importing ``prunescope.shrink`` binds the subpackage to the name ``shrink`` here; every name exported
    # from that module is bound now, so ``from prunescope import as_pruned, shrink`` gives the function
    for n, m in _EXPORTS.items():
        if m == mod:
            globals()[n] = getattr(module, n)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
