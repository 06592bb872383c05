"""From masks to the model a user ships: the removal plan, ``shrink``, and pruned-model files.

>>> import torch, torchvision
>>> from prunescope.shrink import shrink
>>> from prunescope.masks import L1FilterPruner
>>> net = torchvision.models.resnet18()
>>> masks = L1FilterPruner(net, [{'sparsity': 0.5, 'op_names': ['layer1.0.conv1']}]).compute_masks()
>>> small = shrink(net, masks, torch.ones(1, 3, 64, 64))
>>> small.layer1[0].conv1.out_channels, small.layer1[0].bn1.num_features, small.layer1[0].conv2.in_channels
(32, 32, 32)
"""

from .core import ShrinkResult, ShrinkWarning, as_pruned, shrink
from .io import load_pruned, save_pruned
from .plan import Cut, RemovalPlan, ShrinkError, plan_removal, removed_channels

__all__ = ["shrink", "as_pruned", "save_pruned", "load_pruned", "plan_removal", "removed_channels", "RemovalPlan",
           "Cut", "ShrinkError", "ShrinkWarning", "ShrinkResult"]
