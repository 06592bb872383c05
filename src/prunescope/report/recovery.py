"""Recovery after pruning: BatchNorm re-estimation and the user's fine-tuning, each measured.

Removing channels shifts the statistics every following BatchNorm sees; re-estimating the running mean and
variance on a few batches of training data (no gradient, no weight change) recovers much of the loss in
seconds. Fine-tuning (the user's ``fn(model)``, which trains the model in place) recovers the rest.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)).eval()
>>> recalibrate_bn(net, [torch.randn(4, 1, 3, 3) * 5 + 3])
1
>>> bool(net[1].running_mean.abs().sum() > 0), net.training
(True, False)
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..graph import make_inputs

__all__ = ["recalibrate_bn"]


def recalibrate_bn(model: nn.Module, batches: Iterable[Any]) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (inputs as for a forward; the exact
    average over all batches). Weights are not changed; momentum and train/eval flags come back. Returns the
    number of batches used (0: the model has no BatchNorm with running statistics, nothing changed)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    flags = [(m, m.training) for m in model.modules()]
    moms = [(m, m.momentum) for m in bns]
    n = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the exact mean over the batches seen
        model.train()
        with torch.no_grad():
            for b in batches:
                args, kw = make_inputs(model, b)
                model(*args, **kw)
                n += 1
    finally:
        for m, mom in moms:
            m.momentum = mom
        for m, f in flags:
            m.training = f
    return n
