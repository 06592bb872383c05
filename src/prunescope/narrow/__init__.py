"""From masks to the model a user ships: ``shrink`` (the narrowed copy), ``as_pruned`` (the masked model that
computes the same), reconstruction, the prunable sets, and pruned-model files.

The removal plan these read (which channels go, the cuts, the as-pruned zeros) is the layer below,
:mod:`prunescope.removal`. The package is named ``narrow`` so that ``prunescope.shrink`` is only the function.

>>> import torch, torchvision
>>> from prunescope import shrink
>>> from prunescope.masks import L1FilterPruner
>>> net = torchvision.models.resnet18()
>>> masks = L1FilterPruner(net, [{'sparsity': 0.5, 'op_names': ['layer1.0.conv1']}]).compute_masks()
>>> small = shrink(net, masks, torch.ones(1, 3, 64, 64))
>>> small.layer1[0].conv1.out_channels, small.layer1[0].bn1.num_features, small.layer1[0].conv2.in_channels
(32, 32, 32)
"""

from ..errors import ShrinkError, ShrinkWarning
from ..removal.plan import Cut, RemovalPlan, plan_removal, removed_channels
from .core import ShrinkResult, as_pruned, reconstruct, shrink
from .files import load_pruned, save_pruned
from .reconstruct import ReconstructResult, refit
from .units import head_masks, unit_masks

__all__ = ["shrink", "as_pruned", "save_pruned", "load_pruned", "plan_removal", "removed_channels", "RemovalPlan",
           "Cut", "ShrinkError", "ShrinkWarning", "ShrinkResult", "reconstruct", "refit", "ReconstructResult",
           "unit_masks", "head_masks"]
