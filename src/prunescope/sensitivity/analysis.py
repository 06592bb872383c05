"""``SensitivityAnalysis``: NNI 2.10.1's layer-wise pruning sensitivity sweep, exact to the bit, with
O(layer) memory, restore-on-error, checkpoint/resume, parallel workers, progress, plots.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..graph import ModelGraph, check_graph_of, trace
from ..masks.layers import FILTER_TYPES, num_filters
from ..masks.pruners import transposed_linear_types
from ..masks.units import channel_units, is_trivial
from ..narrow.prunable import Prunable, prunable_sets
from ..removal.zeros import follower_zero_maps
from ..topology import ChannelDependency
from . import results
from .checkpoint import Checkpoint, state_hash
from .jobs import EARLY_STOP_MODES, Eval, Job, _StateGuard, coerce_metric, run_job
from .parallel import Backend, make_bundle, process_pool
from .schedule import BASELINE, SweepState

logger = logging.getLogger("prunescope.sensitivity")

PRUNE_TYPES = ("l1", "l2", "fpgm", "level")
#: NNI collects these (``isinstance``) but prunes only modules whose class is exactly ``Conv2d``.
NNI_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv1d)


def _check_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _digest(units: Mapping[str, Any]) -> str:
    """A short stable digest of the unit maps (checkpoint fingerprint)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(units, sort_keys=True).encode()).hexdigest()[:16]


def parse_sparsities(sparsities: Iterable[float] | None) -> list[float]:
    """The sweep's sparsities as NNI reads them: sorted, rounded to 2 decimals (``np.round(s, 2)``), each in
    ``(0, 1)`` and given once; ``None``: ``0.1 ... 0.9``. Anything else is a :class:`ConfigError` naming it.

    >>> parse_sparsities([0.5, 0.25])
    [0.25, 0.5]
    """
    if sparsities is None:
        raw = list(np.arange(0.1, 1.0, 0.1))
    else:
        if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Iterable):
            raise ConfigError(f"sparsities must be a list of numbers in (0, 1), got {sparsities!r}")
        raw = [_check_number(s, "every sparsity") for s in sparsities]
        if not raw:
            raise ConfigError("sparsities is empty; give numbers in (0, 1) or None for 0.1 ... 0.9")
        raw = sorted(raw)
    out = [float(np.round(s, 2)) for s in raw]
    for given, s in zip(raw, out):
        if not 0.0 < s < 1.0:
            extra = "" if float(given) == s else f" (rounds to {s} with 2 decimals)"
            raise ConfigError(f"sparsity {float(given)!r} is outside (0, 1){extra}")
    dups: dict[float, list[float]] = {}
    for given, s in zip(raw, out):
        dups.setdefault(s, []).append(float(given))
    dups = {s: g for s, g in dups.items() if len(g) > 1}
    if dups:
        # NNI evaluates such a sparsity twice and writes a CSV whose values no longer line up with the header
        what = "; ".join(f"{s} (given as {', '.join(map(repr, g))})" for s, g in dups.items())
        raise ConfigError(f"duplicate sparsities after rounding to 2 decimals (NNI's rule, also the CSV's): "
                          f"{what}; give each sparsity once")
    return out


class SensitivityAnalysis:
    """Prune one layer at a time at increasing sparsities and record ``val_func``'s metric (NNI API).

    Same signature, defaults and numbers as NNI 2.10.1's ``SensitivityAnalysis``: sparsities are sorted
    and rounded with ``np.round(s, 2)`` (default ``numpy.arange(0.1, 1.0, 0.1)``); each target layer is
    pruned alone at every sparsity in ascending order (masks nested, each computed from the already-pruned
    weights by :func:`prunescope.masks.pruners.layer_mask`); the metric is recorded per sparsity; the
    early stop (``minimize``/``maximize``/``dropped``/``raised``, strict comparisons) ends a layer's
    sweep after recording the triggering value; the layer is restored before the next one.

    Beyond NNI (keyword-only):

    * ``layer_types``: module classes to analyse (e.g. ``(nn.Conv2d, nn.Conv1d, nn.Linear)``), all really
      pruned. ``None`` is NNI's behaviour: Conv2d and Conv1d are listed, only exact ``Conv2d`` is pruned
      (a Conv1d row repeats the unpruned metric); a warning names the layers left unpruned.
    * ``group_dependencies=True`` (needs ``dummy_input``): prune each channel-dependency set (layers whose
      outputs are added together) as one unit, keeping the same channels in every member, which is what a
      real pruner must do. Rows are keyed by the members joined with ``+``. Where the channel engine ties
      several channels into one unit (an attention head: its q/k/v rows; a kv group under GQA; channels of one
      layer tied by a reshape), whole units are pruned and the sparsity is a fraction of the units
      (:mod:`prunescope.masks.units`); a set whose units are single channels keeps NNI's group rule exactly.
      Only the sets that :func:`~prunescope.narrow.shrink` can narrow are swept (filter pruning; the one
      definition of :func:`prunescope.narrow.prunable.prunable_sets`): the others (a set reaching the model
      output, an unsafe layer, ...) are left out, with the reason in ``self.excluded``. On grouped
      convolutions as many units go from every group, so ``fix_mask_conflict`` leaves every mask of the sweep
      as it is and the model measured is the one ``shrink`` builds.
    * ``as_pruned=True`` (needs ``dummy_input``): measure the model as it will be once the pruned channels are
      physically removed: a pruned channel is also zero after its normalisation (the constant an eval-mode
      BatchNorm adds to a zeroed channel is gone), which is what :func:`prunescope.shrink` builds. The default
      keeps NNI's mask semantics (and NNI's numbers).
    * ``graph=``: the model's :class:`~prunescope.graph.ModelGraph` (``prunescope.graph.trace(model, x)``), so
      that one trace feeds the dependency sets (``group_dependencies``) and ``as_pruned`` instead of the model
      being traced again; it must be a trace of this model (:func:`prunescope.graph.check_graph_of`).
    * ``prunable=`` (with ``graph=``): the model's prunable sets already computed on that trace
      (:func:`prunescope.narrow.prunable.prunable_sets` with ``layer_ok`` accepting exactly the target layer
      types), so that ``group_dependencies`` does not compute them (and their shrink probe) again; a set with a
      member outside the target layers is a :class:`ConfigError`.
    * ``checkpoint=path``: JSON-lines checkpoint, appended the moment each evaluation finishes (every
      mode); a rerun skips every finished evaluation.
    * ``workers=N`` / ``executor=``: run the evaluations on N local processes or any ``concurrent.futures``
      executor (Dask: ``Client(...).get_executor()``; a ``ThreadPoolExecutor`` gives each thread its own copy
      of the model). Every evaluation ``(layer, sparsity)`` is its own job, the longest layers first, as
      many in flight as there are workers; with early stop, later sparsities of a layer are evaluated
      speculatively on idle workers and discarded past the stop, so the results are the serial ones.
      ``device``: a device or list of devices for the workers.
    * ``progress``: tqdm progress bar; ``restore_buffers``: snapshot and restore the model's buffers.

    Metrics are coerced to Python floats; NaN, infinities and non-numbers raise :class:`MetricError`.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    >>> x = torch.randn(8, 1, 7, 7)
    >>> def val(model):
    ...     with torch.no_grad():
    ...         return model(x).abs().mean().item()
    >>> sa = SensitivityAnalysis(net, val, sparsities=[0.25, 0.5], progress=False)
    >>> res = sa.analysis(val_args=[net])
    >>> list(res), list(res["0"])
    (['0', '2'], [0.25, 0.5])
    """

    def __init__(self, model: nn.Module, val_func: Callable[..., Any], sparsities: Iterable[float] | None = None,
                 prune_type: str = "l1", early_stop_mode: str | None = None,
                 early_stop_value: float | None = None, *,
                 layer_types: Sequence[type[nn.Module]] | None = None, group_dependencies: bool = False,
                 dummy_input: Any = None, checkpoint: str | os.PathLike[str] | None = None,
                 workers: int | None = None, executor: Executor | None = None,
                 device: str | Sequence[str] | None = None, progress: bool = True,
                 restore_buffers: bool = True, as_pruned: bool = False, graph: ModelGraph | None = None,
                 prunable: Prunable | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(val_func):
            raise ConfigError(f"val_func must be callable, got {type(val_func).__name__}")
        self.model = model
        self.val_func = val_func
        self.sparsities = parse_sparsities(sparsities)
        if prune_type not in PRUNE_TYPES:
            raise ConfigError(f"unknown prune_type {prune_type!r}; expected one of {', '.join(PRUNE_TYPES)}")
        self.prune_type = prune_type
        if early_stop_mode is not None and early_stop_mode not in EARLY_STOP_MODES:
            raise ConfigError(f"unknown early_stop_mode {early_stop_mode!r}; expected one of "
                              f"{', '.join(EARLY_STOP_MODES)} or None")
        if early_stop_mode is not None:
            if early_stop_value is None:
                raise ConfigError(f"early_stop_mode={early_stop_mode!r} needs an early_stop_value")
            early_stop_value = _check_number(early_stop_value, "early_stop_value")
        self.early_stop_mode = early_stop_mode
        self.early_stop_value = early_stop_value
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ConfigError(f"workers must be a non-negative integer, got {workers!r}")
        if workers and executor is not None:
            raise ConfigError("give either workers=N (local processes) or executor=, not both")
        if executor is not None and not isinstance(executor, Executor):
            raise ConfigError(f"executor must be a concurrent.futures.Executor, got {type(executor).__name__}")
        self.workers = workers or None
        self.executor = executor
        if isinstance(device, str):
            device = [device]
        self.devices = list(device) if device is not None else None
        if self.devices is not None and not (self.workers or self.executor):
            raise ConfigError("device= assigns worker processes to devices; it needs workers=N or executor= "
                              "(without them the model is evaluated where it is)")
        self.checkpoint = os.fspath(checkpoint) if checkpoint is not None else None
        self.progress = progress
        self.restore_buffers = restore_buffers
        self.group_dependencies = group_dependencies
        self.dummy_input = dummy_input
        check_graph_of(graph, model, "SensitivityAnalysis")
        self.graph = graph
        if prunable is not None and not isinstance(prunable, Prunable):
            raise ConfigError(f"prunable must be the result of prunescope.narrow.prunable.prunable_sets, got "
                              f"{type(prunable).__name__}")
        if prunable is not None and graph is None:
            raise ConfigError("prunable= needs graph= (the trace it was computed from)")
        self._given_prunable = prunable
        if as_pruned and dummy_input is None and graph is None:
            raise ConfigError("as_pruned=True needs dummy_input (the model is traced to find where each pruned "
                              "channel is normalised) or graph= (its trace)")
        self.as_pruned = bool(as_pruned)
        self._zero_after: dict[str, tuple] = {}
        self.layer_types = tuple(layer_types) if layer_types is not None else None
        self.ori_metric: float | None = None
        self.sensitivities: dict[str, dict[float, float]] = {}
        self.already_pruned: dict[str, float] = {}
        self.target_layer: dict[str, nn.Module] = {}
        self.groups: dict[str, tuple[str, ...]] = {}
        self.units: dict[str, tuple[tuple[int, ...], ...]] = {}  # group key -> per member, unit id per channel
        self.chunks: dict[str, tuple[int, ...]] = {}  # group key -> chunk of every unit (grouped convolutions)
        self.excluded: dict[str, str] = {}  # group key -> why the sweep leaves it out (group mode)
        self._pruned: dict[str, bool] = {}
        self._parametrized: dict[str, str] = {}  # target layer -> class, e.g. ParametrizedConv2d (weight_norm)
        self.model_parse()

    # -- configuration -------------------------------------------------------------------------------
    def model_parse(self) -> None:
        """Collect the target layers (``named_modules`` order) and, with grouping, the dependency sets."""
        filter_prune = self.prune_type != "level"
        types = self.layer_types
        if types is None:
            types = (nn.Conv2d,) if self.group_dependencies else NNI_LAYER_TYPES
        for t in types:
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise ConfigError(f"layer_types must be torch.nn.Module classes, got {t!r}")
            if filter_prune and not issubclass(t, FILTER_TYPES + transposed_linear_types()):
                raise ConfigError(f"{self.prune_type} filter pruning cannot prune {t.__name__}; supported: "
                                  f"{', '.join(c.__name__ for c in FILTER_TYPES)} (or use prune_type='level')")
        from torch.nn.utils import parametrize

        compat = self.layer_types is None and not self.group_dependencies
        for name, m in self.model.named_modules():
            if isinstance(m, types) and parametrize.is_parametrized(m, "weight"):
                self._parametrized[name] = type(m).__name__  # refused when a sweep reaches it (analysis)
            if isinstance(m, types) and isinstance(getattr(m, "weight", None), torch.Tensor):
                self.target_layer[name] = m
                self.already_pruned[name] = 0
                self._pruned[name] = type(m).__name__ == "Conv2d" if compat else True
        unpruned = [n for n, p in self._pruned.items() if not p]
        if unpruned:
            shown = ", ".join(unpruned[:6]) + (" ..." if len(unpruned) > 6 else "")
            warnings.warn(f"NNI-compatible targets: {shown} {'is' if len(unpruned) == 1 else 'are'} listed but "
                          "not pruned (NNI 2.10.1 prunes only Conv2d); pass layer_types=(nn.Conv2d, nn.Conv1d) "
                          "to prune them", stacklevel=3)
        if self.group_dependencies:
            self._parse_groups()
        else:
            self.groups = {n: (n,) for n in self.target_layer}

    def _parse_groups(self) -> None:
        if self.dummy_input is None and self.graph is None:
            raise ConfigError("group_dependencies=True needs dummy_input (an example input to trace the model) "
                              "or graph= (its trace)")
        include_linear = any(issubclass(t, nn.Linear) for t in (self.layer_types or ()))
        if self.graph is None:  # one trace for the sets, what may be pruned and the as-pruned zeros
            self.graph = trace(self.model, self.dummy_input)
        dep = ChannelDependency(self.model, self.dummy_input, include_linear=include_linear, graph=self.graph)
        order = {n: k for k, n in enumerate(self.target_layer)}
        seen: set[str] = set()
        groups: list[tuple[str, ...]] = []
        for dset in dep.dependency_sets:
            members = tuple(sorted((n for n in dset if n in order), key=order.__getitem__))
            if members:
                groups.append(members)
                seen.update(members)
        groups += [(n,) for n in self.target_layer if n not in seen]
        groups.sort(key=lambda g: order[g[0]])
        self.units, self.chunks, self.excluded = {}, {}, {}
        offered = None
        if self.prune_type != "level":  # filter pruning removes channels: only the sets shrink can narrow
            offered = self._prunable(groups)
        for g in groups:
            if self.prune_type == "level":
                continue
            key = "+".join(g)
            if offered is not None and key in offered:
                units, chunk = offered[key]
                if chunk is not None:  # grouped convolutions: as many units from every group (no conflict fix)
                    self.units[key] = tuple(tuple(int(i) for i in u) for u in units)
                    self.chunks[key] = tuple(int(c) for c in chunk)
                    continue
            units = channel_units(dep.atoms, g)
            if units is not None and not is_trivial(units):
                # the set's channels form units spanning several channels (heads, kv groups, tied channels of
                # one layer): prune whole units, the sparsity being a fraction of the units
                self.units["+".join(g)] = tuple(tuple(int(i) for i in u) for u in units)
            elif len({num_filters(self.target_layer[n]) for n in g}) > 1:
                raise ConfigError(f"dependency set {', '.join(g)} has layers with different output channel "
                                  "counts; cannot prune it as one group")
        self.groups = {"+".join(g): g for g in groups if "+".join(g) not in self.excluded}

    def _prunable(self, groups: list[tuple[str, ...]]) -> dict[str, tuple[list[np.ndarray], np.ndarray | None]]:
        """The one definition of prunable (:func:`prunescope.narrow.prunable.prunable_sets`, members limited to
        the target layer types) for the groups of the sweep: ``{group key: (units per member, chunk of every unit
        or None)}`` for the groups offered; the others go to ``self.excluded`` with the reason."""
        graph = self.graph
        targets = set(self.target_layer)
        target_ids = {id(m) for m in self.target_layer.values()}
        p = self._given_prunable
        if p is None:
            p = prunable_sets(self.model, graph, self.dummy_input, layer_ok=lambda m: id(m) in target_ids)
        else:
            outside = [m for members in p.sets for m in members if m not in targets]
            if outside:
                raise ConfigError(f"prunable= offers {outside[0]!r}, which is not a target layer (layer_types): "
                                  "compute it with layer_ok accepting exactly the target layers")
        key_of: dict[str, tuple[str, tuple[str, ...] | None]] = {}
        for members in p.sets:
            for m in members:
                key_of[m] = ("+".join(members), members)
        for key in p.excluded:
            for m in key.split("+"):
                key_of.setdefault(m, (key, None))
        out: dict[str, tuple[list[np.ndarray], np.ndarray | None]] = {}
        for g in groups:
            gkey = "+".join(g)
            hit = key_of.get(g[0])
            if hit is None:  # not a layer of the trace (never called): nothing shrink would narrow either
                continue
            pkey, members = hit
            if members is None:
                self.excluded[gkey] = p.excluded[pkey]
            elif set(members) != set(g) or not set(members) <= targets:
                self.excluded[gkey] = (f"its dependency set {pkey} has members outside the target layer types; "
                                       "pruning part of it needs a conflict fix")
            else:
                units = p.units[pkey]
                pos = {m: k for k, m in enumerate(members)}
                out[gkey] = ([units[pos[m]] for m in g], p.chunks.get(pkey))
        return out

    @property
    def layers_count(self) -> int:
        """Number of target layers (NNI)."""
        return len(self.target_layer)

    def update_already_pruned(self, layername: str, ratio: float) -> None:
        """Declare that ``layername`` is already pruned by ``ratio``: sparsity ``s`` then prunes
        ``(1 - ratio) * s + ratio`` of the layer (NNI's iterative-pruning hook)."""
        if layername not in self.target_layer:
            raise ConfigError(f"unknown layer {layername!r}; target layers: {', '.join(self.target_layer)}")
        r = _check_number(ratio, "already-pruned ratio")
        if not 0.0 <= r < 1.0:
            raise ConfigError(f"already-pruned ratio for {layername!r} must be in [0, 1), got {ratio!r}")
        self.already_pruned[layername] = ratio

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load new weights into the model (NNI API). Unlike NNI no copy is kept: every layer is
        snapshotted when its sweep starts, so the state the model has at ``analysis()`` is what is restored."""
        self.model.load_state_dict(state_dict)

    # -- the sweep ------------------------------------------------------------------------------------
    def _select(self, specified_layers: Iterable[str] | str | None) -> list[str]:
        keys = list(self.groups)
        if specified_layers is None:
            return keys
        wanted = [specified_layers] if isinstance(specified_layers, str) else list(specified_layers)
        known = set(keys) | set(self.target_layer)
        unknown = [n for n in wanted if n not in known]
        if unknown:
            named = {n for n, _ in self.model.named_modules()}
            why = [f"{n!r} ({'not a target layer type' if n in named else 'no such module'})" for n in unknown]
            raise ConfigError(f"unknown specified_layers: {', '.join(why)}; target layers: "
                              f"{', '.join(self.target_layer)}")
        chosen = set(wanted)
        for key, why in self.excluded.items():
            if key in chosen or any(m in chosen for m in key.split("+")):
                raise ConfigError(f"dependency set {key} is not swept: {why} (group_dependencies=True sweeps the "
                                  "sets that shrink can narrow)")
        return [k for k in keys if k in chosen or any(m in chosen for m in self.groups[k])]

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "weights": state_hash(self.model),
            "targets": [[k, list(g), [self._pruned[n] for n in g]] for k, g in self.groups.items()],
            "sparsities": self.sparsities,
            "prune_type": self.prune_type,
            "early_stop": [self.early_stop_mode, self.early_stop_value],
            "already_pruned": {k: float(v) for k, v in self.already_pruned.items() if v},
            **({"semantics": "as pruned"} if self.as_pruned else {}),
            **({"units": _digest(self.units)} if self.units else {}),
            **({"chunks": _digest(self.chunks)} if self.chunks else {}),
        }

    def _real(self, key: str, s: float) -> float:
        ap = self.already_pruned[self.groups[key][0]]
        return (1.0 - ap) * s + ap

    def analysis(self, val_args: Sequence[Any] | None = None, val_kwargs: Mapping[str, Any] | None = None,
                 specified_layers: Iterable[str] | None = None) -> dict[str, dict[float, float]]:
        """Run the sweep; returns (and accumulates into) ``self.sensitivities`` = ``{layer: {s: metric}}``.

        ``val_func(*val_args, **val_kwargs)`` is called once for the baseline (``self.ori_metric``) and
        once per layer and sparsity until the early stop fires. ``specified_layers`` restricts the sweep
        (model order is kept; unknown names are an error, NNI ignores them).

        With ``workers``/``executor`` every evaluation is its own job; with early stop, evaluations past a
        layer's stop may run speculatively on otherwise idle workers and are then discarded, so the result
        (and ``self.sensitivities``) is the serial one.
        """
        val_args = list(val_args) if val_args is not None else []
        val_kwargs = dict(val_kwargs) if val_kwargs is not None else {}
        keys = self._select(specified_layers)
        for name in (n for k in keys for n in self.groups[k] if n in self._parametrized):
            raise ConfigError(f"layer {name!r} has a parametrized weight ({self._parametrized[name]}, e.g. "
                              "weight_norm): the sweep prunes stored weights, which would leave its effective weight "
                              "unpruned; make it plain first (torch.nn.utils.parametrize.remove_parametrizations), "
                              "leave the layer type out of layer_types or the layer out of specified_layers")
        remote = bool(self.workers or self.executor)
        bundle = None
        if remote:
            bundle = make_bundle(self.model, self.val_func, val_args, val_kwargs)
        ckpt = Checkpoint(self.checkpoint, self._fingerprint()) if self.checkpoint else None
        state = SweepState(keys, len(self.sparsities), self.early_stop_mode, self.early_stop_value,
                           baseline=ckpt.baseline if ckpt else None,
                           known={k: ckpt.known(k) for k in keys} if ckpt else None)
        bar = _Progress(self.progress, state)
        try:
            if remote:
                assert bundle is not None
                self._run_remote(keys, state, bundle, ckpt, bar)
            else:
                self._run_serial(keys, state, val_args, val_kwargs, ckpt, bar)
        finally:
            bar.close()
        return self.sensitivities

    def _record(self, ckpt: Checkpoint | None, key: str, i: int, value: float) -> None:
        """A finished evaluation: logged (NNI's line) and appended to the checkpoint at once."""
        if i < 0:
            if ckpt is not None:
                ckpt.add_baseline(value)
            return
        ap = self.already_pruned[self.groups[key][0]]
        logger.info("Layer: %s Sparsity: %.2f Validation Metric: %.4f", key, (1.0 - ap) * self.sparsities[i] + ap,
                    value)
        if ckpt is not None:
            ckpt.add(key, [(i, self.sparsities[i], value)])

    def _run_serial(self, keys: list[str], state: SweepState, val_args: list[Any], val_kwargs: dict[str, Any],
                    ckpt: Checkpoint | None, bar: _Progress) -> None:
        """NNI's order in this process: the baseline, then each layer's sparsities in order, masks applied
        incrementally; every new value goes to the checkpoint as soon as it is known."""
        if state.baseline is None:
            bar.show(1, 1, "baseline")
            guard = _StateGuard(self.model, [], self.restore_buffers)
            try:
                value = self.val_func(*val_args, **val_kwargs)
                guard.check("the unpruned model (baseline)")
            finally:
                guard.restore()
            value = coerce_metric(value, "", None)
            self._record(ckpt, "", -1, value)
            state.finish(BASELINE, -1, value)
        self.ori_metric = state.baseline

        def on_result(job: Job, i: int, value: float) -> None:
            self.sensitivities[job.key][job.sparsities[i]] = value
            self._record(ckpt, job.key, i, value)
            state.finish(job.key, i, value)
            nxt = f"{job.key} @ {job.sparsities[i + 1]}" if i + 1 < len(job.sparsities) else job.key
            bar.show(1, 1, nxt)

        for key in keys:  # layers in model order, as NNI fills its dict
            if state.layer_done(key):
                self.sensitivities[key] = dict(zip(self.sparsities, state.result(key)))
                continue
            members = self.groups[key]
            known = state.layers[key].values
            assert self.ori_metric is not None
            job = Job(key=key, members=members, sparsities=tuple(self.sparsities), zero_after=self._zeros(key),
                      real_sparsities=tuple(self._real(key, s) for s in self.sparsities),
                      prune_type=self.prune_type, ori_metric=self.ori_metric, early_stop_mode=self.early_stop_mode,
                      early_stop_value=self.early_stop_value, prune=all(self._pruned[m] for m in members),
                      done=dict(known), restore_buffers=self.restore_buffers, units=self.units.get(key),
                      chunks=self.chunks.get(key))
            first = next((i for i in range(len(self.sparsities)) if i not in known), 0)
            self.sensitivities[key] = {s: known[i] for i, s in enumerate(self.sparsities[:first])}
            bar.show(1, 1, f"{key} @ {self.sparsities[first]}")
            res = run_job(self.model, self.val_func, val_args, val_kwargs, job, on_result)
            self.sensitivities[key] = dict(zip(self.sparsities, res.values))

    def _eval(self, key: str, i: int, threads: int | None) -> Eval:
        if i < 0:
            device = self.devices[0] if self.devices and self.executor else None
            return Eval(BASELINE, (), -1, None, (), self.prune_type, prune=False,
                        restore_buffers=self.restore_buffers, device=device, threads=threads)
        members = self.groups[key]
        idx = list(self.groups).index(key)
        device = self.devices[idx % len(self.devices)] if self.devices and self.executor else None
        return Eval(key, members, i, self.sparsities[i], tuple(self._real(key, s) for s in self.sparsities[: i + 1]),
                    self.prune_type, prune=all(self._pruned[m] for m in members),
                    restore_buffers=self.restore_buffers, device=device, threads=threads,
                    zero_after=self._zeros(key), units=self.units.get(key), chunks=self.chunks.get(key))

    def _zeros(self, key: str) -> tuple:
        """As-pruned semantics (``as_pruned=True``): where the key's pruned channels are normalised."""
        if not self.as_pruned:
            return ()
        if not self._zero_after:  # every swept key at once: one walk over the norm calls
            if self.graph is None:
                self.graph = trace(self.model, self.dummy_input)
            self._zero_after = follower_zero_maps(self.graph, self.groups)
        return self._zero_after.get(key, ())

    def _run_remote(self, keys: list[str], state: SweepState, bundle: tuple[str, bytes], ckpt: Checkpoint | None,
                    bar: _Progress) -> None:
        """One evaluation per job on worker processes / an executor, the most urgent first, as many in flight
        as there are workers; a finished evaluation is checkpointed the moment it arrives."""
        from concurrent.futures import FIRST_COMPLETED, CancelledError, wait
        from concurrent.futures.process import BrokenProcessPool

        digest, data = bundle

        def backend() -> Backend:
            if self.executor is not None:
                return Backend(self.executor, digest, data, own=False)
            assert self.workers is not None
            return Backend(process_pool(self.workers, digest, data, self.devices), digest, data, own=True,
                           workers=self.workers)

        be = backend()
        threads = None if be.threads_pool else 1
        inflight: dict[Future[float], tuple[str, int, float]] = {}
        error: BaseException | None = None
        restarts = 0
        aborted = True
        try:
            while not state.done():
                slots, window = be.slots(), be.window()
                while error is None and len(inflight) < window:
                    task = state.next_task()
                    if task is None:
                        break
                    fut = be.submit(self._eval(*task, threads))
                    inflight[fut] = (*task, time.monotonic())
                if not inflight:
                    break
                bar.show(min(len(inflight), slots), slots, be.kind)
                finished, _ = wait(list(inflight), timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in finished:
                    key, i, t0 = inflight.pop(fut)
                    try:
                        value = fut.result()
                    except (CancelledError, BrokenProcessPool) as e:
                        state.abandon(key, i)
                        if isinstance(e, BrokenProcessPool) and be.own and restarts < 3 and error is None:
                            restarts += 1  # a local worker died (OOM killer, ...): new pool, same evaluations
                            logger.warning("a worker process died; restarting the pool (%d/3)", restarts)
                            for other in list(inflight):
                                state.abandon(*inflight.pop(other)[:2])
                            be.close(abort=True)
                            be = backend()
                            break
                        error = error or e
                        continue
                    except Exception as e:  # noqa: BLE001 - val_func's error, raised after the in-flight ones land
                        state.abandon(key, i)
                        error = error or e
                        continue
                    self._record(ckpt, key, i, value)
                    state.finish(key, i, value, time.monotonic() - t0)
                    if key == BASELINE:
                        self.ori_metric = value
                # evaluations a stop has made useless: cancel those not started yet
                for fut, (key, i, _) in list(inflight.items()):
                    if key != BASELINE and not state.needed(key, i) and fut.cancel():
                        del inflight[fut]
                        state.abandon(key, i)
            aborted = False
        finally:
            for fut in inflight:
                fut.cancel()
            be.close(abort=aborted or bool(inflight))
            self._collect(keys, state)
        if error is not None:
            raise error

    def _collect(self, keys: list[str], state: SweepState) -> None:
        """Results into ``self.sensitivities``: finished layers whole, others their contiguous known start."""
        if state.baseline is not None:
            self.ori_metric = state.baseline
        for k in keys:
            if state.layer_done(k):
                vals = state.result(k)
            else:
                known = state.layers[k].values
                vals = []
                while len(vals) in known:
                    vals.append(known[len(vals)])
            if vals:
                self.sensitivities[k] = dict(zip(self.sparsities, vals))

    # -- output -----------------------------------------------------------------------------------------
    def export(self, filepath: str | os.PathLike[str]) -> None:
        """Write NNI's CSV (same bytes as NNI 2.10.1's ``export``), atomically (temp file + rename)."""
        results.write_atomic(filepath, results.csv_bytes(self.sparsities, self.sensitivities))

    def load(self, filepath: str | os.PathLike[str]) -> dict[str, dict[float, float]]:
        """Read a CSV written by ``export`` (ours or NNI's) into ``self.sensitivities`` and return it."""
        self.sensitivities = results.load_sensitivity(filepath)
        return self.sensitivities

    def plot(self, path: str | os.PathLike[str], title: str = "Pruning sensitivity") -> None:
        """PNG with one metric-vs-sparsity curve per layer and the baseline (needs matplotlib)."""
        results.plot(self.sensitivities, path, baseline=self.ori_metric, title=title)

    def to_dataframe(self) -> Any:
        """Results as a long ``pandas.DataFrame`` (``layer, sparsity, metric, delta``); needs pandas."""
        return results.to_dataframe(self.sensitivities, baseline=self.ori_metric)


class _Progress:
    """The one progress bar, in every mode: evaluations done / total (the total shrinks when an early stop
    drops a layer's remaining sparsities), workers busy, what runs, and tqdm's ETA (average rate)."""

    def __init__(self, enabled: bool, state: SweepState) -> None:
        from tqdm.auto import tqdm

        self.state = state
        fin, tot = state.counts()
        self.bar = tqdm(total=tot, initial=fin, desc="sensitivity", unit="eval", disable=not enabled,
                        dynamic_ncols=True, smoothing=0)
        self.enabled = enabled

    def show(self, busy: int, slots: int, what: str) -> None:
        if not self.enabled:
            return
        fin, tot = self.state.counts()
        self.bar.total = tot
        self.bar.n = fin
        self.bar.set_postfix_str(f"{busy}/{slots} busy, {what}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.enabled:
            fin, tot = self.state.counts()
            self.bar.total, self.bar.n = tot, fin
        self.bar.close()
