"""Post-training reconstruction: refit the narrowed layers by least squares from unlabeled inputs.

After channels are removed, every layer that lost input or output channels (``Conv1d/2d/3d`` including grouped
and depthwise ones, ``Linear``, Hugging Face ``Conv1D``: attention output projections, gated-MLP down
projections, q/k/v and gate/up rows) is refit so that it reproduces the **dense** model's output at that layer
(its kept output channels) from the **shrunk** model's actual inputs (He et al. 2017, ThiNet, Kwon et al. 2022).
Layers are refit one pass at a time in execution order, so a later layer corrects what an earlier one could
not reproduce.

The choice: ``prunescope.reconstruct(model, masks, x, calibration)`` is ``shrink(model, masks, x,
calibration=calibration)``: one implementation, one model that ships. Evaluate a masked model "as it will
ship" by reconstructing it (the reconstructed model is the shrunk one; as-pruned masks alone cannot hold the
refit weights of narrower layers).

How (and why)
-------------
* **Ridge towards the narrowed weight.** Per layer (per group of a grouped conv) the weight and bias are
  solved jointly from the streamed normal equations::

      W = (XᵀX + λI)⁻¹ (XᵀY + λ W₀),    λ = ridge · mean(diag XᵀX)

  with ``X`` the shrunk model's input patches, ``Y`` the dense output's kept channels and ``W₀`` the narrowed
  weight, on centred data: the intercept is not shrunk (ridge practice) and absorbs the mean the removed
  channels carried (FLAP's bias compensation). The regulariser pulls towards ``W₀``, not towards zero, so a
  layer whose input and kept output are what the dense model computes comes back as itself (exact up to float
  noise), and a layer seen on too few samples stays near what it was. ``ridge=None`` (default): ``1e-3`` where
  a layer has at least 4 rows per unknown; below that (a linear layer fitted on a few hundred inputs) the
  ridge is chosen from ``RIDGE_GRID`` by 4-fold cross-validation over whole calibration samples (one
  eigendecomposition per fold), or ``0.1`` for layers wider than ``CV_MAX_DIM``.
* **Streaming.** ``XᵀX`` and ``XᵀY`` are accumulated per batch in float64; a convolution's patches (an unfold,
  any dimensionality, stride, dilation, padding mode) exist for one batch of one layer at a time. Layers whose
  inputs do not depend on each other (q/k/v, gate/up, a residual block's last conv and its downsample) share a
  pass; a forward is cut short after a pass's last layer.
* **Linear in depth: block by block.** Rerunning the shrunk model from its input for every pass costs
  ``O(depth²)`` forwards per batch. Instead the refit finds a *chain of blocks* (same-class modules such as
  transformer layers or residual blocks, each called once, each on the previous block's output and otherwise
  the same inputs — attention mask, position embeddings — and not writing into its inputs; checked on one
  probe forward of both models) and keeps, for every calibration batch, the input of the current block of
  the shrunk and of the dense model (the chain tensor on the CPU). A pass inside block ``k`` runs only block
  ``k`` on those inputs; once all of block ``k``'s layers are refit, the cached inputs are replaced by the
  block's outputs. Each layer still sees the shrunk model's input after every earlier layer was refit: the
  result is the same as rerunning the whole model (tested equal), at ``O(depth)`` block forwards per batch.
  Layers outside the chain (a stem, a classifier) are refit by whole-model runs as before; models without a
  chain (or with ``block_cache_mb=0``) use whole-model runs throughout. The chain cache costs
  ``2 × calibration samples × one block input`` (e.g. 128 sequences × 128 tokens × hidden 1024 × 4 bytes =
  64 MiB per model); above ``block_cache_mb`` (default 4 GiB) the chain is not used (a note in the result).
  The model's forward gets ``use_cache=False`` where it takes one (no key/value cache is needed).
* **Dense targets.** The dense model's targets of the layers of one block (or of all layers outside the
  chain) are kept for all batches when they fit in ``cache_mb`` (one dense run per batch); otherwise each
  pass reruns the dense block (or model) up to its layers.
* **BatchNorm.** An eval-mode BatchNorm after a conv is a per-channel affine map; least squares with one Gram
  matrix solves every output channel separately, so matching the conv output before the BatchNorm is the
  same solution as matching after it. A conv without a bias whose only reader is such a BatchNorm gets its
  fitted intercept folded into the BatchNorm's running mean (the module keeps its parameters, so saved
  models load as before). A layer without a bias and no such BatchNorm is fitted without an intercept.
  ``bn="recalibrate"`` re-estimates the BatchNorm statistics afterwards (measured on the digits CNN it is
  worse than keeping them: the refit already targets the dense statistics), ``bn="keep"`` (default) does not.
* **Scope.** ``layers="affected"`` (default) refits the layers that lost channels; ``"downstream"`` also every
  later conv/linear layer (their inputs changed too). Layers called more than once per forward are fitted
  on all their calls.
* **Fused experts** (one 3-D parameter for all experts, transformers 5 MoE): after the conv/linear layers, every
  expert's down projection whose input lost units is refit on its own, from the tokens the shrunk router sends
  to it. Its input (the shrunk expert's hidden units) is read off the experts module's own forward, called on
  those tokens routed to that expert alone with weight 1 and the down projection temporarily replaced by
  selectors (``⌈units / hidden⌉`` calls); its target is the dense expert's output on the dense model's hidden
  state of the same tokens. Unweighted by the routing weights; gate/up projections (behind the activation)
  are not refit. Cost: one whole-model run per MoE layer and batch (the MoE layers are refit in execution
  order but after all other layers, so the layers after an MoE layer were fitted to its unrefit output).
  Skipped with the reason where the module is not called as ``(hidden_states, top_k_index, top_k_weights)``
  or has biases.

The user's model is not modified (temporary hooks, eval mode, all restored, also on exceptions). The
reconstruction targets eval-mode outputs; the returned model is in the training mode the model had.

>>> import torch
>>> from torch import nn
>>> from prunescope import reconstruct
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
>>> m = torch.ones(8, 3, 3, 3); m[:2] = 0
>>> x = [torch.randn(16, 3, 10, 10) for _ in range(2)]
>>> small = reconstruct(net, {'0': {'weight': m, 'bias': torch.tensor([0.] * 2 + [1.] * 6)}}, x[0], x)
>>> small[2].in_channels
6
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ShrinkError, ShrinkWarning
from ..graph import ModelGraph, make_inputs, preserved_training
from ..masks.layers import CONV_TYPES, is_transposed_linear
from ..removal.expert_cuts import ExpertCut
from ..removal.plan import RemovalPlan
from ..removal.stdconv import std_weights

__all__ = ["refit", "ReconstructResult"]

_SCOPES = ("affected", "downstream")
DEFAULT_RIDGE = 1e-3  # relative to the mean diagonal of XᵀX, for layers with many rows per unknown
RIDGE_GRID = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 10.0)  # tried by cross-validation otherwise
CV_ROWS_PER_UNKNOWN = 4  # fewer expected rows per input column than this: choose the ridge by cross-validation
CV_FOLDS = 4
CV_MAX_DIM = 1024  # wider under-determined layers skip the cross-validation (an eigendecomposition per fold) ...
UNDERDETERMINED_RIDGE = 0.1  # ... and get this ridge (what the cross-validation chose on the digits CNN's fc1)
_BN_MODES = ("keep", "recalibrate")


class _Stop(BaseException):
    """Raised by a hook to cut a forward short once every layer of a pass has been seen (a ``BaseException``,
    so that a model's own ``except Exception`` does not swallow it)."""


@dataclass
class ReconstructResult:
    """What :func:`refit` did: the refit layers in order, the passes over the calibration batches, the relative
    output error of every refit layer before and after (on the calibration inputs), and the seconds spent."""

    layers: list[str] = field(default_factory=list)
    passes: int = 0
    batches: int = 0
    error_before: dict[str, float] = field(default_factory=dict)
    error_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    ridge: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)
    block_cache_mb: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"ReconstructResult({len(self.layers)} layers in {self.passes} passes over {self.batches} batches, "
                f"{len(self.blocks)} blocks, {self.seconds:.2f} s, skipped={len(self.skipped)})")


def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, CONV_TYPES):
        return "conv"
    if isinstance(mod, nn.Linear):
        return "linear"
    if is_transposed_linear(mod) and not isinstance(mod, nn.Embedding):
        w = getattr(mod, "weight", None)
        return "tlinear" if isinstance(w, torch.Tensor) and w.dim() == 2 else None
    return None


def _first_tensor(args: Any) -> torch.Tensor | None:
    if isinstance(args, torch.Tensor):
        return args
    if isinstance(args, (tuple, list)):
        for a in args:
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


# ------------------------------------------------------------------------------------------- per-layer algebra
def _patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input patches of ``conv`` on ``x`` (``(B, C, *S)``) as ``(B·L, C·k)``, channel-major like the weight."""
    nd = x.ndim - 2
    ks, st, dil = conv.kernel_size, conv.stride, conv.dilation  # type: ignore[attr-defined]
    pad = conv._reversed_padding_repeated_twice  # type: ignore[attr-defined]
    if any(pad):
        mode = conv.padding_mode  # type: ignore[attr-defined]
        x = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
    for d in range(nd):
        window = dil[d] * (ks[d] - 1) + 1
        x = x.unfold(2 + d, window, st[d])
        if dil[d] > 1:
            x = x[..., :: dil[d]]
    # (B, C, o1..on, k1..kn) -> (B, o1..on, C, k1..kn)
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)
    n_pos = math.prod(x.shape[1 : 1 + nd])
    return x.reshape(x.shape[0] * n_pos, -1)


class _Fit:
    """Streamed normal equations of one layer (one block per group of a grouped conv; one set per fold when the
    ridge is chosen by cross-validation)."""

    def __init__(self, name: str, mod: nn.Module, keep_out: torch.Tensor, intercept: bool, batches: int = 1,
                 auto_ridge: bool = False) -> None:
        self.name, self.mod, self.kind = name, mod, _kind(mod)
        self.keep_out = keep_out
        self.intercept = intercept
        self.groups = int(getattr(mod, "groups", 1)) if self.kind == "conv" else 1
        w = mod.weight  # type: ignore[union-attr]
        self.d_in = (w.shape[1] * math.prod(w.shape[2:])) if self.kind == "conv" else (
            w.shape[0] if self.kind == "tlinear" else w.shape[1])
        self.n_out = w.shape[1] if self.kind == "tlinear" else w.shape[0]
        self.batches, self.auto_ridge = batches, auto_ridge
        self.folds = 0  # set by the first batch
        self.gram = self.cross = self.yy = torch.zeros(0)
        self.n = 0
        self.samples = 0  # inputs seen (rows of a sample go to fold ``sample % folds``)
        self.ridge_used = float("nan")
        self.bn: nn.Module | None = None  # the BatchNorm that takes the intercept of a bias-free conv

    def design(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, groups, d_in)`` rows of the input."""
        if self.kind == "conv":
            p = _patches(self.mod, x)
        else:
            p = x.reshape(-1, x.shape[-1])
        return p.reshape(p.shape[0], self.groups, -1)

    def target(self, y: torch.Tensor) -> torch.Tensor:
        """``(N, groups, out_per_group)`` rows of the dense output's kept channels."""
        if self.kind == "conv":
            y = y.movedim(1, -1)
        y = y.reshape(-1, y.shape[-1])[:, self.keep_out.to(y.device)]
        return y.reshape(y.shape[0], self.groups, -1)

    def add(self, x: torch.Tensor, y: torch.Tensor, is_target: bool = False) -> None:
        """Accumulate one call: input ``x`` of the shrunk layer, dense output ``y`` (or its :meth:`target`)."""
        xd = self.design(x.detach().float())
        yd = y if is_target else self.target(y.detach().float())
        if xd.shape[0] != yd.shape[0]:
            raise ShrinkError(f"reconstruct: '{self.name}' saw {xd.shape[0]} input rows and {yd.shape[0]} "
                              "output rows", self.name)
        if self.intercept:
            xd = torch.cat([xd, xd.new_ones(xd.shape[0], self.groups, 1)], 2)
        b = max(int(x.shape[0]), 1) if x.ndim > 1 else 1
        b = b if xd.shape[0] % b == 0 else 1
        if not self.folds:  # the first batch: cross-validate the ridge only where rows are few per unknown
            d, g, og = xd.shape[2], self.groups, yd.shape[2]
            few = xd.shape[0] * self.batches < CV_ROWS_PER_UNKNOWN * d
            self.folds = CV_FOLDS if (self.auto_ridge and few and b * self.batches >= CV_FOLDS) else 1
            self.gram = torch.zeros(self.folds, g, d, d, dtype=torch.float64, device=xd.device)
            self.cross = torch.zeros(self.folds, g, d, og, dtype=torch.float64, device=xd.device)
            self.yy = torch.zeros(self.folds, dtype=torch.float64, device=xd.device)
        fold = (self.samples + torch.arange(xd.shape[0], device=xd.device) // (xd.shape[0] // b)) % self.folds
        for k in range(self.folds):
            sel = fold == k if self.folds > 1 else slice(None)
            xg, yg = xd[sel].transpose(0, 1), yd[sel].transpose(0, 1)  # (g, N, d), (g, N, o)
            self.gram[k] += torch.bmm(xg.transpose(1, 2), xg).double()
            self.cross[k] += torch.bmm(xg.transpose(1, 2), yg).double()
            self.yy[k] += (yg.double() ** 2).sum()
        self.n += xd.shape[0]
        self.samples += b

    def current(self) -> torch.Tensor:
        """The layer's current weight (and bias) as ``(groups, d, out_per_group)``."""
        w = self.mod.weight.detach().double()  # type: ignore[union-attr]
        g = self.groups
        if self.kind == "tlinear":
            wm = w.unsqueeze(0)  # (1, in, out)
        else:
            wm = w.reshape(g, self.n_out // g, -1).transpose(1, 2)  # (g, d_in, o)
        if self.intercept:
            b = getattr(self.mod, "bias", None)
            bb = b.detach().double() if isinstance(b, torch.Tensor) else torch.zeros(self.n_out, dtype=torch.float64,
                                                                                       device=w.device)
            wm = torch.cat([wm, bb.reshape(g, 1, -1)], 1)
        return wm

    @staticmethod
    def _quad(wm: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return (torch.bmm(gram, wm) * wm).sum() - 2 * (wm * cross).sum() + yy

    def error(self, wm: torch.Tensor) -> float:
        """Relative squared error ``‖XW − Y‖² / ‖Y‖²`` from the accumulated statistics."""
        yy = self.yy.sum()
        quad = self._quad(wm, self.gram.sum(0), self.cross.sum(0), yy)
        return float(quad.clamp(min=0) / yy.clamp(min=1e-30))

    def _centred(self, gram: torch.Tensor, cross: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The weight block of the normal equations with the (unpenalised) intercept eliminated: ridge on
        centred data. Returns ``(gram_c, cross_c, mean_x, mean_y)`` (means ``None`` without an intercept)."""
        d = self.d_in
        if not self.intercept:
            return gram, cross, None, None
        n = gram[:, d, d].clamp(min=1.0)  # (g,)
        mu = gram[:, :d, d] / n[:, None]  # (g, d)
        ybar = cross[:, d, :] / n[:, None]  # (g, o)
        gc = gram[:, :d, :d] - n[:, None, None] * mu[:, :, None] * mu[:, None, :]
        cc = cross[:, :d, :] - n[:, None, None] * mu[:, :, None] * ybar[:, None, :]
        return gc, cc, mu, ybar

    def _with_intercept(self, body: torch.Tensor, mu: Any, ybar: Any) -> torch.Tensor:
        if mu is None:
            return body
        b = ybar - torch.einsum("gd,gdo->go", mu, body)
        return torch.cat([body, b[:, None, :]], 1)

    def _ridge_solve(self, gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
        """``W = (XᵀX + λI)⁻¹ (XᵀY + λW₀)`` on the weight block (the intercept is not shrunk: ridge practice; it
        absorbs the mean the removed channels carried), ``λ = ridge · mean(diag)``."""
        gc, cc, mu, ybar = self._centred(gram, cross)
        d = self.d_in
        lam = (ridge * gc.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)).reshape(-1, 1, 1)
        a = gc + lam * torch.eye(d, dtype=torch.float64, device=gc.device)
        rhs = cc + lam * w0[:, :d, :]
        try:
            body = torch.linalg.solve(a, rhs)
        except RuntimeError:  # singular even with the ridge (all-zero inputs): least squares
            body = torch.linalg.lstsq(a, rhs).solution
        return self._with_intercept(body, mu, ybar)

    def _ridge_path(self, gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridges: Sequence[float]
                    ) -> list[torch.Tensor]:
        """:meth:`_ridge_solve` for several ridges from one eigendecomposition."""
        gc, cc, mu, ybar = self._centred(gram, cross)
        d = self.d_in
        scale = gc.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-12)  # (g,)
        evals, vecs = torch.linalg.eigh(gc)
        evals = evals.clamp(min=0)
        vc = vecs.transpose(1, 2) @ cc
        vw = vecs.transpose(1, 2) @ w0[:, :d, :]
        out = []
        for r in ridges:
            lam = (r * scale)[:, None]  # (g, 1)
            den = evals + lam
            inv = torch.where(den > 1e-12 * scale[:, None], 1.0 / den.clamp(min=1e-300), torch.zeros_like(den))
            body = vecs @ ((vc + lam[:, :, None] * vw) * inv[:, :, None])
            out.append(self._with_intercept(body, mu, ybar))
        return out

    def solve(self, ridge: float | None) -> torch.Tensor:
        """The refit ``(groups, d, out)``. ``ridge=None``: chosen from :data:`RIDGE_GRID` by cross-validation over
        the folds (whole samples held out) when the layer was fitted with folds (few rows per unknown); such a
        layer wider than ``CV_MAX_DIM`` gets ``UNDERDETERMINED_RIDGE``; others ``DEFAULT_RIDGE``."""
        w0 = self.current()
        gram, cross = self.gram.sum(0), self.cross.sum(0)
        if ridge is None:
            ridge = DEFAULT_RIDGE
            if self.folds > 1 and self.d_in > CV_MAX_DIM:
                ridge = UNDERDETERMINED_RIDGE
            elif self.folds > 1:
                errs = np.zeros(len(RIDGE_GRID))
                for k in range(self.folds):
                    sols = self._ridge_path(gram - self.gram[k], cross - self.cross[k], w0, RIDGE_GRID)
                    errs += [float(self._quad(w, self.gram[k], self.cross[k], self.yy[k])) for w in sols]
                ridge = RIDGE_GRID[int(np.argmin(errs))]
        self.ridge_used = ridge
        return self._ridge_solve(gram, cross, w0, ridge)

    @torch.no_grad()
    def write(self, wm: torch.Tensor, bn: nn.Module | None) -> None:
        mod = self.mod
        w = mod.weight  # type: ignore[union-attr]
        body = wm[:, : self.d_in, :]
        if self.kind == "tlinear":
            new = body[0]
        else:
            new = body.transpose(1, 2).reshape(w.shape)
        w.copy_(new.to(w.dtype))
        if self.intercept:
            c = wm[:, self.d_in, :].reshape(-1)
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.Tensor):
                b.copy_(c.to(b.dtype))
            elif bn is not None:  # BN(y + c) with running mean μ is BN(y) with running mean μ − c
                bn.running_mean.sub_(c.to(bn.running_mean.dtype))  # type: ignore[union-attr,operator]


# ---------------------------------------------------------------------------------------- execution structure
def _call_order(model: nn.Module, names: Sequence[str], batches: Sequence[Any]
                ) -> tuple[list[str], dict[str, int], list[str]]:
    """The candidate layers in order of first call, how often each is called per forward, and the layers whose
    call count differs between ``batches`` (data-dependent routing, e.g. mixture-of-experts modules: they
    cannot be cut short reliably and are not refit). One forward of ``model`` per batch."""
    modules = dict(model.named_modules())
    order: list[str] = []
    per_batch: list[dict[str, int]] = []
    handles = []

    def pre(name: str) -> Any:
        def hook(_m: nn.Module, _a: Any) -> None:
            counts = per_batch[-1]
            if name not in counts and name not in order:
                order.append(name)
            counts[name] = counts.get(name, 0) + 1
        return hook

    try:
        for n in names:
            handles.append(modules[n].register_forward_pre_hook(pre(n)))
        for b in batches:
            per_batch.append({})
            args, kw = _run_args(model, b)
            model(*args, **kw)
    finally:
        for h in handles:
            h.remove()
    varying = [n for n in order if len({c.get(n, 0) for c in per_batch}) > 1]
    return order, per_batch[0], varying


def _depends(graph: ModelGraph | None, names: Sequence[str]) -> dict[str, int] | None:
    """Per candidate layer, a bit set of the candidate layers its input depends on (``None``: unknown)."""
    if graph is None:
        return None
    bit = {n: 1 << i for i, n in enumerate(names)}
    anc: dict[int, int] = {}  # tensor id -> layers it depends on
    dep: dict[str, int] = {}
    try:
        for node in graph.nodes:
            a = 0
            for t in node.inputs:
                a |= anc.get(t.id, 0)
            if node.module in bit:
                dep[node.module] = dep.get(node.module, 0) | a
                a |= bit[node.module]
            for t in node.outputs:
                anc[t.id] = anc.get(t.id, 0) | a
            for t in node.mutated:
                anc[t.id] = anc.get(t.id, 0) | a
    except AttributeError:
        return None
    return dep


def _passes(order: Sequence[str], dep: dict[str, int] | None, names: Sequence[str]) -> list[list[str]]:
    """Consecutive layers (execution order) whose inputs do not depend on each other share a pass."""
    if dep is None:
        return [[n] for n in order]
    bit = {n: 1 << i for i, n in enumerate(names)}
    out: list[list[str]] = []
    cur: list[str] = []
    cur_bits = 0
    for n in order:
        if cur and not (dep.get(n, 0) & cur_bits):
            cur.append(n)
        else:
            if cur:
                out.append(cur)
            cur = [n]
            cur_bits = 0
        cur_bits |= bit[n]
    if cur:
        out.append(cur)
    return out


def _folding_bn(graph: ModelGraph | None, name: str, modules: Mapping[str, nn.Module]) -> str | None:
    """The eval BatchNorm that alone reads ``name``'s output (where a bias-free conv's intercept can go)."""
    if graph is None:
        return None
    nodes = [n for n in graph.nodes if n.module == name and n.outputs]
    if len(nodes) != 1:
        return None
    cons = graph.consumers(nodes[0].outputs[0])
    if len(cons) != 1 or cons[0].name != "batch_norm" or not cons[0].module:
        return None
    bn = modules.get(cons[0].module)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and bn.running_mean is not None:
        return cons[0].module
    return None


def _lead(model: nn.Module, b: Any) -> int:
    """Samples in a batch (the first input's leading dimension)."""
    t = _first_tensor(list(b.values())) if isinstance(b, dict) else _first_tensor(make_inputs(model, b)[0])
    return int(t.shape[0]) if t is not None and t.ndim else 1


def _dense_targets(modules: Mapping[str, nn.Module], fits: Mapping[str, _Fit], names: Sequence[str],
                   counts: Mapping[str, int], runs: Sequence[Callable[[], Any]], leads: Sequence[int],
                   cache_mb: float) -> list[dict[str, list[torch.Tensor]]] | None:
    """The dense model's targets of the layers ``names`` for every batch, one dense run (``runs[i]``: the whole
    model or one block on batch ``i``) per batch, when they fit in ``cache_mb`` (estimated from the first
    batch); ``None`` otherwise (each pass then reruns the dense model or block up to its layers)."""
    if cache_mb <= 0 or not names:
        return None
    out: list[dict[str, list[torch.Tensor]]] = []
    for i, run in enumerate(runs):
        ys = _capture(modules, names, counts, run, output=True)
        out.append({n: [fits[n].target(y.float()) for y in ys[n]] for n in names})
        if i == 0:
            size = sum(t.numel() * t.element_size() for ts in out[0].values() for t in ts)
            if size / max(leads[0], 1) * sum(leads) > cache_mb * 2**20:
                return None
    return out


def _model_run(model: nn.Module, batch: Any) -> Callable[[], Any]:
    def run() -> Any:
        args, kw = _run_args(model, batch)
        return model(*args, **kw)
    return run


def _block_run(block: nn.Module, inp: tuple[tuple[Any, ...], dict[str, Any]]) -> Callable[[], Any]:
    """Run one chain block on its cached input (the chain tensor is kept on the CPU, moved to the block)."""
    def run() -> Any:
        args, kw = inp
        dev = next((p.device for p in block.parameters()), args[0].device)
        return block(args[0].to(dev), *args[1:], **kw)
    return run


def _capture(modules: Mapping[str, nn.Module], layers: Sequence[str], counts: Mapping[str, int],
             run: Callable[[], Any], output: bool) -> dict[str, list[torch.Tensor]]:
    """``run()`` (the model on a batch, or one block on its cached input) up to the last call of ``layers``;
    their inputs (or outputs), per call."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    remaining = [sum(counts[n] for n in layers)]
    handles = []

    def hook(name: str) -> Any:
        def fn(_m: nn.Module, args: Any, out: Any = None) -> None:
            t = _first_tensor(out if output else args)
            if t is None:
                raise ShrinkError(f"reconstruct: '{name}' was called without a tensor", name)
            got[name].append(t.detach())
            remaining[0] -= 1
            if remaining[0] == 0:
                raise _Stop
        return fn

    try:
        for n in layers:
            m = modules[n]
            handles.append(m.register_forward_hook(hook(n)) if output else m.register_forward_pre_hook(hook(n)))
        try:
            run()
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    for n in layers:
        if len(got[n]) != counts[n]:
            raise ShrinkError(f"reconstruct: '{n}' ran {len(got[n])} times on a calibration batch, "
                              f"{counts[n]} times on the first one; the call pattern must not depend on the input", n)
    return got


# ------------------------------------------------------------------------------------------------ block chain
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _run_args(model: nn.Module, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``make_inputs`` plus ``use_cache=False`` where the model's forward takes it: the reconstruction never
    needs a key/value cache, and a cache object handed to every block could not be replayed block by block."""
    args, kw = make_inputs(model, batch)
    if "use_cache" not in kw:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "use_cache" in params:
            kw = {**kw, "use_cache": False}
    return args, kw


def _plain(v: Any) -> bool:
    """Only tensors, numbers, strings, ``None`` and containers of those (what a block can be replayed with)."""
    if isinstance(v, (torch.Tensor, *_PLAIN)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain(a) for a in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(a) for k, a in v.items())
    return False


def _same(a: Any, b: Any) -> bool:
    """The same objects (tensors by identity, containers element-wise, plain values by equality)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _versions(v: Any) -> list[int]:
    if isinstance(v, torch.Tensor):
        return [v._version]
    if isinstance(v, (tuple, list)):
        return [x for a in v for x in _versions(a)]
    if isinstance(v, dict):
        return [x for a in v.values() for x in _versions(a)]
    return []


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(a) for a in v)
    if isinstance(v, dict):
        return sum(_nbytes(a) for a in v.values())
    return 0


@dataclass
class _Call:
    """One call of a module during the probe forward."""

    enter: int
    exit: int = -1
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    out: torch.Tensor | None = None
    replayable: bool = True


def _probe(model: nn.Module, layers: Sequence[str], batch: Any) -> tuple[dict[str, list[_Call]], dict[str, list[int]]]:
    """One forward on ``batch`` recording every call of every container module (its inputs, first output tensor,
    and whether it modified its inputs in place) and the sequence numbers of the calls of ``layers``."""
    calls: dict[str, list[_Call]] = {}
    layer_calls: dict[str, list[int]] = {n: [] for n in layers}
    seq = [0]
    handles = []
    wanted = set(layers)

    def pre(name: str) -> Any:
        def fn(_m: nn.Module, args: Any, kwargs: Any) -> None:
            seq[0] += 1
            if name in wanted:
                layer_calls[name].append(seq[0])
                return
            c = _Call(seq[0], args=tuple(args), kwargs=dict(kwargs))
            c.replayable = _plain(c.args) and _plain(c.kwargs)
            c._versions = _versions((c.args, c.kwargs))  # type: ignore[attr-defined]
            calls.setdefault(name, []).append(c)
        return fn

    def post(name: str) -> Any:
        def fn(_m: nn.Module, _args: Any, _kwargs: Any, out: Any) -> None:
            seq[0] += 1
            c = calls[name][-1]
            c.exit, c.out = seq[0], _first_tensor(out)
            if _versions((c.args, c.kwargs)) != c._versions:  # type: ignore[attr-defined]
                c.replayable = False  # it writes into its inputs: a cached input would not survive a replay
        return fn

    try:
        for name, m in model.named_modules():
            if not name or (name not in wanted and not any(True for _ in m.children())):
                continue
            handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
            if name not in wanted:
                handles.append(m.register_forward_hook(post(name), with_kwargs=True))
        args, kw = _run_args(model, batch)
        model(*args, **kw)
    finally:
        for h in handles:
            h.remove()
    return calls, layer_calls


def _links(calls: Mapping[str, list[_Call]], a: str, b: str) -> bool:
    """Block ``b`` runs after ``a`` on ``a``'s output (its first positional input) and the same other inputs."""
    ca, cb = calls[a][0], calls[b][0]
    return (cb.enter > ca.exit and bool(cb.args) and ca.out is not None and cb.args[0] is ca.out
            and _same(ca.args[1:], cb.args[1:]) and _same(ca.kwargs, cb.kwargs))


def _find_chain(model: nn.Module, dense: nn.Module, layers: Sequence[str], batch: Any
                ) -> tuple[list[str], dict[str, int], int]:
    """The longest chain of same-class blocks (transformer layers, residual blocks) that the refit can run one
    at a time: each called once, on the previous block's output and otherwise the same inputs, not writing
    into its inputs, holding every call of the layers assigned to it. Checked on the shrunk and on the dense
    model. Returns ``(blocks, {layer: block index}, bytes of one block input per sample)``."""
    calls, lcalls = _probe(model, layers, batch)
    ok = {n: cs[0] for n, cs in calls.items() if len(cs) == 1 and cs[0].replayable and cs[0].exit > 0
          and cs[0].args and isinstance(cs[0].args[0], torch.Tensor) and cs[0].out is not None}
    mods = dict(model.named_modules())
    by_class: dict[type, list[str]] = {}
    for n in sorted(ok, key=lambda n: ok[n].enter):
        by_class.setdefault(type(mods[n]), []).append(n)

    def members(block: str) -> list[str]:
        c = ok[block]
        return [ly for ly, s in lcalls.items() if s and all(c.enter < t < c.exit for t in s)]

    best: tuple[int, int, list[str]] = (0, 0, [])
    for names in by_class.values():
        run: list[str] = []
        for n in [*names, None]:
            if n is not None and run and _links(calls, run[-1], n):
                run.append(n)
                continue
            if len(run) >= 2:
                covered = sum(len(members(b)) for b in run)
                if (covered, len(run)) > best[:2]:
                    best = (covered, len(run), list(run))
            run = [n] if n is not None else []
    chain = best[2]
    if not chain or not best[0]:
        return [], {}, 0
    dcalls, dl = _probe(dense, layers, batch)
    for a, b in zip(chain, chain[1:]):
        if not (len(dcalls.get(a, [])) == 1 == len(dcalls.get(b, [])) and dcalls[b][0].replayable
                and dcalls[a][0].replayable and _links(dcalls, a, b)):
            return [], {}, 0
    where = {ly: i for i, b in enumerate(chain) for ly in members(b)}
    for ly, i in where.items():  # the dense model must call the layer inside the same block
        c = dcalls[chain[i]][0]
        if not all(c.enter < t < c.exit for t in dl[ly]):
            return [], {}, 0
    first = ok[chain[0]]
    lead = int(first.args[0].shape[0]) if first.args[0].ndim else 1
    size = _nbytes((first.args, first.kwargs)) // max(lead, 1)
    return chain, where, size


def _block_inputs(model: nn.Module, block: str, batches: Sequence[Any]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The inputs of ``block`` on every batch (a forward cut short at the block), the chain tensor on the CPU."""
    mod = dict(model.named_modules())[block]
    got: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fn(_m: nn.Module, args: Any, kwargs: Any) -> None:
        got.append(((args[0].detach().to("cpu"), *args[1:]), dict(kwargs)))
        raise _Stop

    h = mod.register_forward_pre_hook(fn, with_kwargs=True)
    try:
        for b in batches:
            try:
                _model_run(model, b)()
            except _Stop:
                pass
    finally:
        h.remove()
    if len(got) != len(batches):
        raise ShrinkError(f"reconstruct: block '{block}' did not run on every calibration batch", block)
    return got


def _dense_block(block: nn.Module, inputs: list[tuple[tuple[Any, ...], dict[str, Any]]],
                 modules: Mapping[str, nn.Module], fits: Mapping[str, _Fit], names: Sequence[str],
                 counts: Mapping[str, int], leads: Sequence[int], cache_mb: float
                 ) -> tuple[list[dict[str, list[torch.Tensor]]] | None, list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """One full run of a dense block per batch: the targets of its layers ``names`` (``None`` where they would
    not fit in ``cache_mb``, estimated from the first batch) and the block's outputs as the next block's inputs."""
    targets: list[dict[str, list[torch.Tensor]]] | None = [] if cache_mb > 0 else None
    nxt = []
    for i, inp in enumerate(inputs):
        got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        handles = []
        if targets is not None:
            for n in names:
                def fn(_m: nn.Module, _a: Any, out: Any, n: str = n, got: dict = got) -> None:
                    got[n].append(fits[n].target(_first_tensor(out).detach().float()))  # type: ignore[union-attr]
                handles.append(modules[n].register_forward_hook(fn))
        try:
            y = _first_tensor(_block_run(block, inp)())
        finally:
            for h in handles:
                h.remove()
        nxt.append(((y.detach().to("cpu"), *inp[0][1:]), inp[1]))  # type: ignore[union-attr]
        if targets is not None:
            for n in names:
                if len(got[n]) != counts[n]:
                    raise ShrinkError(f"reconstruct: '{n}' ran {len(got[n])} times in its block, {counts[n]} times "
                                      "per forward", n)
            targets.append(got)
            if i == 0:
                size = sum(t.numel() * t.element_size() for ts in got.values() for t in ts)
                if size / max(leads[0], 1) * sum(leads) > cache_mb * 2**20:
                    targets = None
    return targets, nxt


def _advance(block: nn.Module, inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
    """Replace every cached input of a block by the block's output: the next block's input (in place)."""
    for i, inp in enumerate(inputs):
        y = _first_tensor(_block_run(block, inp)())
        inputs[i] = ((y.detach().to("cpu"), *inp[0][1:]), inp[1])  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------- fused experts
_ROUTED = ("hidden_states", "top_k_index", "top_k_weights")


def _module_inputs(model: nn.Module, module: str, batch: Any) -> inspect.BoundArguments | None:
    """The arguments ``module`` was called with on ``batch`` (a forward cut short there), bound to its signature."""
    mod = dict(model.named_modules())[module]
    got: list[inspect.BoundArguments] = []

    def fn(m: nn.Module, args: Any, kwargs: Any) -> None:
        got.append(inspect.signature(m.forward).bind(*args, **kwargs))
        raise _Stop

    h = mod.register_forward_pre_hook(fn, with_kwargs=True)
    try:
        _model_run(model, batch)()
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0] if got else None


def _expert_call(mod: nn.Module, bound: inspect.BoundArguments, rows: torch.Tensor, expert: int) -> torch.Tensor:
    """``mod`` on the token rows ``rows`` of the bound call, every row routed to ``expert`` alone with weight 1:
    that expert's output on those tokens."""
    x = bound.arguments["hidden_states"][rows]
    idx = bound.arguments["top_k_index"]
    args = {**bound.arguments, "hidden_states": x,
            "top_k_index": torch.full((x.shape[0], 1), expert, dtype=idx.dtype, device=idx.device),
            "top_k_weights": torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)}
    return mod(**args)


def _fused_down(plan: RemovalPlan, small: nn.Module, model: nn.Module, res: ReconstructResult
                ) -> list[tuple[str, str, int, np.ndarray]]:
    """The fused expert parameters to refit: ``(parameter, module, weight_out_dim, kept outputs)`` of every fused
    output projection (a down projection: its outputs are the module's, its input columns lost units)."""
    out = []
    layers = getattr(plan.atoms, "layers", {})
    for name, cut in plan.cuts.items():
        li = layers.get(name)
        if not isinstance(cut, ExpertCut) or li is None or getattr(li, "kind", None) != "experts":
            continue
        od = li.weight_out_dim
        if 3 - od not in cut.keep:
            continue  # its inputs are all kept (a gate/up projection that lost rows): not refit
        mod_name, _, pname = name.rpartition(".")
        try:
            mod = small.get_submodule(mod_name)
            dmod = model.get_submodule(mod_name)
        except AttributeError:
            continue
        dense_w = dict(dmod.named_parameters(recurse=False)).get(pname)
        others = [p for n, p in mod.named_parameters() if n != pname]
        params = inspect.signature(mod.forward).parameters
        why = None
        if dense_w is None or not all(a in params for a in _ROUTED):
            why = "the experts module is not called as (hidden_states, top_k_index, top_k_weights)"
        elif any(p.dim() != 3 for p in others):
            why = "the experts module has parameters besides its fused 3-D weights (biases)"
        else:  # the output projection writes the module's width: what the other fused weights read
            dense_others = [w for n, w in dmod.named_parameters() if n != pname and w.dim() == 3]
            width = {w.shape[3 - layers[f"{mod_name}.{n}"].weight_out_dim] for n, w in dmod.named_parameters()
                     if n != pname and w.dim() == 3 and f"{mod_name}.{n}" in layers}
            if not dense_others or width != {dense_w.shape[od]}:
                continue  # an input projection (gate/up) whose input lost channels: behind the activation
            if "down" not in pname and dense_w.shape[od] == dense_w.shape[3 - od]:
                why = "cannot tell the output projection from the input one (square and not named 'down')"
        if why:
            res.skipped[name] = why
            continue
        keep_out = cut.keep.get(od)
        keep = np.ones(dense_w.shape[od], bool) if keep_out is None else keep_out[0]
        out.append((name, mod_name, od, keep))
    return out


def _refit_experts(model: nn.Module, small: nn.Module, plan: RemovalPlan, batches: Sequence[Any],
                   ridge: float | None, res: ReconstructResult) -> None:
    """Refit every expert's down projection of every fused expert layer, one expert at a time, from the tokens
    the shrunk model routes to it: its input is what the shrunk expert computes before the down projection on
    those tokens (read off the module's own forward with the down projection replaced by selectors, a slice of
    the hidden units per call), its target what the dense expert outputs on the dense model's hidden state of
    the same tokens. Same ridge least squares as a ``Linear`` without bias, unweighted by the routing weights."""
    for name, mod_name, od, keep in _fused_down(plan, small, model, res):
        mod, dmod = small.get_submodule(mod_name), model.get_submodule(mod_name)
        p = dict(mod.named_parameters(recurse=False))[name.rpartition(".")[2]]
        n_exp = p.shape[0]
        h_out, width = p.shape[od], p.shape[3 - od]
        lins = [nn.Linear(width, h_out, bias=False) for _ in range(n_exp)]
        with torch.no_grad():
            for e, lin in enumerate(lins):
                lin.weight.copy_(p[e] if od == 1 else p[e].T)
        fits = [_Fit(f"{name}[{e}]", lins[e], torch.from_numpy(keep), intercept=False, batches=len(batches),
                     auto_ridge=ridge is None) for e in range(n_exp)]
        saved = p.detach().clone()
        try:
            for b in batches:
                sb, db = _module_inputs(small, mod_name, b), _module_inputs(model, mod_name, b)
                if sb is None or db is None:
                    raise ShrinkError(f"reconstruct: the experts module '{mod_name}' did not run", mod_name)
                routed = sb.arguments["top_k_index"]
                for e in range(n_exp):
                    rows = (routed == e).any(-1).nonzero().flatten()
                    if rows.numel() == 0:
                        continue
                    parts = []
                    for j0 in range(0, width, h_out):  # the hidden units j0.. through selector down projections
                        sel = torch.zeros_like(p[e])
                        j = torch.arange(j0, min(j0 + h_out, width), device=p.device)
                        if od == 1:
                            sel[j - j0, j] = 1.0
                        else:
                            sel[j, j - j0] = 1.0
                        p.data[e] = sel
                        parts.append(_expert_call(mod, sb, rows, e)[:, : len(j)])
                        p.data[e] = saved[e]
                    fits[e].add(torch.cat(parts, 1), _expert_call(dmod, db, rows, e))
        finally:
            p.data.copy_(saved)
        quad = [0.0, 0.0, 0.0]
        for e, f in enumerate(fits):
            if not f.folds:
                continue  # no token was routed to this expert: left as it is
            yy = float(f.yy.sum())
            quad[0] += f.error(f.current()) * yy
            wm = f.solve(ridge)
            quad[1] += f.error(wm) * yy
            quad[2] += yy
            f.write(wm, None)
            with torch.no_grad():
                p.data[e] = (lins[e].weight if od == 1 else lins[e].weight.T).to(p.dtype)
        if quad[2] > 0:
            res.error_before[name], res.error_after[name] = quad[0] / quad[2], quad[1] / quad[2]
        res.layers.append(name)
        res.passes += 1


# ------------------------------------------------------------------------------------------------------ public
@torch.no_grad()
def refit(model: nn.Module, small: nn.Module, plan: RemovalPlan, calibration: Iterable[Any], *,
          ridge: float | None = None, layers: str = "affected", bn: str = "keep", cache_mb: float = 1024.0,
          block_cache_mb: float = 4096.0) -> ReconstructResult:
    """Refit ``small`` (the shrunk copy of ``model`` made with ``plan``) in place; see the module docs.

    ``calibration``: inputs shaped like the example input (tensor, tuple or dict per batch), no labels.
    ``cache_mb`` and ``block_cache_mb``: as in :func:`reconstruct` (``block_cache_mb=0``: the whole-model path).
    Returns a :class:`ReconstructResult` (``blocks``: the block chain used, ``block_cache_mb``: its inputs'
    estimated size). ``model`` is only run (eval mode, temporary hooks), never modified.
    """
    if layers not in _SCOPES:
        raise ConfigError(f"reconstruct: layers must be one of {_SCOPES}, got {layers!r}")
    if bn not in _BN_MODES:
        raise ConfigError(f"reconstruct: bn must be one of {_BN_MODES}, got {bn!r}")
    if ridge is not None and not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ConfigError(f"reconstruct: ridge must be None (automatic) or a finite number >= 0, got {ridge!r}")
    for what, v in (("cache_mb", cache_mb), ("block_cache_mb", block_cache_mb)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"reconstruct: {what} must be a finite number of MiB >= 0, got {v!r}")
    if isinstance(calibration, (torch.Tensor, dict)):
        raise ConfigError("reconstruct: calibration must be an iterable of batches (e.g. a list of tensors), "
                          "not one batch; wrap it in a list")
    batches = list(calibration)
    if not batches:
        raise ConfigError("reconstruct: calibration is empty; give at least one batch of inputs")
    t0 = time.perf_counter()
    res = ReconstructResult(batches=len(batches))
    dense_mods = dict(model.named_modules())
    small_mods = dict(small.named_modules())
    cands = [n for n, m in small_mods.items() if _kind(m) is not None and n in dense_mods
             and _kind(dense_mods[n]) == _kind(m)]
    with preserved_training(model, False), preserved_training(small, False):
        order, counts, varying = _call_order(small, cands, batches)
        for n in varying:
            res.skipped[n] = "called a different number of times on different batches (data-dependent routing)"
        order = [n for n in order if n not in varying]
        affected = []
        for n in order:
            ws, wd = small_mods[n].weight, dense_mods[n].weight  # type: ignore[union-attr]
            if tuple(ws.shape) != tuple(wd.shape) or getattr(small_mods[n], "groups", 1) != getattr(
                    dense_mods[n], "groups", 1):
                affected.append(n)
        if not affected:
            _refit_experts(model, small, plan, batches, ridge, res)
            res.seconds = time.perf_counter() - t0
            _warn_skipped(res)
            return res
        chosen = affected if layers == "affected" else order[order.index(affected[0]):]
        graph = plan.graph if isinstance(plan.graph, ModelGraph) else None
        # a weight standardisation (removal/stdconv.py) would standardise a least-squares weight again
        standardised = {graph.nodes[i].module for i in std_weights(graph)} if graph is not None else set()
        fits: dict[str, _Fit] = {}
        for n in chosen:
            if n in standardised:
                res.skipped[n] = ("its weight is standardised per filter in its forward: a least-squares weight "
                                  "would be standardised again (not refit)")
                continue
            mod = small_mods[n]
            kind = _kind(mod)
            n_dense = dense_mods[n].weight.shape[1 if kind == "tlinear" else 0]  # type: ignore[union-attr]
            rem = plan.removed.get(n)
            keep = torch.ones(n_dense, dtype=torch.bool) if rem is None else torch.from_numpy(~np.asarray(rem))
            fit_n_out = mod.weight.shape[1 if kind == "tlinear" else 0]  # type: ignore[union-attr]
            if keep.numel() != n_dense or int(keep.sum()) != fit_n_out:
                res.skipped[n] = (f"the plan keeps {int(keep.sum())} of {keep.numel()} output channels, the layer "
                                  f"has {fit_n_out}")
                continue
            has_bias = isinstance(getattr(mod, "bias", None), torch.Tensor)
            bn_name = None if has_bias else _folding_bn(graph, n, small_mods)
            fits[n] = _Fit(n, mod, keep, intercept=has_bias or bn_name is not None, batches=len(batches),
                           auto_ridge=ridge is None)
            fits[n].bn = small_mods[bn_name] if bn_name else None
        names = list(fits)
        fit_order = [n for n in order if n in fits]
        leads = [_lead(small, b) for b in batches]
        chain: list[str] = []
        where: dict[str, int] = {}
        if block_cache_mb > 0:
            chain, where, per_sample = _find_chain(small, model, fit_order, batches[0])
            est = 2 * per_sample * sum(leads) / 2**20  # dense and shrunk block inputs, all batches
            if chain and est > block_cache_mb:
                res.notes.append(f"block chain of {len(chain)} '{type(small_mods[chain[0]]).__name__}' blocks not "
                                 f"used: its inputs need ~{est:.0f} MiB > block_cache_mb={block_cache_mb:g}")
                chain, where = [], {}
            res.block_cache_mb = est if chain else 0.0
        res.blocks = list(chain)
        passes = []  # a pass stays inside one block (or outside the chain): split where the segment changes
        for group in _passes(fit_order, _depends(graph, names), names):
            for n in group:
                if passes and passes[-1] and where.get(passes[-1][-1], -1) == where.get(n, -1) and n != group[0]:
                    passes[-1].append(n)
                else:
                    passes.append([n])
        rest = [n for n in fit_order if n not in where]
        cache = _dense_targets(dense_mods, fits, rest, counts, [_model_run(model, b) for b in batches], leads,
                               cache_mb)
        res.cached = cache is not None
        last_chain = max((i for i, g in enumerate(passes) if g[0] in where), default=-1)
        pos = -1  # the block whose inputs s_in / d_in hold
        s_in: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        d_in: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        btargets: list[dict[str, list[torch.Tensor]]] | None = None
        d_next: list[tuple[tuple[Any, ...], dict[str, Any]]] | None = None
        for gi, group in enumerate(passes):
            k = where.get(group[0])
            if k is not None:
                if pos < 0:
                    s_in, d_in, pos = _block_inputs(small, chain[0], batches), _block_inputs(model, chain[0],
                                                                                             batches), 0
                    d_next = None
                while pos < k:
                    _advance(small_mods[chain[pos]], s_in)
                    if d_next is None:
                        _advance(dense_mods[chain[pos]], d_in)
                    else:
                        d_in = d_next
                    pos, btargets, d_next = pos + 1, None, None
                if d_next is None:  # one dense run of the block: its layers' targets and the next block's input
                    inside = [n for n in fit_order if where.get(n) == k]
                    btargets, d_next = _dense_block(dense_mods[chain[k]], d_in, dense_mods, fits, inside, counts,
                                                    leads, cache_mb)
                    if btargets is not None:
                        d_in = []  # the targets are kept: the dense block's inputs are no longer needed
                targets = btargets
            else:
                targets = cache
            for bi, b in enumerate(batches):
                if k is None:
                    small_run = _model_run(small, b)
                    dense_run = _model_run(model, b)
                else:
                    small_run = _block_run(small_mods[chain[k]], s_in[bi])
                    dense_run = _block_run(dense_mods[chain[k]], d_in[bi]) if targets is None else small_run
                ys = targets[bi] if targets is not None else _capture(dense_mods, group, counts, dense_run, True)
                xs = _capture(small_mods, group, counts, small_run, output=False)
                for n in group:
                    for x, y in zip(xs[n], ys[n]):
                        fits[n].add(x, y, is_target=targets is not None)
                    if targets is not None:
                        targets[bi][n] = []  # this layer is done: free its targets
            for n in group:
                f = fits[n]
                res.error_before[n] = f.error(f.current())
                wm = f.solve(ridge)
                res.error_after[n] = f.error(wm)
                res.ridge[n] = f.ridge_used
                f.write(wm, f.bn)
                res.layers.append(n)
                fits[n] = None  # type: ignore[assignment]  # free the Gram matrices
            res.passes += 1
            if gi == last_chain:
                s_in, d_in, btargets, d_next = [], [], None, None  # the chain is done: free its caches
        _refit_experts(model, small, plan, batches, ridge, res)
    if bn == "recalibrate":
        _recalibrate(small, batches)
    res.seconds = time.perf_counter() - t0
    _warn_skipped(res)
    return res


def _warn_skipped(res: ReconstructResult) -> None:
    if res.skipped:
        first = next(iter(res.skipped.items()))
        warnings.warn(f"reconstruct: {len(res.skipped)} layers were not refit, e.g. '{first[0]}': {first[1]}",
                      ShrinkWarning, stacklevel=4)


def _recalibrate(model: nn.Module, batches: Sequence[Any]) -> None:
    """Exact BatchNorm statistics over ``batches`` (momentum and train flags restored)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    moms = [(m, m.momentum) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        with preserved_training(model, True):
            for b in batches:
                args, kw = _run_args(model, b)
                model(*args, **kw)
    finally:
        for m, mom in moms:
            m.momentum = mom
