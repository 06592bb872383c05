"""The removal layer: which channels physically go, and what that does to the model.

Read by everything above it — the effective FLOPs counter, ``shrink``, ``as_pruned``, the sensitivity sweep —
so that they cannot disagree (DESIGN.md, "One removal plan"):

* :mod:`~prunescope.removal.plan` — the removal plan of a set of masks (the channel engine's classes that go,
  the ones kept and why, the cut of every tensor, the attributes to set, the constants to fold);
* :mod:`~prunescope.removal.expert_cuts` — cuts of fused expert parameters;
* :mod:`~prunescope.removal.zeros` — the as-pruned zeros (a removed channel reads zero downstream, also after
  its normalisation) and norms over the kept channels;
* :mod:`~prunescope.removal.fold` — constants of removed channels folded into the consumers' biases;
* :mod:`~prunescope.removal.narrow` — a copy narrowed by a plan, and the check that it still runs;
* :mod:`~prunescope.removal.probe` — the pin probe (a pin of the engine decided by narrowing a meta copy);
* :mod:`~prunescope.removal.unsafe` — NNI's ``ReshapeDependency`` and ``not_safe_to_prune``.
"""

from ..errors import ShrinkError
from .plan import Cut, RemovalPlan, plan_removal, removed_channels
from .probe import PinProbe, probe_pins
from .unsafe import ReshapeDependency, not_safe_to_prune

__all__ = ["plan_removal", "removed_channels", "RemovalPlan", "Cut", "ShrinkError", "probe_pins", "PinProbe",
           "ReshapeDependency", "not_safe_to_prune"]
