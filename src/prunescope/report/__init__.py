"""``prunescope report``: a full analysis of one model, ending in a verified pruning plan.

Steps (each prints one short line; the details go to the output folder):

1. **Cost** — FLOPs (MACs) and parameters per layer (:func:`prunescope.flops.flops_report`).
2. **Topology** — channel-dependency sets (Linear layers included), group constraints, unsafe layers.
3. **Sensitivity** — every prunable dependency set is pruned as one group (L1 filter norm, the same channels
   in every member) at each sparsity, and the metric measured (:class:`~prunescope.SensitivityAnalysis`). A
   set's pruning units are the channel engine's classes (:mod:`prunescope.masks.units`): one channel of every
   member for a CNN, a whole head (q/k/v rows) or kv group for an attention, an MLP hidden unit; a sparsity is
   the fraction of a set's units removed.
4. **Plan** — the per-set sparsities that keep at most ``flops_target`` of the dense effective MACs with the
   smallest predicted metric loss (an exact multiple-choice knapsack, :mod:`prunescope.plan`). The savings of
   each option are the *effective* MACs (input channels of the consumers included). Sets that contain an
   unsafe layer, whose channels reach the model's output (the classifier), or whose masked channels
   :func:`prunescope.shrink` would have to keep (a ViT's residual stream, concatenated with its class token)
   are left alone; grouped convolutions keep their divisibility. The plan's masks are made conflict-free,
   counted exactly, and the budget is tightened and the plan re-solved until the exact count meets the target.
5. **Verify** — the plan's masks are turned into the physically smaller model (:func:`prunescope.shrink`), the
   model a user ships; its metric, its dense MACs and parameters (equal to the effective count, checked) and
   its CPU latency next to the dense model's (median of interleaved runs) are measured, and it is written to
   ``pruned.pt`` (:func:`prunescope.load_pruned`).
6. **Recover** — reconstruct -> (BatchNorm re-estimation) -> fine-tune, each measured, for the plan and the
   uniform baseline alike.

**Choosing by what ships.** With calibration inputs (``calibrate``) the shipped model is the *reconstructed*
one (:func:`prunescope.narrow.reconstruct`: every narrowed layer refit by least squares to the dense model's
output, from the first ``calibration_samples`` unlabeled inputs), so every candidate plan of the search and
the verification measure that model (``plan_metric: "reconstructed"``; the as-pruned metric is measured beside
it). The sensitivity sweep stays as pruned: its single-set curves only rank sets and seed the knapsack and
the predictions (whose per-set factors are refit on the reconstructed measurements), while reconstructing
each of its sets x sparsities models would multiply the report's cost by the number of sweep points; the
choice itself is made on reconstructed measurements. Without calibration inputs plans are measured as pruned
(``plan_metric: "as-pruned"``).

**The report's own work.** A plan's effective MACs come from its sets' masked channels, computed once per set
and pruning level, combined by :class:`prunescope.flops.plancost.PlanCost` (the effective counter's own factors
and removal decision, the mask-independent work done once): the hundreds of plans of the search cost
milliseconds each, and the user's evaluations are the only cost that grows with the model.

Every number on the page and in ``summary.json`` describes that one shrunk model. Sensitivity is measured
"as pruned" (a removed channel is zero after its normalisation too, see :func:`prunescope.narrow.as_pruned`),
so prediction and measurement describe the same kind of model. Predicted loss of a plan = the sum of the
measured drops of its sets (each measured with the other sets intact), the usual additive assumption of
sensitivity-based allocation; the measured metric shows how far it holds.

The folder is written as a whole (:mod:`prunescope.report.output`): files of two runs never mix. The model
comes back exactly as it was (weights, buffers, training flags), also when ``val_func`` changes it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..narrow.prunable import output_layers  # noqa: F401 - re-exported: the report's name for it
from ..narrow.prunable import prunable_sets as _prunable_sets
from .output import ReportFolder

__all__ = ["ReportResult", "run_report", "prunable_sets"]


@dataclass
class ReportResult:
    summary: dict[str, Any]
    files: dict[str, str]
    plan: dict[str, float] = field(default_factory=dict)  # set key -> sparsity


def report_layer_types() -> tuple[type[nn.Module], ...]:
    """The layer types the report prunes: convolutions, Linear, and Hugging Face ``Conv1D`` (GPT-2's
    transposed linear) when ``transformers`` is loaded."""
    from ..masks.pruners import transposed_linear_types

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, *transposed_linear_types())


def _report_layer(m: nn.Module | None) -> bool:
    return m is not None and isinstance(m, report_layer_types())


def prunable_sets(model: nn.Module, graph: Any, x: Any) -> tuple[list[tuple[str, ...]], dict[str, str],
                                                                   dict[str, int]]:
    """Dependency sets (conv + linear) that may be pruned, and why the others may not: the one definition of
    :func:`prunescope.narrow.prunable.prunable_sets` (which ``unit_masks`` uses too), members limited to
    :func:`report_layer_types`.

    Returns ``(sets, excluded, group_constraint)``: ``excluded`` maps a set key to the reason,
    ``group_constraint`` maps a layer to its GroupDependency constraint (lcm of groups).
    """
    p = _prunable_sets(model, graph, x, layer_ok=_report_layer)
    return p.sets, p.excluded, p.groups


def snapshot(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tensor, copy)`` for every parameter and buffer of ``model``: what :func:`borrowed` restores."""
    return [(t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())]


@contextlib.contextmanager
def borrowed(model: nn.Module, state: list[tuple[torch.Tensor, torch.Tensor]] | None = None
             ) -> Iterator[nn.Module]:
    """Lend ``model`` to user code: parameters, buffers and training flags come back exactly afterwards.

    ``state``: a :func:`snapshot` taken earlier and still exact (a caller lending the model many times takes it
    once); only the tensors that differ from it are written back."""
    state = snapshot(model) if state is None else state
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, saved in state:
                if t.shape == saved.shape and not torch.equal(t, saved):
                    t.copy_(saved)
        for m, f in flags:
            m.training = f


def run_report(
    model: nn.Module,
    val_func: Callable[[nn.Module], Any],
    dummy_input: Any,
    out_dir: str | os.PathLike[str],
    *,
    flops_target: float = 0.5,
    sparsities: Sequence[float] | None = None,
    workers: int | None = None,
    higher_is_better: bool = True,
    model_name: str = "model",
    metric_name: str = "metric",
    progress: bool = True,
    console: Callable[[str], None] | None = print,
    plan_evals: int = 16,
    calibrate: Callable[[], Iterable[Any]] | Iterable[Any] | None = None,
    finetune: Callable[[nn.Module], Any] | None = None,
    reconstruct: bool = True,
    calibration_samples: int = 512,
) -> ReportResult:
    """Run the whole analysis and write the report folder (see the module docs). The model is left as it was.

    ``plan_evals``: how many candidate plans may be measured (one ``val_func`` call each) to choose the plan.
    ``calibrate``: unlabeled input batches (or a function returning them). With them and ``reconstruct``
    (default) every candidate plan is measured, chosen and shipped **reconstructed**: the shrunk model's
    narrowed layers refit by least squares to reproduce the dense model on the first ``calibration_samples``
    inputs (:func:`prunescope.narrow.reconstruct`); ``summary['plan_metric']`` says ``'reconstructed'``. With
    ``reconstruct=False`` they serve BatchNorm re-estimation of the shrunk model only (``'as-pruned'``).
    ``finetune``: ``fn(model)`` that trains the shipped model in place, after the reconstruction. Recovery
    order: reconstruct -> (BatchNorm re-estimation, without reconstruction) -> fine-tune; the uniform baseline
    gets the same recovery. All of it runs on copies.
    Arguments and the output folder (it must be creatable) are checked before the first step.
    """
    from ..errors import ConfigError
    from .page import FILES, write_folder
    from .steps import STEPS, Run

    if isinstance(flops_target, bool) or not isinstance(flops_target, (int, float)) or not 0 < flops_target <= 1:
        raise ConfigError(f"--flops-target must be in (0, 1], got {flops_target}")
    if isinstance(plan_evals, bool) or not isinstance(plan_evals, int) or plan_evals < 2:
        raise ConfigError(f"plan_evals must be an integer >= 2 (uniform and knapsack plans), got {plan_evals!r}")
    if finetune is not None and not callable(finetune):
        raise ConfigError(f"finetune must be a function fn(model), got {type(finetune).__name__}")
    if calibrate is not None and not callable(calibrate) and (
            isinstance(calibrate, (str, bytes)) or not hasattr(calibrate, "__iter__")):
        raise ConfigError(f"calibrate must be batches (an iterable of model inputs) or a function returning them, "
                          f"got {type(calibrate).__name__}")
    if isinstance(calibration_samples, bool) or not isinstance(calibration_samples, int) or calibration_samples < 1:
        raise ConfigError(f"calibration_samples must be a positive integer, got {calibration_samples!r}")
    folder = ReportFolder(out_dir, tuple(FILES.values()))
    folder.check()  # before any work: a bad --out is reported at once
    r = Run(model, val_func, dummy_input, float(flops_target), sparsities, workers,
            1.0 if higher_is_better else -1.0, model_name, metric_name, progress, console, plan_evals=plan_evals,
            calibrate=calibrate, finetune=finetune, reconstruct=bool(reconstruct),
            calibration_samples=calibration_samples)
    for step in STEPS:
        step(r)
    with folder as tmp:
        files = write_folder(r, folder, tmp)
    assert r.chosen is not None
    return ReportResult(r.summary, files, dict(r.chosen.plan))
