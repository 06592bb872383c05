"""The shared services of the report's stages: the user's model lent out and given back exactly, the metric as
a float, the console, and the calibration inputs read once (:class:`Context`). No stage result lives here."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..sensitivity.jobs import coerce_metric

__all__ = ["Context", "snapshot", "borrowed", "batch_len"]


def snapshot(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tensor, copy)`` for every parameter and buffer of ``model``: what :func:`borrowed` restores.

    >>> net = torch.nn.Linear(2, 2)
    >>> len(snapshot(net))
    2
    """
    return [(t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())]


@contextlib.contextmanager
def borrowed(model: nn.Module, state: list[tuple[torch.Tensor, torch.Tensor]] | None = None
             ) -> Iterator[nn.Module]:
    """Lend ``model`` to user code: parameters, buffers and training flags come back exactly afterwards.

    ``state``: a :func:`snapshot` taken earlier and still exact (a caller lending the model many times takes it
    once); only the tensors that differ from it are written back.

    >>> net = torch.nn.Linear(2, 2).eval()
    >>> before = net.weight.detach().clone()
    >>> with borrowed(net) as m:
    ...     _ = m.train(), m.weight.data.zero_()
    >>> torch.equal(net.weight, before), net.training
    (True, False)
    """
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


def batch_len(b: Any) -> int:
    """How many inputs a batch holds (its first tensor's first dimension; 1 for a scalar or no tensor)."""
    t = b if hasattr(b, "shape") else next((v for v in (b.values() if isinstance(b, dict) else b)
                                            if hasattr(v, "shape")), None)
    return int(t.shape[0]) if t is not None and len(t.shape) else 1


@dataclass
class Context:
    """What every stage may use: the user's model and evaluation, the example input, what the user asked for
    (target, names, recovery functions), the console and progress switches, and the calibration inputs (read
    once). ``sign``: +1 when a higher metric is better."""

    model: nn.Module
    val_func: Callable[[nn.Module], Any]
    x: Any
    flops_target: float = 0.5
    sign: float = 1.0
    model_name: str = "model"
    metric_name: str = "metric"
    console: Callable[[str], None] | None = print
    progress: bool = True
    calibrate: Callable[[], Iterable[Any]] | Iterable[Any] | None = None
    finetune: Callable[..., Any] | None = None
    reconstruct: bool = True
    calibration_samples: int = 512
    score: str = "l1"  # how units are ranked: 'l1', or from the calibration inputs 'activation' / 'reconstruction'
    reconstruct_sweep: bool = True  # when reconstructing, the sweep measures reconstructed models too
    t0: float = field(default_factory=time.perf_counter)
    _state: list[Any] | None = None
    _calibration: list[Any] | None = None

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console(text)

    def bar(self, total: int, desc: str, unit: str = "step") -> Any:
        """The report's progress bar (``tqdm``, shown only when ``progress``; it goes away when closed)."""
        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, leave=False)

    @contextlib.contextmanager
    def steps(self, desc: str, names: Sequence[str]) -> Iterator[Callable[[], None]]:
        """A progress bar over the named steps of a stage: each call of the yielded ``step()`` completes the
        step before (if any) and shows the next one's name; the bar is closed on exit, also on errors.

        >>> ctx = Context(torch.nn.Linear(1, 1), lambda m: 0.0, torch.ones(1), progress=False)
        >>> with ctx.steps("topology", ["channel dependencies", "prunable sets"]) as step:
        ...     step(); step()
        """
        bar = self.bar(len(names), desc)
        done = [-1]

        def step() -> None:
            if done[0] >= 0:
                bar.update(1)
            done[0] += 1
            bar.set_postfix_str(names[min(done[0], len(names) - 1)], refresh=True)

        try:
            yield step
            if done[0] >= 0:
                bar.update(1)
        finally:
            bar.close()

    def evaluate(self, model: nn.Module, what: str,
                 within: Callable[[], ContextManager[Any]] | None = None) -> float:
        """``val_func(model)`` as a finite float; the user's model is borrowed and given back exactly.

        ``within``: a temporary change of the user's model to evaluate under (e.g. ``lambda: as_pruned(...)``),
        entered once the model is lent and undone before it is given back, so the comparison with the snapshot
        finds only what ``val_func`` itself changed (nothing to copy back after the change's own restore)."""
        if model is self.model:
            with borrowed(model, self.state()), (within() if within is not None else contextlib.nullcontext()):
                value = self.val_func(model)
        else:
            value = self.val_func(model)
        return coerce_metric(value, "", None, where=what)

    def state(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The user's model as it was lent to the report (:func:`snapshot`, taken once, when first needed): every
        lending (:meth:`evaluate`, the sweep) compares against it and copies back only what changed, so the
        report holds one copy of the model's tensors, not one per lending."""
        if self._state is None:
            self._state = snapshot(self.model)
        return self._state

    @property
    def device(self) -> str:
        p = next(self.model.parameters(), None)
        return p.device.type if p is not None else "cpu"

    @property
    def reconstructing(self) -> bool:
        """Plans are measured and shipped reconstructed (calibration inputs given and ``reconstruct``)."""
        return self.reconstruct and self.calibrate is not None

    @property
    def plan_metric(self) -> str:
        return "reconstructed" if self.reconstructing else "as-pruned"

    @property
    def sweep_metric(self) -> str:
        """What every sweep point measures: the reconstructed model when reconstructing (unless
        ``reconstruct_sweep=False``), else the masked model as pruned."""
        return "reconstructed" if self.reconstructing and self.reconstruct_sweep else "as-pruned"

    def calibration(self) -> list[Any]:
        """The calibration batches, read once (``calibrate`` may be a function returning them)."""
        if self._calibration is None:
            got = self.calibrate() if callable(self.calibrate) else self.calibrate
            try:
                self._calibration = list(got) if got is not None else []
            except TypeError:
                raise ConfigError(f"calibrate must be an iterable of input batches (or a function returning one), "
                                  f"got {type(got).__name__}") from None
        return self._calibration

    def fit_batches(self) -> list[Any]:
        """The first calibration batches, up to ``calibration_samples`` inputs: what every reconstruction fits on
        (the same inputs for every candidate plan and the shipped model)."""
        out, n = [], 0
        for b in self.calibration():
            if n >= self.calibration_samples:
                break
            out.append(b)
            n += batch_len(b)
        return out

    def fit_inputs(self) -> int:
        """How many inputs the reconstruction fits on (0 when not reconstructing)."""
        return sum(batch_len(b) for b in self.fit_batches()) if self.reconstructing else 0
