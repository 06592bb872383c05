"""The second embedded example of ``prunescope report``: a tiny Vision Transformer on scikit-learn's digits.

``prunescope report --example vit-digits --out DIR``. The model is plain PyTorch in torchvision's style: a
patch-embedding convolution (2×2 patches of the 8×8 digits: 16 tokens), a class token and a learned position
embedding, pre-norm blocks of multi-head self-attention (separate ``q``/``k``/``v`` Linear layers, heads split
with ``view(B, N, -1, head_dim)``, ``F.scaled_dot_product_attention``) and an MLP, a final LayerNorm and a
Linear head on the class token (~70k parameters). Its pruning units are attention heads (a head's ``q``/``k``/
``v`` rows and ``proj`` columns) and MLP hidden units (an ``fc1`` row and an ``fc2`` column).

Training is deterministic (fixed seed, one thread-independent order) and takes a few seconds on a CPU; the
weights are cached next to the digits CNN's (:func:`prunescope.examples.digits.cache_dir`), loaded without
pickle. LayerNorm has no running statistics, so recovery after pruning is a short fine-tune
(:func:`finetune`); :func:`calibration_batches` exists for symmetry with the CNN example.

>>> from prunescope.examples.vit_digits import load_trained, evaluate   # doctest: +SKIP
>>> model = load_trained()                                              # doctest: +SKIP
>>> evaluate(model) >= 0.95                                             # doctest: +SKIP
True
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .digits import cache_dir, cached_model, calibration_batches, epoch_line, evaluate, load_data

__all__ = ["DigitsViT", "train", "load_trained", "evaluate", "calibration_batches", "finetune", "INPUT_SIZE",
           "cache_dir"]

INPUT_SIZE = (1, 1, 8, 8)
_SEED = 0
_EPOCHS = 30
_LR = 3e-3
_VERSION = "digitsvit-v1"


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections and an output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # (B, N, heads * head_dim) -> (B, heads, N, head_dim); the head count follows the layers' width
        q = self.q(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """2×2 patches → 16 tokens + class token → ``depth`` blocks → LayerNorm → Linear (10 classes)."""

    def __init__(self, dim: int = 64, depth: int = 2, num_heads: int = 4, patch: int = 2, image: int = 8,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 16, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))


def _fit(model: nn.Module, epochs: int, lr: float, seed: int, log: Callable[[str], None] | None = None) -> None:
    """AdamW (one-cycle schedule) on the training split, batches of 64 in a seeded order, cross-entropy;
    leaves the model in train mode. ``log`` gets a line per epoch."""
    xt, yt, _, _ = load_data()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(xt) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        total = 0.0
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log is not None:
            log(epoch_line(epoch, epochs, total / len(xt), t0))


def train(epochs: int = _EPOCHS, seed: int = _SEED, log: Callable[[str], None] | None = None) -> DigitsViT:
    """Train a fresh :class:`DigitsViT` (seconds on a CPU)."""
    torch.manual_seed(seed)
    model = DigitsViT()
    _fit(model, epochs, _LR, seed, log)
    return model.eval()


def load_trained(use_cache: bool = True, progress: bool = True) -> DigitsViT:
    """The trained ViT: loaded from the cache, or trained once and cached (atomic write); training prints a line
    per epoch on stderr unless ``progress=False``."""
    return cached_model(DigitsViT, train, f"{_VERSION}-{_EPOCHS}-{_SEED}", use_cache,  # type: ignore[return-value]
                        progress)


def finetune(model: nn.Module, epochs: int = 10, lr: float = 2e-3, seed: int = _SEED,
             log: Callable[[str], None] | None = None) -> nn.Module:
    """Fine-tune ``model`` in place on the training split (a few seconds on a CPU); the train/eval mode it had
    comes back. ``log`` gets a line per epoch (the report passes its console)."""
    was = model.training
    _fit(model, epochs, lr, seed, log)
    model.train(was)
    return model
