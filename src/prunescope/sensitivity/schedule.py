"""Which evaluation runs next: NNI's early stop kept exactly while every worker stays busy.

A sweep is a set of evaluations ``(layer, i)`` (``i`` indexes the sorted sparsities) plus the baseline.
Without early stop all of them are needed. With early stop, NNI's layer sweep stops at the first sparsity
whose metric meets the threshold, so evaluation ``i`` of a layer is needed only if none of ``0 .. i-1``
stops; that is known for sure only once they are finished. :class:`SweepState` therefore treats an
evaluation as *speculative* while earlier ones of its layer are unfinished, and runs it only when a worker
would otherwise be idle; once an evaluation meets the threshold, everything after it in that layer is
dropped (and values already computed there are ignored). A layer's result is its values ``0 .. stop``,
which is the serial sweep's result whatever order the evaluations finish in.

Priorities (lowest first): the baseline; then the *speculation depth* (how many earlier evaluations of the
same layer are still unfinished; 0 = surely needed); then the longest layer first (remaining evaluations
times that layer's measured mean evaluation time); then the lower sparsity index; then model order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .jobs import need_to_stop

BASELINE = ""  # the key of the baseline evaluation (index -1)


@dataclass
class _Layer:
    key: str
    order: int
    n: int
    values: dict[int, float] = field(default_factory=dict)
    running: set[int] = field(default_factory=set)
    seconds: list[float] = field(default_factory=list)


class SweepState:
    """Bookkeeping of one sweep: known values, running evaluations, the early stop, what to run next.

    >>> st = SweepState(["a"], 3, "minimize", 0.5, baseline=1.0)
    >>> st.next_task(), st.next_task()   # the first is surely needed, the second is speculative
    (('a', 0), ('a', 1))
    >>> st.finish("a", 1, 0.4)  # 0.4 < 0.5 stops the layer at index 1 (if index 0 does not stop first)
    >>> st.needed("a", 2), st.done()
    (False, False)
    >>> st.finish("a", 0, 0.9); st.done(), st.result("a")
    (True, [0.9, 0.4])
    """

    def __init__(self, keys: Sequence[str], n: int, mode: str | None, threshold: float | None,
                 baseline: float | None = None, known: Mapping[str, Mapping[int, float]] | None = None) -> None:
        self.n = n
        self.mode = mode
        self.threshold = threshold
        self.baseline = baseline
        self.baseline_running = False
        self.layers = {k: _Layer(k, j, n, dict((known or {}).get(k, {}))) for j, k in enumerate(keys)}

    # -- early stop ---------------------------------------------------------------------------------
    def _decided(self) -> bool:
        """Whether stop decisions can be made (``dropped``/``raised`` compare with the baseline)."""
        return self.mode is None or self.mode in ("minimize", "maximize") or self.baseline is not None

    def _stops(self, v: float) -> bool:
        return need_to_stop(self.mode, self.threshold, self.baseline if self.baseline is not None else 0.0, v)

    def cap(self, key: str) -> int:
        """The last index that may be needed: the first known stopping index, else ``n - 1``."""
        layer = self.layers[key]
        if self.mode is not None and self._decided():
            for i in sorted(layer.values):
                if self._stops(layer.values[i]):
                    return i
        return self.n - 1

    def needed(self, key: str, i: int) -> bool:
        """Whether evaluation ``i`` of ``key`` may still be part of the result."""
        return i <= self.cap(key)

    def depth(self, key: str, i: int) -> int:
        """How many earlier evaluations of ``key`` are unfinished (0: ``i`` is surely needed)."""
        if self.mode is None:
            return 0
        layer = self.layers[key]
        return sum(1 for j in range(i) if j not in layer.values)

    # -- progress ------------------------------------------------------------------------------------
    def layer_done(self, key: str) -> bool:
        layer = self.layers[key]
        return self._decided() and all(i in layer.values for i in range(self.cap(key) + 1))

    def done(self) -> bool:
        return self.baseline is not None and all(self.layer_done(k) for k in self.layers)

    def result(self, key: str) -> list[float]:
        """The layer's values ``0 .. stop`` (only when :meth:`layer_done`)."""
        layer = self.layers[key]
        return [layer.values[i] for i in range(self.cap(key) + 1)]

    def counts(self) -> tuple[int, int]:
        """``(finished, total)`` needed evaluations as far as known now (the total shrinks at a stop)."""
        fin = int(self.baseline is not None)
        tot = 1
        for k, layer in self.layers.items():
            c = self.cap(k)
            fin += sum(1 for i in layer.values if i <= c)
            tot += c + 1
        return fin, tot

    # -- scheduling -----------------------------------------------------------------------------------
    def _mean(self, layer: _Layer) -> float:
        if layer.seconds:
            return sum(layer.seconds) / len(layer.seconds)
        alls = [s for lay in self.layers.values() for s in lay.seconds]
        return sum(alls) / len(alls) if alls else 1.0

    def next_task(self) -> tuple[str, int] | None:
        """The most urgent evaluation that is neither finished, running nor past a stop; marks it running."""
        if self.baseline is None and not self.baseline_running:
            self.baseline_running = True
            return BASELINE, -1
        best: tuple[tuple[float, ...], str, int] | None = None
        for k, layer in self.layers.items():
            c = self.cap(k)
            todo = [i for i in range(c + 1) if i not in layer.values and i not in layer.running]
            if not todo:
                continue
            i = todo[0]  # within a layer, the lowest index is always the most urgent
            prio = (self.depth(k, i), -len(todo) * self._mean(layer), i, layer.order)
            if best is None or prio < best[0]:
                best = (prio, k, i)
        if best is None:
            return None
        _, k, i = best
        self.layers[k].running.add(i)
        return k, i

    def finish(self, key: str, i: int, value: float, seconds: float | None = None) -> None:
        """Record a finished evaluation (``key == BASELINE`` for the baseline)."""
        if key == BASELINE:
            self.baseline, self.baseline_running = value, False
            return
        layer = self.layers[key]
        layer.running.discard(i)
        layer.values[i] = value
        if seconds is not None:
            layer.seconds.append(seconds)

    def abandon(self, key: str, i: int) -> None:
        """An evaluation did not finish (cancelled, its worker lost): it may be handed out again."""
        if key == BASELINE:
            self.baseline_running = False
        else:
            self.layers[key].running.discard(i)
