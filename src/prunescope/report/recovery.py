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

from ..errors import ConfigError
from ..graph import make_inputs

__all__ = ["recalibrate_bn"]


def recalibrate_bn(model: nn.Module, batches: Iterable[Any]) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (inputs as for a forward; the exact
    average over all batches). Weights are not changed; momentum and train/eval flags come back. Returns the
    number of batches used (0: the model has no BatchNorm with running statistics, nothing changed).

    ``batches`` that are not iterable, or a batch the model cannot run, raise
    :class:`~prunescope.errors.ConfigError` naming the batch (its index and shapes); the running statistics
    then come back as they were."""
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise ConfigError(f"calibration batches must be an iterable of model inputs (a list, a DataLoader ...), "
                          f"got {type(batches).__name__}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    flags = [(m, m.training) for m in model.modules()]
    moms = [(m, m.momentum) for m in bns]
    stats = [(t, t.detach().clone()) for m in bns for t in m.buffers()]
    n = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the exact mean over the batches seen
        model.train()
        with torch.no_grad():
            for b in batches:
                try:
                    args, kw = make_inputs(model, b)
                    model(*args, **kw)
                except Exception as e:  # noqa: BLE001 - any failure on a user batch is that batch's problem
                    for t, saved in stats:
                        t.copy_(saved)
                    first = " ".join(str(e).split())[:300]
                    raise ConfigError(f"calibration batch {n} ({_describe(b)}) does not fit the model: "
                                      f"{type(e).__name__}: {first}") from e
                n += 1
    finally:
        for m, mom in moms:
            m.momentum = mom
        for m, f in flags:
            m.training = f
    return n


def _describe(batch: Any) -> str:
    """A batch by its shapes: ``tensor (2, 5, 8, 8)``, ``tuple of 2: (2, 3), (2,)``, ``int``."""
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        parts = [str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__ for v in batch[:4]]
        return f"{type(batch).__name__} of {len(batch)}: " + ", ".join(parts) + (" ..." if len(batch) > 4 else "")
    if isinstance(batch, dict):
        return "dict: " + ", ".join(f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
                                    for k, v in list(batch.items())[:4])
    return type(batch).__name__
