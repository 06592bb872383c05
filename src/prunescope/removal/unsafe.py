"""Layers unsafe to prune: NNI's ``ReshapeDependency`` and ``not_safe_to_prune``, with each pin of the channel
engine decided physically by the pin probe (:mod:`prunescope.removal.probe`: the channels are removed from a
``meta`` copy by the removal plan, which is traced again). They live in the removal layer because the probe
narrows a copy with the removal plan; :mod:`prunescope.topology` gives the engine's answer alone
(``ChannelDependency(...).unsafe``)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..graph import ModelGraph
from ..topology import atomic_csv, checked_channel_atoms, get_graph, is_module_layer
from ..topology.engine import ChannelAtoms
from .probe import probe_pins

__all__ = ["ReshapeDependency", "not_safe_to_prune", "unsafe_layers"]


class ReshapeDependency:
    """Layers whose output channel count is pinned downstream, with the reason for each.

    A layer is reported when one of its output channels (or a channel tied to it) reaches a shape op that
    writes the channel count into the code — ``view``/``reshape``/``expand`` with an explicit size on a
    channel-carrying axis (``x.view(-1, 1024)``, ViT's ``reshape(n, hidden_dim, -1)``), a slice or split at
    fixed sizes along channels — or an op whose channel semantics are unknown (the analysis stops there).
    ``view(N, -1)``, ``flatten`` (into a Linear, whose input columns follow) and channel-group split/merge
    reshapes (channel shuffle) are safe.

    A size written in a shape op may also be one the forward read from ``x.shape`` at run time (a trace
    records both as numbers); with ``probe=True`` (default) each pin is decided physically by
    :func:`~prunescope.removal.probe.probe_pins` (the channels are removed from a ``meta`` copy, which is
    traced again), and a pin whose removal runs with every size following is dropped. ``probe=False`` gives
    the engine's answer alone.

    Attributes: ``dependency_sets`` (layer names, execution order), ``reasons`` (``{layer: [reason, ...]}``),
    ``dependency`` (``{op description: [layers]}``), ``probe`` (the
    :class:`~prunescope.removal.probe.PinProbe`, or ``None``).

    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv, self.fc = nn.Conv2d(3, 16, 3), nn.Linear(64, 2)
    ...     def forward(self, x):
    ...         return self.fc(self.conv(x).view(-1, 64))
    >>> ReshapeDependency(Net(), torch.ones(1, 3, 4, 4)).dependency_sets
    ['conv']
    """

    header = ["Reshape OP", "Dependent Layers"]

    def __init__(self, model: nn.Module | None = None, dummy_input: Any = None, traced_model: Any = None, *,
                 graph: ModelGraph | None = None, probe: bool = True) -> None:
        self.graph = get_graph(model, dummy_input, traced_model, graph)
        self.model = model if model is not None else self.graph.model
        ca = self.atoms = checked_channel_atoms(self.graph)
        self.probe = _pin_probe(self.graph, dummy_input) if probe and ca.class_notes else None
        unsafe = self.probe.unsafe if self.probe is not None else ca.unsafe
        self.reasons: dict[str, list[str]] = {
            n: list(r) for n, r in unsafe.items() if is_module_layer(ca, n)
        }
        self.dependency: dict[str, list[str]] = {}
        for n, rs in self.reasons.items():
            for r in rs:
                self.dependency.setdefault(r, []).append(n)

    @property
    def dependency_sets(self) -> list[str]:
        return list(self.reasons)

    def export(self, filepath: str | os.PathLike[str]) -> None:
        """Write ``Reshape OP,Dependent Layers`` then one row per op (atomic write)."""
        atomic_csv(filepath, [self.header] + [[op, *ls] for op, ls in self.dependency.items()])


def not_safe_to_prune(model: nn.Module | None, dummy_input: Any, *, traced_model: Any = None,
                      with_reasons: bool = False, probe: bool = True) -> list[str] | dict[str, list[str]]:
    """Layers whose output channels cannot be pruned safely (see :class:`ReshapeDependency`).

    Returns the layer names in execution order, or ``{layer: [reason, ...]}`` with ``with_reasons=True``.
    ``probe=False``: the channel engine's pins alone, without deciding them physically.

    >>> import torch, torchvision
    >>> not_safe_to_prune(torchvision.models.vit_b_16(), torch.ones(1, 3, 224, 224))[:2]
    ['conv_proj', 'encoder.layers.encoder_layer_0.self_attention']
    """
    dep = ReshapeDependency(model, dummy_input, traced_model, probe=probe)
    return dict(dep.reasons) if with_reasons else dep.dependency_sets


# ------------------------------------------------------------------ pin probe hook (removal/probe.py)
def _pin_probe(graph: ModelGraph, dummy_input: Any) -> Any:
    """The cached :class:`~prunescope.removal.probe.PinProbe` of ``graph`` (pins decided physically on meta)."""
    return probe_pins(graph, dummy_input)


def unsafe_layers(graph: ModelGraph, ca: ChannelAtoms, dummy_input: Any, probe: bool) -> dict[str, list[str]]:
    """``{layer: [reason, ...]}``: the engine's ``unsafe``, with the probe's cleared pins dropped if ``probe``."""
    if not probe or not ca.class_notes:
        return dict(ca.unsafe)
    return dict(_pin_probe(graph, dummy_input).unsafe)
