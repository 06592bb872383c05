"""Unit pruning: masks that remove whole pruning units (attention heads, kv groups, MLP units, channels).

A transformer's pruning unit spans several layers: a head is ``head_dim`` rows of ``q``, ``k`` and ``v`` (and
the ``head_dim`` input columns of the output projection that read it), a kv group under grouped-query
attention is one key/value head with all the query heads that read it, a gated-MLP unit is a ``gate`` row, an
``up`` row and a ``down`` column. Channel-level masks (one layer's L1 norms) cut across them, and the conflict
fixer then keeps the union: almost no whole head goes.

Here a **unit is one class of the channel engine** (:func:`prunescope.topology.channel_atoms`): the output
channels that must go together. For a dependency set (layers sharing classes) the units are the classes of
its members' output channels, so a head, a kv group and a convolution channel tied across a residual add are
all handled by one rule:

* score of a unit = the sum of its channels' filter scores over all members (``l1``: sum of ``|w|`` of the
  producing rows; ``l2``: sum of the rows' L2 norms; ``fpgm``: sum of each row's FPGM score in its layer);
  with ``consumers=True`` the L1 norm (``l2``: the L2 norm) of the consumer input columns that read the unit
  is added (a head's output-projection columns, a ``down`` column). The default scores the producing rows
  only, the rule of NNI v2's dependency-aware pruners, so that
* ``int(n_units * sparsity)`` units with the lowest scores are pruned (NNI's selection: ``<= threshold`` for
  l1/l2, stable order for fpgm). For a convolution set whose classes are one channel of every member this is
  exactly :func:`prunescope.masks.pruners.group_masks` (NNI's rule), bit for bit.

Example
-------
>>> import torch
>>> from torch import nn
>>> from prunescope import unit_masks
>>> import torch.nn.functional as F
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
...         self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
...     def forward(self, x):
...         b, n, _ = x.shape
...         q, k, v = (p(x).view(b, n, -1, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
...         x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
...         return x + self.fc2(F.relu(self.fc1(x)))
>>> torch.manual_seed(0) and None
>>> model = Block()
>>> masks = unit_masks(model, torch.ones(1, 5, 16), 0.5, layers=["q", "fc1"])
>>> sorted(masks)
['fc1', 'k', 'q', 'v']
>>> keep = masks["q"]["weight"][:, 0].view(4, 4).bool()  # 4 heads of 4 channels: 2 whole heads go
>>> keep.all(1).sum().item(), (keep.sum(1) % 4).tolist()
(2, [0, 0, 0, 0])
>>> int(masks["fc1"]["bias"].sum())                    # 16 of the 32 MLP units stay
16
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..graph import make_inputs, preserved_training
from .layers import CONV_TYPES, in_channel_matrix, is_transposed_linear, weight_of
from .pruners import _masks_from_keep, group_masks, is_filter_layer, select_lowest

__all__ = ["channel_units", "check_sparsity", "activation_masks", "reconstruction_set_masks",
           "unit_scores_from_consumers", "input_channel_norms", "unit_scores_from_activations", "input_grams",
           "reconstruction_keep", "RefitConsumer", "RECONSTRUCTION_DAMP"]


def channel_units(ca: Any, members: Sequence[str]) -> list[np.ndarray] | None:
    """Per member of a dependency set, the unit id of every output channel (``0 .. U-1``, in order of first
    appearance), the units being the channel engine's classes. ``None`` when a member is not a layer of the
    engine (it cannot be scored by unit)."""
    if any(m not in ca.layers for m in members):
        return None
    ids: dict[int, int] = {}
    out = []
    for m in members:
        cls = ca.layer_classes(m)
        out.append(np.array([ids.setdefault(int(c), len(ids)) for c in cls], dtype=np.int64))
    return out


def is_trivial(units: Sequence[np.ndarray]) -> bool:
    """Every unit is one channel of every member (``units[k] == range(n)``): today's channel rule applies."""
    return all(len(u) == len(units[0]) and np.array_equal(u, np.arange(len(u))) for u in units)


def _consumer_columns(ca: Any, model: nn.Module, members: Sequence[str], units: Sequence[np.ndarray]
                      ) -> Iterator[tuple[str, torch.Tensor, np.ndarray]]:
    """Every layer that reads a member's channels, as ``(layer, in-channel matrix (float64), unit of each input
    column or -1)`` (grouped convolutions are skipped: a column there is not one unit)."""
    cls_unit: dict[int, int] = {}
    for m, u in zip(members, units):
        for c, uid in zip(ca.layer_classes(m).tolist(), u.tolist()):
            cls_unit[int(c)] = int(uid)
    modules = dict(model.named_modules())
    for name, li in ca.layers.items():
        mod = modules.get(name)
        w = weight_of(mod) if mod is not None else None
        if w is None or not li.inputs or li.groups != 1 or not is_filter_layer(mod):
            continue
        cols = li.inputs[0]
        valid = cols >= 0
        if not valid.any():
            continue
        col_cls = np.where(valid, ca.atom_class(np.maximum(cols, 0)), -1)
        col_unit = np.array([cls_unit.get(int(c), -1) for c in col_cls], dtype=np.int64)
        if (col_unit < 0).all():
            continue
        mat = in_channel_matrix(mod, w.detach()).to(torch.float64)
        if mat.shape[0] == len(col_unit):
            yield name, mat, col_unit


def _n_units(units: Sequence[np.ndarray]) -> int:
    return int(max((int(u.max()) for u in units if len(u)), default=-1)) + 1


@torch.no_grad()
def unit_scores_from_consumers(ca: Any, model: nn.Module, members: Sequence[str], units: Sequence[np.ndarray],
                               prune_type: str = "l1") -> torch.Tensor:
    """Per unit, the norm of the consumer input columns that read it (L1; L2 for ``l2``), summed over every
    layer that reads a member's channels (grouped convolutions are skipped: a column there is not one unit)."""
    total = torch.zeros(_n_units(units), dtype=torch.float64)
    for _name, mat, col_unit in _consumer_columns(ca, model, members, units):
        per_col = mat.abs().sum(1) if prune_type != "l2" else torch.sqrt((mat ** 2).sum(1))
        sel = torch.from_numpy(col_unit >= 0)
        total.index_add_(0, torch.from_numpy(col_unit[col_unit >= 0]), per_col[sel].cpu())
    return total


def check_sparsity(sparsity: Any, where: str) -> float:
    """``sparsity`` as a float in ``[0, 1)``; a :class:`ConfigError` naming the value otherwise (1 would remove
    every unit of every set, NaN and values outside the range select no meaningful count)."""
    if isinstance(sparsity, (bool, np.bool_)) or not isinstance(sparsity, numbers.Real):
        raise ConfigError(f"{where}: sparsity must be a number with 0 <= sparsity < 1, got {sparsity!r}")
    value = float(sparsity)
    if not 0.0 <= value < 1.0:  # also NaN
        raise ConfigError(f"{where}: sparsity must be a number with 0 <= sparsity < 1 (the fraction of each set's "
                          f"units removed), got {value!r}")
    return value


# ------------------------------------------------------------------------------- data-aware scores (issue 17.2)
@torch.no_grad()
def input_channel_norms(model: nn.Module, calibration: Iterable[Any]) -> dict[str, torch.Tensor]:
    """``{layer: ‖X_c‖₂ per input channel c}`` of every conv/linear layer over the ``calibration`` batches (the
    layer's actual input, all positions and calls). The model runs in eval mode; nothing is left on it."""
    if isinstance(calibration, (torch.Tensor, dict)):
        raise ConfigError("calibration must be an iterable of batches (e.g. a list of tensors), not one batch")
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str, channel_dim: int) -> Any:
        def fn(_m: nn.Module, args: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None or x.ndim == 0:
                return
            d = channel_dim if channel_dim >= 0 and x.ndim > 1 else x.ndim - 1
            sq = x.detach().double().pow(2).sum(dim=[i for i in range(x.ndim) if i != d])
            sums[name] = sums[name] + sq if name in sums else sq
        return fn

    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, CONV_TYPES):
            hooks.append((mod, hook(name, 1)))
        elif isinstance(mod, nn.Linear) or (is_transposed_linear(mod) and not isinstance(mod, nn.Embedding)):
            hooks.append((mod, hook(name, -1)))
    _run_calibration(model, calibration, hooks)
    return {k: v.sqrt() for k, v in sums.items()}


def _run_calibration(model: nn.Module, calibration: Iterable[Any], hooks: list[tuple[nn.Module, Any]]) -> None:
    """Run every calibration batch through ``model`` (eval mode, the flags restored) with the forward pre-hooks
    ``hooks`` registered for the duration (removed also on exceptions); an empty ``calibration`` is an error."""
    handles = []
    n = 0
    try:
        for mod, fn in hooks:
            handles.append(mod.register_forward_pre_hook(fn))
        with preserved_training(model, False):
            for b in calibration:
                args, kw = make_inputs(model, b)
                model(*args, **kw)
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ConfigError("calibration is empty; give at least one batch of inputs")


@torch.no_grad()
def unit_scores_from_activations(ca: Any, model: nn.Module, members: Sequence[str], units: Sequence[np.ndarray],
                                 norms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit, ``Σ |W[:, c]|₁ · ‖X_c‖₂`` over every consumer column ``c`` that reads it (Wanda-sp / FLAP's
    activation-weighted norm; ``norms`` from :func:`input_channel_norms`), and per unit whether any consumer
    column was found (grouped convolutions are skipped as in :func:`unit_scores_from_consumers`)."""
    total = torch.zeros(_n_units(units), dtype=torch.float64)
    seen = torch.zeros(_n_units(units), dtype=torch.bool)
    for name, mat, col_unit in _consumer_columns(ca, model, members, units):
        nrm = norms[name].to(torch.float64).cpu() if name in norms else None
        if nrm is None or nrm.numel() != len(col_unit):
            continue
        per_col = mat.abs().sum(1).cpu() * nrm
        sel = torch.from_numpy(col_unit >= 0)
        idx = torch.from_numpy(col_unit[col_unit >= 0])
        total.index_add_(0, idx, per_col[sel])
        seen[idx] = True
    return total, seen


def activation_masks(ca: Any, model: nn.Module, mods: list[nn.Module], members: Sequence[str],
                      units: Sequence[np.ndarray], norms: dict[str, torch.Tensor], sparsity: float
                      ) -> list[dict[str, Any]]:
    """Masks of one dependency set by activation scores; a set with a unit no consumer reads falls back to L1."""
    scores, seen = unit_scores_from_activations(ca, model, members, units, norms)
    if not bool(seen.all()):
        return group_masks(mods, sparsity, "l1", units=[u.tolist() for u in units])
    keep_unit = select_lowest(scores, int(scores.numel() * float(sparsity)), "l1")
    return _masks_from_keep(mods, [keep_unit[torch.from_numpy(u)].to(weight_of(m).device)  # type: ignore[union-attr]
                                   for m, u in zip(mods, units)])


# ------------------------------------------------------------------ reconstruction-aware scores (issue 17.2)
#: relative damping of the consumers' input Gram matrices, ``λ = damp · mean(diag XᵀX)``: small where a layer has
#: at least ``_ROWS_PER_COLUMN`` calibration rows per input column, larger where it is under-determined (the same
#: two regimes as the least-squares refit of :func:`prunescope.narrow.reconstruct`, which follows the selection)
RECONSTRUCTION_DAMP = (1e-3, 0.1)
_ROWS_PER_COLUMN = 4
#: MB of float64 input Gram matrices held at once: the sets whose readers need more are scored in several
#: passes over the calibration batches (the selection holds about twice that again while it runs)
GRAM_BUDGET_MB = 2048.0
#: units removed per greedy step: at most this fraction of the units still to remove (at least one), so that a
#: set of U units needs O(log U / fraction) steps, not U
_GREEDY_FRACTION = 0.125


def _patch_columns(mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The rows ``X`` with ``layer(x) = X Wᵀ (+ bias)``: the input of a Linear / HF ``Conv1D`` (last dim), the
    unfolded patches of a Conv1d/Conv2d (columns in the weight's ``(in, *kernel)`` order); ``None`` for other
    layers (transposed and 3-D convolutions are not scored this way)."""
    if isinstance(mod, nn.Linear) or (is_transposed_linear(mod) and not isinstance(mod, nn.Embedding)):
        return x.reshape(-1, x.shape[-1])
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and not isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        if isinstance(mod.padding, str) or mod.groups != 1:
            return None
        if isinstance(mod, nn.Conv1d):
            x = x.unsqueeze(-2)
            ks, dil, pad, st = (1, *mod.kernel_size), (1, *mod.dilation), (0, *mod.padding), (1, *mod.stride)
        else:
            ks, dil, pad, st = mod.kernel_size, mod.dilation, mod.padding, mod.stride
        cols = torch.nn.functional.unfold(x, ks, dilation=dil, padding=pad, stride=st)  # (N, C·k, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return None


def _consumer_matrix(mod: nn.Module) -> torch.Tensor:
    """The weight as ``(out, columns)`` matching :func:`_patch_columns` (float64)."""
    w = weight_of(mod).detach().to(torch.float64)  # type: ignore[union-attr]
    if is_transposed_linear(mod):
        return w.t().contiguous()
    return w.reshape(w.shape[0], -1)


@torch.no_grad()
def input_grams(model: nn.Module, calibration: Iterable[Any], layers: Iterable[str]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """``{layer: (XᵀX, Σ X, rows)}`` in float64 over the ``calibration`` batches, ``X`` the layer's input rows as
    :func:`_patch_columns` lays them out (Linear / HF ``Conv1D`` inputs, Conv1d/2d patches; other layers are left
    out). Streamed batch by batch; the model runs in eval mode and nothing is left on it."""
    if isinstance(calibration, (torch.Tensor, dict)):
        raise ConfigError("calibration must be an iterable of batches (e.g. a list of tensors), not one batch")
    modules = dict(model.named_modules())
    acc: dict[str, list[Any]] = {}

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, args: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            rows = None if x is None or not x.is_floating_point() else _patch_columns(mod, x.detach())
            if rows is None:
                return
            rows = rows.to(torch.float64).cpu()
            if name not in acc:
                acc[name] = [rows.T @ rows, rows.sum(0), rows.shape[0]]
            else:
                a = acc[name]
                a[0] += rows.T @ rows
                a[1] += rows.sum(0)
                a[2] += rows.shape[0]
        return fn

    _run_calibration(model, calibration, [(modules[n], hook(n)) for n in dict.fromkeys(layers) if n in modules])
    return {k: (v[0], v[1], int(v[2])) for k, v in acc.items()}


class RefitConsumer:
    """One layer that reads a dependency set, in the greedy selection of :func:`reconstruction_keep`: its weight
    ``W (out, d)``, the inverse ``H`` of its damped, centred input Gram matrix (``gram`` from :func:`input_grams`),
    the unit of every input column (``-1``: a column of no unit of the set) and its output energy (the scale of
    its costs)."""

    def __init__(self, mod: nn.Module, gram: tuple[torch.Tensor, torch.Tensor, int], col_unit: np.ndarray) -> None:
        xtx, xsum, rows = gram
        self.w = _consumer_matrix(mod)
        d = self.w.shape[1]
        # the refit's intercept absorbs a removed column's mean: the centred Gram is what removing costs
        cov = xtx - torch.outer(xsum, xsum) / max(rows, 1)
        damp = RECONSTRUCTION_DAMP[0 if rows >= _ROWS_PER_COLUMN * d else 1]
        lam = damp * float(cov.diagonal().mean().clamp(min=1e-12))
        self.scale = max(float(((self.w @ cov) * self.w).sum()), 1e-30)
        a = cov + lam * torch.eye(d, dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(a)
        self.h = torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.inv(a)
        self.col_unit = torch.from_numpy(col_unit)  # the columns still there (removed ones are dropped)

    def costs(self, n_units: int) -> torch.Tensor:
        """Per unit, the least output error (relative to the output energy) of removing its remaining columns
        with the others refit: ``tr(W_b (H_bb)⁻¹ W_bᵀ)`` (Optimal Brain Surgeon, block form)."""
        out = torch.zeros(n_units, dtype=torch.float64)
        cols = torch.nonzero(self.col_unit >= 0).flatten()
        if not len(cols):
            return out
        unit = self.col_unit[cols]
        order = torch.argsort(unit, stable=True)
        cols, unit = cols[order], unit[order]
        ids, counts = torch.unique_consecutive(unit, return_counts=True)
        for m in torch.unique(counts).tolist():  # units with the same column count are solved in one batch
            sel = torch.nonzero(counts == m).flatten()
            starts = torch.cumsum(counts, 0) - counts
            idx = cols[(starts[sel].unsqueeze(1) + torch.arange(m)).flatten()].view(-1, m)  # (k, m)
            hb = self.h[idx.unsqueeze(2), idx.unsqueeze(1)]  # (k, m, m)
            wb = self.w[:, idx].permute(1, 2, 0)  # (k, m, out)
            sol = torch.linalg.solve(hb, wb)
            out[ids[sel]] = (wb * sol).sum((1, 2)) / self.scale
        return out

    def remove(self, units: torch.Tensor) -> None:
        """Remove the columns of ``units`` and refit the rest (the OBS update of ``W`` and of ``H``, which then
        drop those columns: later steps work on smaller matrices)."""
        gone = (self.col_unit >= 0) & torch.isin(self.col_unit, units)
        b = torch.nonzero(gone).flatten()
        if not len(b):
            return
        k = torch.nonzero(~gone).flatten()
        hb = self.h.index_select(0, b)
        hbk = hb.index_select(1, k)
        r = torch.linalg.solve(hb.index_select(1, b), hbk)  # (|b|, d')
        self.w = self.w.index_select(1, k) - self.w.index_select(1, b) @ r
        self.h = self.h.index_select(0, k).index_select(1, k).addmm_(hbk.T, r, alpha=-1.0)
        self.col_unit = self.col_unit[k]


def reconstruction_keep(consumers: Sequence[RefitConsumer], n_units: int, n_prune: int) -> torch.Tensor:
    """Greedy backward selection: repeatedly remove the units whose removal, with the remaining consumer columns
    refit by least squares, adds the least output error summed over the consumers (each relative to its output
    energy); a step removes at most :data:`_GREEDY_FRACTION` of the units still to go. Bool keep per unit."""
    keep = torch.ones(n_units, dtype=torch.bool)
    while n_prune > 0:
        cost = sum(c.costs(n_units) for c in consumers)
        assert isinstance(cost, torch.Tensor)
        cost[~keep] = float("inf")
        step = max(1, int(n_prune * _GREEDY_FRACTION))
        drop = torch.argsort(cost, stable=True)[:step]
        keep[drop] = False
        n_prune -= step
        for c in consumers if n_prune > 0 else ():
            c.remove(drop)
    return keep


def _reconstruction_masks(ca: Any, model: nn.Module, mods: list[nn.Module], members: Sequence[str],
                          units: Sequence[np.ndarray], grams: dict[str, tuple[torch.Tensor, torch.Tensor, int]],
                          sparsity: float) -> list[dict[str, Any]]:
    """Masks of one dependency set by :func:`reconstruction_keep` over the consumers that read it; a set with a
    unit no scored consumer reads falls back to L1."""
    n_units = _n_units(units)
    modules = dict(model.named_modules())
    consumers, seen = [], torch.zeros(n_units, dtype=torch.bool)
    for name, _mat, col_unit in _consumer_columns(ca, model, members, units):
        if name not in grams:
            continue
        per_col = grams[name][0].shape[0] // len(col_unit)
        if per_col * len(col_unit) != grams[name][0].shape[0]:
            continue
        cu = np.repeat(col_unit, per_col)  # a channel's columns are contiguous (``(in, *kernel)`` order)
        consumers.append(RefitConsumer(modules[name], grams[name], cu))
        seen[torch.from_numpy(col_unit[col_unit >= 0])] = True
    if not consumers or not bool(seen.all()):
        return group_masks(mods, sparsity, "l1", units=[u.tolist() for u in units])
    n_prune = int(n_units * float(sparsity)) if n_units >= 2 else 0
    keep_unit = reconstruction_keep(consumers, n_units, n_prune)
    return _masks_from_keep(mods, [keep_unit[torch.from_numpy(u)].to(weight_of(m).device)  # type: ignore[union-attr]
                                   for m, u in zip(mods, units)])


def _n_columns(mod: nn.Module) -> int:
    """Input columns of :func:`_consumer_matrix` (without building it)."""
    w = weight_of(mod)
    assert w is not None
    rows = w.shape[1] if is_transposed_linear(mod) else w.shape[0]
    return w.numel() // max(rows, 1)


def reconstruction_set_masks(p: Any, model: nn.Module, sets: Sequence[Sequence[str]], calibration: Iterable[Any],
                              sparsity: float) -> dict[str, list[dict[str, Any]]]:
    """``{set key: member masks}`` by :func:`reconstruction_keep`, the sets taken in groups whose readers' Gram
    matrices fit :data:`GRAM_BUDGET_MB` (one pass over the calibration batches per group)."""
    if isinstance(calibration, (torch.Tensor, dict)):
        raise ConfigError("calibration must be an iterable of batches (e.g. a list of tensors), not one batch")
    batches = list(calibration)
    if not batches:
        raise ConfigError("calibration is empty; give at least one batch of inputs")
    modules = dict(model.named_modules())
    out: dict[str, list[dict[str, Any]]] = {}
    groups: list[tuple[list[Sequence[str]], dict[str, float]]] = [([], {})]
    for s in sets:
        names = [n for n, _, _ in _consumer_columns(p.atoms, model, s, p.units["+".join(s)])]
        group, readers = groups[-1]
        new = {n: _n_columns(modules[n]) ** 2 * 8 / 2 ** 20 for n in names if n not in readers}
        if group and sum(readers.values()) + sum(new.values()) > GRAM_BUDGET_MB:
            groups.append(([], {}))
            group, readers = groups[-1]
            new = {n: _n_columns(modules[n]) ** 2 * 8 / 2 ** 20 for n in names}
        group.append(s)
        readers.update(new)
    for group, readers in groups:
        if not group:
            continue
        grams = input_grams(model, batches, list(readers))
        for s in group:
            key = "+".join(s)
            out[key] = _reconstruction_masks(p.atoms, model, [modules[m] for m in s], s, p.units[key], grams,
                                             sparsity)
        del grams
    return out
