"""The pin probe: tell a size that follows the channel count from a literal, physically.

In a trace every size is a number. ``x.view(B, H // ws, ws, W // ws, ws, C)`` with ``C`` read from ``x.shape``
at run time (swin's window partition) and ``x.view(B, L, -1, 8)`` with a literal ``8`` are recorded alike, so
the channel engine (:mod:`.engine`) *pins* both: the classes whose removal would change a size written in the
op are reported unsafe. This module decides each pin physically, as a removal would:

1. candidates are the pinned classes that no op with unknown channel semantics stopped (a stop stays);
2. classes pinned by the same ops form a *group*, split into subgroups whose removal narrows every recorded
   tensor (hence every parameter) identically — the same number of channel slices along the same axes
   (swin's first-stage residual channels are one subgroup); one class of a subgroup is probed; a failure
   keeps the pins of the whole group (no more probes for it: conservative);
3. the probe removes the representative physically from a ``meta`` copy of the model (the
   :func:`~prunescope.removal.plan.plan_removal` of masks zeroing its channels in every member layer, pins
   not checked, the cuts applied to the copy), traces the copy on ``meta`` inputs and compares:
   the forward must run, follow the same ops, and *every* recorded tensor must have exactly the shape the
   removal predicts — the original shape with the class's channel slices dropped (so every reshape's
   sizes changed with the channel count, and only where the class flows), outputs unchanged;
4. a pass clears the whole subgroup when no op on the class's path selects channels by position
   (``x[:, a:b]``, ``narrow``, ``index_select``, ``roll`` ...): the copy's meta forward is then the same for
   every class of the subgroup (it depends on shapes only), and a reshape that keeps the row-major order of
   the surviving elements and lands on the predicted shape places them exactly where predicted. Where such
   an op is on the path, the probed copy is also analysed by the channel engine and every tensor's channel
   grid must be the original one with the class removed; the answer then holds for the probed class only,
   and the other classes of the subgroup stay pinned (``max_per_group`` > 1 probes more of them one by one).

Not probed (the pin stays): a class that an op with unknown channel semantics stopped; a class with a
member the removal plan cannot narrow (attention modules, embeddings) or that the plan keeps (it reaches an
output, it is combined with a parameter-derived tensor); a model whose forward does not run on ``meta``;
groups beyond ``max_probes``. A tensor the engine does not follow (channels turned into a sequence axis, as
ECA's 1-D convolution over channels) must keep its shape, so such pins stay too.

A failure keeps the pin with its reason (a literal ``head_dim`` keeps head_dim pinned: removing an in-head
index breaks the reshape; the head count is a separate unit of the head view). Nothing here is a guess:
a class is cleared only by a removal that ran and matched.

Cost: a probe is one removal plan, one narrowing of the meta copy and one meta trace (tens of milliseconds
for a CNN, up to about a second for a large transformer on a busy CPU); results are cached per graph;
``max_probes`` (default 32) bounds the number of probes, so the answer is deterministic (never time-based).

>>> import torch
>>> from torch import nn
>>> from prunescope.graph import trace
>>> class Windows(nn.Module):  # swin's window partition: C read from y.shape at run time
...     def __init__(self):
...         super().__init__()
...         self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)
...     def forward(self, x):
...         y = self.a(x)
...         b, h, w, c = y.shape
...         y = y.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
...         return self.b(y.view(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c))
>>> x = torch.ones(1, 4, 4, 3)
>>> g = trace(Windows(), x)
>>> from prunescope.topology import channel_atoms
>>> list(channel_atoms(g).unsafe)  # the engine alone: 6 looks like a literal
['a']
>>> res = probe_pins(g, x)
>>> res.unsafe, res.cleared_layers, res.probes
({}, ['a'], 1)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..graph import ModelGraph, TensorInfo, make_inputs, meta_copy, model_device, trace
from ..topology.engine import ChannelAtoms, channel_atoms
from .narrow import apply_plan, replace_tensors
from .plan import param_view_shapes, plan_removal

__all__ = ["PinProbe", "probe_pins"]

# ops whose channel mapping depends on the position of a channel, not only on the sizes: after a removal the
# same offsets/indices select other channels even when the sizes come out right
_POSITIONAL = frozenset(
    "__getitem__ getitem __setitem__ narrow select index_select gather take take_along_dim roll index "
    "index_put index_put_ index_add index_copy index_fill scatter scatter_add scatter_reduce masked_select "
    "diagonal as_strided slice_scatter select_scatter diagonal_scatter".split())


@dataclass
class PinProbe:
    """The outcome of :func:`probe_pins` on one graph.

    * ``cleared``: ``{class: evidence}`` — pinned classes whose physical removal ran and matched (not unsafe);
    * ``kept``: ``{class: why}`` — pinned classes whose probe failed (the pin stays, with its reason);
    * ``unprobed``: pinned classes not decided (stopped by an unknown op, or over the probe bound);
    * ``class_notes``: the engine's ``class_notes`` without the cleared classes;
    * ``unsafe``: ``{layer: [reason, ...]}`` recomputed from ``class_notes`` (what ``not_safe_to_prune`` reports);
    * ``cleared_layers``: layers unsafe for the engine alone that are not unsafe any more;
    * ``probes`` (count), ``seconds`` (wall time of the whole probe).
    """

    cleared: dict[int, str] = field(default_factory=dict)
    kept: dict[int, str] = field(default_factory=dict)
    unprobed: list[int] = field(default_factory=list)
    class_notes: dict[int, list[str]] = field(default_factory=dict)
    unsafe: dict[str, list[str]] = field(default_factory=dict)
    cleared_layers: list[str] = field(default_factory=list)
    probes: int = 0
    seconds: float = 0.0


_CACHE: WeakKeyDictionary[ModelGraph, dict[tuple[int, int], PinProbe]] = WeakKeyDictionary()


def probe_pins(graph: ModelGraph, dummy_input: Any = None, *, max_probes: int = 32,
               max_per_group: int = 1) -> PinProbe:
    """Probe the pinned classes of ``graph`` (see the module docs); cached per graph.

    ``dummy_input``: what the graph was traced on (any form :func:`~prunescope.graph.trace` takes); without it
    the inputs are rebuilt from the graph's recorded input shapes (positional tensors and keyword tensors).
    ``max_probes`` bounds the probes (groups beyond it stay pinned, listed in ``unprobed``);
    ``max_per_group`` bounds the one-by-one probes of a group whose path selects channels by position.
    """
    per_graph = _CACHE.setdefault(graph, {})
    res = per_graph.get((max_probes, max_per_group))
    if res is None:
        prober = _Prober(graph, dummy_input, max_probes, max_per_group)
        res = prober.run()
        if not prober.no_inputs:  # a later call with dummy_input may do better
            per_graph[(max_probes, max_per_group)] = res
    return res


# ---------------------------------------------------------------------------------------------------- helpers
def _meta_like(v: Any) -> Any:
    return torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v


def _meta_inputs(graph: ModelGraph, dummy_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """``(args, kwargs)`` on ``meta`` for re-tracing, or None when the inputs cannot be rebuilt."""
    if dummy_input is not None:
        if isinstance(dummy_input, (tuple, list)) and dummy_input and all(isinstance(v, int) for v in dummy_input):
            return (torch.empty(tuple(dummy_input), device="meta"),), {}
        args, kw = make_inputs(graph.model, dummy_input)
        return pytree.tree_map(_meta_like, args), pytree.tree_map(_meta_like, kw)
    pos: dict[int, TensorInfo] = {}
    kw: dict[str, Any] = {}
    for t in graph.inputs:
        name = t.name or ""
        if name.startswith("input."):
            i = int(name.split(".", 1)[1])
            if i in pos:  # a nested positional input: its structure is not recorded
                return None
            pos[i] = t
        elif name:
            if name in kw:
                return None
            kw[name] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        else:
            return None
    if sorted(pos) != list(range(len(pos))):
        return None
    args = tuple(torch.empty(pos[i].shape, dtype=pos[i].dtype, device="meta") for i in range(len(pos)))
    return args, kw


def positional_inputs(graph: ModelGraph, ca: Any) -> list[tuple[Any, Any]]:
    """``(node, channel info of its input)`` for every op that selects channels by position (``x[:, a:b]``,
    ``roll``, ``index_select`` ...) other than a spatial slice that passes the channels through untouched."""
    out = []
    for node in graph.nodes:
        if node.name not in _POSITIONAL or not node.inputs:
            continue
        ci_in = ca.info(node.inputs[0])
        if ci_in is None:
            continue
        ci_out = ca.info(node.outputs[0]) if node.outputs else None
        if ci_out is not None and ci_out.atoms.shape == ci_in.atoms.shape and np.array_equal(ci_out.atoms,
                                                                                              ci_in.atoms):
            continue
        out.append((node, ci_in))
    return out


def _removed_shape(cls_grid: np.ndarray, axes: tuple[int, ...], shape: tuple[int, ...],
                   c: int) -> tuple[int, ...] | None:
    """The tensor shape once every channel slice of class ``c`` is gone (None: ``c`` is not whole slices)."""
    hit = cls_grid == c
    if not hit.any():
        return tuple(shape)
    covered = np.zeros_like(hit)
    new = list(shape)
    for k, ax in enumerate(axes):
        sl = np.moveaxis(hit, k, 0).reshape(hit.shape[k], -1)
        whole = sl.all(1)
        if whole.any():
            new[ax] -= int(whole.sum())
            idx = [slice(None)] * hit.ndim
            idx[k] = whole
            covered[tuple(idx)] = True
    if (hit & ~covered).any():
        return None
    return tuple(new)


def _drop_class(cls_grid: np.ndarray, c: int) -> np.ndarray:
    """The class grid with the whole slices of class ``c`` removed (assumes :func:`_removed_shape` passed)."""
    g = cls_grid
    for k in range(g.ndim):
        sl = np.moveaxis(g, k, 0).reshape(g.shape[k], -1)
        keep = ~(sl == c).all(1) if sl.shape[1] else np.ones(g.shape[k], bool)
        g = np.compress(keep, g, axis=k)
    return g


class _Prober:
    def __init__(self, graph: ModelGraph, dummy_input: Any, max_probes: int, max_per_group: int) -> None:
        self.g = graph
        self.ca = channel_atoms(graph)
        self.dummy_input = dummy_input
        self.max_probes = max_probes
        self.max_per_group = max_per_group
        self.res = PinProbe()
        self._small: nn.Module | None = None
        self._inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._grids: list[tuple[int, int, TensorInfo, tuple[int, ...], np.ndarray]] = []
        self._pos_nodes: list[tuple[int, np.ndarray]] = []
        self.no_inputs = False

    # -- setup
    def _candidates(self) -> tuple[list[int], list[int]]:
        ca = self.ca
        notes = ca.class_notes
        stopped: set[int] = set()
        for atoms, _note in getattr(ca, "_stop_notes", None) or []:
            a = atoms[atoms >= 0]
            stopped.update(np.unique(ca.root[a]).tolist())
        # -- pins on what channel values select (topk routing, topology/moe.py): a removal that runs proves nothing
        for atoms in getattr(ca, "value_pins", None) or []:
            a = atoms[atoms >= 0]
            stopped.update(np.unique(ca.root[a]).tolist())
        if not hasattr(ca, "_stop_notes"):  # an engine without the pin/stop split: decide nothing
            return [], sorted(notes)
        cand = [c for c in notes if c not in stopped]
        return cand, sorted(c for c in notes if c in stopped)

    def _groups(self, cand: list[int]) -> list[list[list[int]]]:
        """Candidate classes grouped by pin notes, then by how much each tensor, layer and layer input loses."""
        ca = self.ca
        want = set(cand)
        sig: dict[int, list[Any]] = {c: [] for c in cand}
        for i, (name, li) in enumerate(ca.layers.items()):
            for k, arr in enumerate([ca.layer_atoms(name)] + list(li.inputs)):
                a = arr[arr >= 0]
                if not a.size:
                    continue
                u, n = np.unique(ca.root[a], return_counts=True)
                for c, cnt in zip(u.tolist(), n.tolist()):
                    if c in want:
                        sig[c].append((i, k, cnt))
        for name, reps in ca.followers.items():
            for k, arr in enumerate(reps):
                a = arr[arr >= 0]
                u, n = np.unique(ca.root[a], return_counts=True)
                for c, cnt in zip(u.tolist(), n.tolist()):
                    if c in want:
                        sig[c].append((name, k, cnt))
        shapes = self._shape_signature()
        by_notes: dict[Any, dict[Any, list[int]]] = {}
        for c in cand:
            key = (tuple(sig[c]), int(shapes[c]))
            by_notes.setdefault(tuple(ca.class_notes[c]), {}).setdefault(key, []).append(c)
        out = [sorted(d.values(), key=len, reverse=True) for d in by_notes.values()]
        # first executed first (the order the user reads the report in)
        return sorted(out, key=lambda v: min(int(ca.atom_layer[min(s)]) for s in v))

    def _shape_signature(self) -> np.ndarray:
        """Per class, a 64-bit digest of how its removal changes every recorded channel tensor (how many whole
        slices go along which axis of which tensor, or that it is not whole slices there). Two classes with the
        same digest narrow every tensor, hence every parameter and the meta forward, identically."""
        n = len(self.ca.root)
        h = np.zeros(n, np.uint64)
        p1, p2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
        with np.errstate(over="ignore"):
            for t_i, (_idx, _j, _t, _axes, grid) in enumerate(self._grids):
                valid = grid[grid >= 0]
                if not valid.size:
                    continue
                present = np.unique(valid)
                whole_any = np.zeros(n, bool)
                for k in range(grid.ndim):
                    sl = np.moveaxis(grid, k, 0).reshape(grid.shape[k], -1)
                    whole = (sl == sl[:, :1]).all(1) & (sl[:, 0] >= 0)
                    if not whole.any():
                        continue
                    u, cnt = np.unique(sl[whole, 0], return_counts=True)
                    whole_any[u] = True
                    key = np.uint64((t_i * 16 + k + 1) & 0xFFFFFFFFFFFF)
                    h[u] = (h[u] * p1) ^ (key * p2 + cnt.astype(np.uint64))
                partial = present[~whole_any[present]]
                if partial.size:
                    key = np.uint64((t_i * 16 + 15) & 0xFFFFFFFFFFFF)
                    h[partial] = (h[partial] * p1) ^ (key * p2)
        return h

    def _setup(self) -> str | None:
        try:
            self._inputs = _meta_inputs(self.g, self.dummy_input)
        except Exception as e:  # noqa: BLE001 - any input we cannot rebuild: decide nothing
            return f"the example input cannot be rebuilt on meta ({type(e).__name__}: {e})"
        if self._inputs is None:
            self.no_inputs = True
            return "the example input cannot be rebuilt from the trace (give dummy_input)"
        try:
            self._small = meta_copy(self.g.model)
        except Exception as e:  # noqa: BLE001
            return f"the model cannot be copied to meta ({type(e).__name__}: {e})"
        if model_device(self.g.model).type != "meta":  # traced on real tensors: does it run on meta at all?
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trace(self._small, self._inputs[0], self._inputs[1] or None)
            except Exception as e:  # noqa: BLE001 - data-dependent forward: nothing can be probed on meta
                return f"the model does not run on the meta device ({str(e)[:200]})"
        ca = self.ca
        for node in self.g.nodes:
            for j, t in enumerate(node.outputs):
                ci = ca.info(t)
                if ci is not None:
                    self._grids.append((node.index, j, t, ci.axes, ca.atom_class(ci.atoms)))
        self._pos_nodes += [(node.index, np.unique(ca.atom_class(ci_in.atoms)))
                            for node, ci_in in positional_inputs(self.g, ca)]
        return None

    # -- one probe
    def _masks(self, c: int) -> dict[str, dict[str, torch.Tensor]] | None:
        ca = self.ca
        members = np.nonzero(ca.root == c)[0]
        masks: dict[str, dict[str, torch.Tensor]] = {}
        mods = self.g.modules
        for a in members.tolist():
            layer, ch = ca.atom_name(a)
            li = ca.layers[layer]
            mod = mods.get(layer)
            w = getattr(mod, "weight", None) if mod is not None else None
            if li.kind not in ("conv", "conv_transpose", "linear") or not isinstance(w, torch.Tensor):
                return None
            if layer not in masks:  # only the axes _filter_keep reads: output channels (and conv_transpose's C_in)
                shape = [1] * w.ndim
                shape[li.weight_out_dim if li.kind == "linear" else 0] = w.shape[li.weight_out_dim if
                                                                              li.kind == "linear" else 0]
                if li.kind == "conv_transpose":
                    shape[1] = w.shape[1]
                masks[layer] = {"weight": torch.ones(shape, dtype=torch.bool)}
            m = masks[layer]["weight"]
            if li.kind == "conv_transpose":
                gr = max(1, li.groups)
                cpg, cin = w.shape[1], w.shape[0]
                grp, j = divmod(ch, cpg)
                m[grp * (cin // gr):(grp + 1) * (cin // gr), j] = False
            elif li.kind == "linear" and li.weight_out_dim:
                m.select(li.weight_out_dim, ch).fill_(False)
            else:
                m[ch] = False
        return masks

    def probe(self, c: int) -> tuple[bool, str, bool]:
        """``(passed, why, positional)`` for removing class ``c`` alone."""
        self.res.probes += 1
        ca = self.ca
        masks = self._masks(c)
        if masks is None:
            return False, "a member is not a conv/linear layer that a removal can narrow", False
        try:
            plan = plan_removal(self.g, masks, check_pins=False)
        except Exception as e:  # noqa: BLE001 - a removal that cannot be planned decides nothing
            return False, f"the removal cannot be planned ({type(e).__name__}: {e})", False
        target = ca.root == c
        if not np.array_equal(plan.atom_removed, target):
            why = next(iter(plan.protected.values()), ["the plan removes other channels"])[0]
            return False, f"the removal plan keeps it ({why})", False
        small = self._small
        assert small is not None and self._inputs is not None
        saved_t: dict[int, torch.Tensor] = {}
        saved_a: list[tuple[nn.Module, str, Any]] = []
        for fqn in plan.cuts:
            mod_name, _, attr = fqn.rpartition(".")
            owner = small.get_submodule(mod_name) if mod_name else small
            saved_t[fqn] = getattr(owner, attr)  # type: ignore[index]
        for name, values in plan.attrs.items():
            try:
                mod = small.get_submodule(name) if name else small
            except AttributeError:
                continue
            for k in values:
                if hasattr(mod, k):
                    saved_a.append((mod, k, getattr(mod, k)))
        try:
            apply_plan(small, plan)
            args, kw = self._inputs
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    g2 = trace(small, args, kw or None)
            except Exception as e:  # noqa: BLE001 - the forward fails: a true literal
                return False, f"the forward fails once it is removed ({str(e)[:300]})", False
            return self._compare(g2, c, plan)
        finally:  # put the copy back as it was for the next probe
            restore: dict[int, torch.Tensor] = {}
            for fqn, old in saved_t.items():
                mod_name, _, attr = fqn.rpartition(".")
                owner = small.get_submodule(mod_name) if mod_name else small
                cur = getattr(owner, attr)
                if cur is not old:
                    restore[id(cur)] = old
            replace_tensors(small, restore)
            for mod, k, v in saved_a:
                setattr(mod, k, v)

    def _compare(self, g2: ModelGraph, c: int, plan: Any) -> tuple[bool, str, bool]:
        g = self.g
        if len(g2.nodes) != len(g.nodes) or any(a.name != b.name or len(a.outputs) != len(b.outputs)
                                                for a, b in zip(g.nodes, g2.nodes)):
            return False, "the forward takes other ops once it is removed", False
        if [tuple(t.shape) for t in g2.outputs] != [tuple(t.shape) for t in g.outputs]:
            return False, "the model's output shapes change", False
        expected: dict[tuple[int, int], tuple[int, ...]] = {}
        for idx, j, t, axes, grid in self._grids:
            shp = _removed_shape(grid, axes, tuple(t.shape), c)
            if shp is None:
                why = f"its channels are not whole slices of the tensor of '{g.nodes[idx].name}' op #{idx}"
                return False, why, False
            expected[(idx, j)] = shp
        views = param_view_shapes(plan) if plan is not None else {}  # a class token's expand narrows with it
        for a, b in zip(g.nodes, g2.nodes):
            for j, (ta, tb) in enumerate(zip(a.outputs, b.outputs)):
                want = expected.get((a.index, j), views.get(ta.id, tuple(ta.shape)))
                if tuple(tb.shape) != want:
                    where = f"module '{a.module}'" if a.module else "the model's forward"
                    return False, (f"'{a.name}' op #{a.index} in {where} gives {list(tb.shape)}, a removal that "
                                   f"follows the channel count gives {list(want)}"), False
        positional = any(c in cls for _i, cls in self._pos_nodes)
        if positional:
            ok, why = self._compare_grids(g2, c, plan)
            if not ok:
                return False, why, True
        return True, "its removal runs and every size follows", positional

    def _compare_grids(self, g2: ModelGraph, c: int, plan: Any) -> tuple[bool, str]:
        """Channel grids of the probed copy, mapped back to the original classes, equal the expected ones."""
        ca = self.ca
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ca2 = ChannelAtoms(g2)
            except Exception as e:  # noqa: BLE001
                return False, f"the probed copy cannot be analysed ({type(e).__name__})"
        n2 = len(ca2.root)
        old_of_new = np.full(n2, -1, np.int64)
        for name, li2 in ca2.layers.items():
            li = ca.layers.get(name)
            if li is None:
                return False, f"layer '{name}' appears only in the probed copy"
            kept = np.nonzero(~plan.removed[name])[0]
            if len(kept) != li2.out_channels:
                return False, f"layer '{name}' has {li2.out_channels} channels in the probed copy, not {len(kept)}"
            old_of_new[li2.atom_start:li2.atom_start + li2.out_channels] = li.atom_start + kept
        for idx, j, _t, axes, grid in self._grids:
            t2 = self.g2_out(g2, idx, j)
            ci2 = ca2.info(t2)
            want = _drop_class(grid, c)
            if ci2 is None:
                if (want >= 0).any():
                    return False, f"the channels of '{self.g.nodes[idx].name}' op #{idx} are lost"
                continue
            a2 = old_of_new[np.maximum(ci2.atoms, 0)]
            got = np.where(ci2.atoms >= 0, ca.root[np.maximum(a2, 0)], -1)
            if ci2.axes != axes or got.shape != want.shape or not np.array_equal(got, want):
                return False, f"'{self.g.nodes[idx].name}' op #{idx} selects other channels once it is removed"
        return True, ""

    @staticmethod
    def g2_out(g2: ModelGraph, idx: int, j: int) -> TensorInfo:
        return g2.nodes[idx].outputs[j]

    # -- the whole run
    def _decide(self, subgroups: list[list[int]]) -> None:
        """One group of classes pinned by the same ops: probe a class of each subgroup (same removal shapes)."""
        res = self.res
        for k, sub in enumerate(subgroups):
            if res.probes >= self.max_probes:
                for rest in subgroups[k:]:
                    res.unprobed.extend(rest)
                return
            ok, why, positional = self.probe(sub[0])
            if not ok:
                # the pin stays; the other classes pinned by the same ops keep it too (not probed: conservative)
                for rest in subgroups[k:]:
                    for c in rest:
                        res.kept[c] = why if c == sub[0] else why + " (probed on a class pinned by the same ops)"
                return
            res.cleared[sub[0]] = why
            if not positional:
                for c in sub[1:]:
                    res.cleared[c] = why + " (probed on a class of the same group)"
                continue
            for j, c in enumerate(sub[1:]):
                if j + 1 >= self.max_per_group or res.probes >= self.max_probes:
                    res.unprobed.extend(sub[1 + j:])
                    break
                ok, why, _ = self.probe(c)
                (res.cleared if ok else res.kept)[c] = why

    def run(self) -> PinProbe:
        t0 = time.perf_counter()
        res = self.res
        ca = self.ca
        cand, stopped = self._candidates()
        res.unprobed.extend(stopped)
        if cand:
            why = self._setup()
            if why is not None:
                for c in cand:
                    res.kept[c] = why
            else:
                for subgroups in self._groups(cand):
                    self._decide(subgroups)
        notes = {c: v for c, v in ca.class_notes.items() if c not in res.cleared}
        res.class_notes = notes
        for name in ca.layers:
            reasons: dict[str, None] = {}
            for c in np.unique(ca.layer_classes(name)).tolist():
                if c in notes:
                    reasons.update(dict.fromkeys(notes[c]))
            if reasons:
                res.unsafe[name] = list(reasons)
        res.cleared_layers = [n for n in ca.unsafe if n not in res.unsafe]
        res.seconds = time.perf_counter() - t0
        return res
