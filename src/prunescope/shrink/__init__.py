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

import sys as _sys
import types as _types

from .core import ShrinkResult, ShrinkWarning, as_pruned, shrink
from .io import load_pruned, save_pruned
from .plan import Cut, RemovalPlan, ShrinkError, plan_removal, removed_channels
from .reconstruct import ReconstructResult, reconstruct, refit

__all__ = ["shrink", "as_pruned", "save_pruned", "load_pruned", "plan_removal", "removed_channels", "RemovalPlan",
           "Cut", "ShrinkError", "ShrinkWarning", "ShrinkResult", "reconstruct", "refit", "ReconstructResult"]


class _CallablePackage(_types.ModuleType):
    """``prunescope.shrink`` is both this package and the function: importing the package (``from
    prunescope.shrink import save_pruned``) binds it to the name ``shrink`` on ``prunescope``, so calling it
    must shrink whatever the import order was."""

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return shrink(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
