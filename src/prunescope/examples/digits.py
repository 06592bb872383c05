"""The embedded default of ``prunescope report``: a small residual CNN trained on scikit-learn's digits.

The data (1,797 8×8 handwritten digits) ship inside scikit-learn, so nothing is downloaded. Training takes a
few seconds on a CPU; the trained weights are cached in the user cache directory
(``$XDG_CACHE_HOME/prunescope`` or ``~/.cache/prunescope``) and loaded without pickle.

>>> from prunescope.examples.digits import load_trained, evaluate   # doctest: +SKIP
>>> model = load_trained()                                          # doctest: +SKIP
>>> round(evaluate(model), 2) > 0.9                                 # doctest: +SKIP
True
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from functools import lru_cache
from typing import Callable

import torch
from torch import nn

from .._io import atomic_open

__all__ = ["DigitsNet", "load_data", "train", "load_trained", "evaluate", "INPUT_SIZE", "cache_dir"]

INPUT_SIZE = (1, 1, 8, 8)
_SEED = 0
_EPOCHS = 5
_VERSION = "digitsnet-v1"


class DigitsNet(nn.Module):
    """conv stem → residual block → strided conv → flatten → Linear → Linear (10 classes)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.conv4 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * w)
        self.fc1 = nn.Linear(2 * w * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(y)) + x)  # residual: conv1 and conv3 are tied
        x = torch.relu(self.bn4(self.conv4(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


@lru_cache(maxsize=1)
def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: a fixed 1,297 / 500 split of scikit-learn's digits, scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the embedded example needs scikit-learn: pip install 'prunescope[examples]'") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(_SEED)
    perm = torch.randperm(len(x), generator=g)
    tr, va = perm[:1297], perm[1297:]
    return x[tr], y[tr], x[va], y[va]


def evaluate(model: nn.Module, batch_size: int = 500) -> float:
    """Top-1 accuracy on the held-out 500 digits (deterministic)."""
    _, _, xv, yv = load_data()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(xv), batch_size):
            out = model(xv[i : i + batch_size].to(device))
            correct += int((out.argmax(1).cpu() == yv[i : i + batch_size]).sum())
    return correct / len(xv)


def train(epochs: int = _EPOCHS, seed: int = _SEED, log: Callable[[str], None] | None = None) -> DigitsNet:
    """Train a fresh :class:`DigitsNet` (a few seconds on a CPU)."""
    torch.manual_seed(seed)
    model = DigitsNet()
    _fit(model, epochs, 3e-3, seed, log)
    return model.eval()


def _fit(model: nn.Module, epochs: int, lr: float, seed: int, log: Callable[[str], None] | None = None) -> None:
    """Adam on the training split, batches of 64 in a seeded order, cross-entropy; leaves the model in train mode.
    ``log`` gets a line per epoch (mean training loss, seconds so far)."""
    xt, yt, _, _ = load_data()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        total = 0.0
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if log is not None:
            log(epoch_line(epoch, epochs, total / len(xt), t0))


def epoch_line(epoch: int, epochs: int, loss: float, t0: float) -> str:
    """``  epoch 3/30  loss 0.4123  (12.3 s)``: one line of training progress."""
    return f"  epoch {epoch + 1}/{epochs}  loss {loss:.4f}  ({time.perf_counter() - t0:.1f} s)"


def print_line(line: str) -> None:
    """Print a progress line on stderr at once (stdout may be a pipe or a file)."""
    print(line, file=sys.stderr, flush=True)


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "prunescope")


# Training sums gradients in an order that depends on the number of intra-op threads, so the trained weights (and
# every accuracy the README and the tests quote) would depend on the machine and on OMP_NUM_THREADS; the examples
# train with this many threads, whatever the caller set.
TRAIN_THREADS = 2


def cached_model(build: Callable[[], nn.Module], train_fn: Callable[..., nn.Module], tag: str, use_cache: bool = True,
                 progress: bool = True) -> nn.Module:
    """A trained example model: its weights loaded from the cache (``cache_dir()/<tag>-<key>.pt``, key = tag and
    torch version), or trained once with ``train_fn(log=...)`` and cached (atomic write, ``weights_only`` load).
    When it has to train and ``progress`` is true, it says so on stderr with a line per epoch."""
    key = hashlib.sha256(f"{tag}-{torch.__version__}".encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"{tag.split('-')[0]}-{key}.pt")
    model = build()
    if use_cache and os.path.exists(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            return model.eval()
        except Exception:  # a corrupt cache is retrained, never trusted
            pass
    log = print_line if progress else None
    if log is not None:
        log(f"training the {tag.split('-')[0]} example on scikit-learn's digits"
            + (f" (first run only: the weights are cached in {path})" if use_cache else ""))
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)  # the float order of training depends on it: one set of weights everywhere
    try:
        model = train_fn(log=log)
    finally:
        torch.set_num_threads(threads)
    if log is not None:
        log(f"trained in {time.perf_counter() - t0:.1f} s")
    if use_cache:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_open(path, "wb") as f:
            torch.save(model.state_dict(), f)
    return model


def load_trained(use_cache: bool = True, progress: bool = True) -> DigitsNet:
    """The trained default model: loaded from the cache, or trained once and cached (atomic write); training
    prints a line per epoch on stderr unless ``progress=False``."""
    return cached_model(DigitsNet, train, f"{_VERSION}-{_EPOCHS}-{_SEED}", use_cache,  # type: ignore[return-value]
                        progress)


def calibration_batches(batch_size: int = 128) -> list[torch.Tensor]:
    """The training split in batches: inputs for BatchNorm re-estimation after pruning."""
    xt, _, _, _ = load_data()
    return [xt[i : i + batch_size] for i in range(0, len(xt), batch_size)]


def finetune(model: nn.Module, epochs: int = 5, lr: float = 2e-3, seed: int = _SEED,
             log: Callable[[str], None] | None = None) -> nn.Module:
    """Fine-tune ``model`` in place on the training split (Adam, cross-entropy; a few seconds on a CPU).

    The model comes back in the train/eval mode it had. ``log`` gets a line per epoch (the report passes its
    console).
    """
    was = model.training
    _fit(model, epochs, lr, seed, log)
    model.train(was)
    return model
