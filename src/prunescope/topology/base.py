"""Data types and small helpers shared by the channel engine, its op rules and the channel-id replay."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..ops import arg  # noqa: F401 - the op-argument helper, for the engine's modules

__all__ = ["ChannelInfo", "LayerInfo", "TopologyWarning", "UnknownOp"]


class TopologyWarning(UserWarning):
    """An op whose channel semantics are unknown stopped the analysis; the layers feeding it are unsafe."""


@dataclass
class ChannelInfo:
    """The channels carried by one tensor value.

    ``axes``: the tensor axes that carry channels, ascending (usually one: ``(1,)`` for NCHW, ``(2,)`` for
    ``(N, L, C)``; several after a reshape that spreads channels over several axes).
    ``atoms``: ``int64`` array of shape ``[shape[a] for a in axes]``; entry = atom id of that channel
    position, ``-1`` = a position that carries no layer channel (padding, a constant, a model input).
    """

    axes: tuple[int, ...]
    atoms: np.ndarray

    def positions(self) -> int:
        return int(self.atoms.size)


@dataclass
class LayerInfo:
    """A layer found in the trace (the owner of a weight consumed by a channel-mixing op)."""

    name: str
    kind: str  # 'conv' | 'conv_transpose' | 'linear' | 'attention' | 'embedding' | 'matmul' | 'norm'
    module_type: str  # class name of the owning module ('' when the owner is not a module)
    first_op: int  # index of the first op that used it
    out_channels: int = 0
    in_channels: int = 0
    groups: int = 1
    atom_start: int = -1  # atoms of this layer are atom_start .. atom_start + out_channels - 1
    depthwise: bool = False
    inputs: list[np.ndarray] = field(default_factory=list)  # per call: atom per input channel (-1: none)
    input_ids: list[int] = field(default_factory=list)  # per call: id of the TensorInfo it read
    nodes: list[int] = field(default_factory=list)  # per call: index of the op node
    weight_out_dim: int = 0  # axis of the weight that holds the output channels (1: Conv1D, transposed conv)
    experts: int = 0  # a fused expert parameter (E, ...) (kind 'experts', topology/moe.py): E; channels e * N + j



class UnknownOp(Exception):
    """Raised by an op rule: the op touches channels in a way the engine cannot describe (it stops there)."""


def norm_axis(a: int, nd: int) -> int:
    return a + nd if a < 0 else a


def renumber(ci: ChannelInfo, mapping: dict[int, int]) -> ChannelInfo:
    """Move grid axes to new tensor axes (``mapping``: old axis -> new axis), keeping the atoms."""
    new = [mapping[a] for a in ci.axes]
    order = np.argsort(new)
    return ChannelInfo(tuple(sorted(new)), np.transpose(ci.atoms, order) if len(new) > 1 else ci.atoms)


def first_valid(flat: np.ndarray) -> np.ndarray:
    """Per row of a 2-D atom array, its first atom (``-1`` for a row without one)."""
    valid = flat >= 0
    has = valid.any(1)
    idx = valid.argmax(1)
    rep = np.full(flat.shape[0], -1, np.int64)
    rep[has] = flat[has, idx[has]]
    return rep
