"""Sizes the forward reads from module attributes (``num_heads``, ``split_size``, ``n_heads`` ...), found physically.

A trace sees sizes, not where they came from: ``q.view(B, L, self.num_heads, self.head_dim)`` and
``view(B, L, 4, 8)`` record the same op. After :func:`~prunescope.narrow.shrink` narrows the tensors of a
copy, a size read from an attribute is stale. Which attributes matter is decided by running the copy, not by
names:

1. The removal plan says what every recorded tensor's shape must become (each channel axis keeps its alive
   positions). The narrowed copy is traced (on the ``meta`` device when the forward allows it) and compared
   op by op with those shapes; when every op matches, nothing is read from a stale attribute.
2. Otherwise the candidates are the integer attributes of the modules (``vars(module)``, public names; also
   tuples of integers, a shape kept as an attribute, with the changing size replaced) whose value is a size
   that changes inside that module's own ops (e.g. ``split_size`` = 768 where a 768-wide axis becomes 576,
   ``num_heads`` = 12 where a 12-head axis becomes 9). Candidates are tried greedily, all modules of one
   class and attribute name together, each with its per-module new value: the one that moves the first
   mismatching op furthest is kept, until every op matches. Only the candidates of modules that have run by
   the first mismatching op (or that contain it, or run inside its module) are tried: a module that runs
   later cannot have written its size. An attribute that the forward does not read
   (GPT-2's ``embed_dim``) never helps and is left as it is. A size the forward derives from an attribute
   by dividing by another integer attribute of the module (``self.in_channels // self.num_paths``) makes the
   attribute a candidate too.
3. If no candidate makes the shapes match, :class:`~prunescope.errors.ShrinkError` names the first op
   whose shape differs (a size written as a literal, or read from somewhere shrink cannot update).

The result is exact by construction: the narrowed model's every recorded shape equals the plan's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ShrinkError, TraceError
from ..graph import ModelGraph, meta_copy, trace
from ..removal.expert_cuts import derived_param_shapes
from ..removal.plan import RESHAPE_LIKE, RemovalPlan, axis_positions, param_view_shapes

__all__ = ["expected_shapes", "fit_attributes"]

_MAX_ROUNDS = 16


def expected_shapes(plan: RemovalPlan) -> dict[int, tuple[int, ...]]:
    """``{tensor id: shape after narrowing}`` for every recorded tensor whose shape changes."""
    out: dict[int, tuple[int, ...]] = {}
    ca = plan.atoms
    for t in plan.graph.tensors:
        ci = ca.info(t)
        if ci is None:
            continue
        shape = list(t.shape)
        for a in ci.axes:
            if a < len(shape):
                shape[a] -= int(axis_positions(ci, a, plan.atom_removed)[1].sum())
        if tuple(shape) != tuple(t.shape):
            out[t.id] = tuple(shape)
    # -- fused expert parameters (removal/expert_cuts.py): the views the forward makes of them narrow too
    out.update(derived_param_shapes(plan))
    out.update(_reshaped_vectors(plan))
    out.update(param_view_shapes(plan))  # a class token's expand(B, -1, -1)
    return out


def _reshaped_vectors(plan: RemovalPlan) -> dict[int, tuple[int, ...]]:
    """Shapes of the pure reshapes of a narrowed per-channel vector (ConvNeXt's ``gamma.reshape(1, -1, 1, 1)``,
    a GRN's ``weight.view(1, -1, 1, 1)``, a layer scale's ``scale.view(C, 1, 1)``): the plan narrows the
    vector itself (its elementwise use), so every view of it with the vector's one long axis narrows too."""
    long_axis: dict[int, tuple[int, int]] = {}  # tensor id -> (old length, new length)
    for t in plan.graph.tensors:
        cut = plan.cuts.get(t.name or "") if t.kind in ("param", "buffer") else None
        if cut is None or not cut.changes() or sum(s > 1 for s in t.shape) != 1:
            continue
        big = next(i for i, s in enumerate(t.shape) if s > 1)
        long_axis[t.id] = (int(t.shape[big]), int(cut.new_shape()[big]))
    out: dict[int, tuple[int, ...]] = {}
    if not long_axis:
        return out
    for node in plan.graph.nodes:
        tins = [t for t in node.inputs if t.kind != "const"]
        if node.name not in RESHAPE_LIKE or len(tins) != 1 or tins[0].id not in long_axis:
            continue
        old, new = long_axis[tins[0].id]
        for o in node.outputs:
            big = [i for i, s in enumerate(o.shape) if s > 1]
            if len(big) == 1 and o.shape[big[0]] == old:
                shape = list(o.shape)
                shape[big[0]] = new
                out[o.id] = tuple(shape)
                long_axis[o.id] = (old, new)
    return out


def _size_changes(plan: RemovalPlan, exp: dict[int, tuple[int, ...]]) -> dict[str, dict[int, set[int]]]:
    """``{module: {old size: {new sizes}}}`` over the ops each module runs itself or through its children.

    Sizes of the channel axes only: a value whose axes keep their size somewhere in the scope maps to itself
    too, which makes it ambiguous unless the search proves which value the forward needs.
    """
    per_node: dict[str, dict[int, set[int]]] = {}
    ca = plan.atoms
    for node in plan.graph.nodes:
        scope = per_node.setdefault(node.module or "", {})
        for t in list(node.inputs) + list(node.outputs):
            ci = ca.info(t)
            if ci is None:
                continue
            new = exp.get(t.id, tuple(t.shape))
            for a in ci.axes:
                if a < t.ndim:
                    scope.setdefault(int(t.shape[a]), set()).add(int(new[a]))
    out: dict[str, dict[int, set[int]]] = {}
    for mod, sizes in per_node.items():
        for anc in _ancestors(mod):
            dst = out.setdefault(anc, {})
            for k, v in sizes.items():
                dst.setdefault(k, set()).update(v)
    return out


def _ancestors(module: str) -> list[str]:
    """``'a.b.c'`` -> ``['', 'a', 'a.b', 'a.b.c']``: the scopes an op of ``module`` belongs to."""
    parts = module.split(".") if module else []
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]


def _written(plan: RemovalPlan) -> dict[str, set[int]]:
    """``{module: integers passed to its ops (and its children's)}``: the sizes a forward wrote in a call."""
    from torch.utils import _pytree as pytree

    per: dict[str, set[int]] = {}
    for node in plan.graph.nodes:
        vals = {v for v in pytree.tree_leaves((node.args, node.kwargs)) if type(v) is int}
        if not vals:
            continue
        for anc in _ancestors(node.module):
            per.setdefault(anc, set()).update(vals)
    return per


def _candidates(model: nn.Module, scopes: dict[str, dict[int, set[int]]], known: dict[str, set[str]],
                written: dict[str, set[int]]) -> dict[tuple[type, str, int], dict[str, Any]]:
    """``{(class, attribute, option index): {module: new value}}`` for integer attributes (and tuples of
    integers) of changing sizes that the module's ops were called with (an attribute no call received cannot
    have set a recorded size)."""
    groups: dict[tuple[type, str, int], dict[str, Any]] = {}
    for name, mod in model.named_modules():
        sizes = scopes.get(name)
        if not sizes:
            continue
        args = written.get(name, set())
        ints = [v for k, v in vars(mod).items() if not k.startswith("_") and type(v) is int and v > 1]
        for k, v in vars(mod).items():
            if k.startswith("_") or k in known.get(name, ()):
                continue
            if type(v) is int and (v in args or any(v % u == 0 and v // u in args for u in ints if u != v)):
                # read as it is, or divided by another integer attribute of the module (SK-ResNet's split size
                # ``self.in_channels // self.num_paths``)
                news = sorted(n for n in sizes.get(v, ()) if n != v)
                for i, n in enumerate(news):
                    groups.setdefault((type(mod), k, i), {})[name] = n
            elif type(v) is tuple and v and all(type(e) is int for e in v):
                # a shape kept as an attribute (timm's layer scale ``self.shape = (dim, 1, 1)``): the first of
                # its sizes that changes, replaced
                size = next((e for e in v if e in args and any(n != e for n in sizes.get(e, ()))), None)
                if size is None:
                    continue
                news = sorted(n for n in sizes[size] if n != size)
                for i, n in enumerate(news):
                    groups.setdefault((type(mod), k, i), {})[name] = tuple(n if e == size else e for e in v)
    return groups


class _Prober:
    """Traces a copy of the narrowed model (meta when possible) and compares it with the plan's shapes."""

    def __init__(self, small: nn.Module, dummy_input: Any, plan: RemovalPlan, exp: dict[int, tuple[int, ...]],
                 meta: bool = True):
        self.want = [[exp.get(t.id, tuple(t.shape)) for t in n.outputs] for n in plan.graph.nodes]
        self.names = [(n.name, n.module) for n in plan.graph.nodes]
        self.model, self.x = _meta_copy(small, dummy_input) if meta else (small, dummy_input)
        self.modules = dict(self.model.named_modules())

    def progress(self) -> tuple[int, str]:
        """Index of the first op whose shapes differ from the plan (``len`` = all match), and a description."""
        try:
            g: ModelGraph = trace(self.model, self.x)
        except TraceError as e:
            idx = e.recorded if e.recorded is not None else 0
            return idx, f"the forward fails at op '{e.op}' in module '{e.module}': {e}"
        for i, (node, want) in enumerate(zip(g.nodes, self.want)):
            got = [tuple(t.shape) for t in node.outputs]
            if node.name != self.names[i][0] or got != want:
                return i, (f"op '{self.names[i][0]}' in module '{self.names[i][1]}' makes {got}, the removal plan "
                           f"expects {want}")
        if len(g.nodes) != len(self.want):
            return min(len(g.nodes), len(self.want)), "the narrowed forward runs different ops"
        return len(self.want), ""

    def set(self, values: dict[str, Any], attr: str) -> dict[str, Any]:
        old = {}
        for name, v in values.items():
            mod = self.modules[name]
            old[name] = getattr(mod, attr)
            setattr(mod, attr, v)
        return old


def _first_ops(graph: ModelGraph) -> dict[str, int]:
    """``{module: index of the first op it (or a child) runs}``."""
    out: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for anc in _ancestors(node.module or ""):
            out.setdefault(anc, i)
    return out


def _meta_copy(model: nn.Module, dummy_input: Any) -> tuple[nn.Module, Any]:
    from torch.utils import _pytree as pytree

    x = pytree.tree_map(lambda v: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v,
                        dummy_input)
    return meta_copy(model), x


def fit_attributes(small: nn.Module, plan: RemovalPlan, dummy_input: Any,
                   known: dict[str, set[str]] | None = None, *, force: bool = False) -> dict[str, dict[str, Any]]:
    """Update the size attributes of ``small`` (already narrowed) that its forward reads; returns what changed.

    Does nothing when no module has an integer attribute equal to a size that changes, unless ``force``
    (removals the engine pins: the comparison is what decides them). Raises :class:`ShrinkError` when the
    shapes cannot be made to match the plan.
    """
    exp = expected_shapes(plan)
    if not exp:
        return {}
    known = known or {}
    groups = _candidates(small, _size_changes(plan, exp), known, _written(plan))
    if not groups and not force:
        return {}
    prober = _Prober(small, dummy_input, plan, exp)
    best, why = prober.progress()
    on_meta = any(t.is_meta for t in list(small.parameters()) + list(small.buffers()))
    if best < len(prober.want) and not on_meta:  # a forward that reads values cannot run on meta: the copy itself
        real = _Prober(small, dummy_input, plan, exp, meta=False)  # attributes are set and restored per try
        rb, rw = real.progress()
        if rb > best:
            prober, best, why = real, rb, rw
    done = len(prober.want)
    chosen: dict[tuple[type, str, int], dict[str, Any]] = {}
    assigned: dict[tuple[type, str], set[str]] = {}
    first = _first_ops(plan.graph)
    for _ in range(_MAX_ROUNDS):
        if best >= done:
            break
        pick = None
        # only modules that run by the first op that differs (or inside / around its module) can have set its
        # size: one whole-model try per candidate, and MaxViT has hundreds of candidates in later blocks
        scope = plan.graph.nodes[best].module if best < len(plan.graph.nodes) else ""
        # one attribute can need different options in different modules (SK-ResNet's ``in_channels`` is the
        # block input's width in one block and equals the paths' width, which shrinks differently, in
        # another): a later option sets the modules no earlier option of the attribute has set; only when no
        # such try helps, a later option may reset those an earlier option set too (MobileViT's ``attn_dim``
        # where several widths change: the first option fitted the early stages, a later one is the last's)
        for reset in (False, True):
            for key, values in groups.items():
                if not any(first.get(n, done) <= best or n.startswith(scope + ".") or scope.startswith(n)
                           for n in values):
                    continue
                if key in chosen:
                    continue
                fresh = {n: v for n, v in values.items() if n not in assigned.get(key[:2], ())}
                vals = values if reset else fresh
                if not vals or (reset and len(fresh) == len(values)):
                    continue
                old = prober.set(vals, key[1])
                try:
                    p, w = prober.progress()
                finally:
                    prober.set(old, key[1])
                if p > best and (pick is None or p > pick[1]):
                    pick = (key, p, w, vals)
                    if p >= done:  # every op matches: no later candidate can do better (the first best is kept)
                        break
            if pick is not None:
                break
        if pick is None:
            break
        key, best, why, values = pick
        chosen[key] = values
        assigned.setdefault(key[:2], set()).update(values)
        prober.set(values, key[1])
    if best < done:
        raise ShrinkError(f"the shrunk model does not compute the planned shapes: {why} (a size written as a "
                          "literal or read from somewhere shrink cannot update)")
    out: dict[str, dict[str, Any]] = {}
    mods = dict(small.named_modules())
    for (_cls, attr, _i), values in chosen.items():
        for name, v in values.items():
            setattr(mods[name], attr, v)
            out.setdefault(name, {})[attr] = v
    return out
