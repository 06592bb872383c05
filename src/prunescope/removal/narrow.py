"""Narrowing a model copy by a removal plan: its tensors cut, the constants of removed channels folded, its
size attributes set, and the check that the copy still runs (shared by :func:`prunescope.shrink` and the pin
probe, which narrows a ``meta`` copy to decide a pin physically)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import ShrinkError, TraceError
from ..graph import make_inputs, preserved_training, trace
from ..masks.layers import bias_of, is_transposed_linear, weight_of
from .fold import apply_folds
from .plan import RemovalPlan
from .zeros import zero_points

__all__ = ["attr_names", "resolve", "replace_tensors", "apply_plan", "mask_in_place", "run_eval", "check_runs"]

# attributes the forward of torch's own modules reads, by class (isinstance, never by name)
_ATTRS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.GroupNorm, ("num_channels",)),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.RMSNorm, ("normalized_shape",)),
    (nn.PReLU, ("num_parameters",)),
    (nn.Embedding, ("embedding_dim",)),
)


def attr_names(mod: nn.Module) -> set[str]:
    """The size attributes of ``mod`` that shrink narrows (and save/load_pruned carry)."""
    names: set[str] = set()
    for cls, ns in _ATTRS:
        if isinstance(mod, cls):
            names.update(ns)
    if is_transposed_linear(mod):
        names.update(("nf", "nx"))
    return names


def resolve(root: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = fqn.rpartition(".")
    return (root.get_submodule(mod_name) if mod_name else root), attr


def replace_tensors(root: nn.Module, new_by_id: Mapping[int, torch.Tensor]) -> None:
    """Put ``new_by_id[id(old)]`` wherever a module of ``root`` holds ``old`` as a parameter or buffer (a tensor
    shared by several modules is replaced everywhere, so it stays shared)."""
    for mod in root.modules():
        for store in (mod._parameters, mod._buffers):
            for k, v in list(store.items()):
                if v is not None and id(v) in new_by_id:
                    store[k] = new_by_id[id(v)]  # type: ignore[assignment]


def apply_plan(small: nn.Module, plan: RemovalPlan) -> None:
    apply_folds(small, plan, zero_points(plan))  # constants of removed channels into biases (removal/fold.py)
    new_by_id: dict[int, torch.Tensor] = {}
    for fqn, cut in plan.cuts.items():
        mod, attr = resolve(small, fqn)
        old = getattr(mod, attr)
        if not isinstance(old, torch.Tensor):
            raise ShrinkError(f"'{fqn}' is not a tensor of the model copy", fqn)
        if tuple(old.shape) != tuple(cut.shape):
            raise ShrinkError(f"'{fqn}' has shape {tuple(old.shape)}, the trace saw {cut.shape}", fqn)
        with torch.no_grad():
            new = cut.apply(old.detach())
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        new_by_id[id(old)] = new
    replace_tensors(small, new_by_id)
    for name, values in plan.attrs.items():
        try:
            mod = small.get_submodule(name) if name else small
        except AttributeError:
            continue
        allowed = attr_names(mod)
        for k, v in values.items():
            if k in allowed:
                setattr(mod, k, v)


def mask_in_place(small: nn.Module, masks: Mapping[str, Any]) -> None:
    modules = dict(small.named_modules())
    with torch.no_grad():
        for name, m in masks.items():
            if name not in modules:  # a fused expert parameter (removal/expert_cuts.py): masked as one tensor
                owner, attr = resolve(small, name)
                getattr(owner, attr).mul_(m["weight"].to(device=getattr(owner, attr).device))
                continue
            mod = modules[name]
            for t, mk in ((weight_of(mod), m.get("weight")), (bias_of(mod), m.get("bias"))):
                if t is not None and mk is not None:
                    t.mul_(mk.to(device=t.device, dtype=t.dtype))




@contextlib.contextmanager
def _seeded(model: nn.Module) -> Iterator[None]:
    """The same random numbers for every run (a model that draws in eval mode), the caller's RNG state kept."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


def run_eval(model: nn.Module, dummy_input: Any) -> Any:
    """``model(dummy_input)`` in eval mode without autograd, seeded; every module's training flag restored."""
    args, kw = make_inputs(model, dummy_input)
    with torch.no_grad(), preserved_training(model, False), _seeded(model):
        return model(*args, **kw)


def check_runs(small: nn.Module, dummy_input: Any, want: list[tuple[int, ...]]) -> Any:
    """Run the shrunk copy once (eval mode, no autograd, seeded) and return its output; on failure trace it to
    name the op that failed."""
    try:
        out = run_eval(small, dummy_input)
    except Exception as first:  # noqa: BLE001 - re-run under the recorder to name the op
        try:
            trace(small, dummy_input)
        except TraceError as e:
            raise ShrinkError(f"the shrunk model no longer runs: {e}", getattr(e, "module", None),
                              getattr(e, "op", None)) from e
        raise ShrinkError(f"the shrunk model no longer runs: {type(first).__name__}: {first}") from first
    got = [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if got != want:
        raise ShrinkError(f"the shrunk model's output shapes {got} differ from the model's {want}")
    return out
