"""Masks: pruners that produce them, safe mask files, applying masks, fixing mask conflicts.

A mask dict has NNI's export layout ``{layer_name: {'weight': tensor, 'bias': tensor or None}}`` with
1 = keep, 0 = pruned.
"""

from __future__ import annotations

from .apply import apply_masks
from .conflict import ConflictChange, FixedMasks, fix_mask_conflict, fix_masks_with
from .files import load_masks, save_masks, validate_masks
from .pruners import FPGMPruner, L1FilterPruner, L2FilterPruner, LevelPruner, Pruner, group_masks, layer_mask

__all__ = [
    "ConflictChange",
    "FixedMasks",
    "FPGMPruner",
    "L1FilterPruner",
    "L2FilterPruner",
    "LevelPruner",
    "Pruner",
    "apply_masks",
    "fix_mask_conflict",
    "fix_masks_with",
    "group_masks",
    "layer_mask",
    "load_masks",
    "save_masks",
    "validate_masks",
]
