"""Compatibility module: the channel engine now lives in :mod:`.engine`, :mod:`.rules`, :mod:`.replay`.

Everything that was importable from ``prunescope.topology.atoms`` still is (the engine was one 1,164-line
module; it is split along its seams: the walk and union-find, the per-op rules, the channel-id replay).

>>> from prunescope.topology.atoms import channel_atoms, ChannelAtoms, map_channels
"""

from .base import ChannelInfo, LayerInfo, TopologyWarning
from .engine import ChannelAtoms, channel_atoms, sets_from_classes
from .replay import map_channels
from .rules import CONV_OPS, LINEAR_OPS

__all__ = [
    "ChannelInfo", "ChannelAtoms", "LayerInfo", "TopologyWarning", "channel_atoms", "map_channels",
    "CONV_OPS", "LINEAR_OPS", "sets_from_classes",
]
