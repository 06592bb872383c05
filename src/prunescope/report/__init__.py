"""``prunescope report``: a full analysis of one model, ending in a verified pruning plan.

Stages (each prints one short line; the details go to the output folder). :func:`run_report` reads top to bottom
as ``dense -> topology -> sweep -> choice -> verify -> recover -> summary -> folder``: each stage
(:mod:`prunescope.report.stages`) takes the typed records of the stages before it and returns its own
(:mod:`prunescope.report.records`); the shared services (lending the model, the console, calibration inputs)
live in one :class:`~prunescope.report.context.Context`, the per-set mask and MACs caches in one
:class:`~prunescope.report.plans.PlanMasks`.

1. **Cost** — FLOPs (MACs) and parameters per layer (:func:`prunescope.flops.flops_report`).
2. **Topology** — channel-dependency sets (Linear layers included), group constraints, unsafe layers.
3. **Sensitivity** — every prunable dependency set is pruned as one group (L1 filter norm, the same channels
   in every member) at each sparsity, and the metric measured (:class:`~prunescope.SensitivityAnalysis`). A
   set's pruning units are the channel engine's classes (:mod:`prunescope.masks.units`): one channel of every
   member for a CNN, a whole head (q/k/v rows) or kv group for an attention, an MLP hidden unit; a sparsity is
   the fraction of a set's units removed.
4. **Plan** — the per-set sparsities that keep at most ``flops_target`` of the dense effective MACs with the
   smallest predicted metric loss (an exact multiple-choice knapsack, :mod:`prunescope.knapsack`). The savings of
   each option are the *effective* MACs (input channels of the consumers included). Sets that contain an
   unsafe layer, whose channels reach the model's output (the classifier), or whose masked channels
   :func:`prunescope.shrink` would have to keep (a token computed from a parameter by an op that mixes channels,
   a weight that is computed) are left alone; grouped convolutions keep their divisibility. The plan's masks are
   made conflict-free, counted exactly, and the budget is tightened and the plan re-solved until the exact count
   meets the target.
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
it), and so does the sensitivity sweep (``sweep_metric: "reconstructed"``: each set alone at each sparsity,
its plan masks shrunk and refit; ``reconstruct_sweep=False`` keeps it as pruned), so the single-set losses
that seed the knapsack and the predictions describe the model that ships. Units are ranked by ``score``
(``unit_score``: L1, or the data-aware ``activation`` / ``reconstruction`` from the calibration inputs; default
``activation`` when reconstructing), the same masks swept, searched, verified and shipped. Without calibration
inputs plans and sweep are measured as pruned with L1 units (``plan_metric: "as-pruned"``), as before.

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

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from ..errors import ConfigError
from ..graph import ModelGraph
from ..narrow.prunable import output_layers  # noqa: F401 - re-exported: the report's name for it
from .context import Context, borrowed, snapshot
from .output import ReportFolder
from .page import FILES, write_folder
from .plans import UNIT_SCORES
from .records import Stages, Summary
from .stages import (
    choose,
    dense_cost,
    plan_masks,
    recover,
    report_prunable,
    summarize,
    sweep,
    topology,
    verify,
)

__all__ = ["ReportResult", "run_report", "resolve_score", "CALIBRATED_SCORE", "prunable_sets", "borrowed",
           "snapshot", "Summary", "Stages"]


@dataclass
class ReportResult:
    """What :func:`run_report` returns: ``summary`` (the dict of ``summary.json``), the written ``files`` by kind,
    the shipped ``plan`` (set name -> sparsity), and every stage's typed record (``stages``)."""

    summary: dict[str, Any]
    files: dict[str, str]
    plan: dict[str, float] = field(default_factory=dict)  # set name -> sparsity
    stages: Stages | None = None


def prunable_sets(model: nn.Module, graph: ModelGraph, x: Any) -> tuple[list[tuple[str, ...]], dict[str, str],
                                                                          dict[str, int]]:
    """Dependency sets (conv + linear) that may be pruned, and why the others may not: the one definition of
    :func:`prunescope.narrow.prunable.prunable_sets` (which ``unit_masks`` and the report's topology stage use
    too), members limited to
    :func:`~prunescope.report.stages.report_layer_types` (:func:`~prunescope.report.stages.report_prunable`).

    Returns ``(sets, excluded, group_constraint)``: ``excluded`` maps a set key to the reason,
    ``group_constraint`` maps a layer to its GroupDependency constraint (lcm of groups).

    >>> import torch
    >>> from prunescope.graph import trace
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    >>> x = torch.ones(1, 1, 6, 6)
    >>> prunable_sets(net, trace(net, x), x)[:2]
    ([('0',)], {'2': 'its channels reach the model output'})
    """
    p = report_prunable(model, graph, x)
    return p.sets, p.excluded, p.groups


#: the unit score when the report reconstructs and none is asked for (chosen by measurement, see the README)
CALIBRATED_SCORE = "activation"


def resolve_score(score: str | None, calibrate: Any, reconstruct: bool = True) -> str:
    """The unit score the report uses: ``score`` checked, or the default (``CALIBRATED_SCORE`` when it
    reconstructs from calibration inputs, else ``'l1'``). A data-aware score without calibration inputs is a
    :class:`ConfigError`.

    >>> resolve_score(None, None), resolve_score(None, [[0.0]]), resolve_score(None, [[0.0]], reconstruct=False)
    ('l1', 'activation', 'l1')
    """
    if score is None:
        return CALIBRATED_SCORE if calibrate is not None and reconstruct else "l1"
    if score not in UNIT_SCORES:
        raise ConfigError(f"unknown unit score {score!r}; expected one of {', '.join(UNIT_SCORES)}")
    if score != "l1" and calibrate is None:
        raise ConfigError(f"--score {score} ranks units by what removing them costs on calibration inputs, and "
                          "there are none: give --calibrate package.module:batches (or calibrate=), use an "
                          "embedded example with its recovery, or --score l1")
    return score


def _check(flops_target: Any, plan_evals: Any, finetune: Any, calibrate: Any, calibration_samples: Any) -> None:
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
    finetune: Callable[..., Any] | None = None,
    reconstruct: bool = True,
    calibration_samples: int = 512,
    score: str | None = None,
    reconstruct_sweep: bool = True,
) -> ReportResult:
    """Run the whole analysis and write the report folder (see the module docs). The model is left as it was.

    ``plan_evals``: how many candidate plans may be measured (one ``val_func`` call each) to choose the plan.
    ``calibrate``: unlabeled input batches (or a function returning them). With them and ``reconstruct``
    (default) every candidate plan is measured, chosen and shipped **reconstructed**: the shrunk model's
    narrowed layers refit by least squares to reproduce the dense model on the first ``calibration_samples``
    inputs (:func:`prunescope.narrow.reconstruct`); ``summary['plan_metric']`` says ``'reconstructed'``. With
    ``reconstruct=False`` they serve BatchNorm re-estimation of the shrunk model only (``'as-pruned'``).
    ``finetune``: ``fn(model)`` that trains the shipped model in place, after the reconstruction; a function
    with a ``log`` parameter is called ``fn(model, log=console)`` and may print its progress (a line per epoch)
    through the report's console. Recovery order: reconstruct -> (BatchNorm re-estimation, without
    reconstruction) -> fine-tune; the uniform baseline gets the same recovery. All of it runs on copies.
    When reconstructing, the sensitivity sweep measures every set x sparsity reconstructed too
    (``summary['sweep_metric']``); ``reconstruct_sweep=False`` keeps it as pruned (cheaper, a worse guide).
    ``score``: how units are ranked, ``'l1'``, ``'activation'`` or ``'reconstruction'`` (both from the
    calibration inputs, see :class:`~prunescope.report.plans.PlanMasks`; ``summary['unit_score']``); default
    ``CALIBRATED_SCORE`` when reconstructing, ``'l1'`` otherwise (a data-aware score needs calibration inputs). The same
    masks are swept, searched, verified and shipped.
    Arguments and the output folder (it must be creatable) are checked before the first stage.

    >>> import tempfile, torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
    ...                           torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32, 2)).eval()
    >>> score = lambda m: float(m(torch.ones(1, 1, 6, 6)).sum().detach())
    >>> res = run_report(net, score, torch.ones(1, 1, 6, 6), tempfile.mkdtemp() + "/r", sparsities=[0.5],
    ...                  progress=False, console=None, plan_evals=2)
    >>> res.summary["flops_after"] <= 0.5 * res.summary["flops_before"], res.stages.summary.target_met
    (True, True)
    """
    _check(flops_target, plan_evals, finetune, calibrate, calibration_samples)
    unit_score = resolve_score(score, calibrate, bool(reconstruct))
    folder = ReportFolder(out_dir, tuple(FILES.values()))
    folder.check()  # before any work: a bad --out is reported at once
    ctx = Context(model, val_func, dummy_input, flops_target=float(flops_target),
                  sign=1.0 if higher_is_better else -1.0, model_name=model_name, metric_name=metric_name,
                  console=console, progress=progress, calibrate=calibrate, finetune=finetune,
                  reconstruct=bool(reconstruct), calibration_samples=calibration_samples, score=unit_score,
                  reconstruct_sweep=bool(reconstruct_sweep))
    dense = dense_cost(ctx)
    topo = topology(ctx, dense)
    plans = plan_masks(ctx, dense, topo)
    swept = sweep(ctx, dense, topo, sparsities, workers, plans)
    choice = choose(ctx, dense, topo, swept, plans, plan_evals)
    verified = verify(ctx, dense, plans, choice)
    recovered = recover(ctx, verified)
    summary = summarize(ctx, dense, topo, swept, choice, verified, recovered, folder.run_id)
    stages = Stages(dense, topo, swept, choice, verified, recovered, summary)
    with ctx.steps("folder", ["charts, masks, pruned.pt, report.html"]) as step:
        step()
        with folder as tmp:
            files = write_folder(stages, folder, tmp)
    return ReportResult(summary.to_json(), files, dict(choice.chosen.plan), stages)
