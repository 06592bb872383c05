"""Choosing the plan by measurement: the knapsack optimum, the uniform baseline and a local search around them.

Single-set drops do not add up (pruning several sets together usually costs more than the sum of their
separate drops), so the additive knapsack optimum is a starting point, not the answer. :class:`PlanSearch`
measures a small budget of candidate plans that all meet the MACs target (exact effective count) and keeps the
best *measured* one:

1. the **uniform** plan — the largest common sparsity of every prunable set that meets the target (also the
   baseline the page shows);
2. the **knapsack** plan — per-set sparsities minimising the sum of single-set losses (:mod:`prunescope.knapsack`);
3. **neighbours** of the best plan measured so far: one set one sparsity step lighter and another one step
   heavier, or one set one step heavier, kept only if they meet the target; the most promising (by the
   prediction below) are measured first; the search moves whenever a neighbour measures better.

**Counting is lazy.** A neighbourhood has about ``K²`` plans (``K`` prunable sets: ~1,400 on a resnet50), of
which a handful are measured. The prediction needs no MACs, so the neighbours are ranked first and counted
(exact effective MACs, the feasibility test) in ranking order, only up to the one measured next; plans of
equal prediction are counted together (their order is by MACs). The plans measured, their order and the answer
are those of counting every neighbour first (tested), at a few counts per move instead of ``K²``.

**Prediction.** Before a candidate is measured its metric is predicted from the candidates measured *so
far*: a first-order step from the nearest measured plan ``Q``, ``measured(Q) − Σ_k w_k · (l_k(P) − l_k(Q))``,
where ``l_k`` is set ``k``'s single-set loss from the sweep at the plan's sparsity and ``w_k`` its interaction
factor, fitted by least squares on all plans measured so far (``before − measured ≈ Σ_k w_k · l_k``, weakly
pulled towards one common factor). Before any measurement it is the additive prediction ``before − Σ l_k``.
The chosen plan's prediction is the one
recorded before its own measurement, so ``|predicted − measured|`` is an honest out-of-sample error; the page
lists every candidate's prediction and measurement.

Candidates are measured by the report's ``measure`` function: the reconstructed shrunk model when calibration
inputs exist (what ships), else the masked model with as-pruned semantics (:func:`prunescope.narrow.as_pruned`,
equal to the shrunk model's output). :attr:`PlanSearch.on_measure` is called after each measurement (the
report's progress bar).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = ["Candidate", "PlanSearch"]

Plan = dict[str, float]  # set key -> sparsity (absent or 0.0: not pruned)


@dataclass
class Candidate:
    plan: Plan
    macs: int
    additive_loss: float
    source: str
    predicted: float | None = None
    measured: float | None = None
    order: int = -1  # measurement order (0 = first)
    as_pruned: float | None = None  # the masked model as pruned (= the shrunk model before any recovery)
    reconstructed: float | None = None  # after least-squares reconstruction (None: not reconstructed)
    finetuned: float | None = None  # after the full recovery with fine-tuning (the shipped plan and uniform only)


@dataclass
class PlanSearch:
    """See the module docs. ``loss(key, s)``: the single-set loss (≥ 0) measured by the sweep; ``macs(plan)``:
    the exact effective MACs of a plan; ``measure(plan)``: the metric of the plan's model."""

    keys: Sequence[str]
    grid: Mapping[str, Sequence[float]]  # per set, the allowed sparsities (ascending), without 0
    loss: Callable[[str, float], float]
    macs: Callable[[Plan], int]
    measure: Callable[[Plan], float]
    metric_before: float
    sign: float
    target_macs: int
    budget: int = 16
    candidates: dict[tuple, Candidate] = field(default_factory=dict)
    measured: list[Candidate] = field(default_factory=list)
    on_measure: Callable[[Candidate], None] | None = None  # called after each measurement (progress)
    on_count: Callable[[int], None] | None = None  # called with the number of plans counted so far (progress)
    _proposed: dict[tuple, str] = field(default_factory=dict, repr=False)  # plan key -> first source proposed
    _loss: dict[tuple[str, float], float] = field(default_factory=dict, repr=False)  # memo of ``loss``
    _fit: tuple | None = field(default=None, repr=False)  # (measured count, keys, factor, slopes) memo

    # ------------------------------------------------------------------ helpers
    def _key(self, plan: Plan) -> tuple:
        return tuple((k, plan.get(k, 0.0)) for k in self.keys if plan.get(k, 0.0) > 0)

    def candidate(self, plan: Plan, source: str) -> Candidate:
        plan = {k: v for k, v in plan.items() if v > 0}
        key = self._key(plan)
        c = self.candidates.get(key)
        if c is None:
            c = self.candidates[key] = Candidate(plan, self.macs(plan), self.additive(plan),
                                                 self._proposed.get(key, source))
            if self.on_count is not None:
                self.on_count(len(self.candidates))
        return c

    def set_loss(self, k: str, s: float) -> float:
        """``loss(k, s)``, memoised (the search asks for the same few values hundreds of thousands of times)."""
        v = self._loss.get((k, s))
        if v is None:
            v = self._loss[(k, s)] = self.loss(k, s)
        return v

    def additive(self, plan: Plan) -> float:
        """The additive loss of a plan: the sum of its sets' single-set losses."""
        return sum(self.set_loss(k, s) for k, s in plan.items() if s > 0)

    def _fitted(self) -> tuple[float, list[float]]:
        """:meth:`factor` and :meth:`slopes`, refit only when a measurement was added (or the keys changed)."""
        tag = (len(self.measured), tuple(self.keys))
        if self._fit is None or self._fit[0] != tag:
            self._fit = (tag, self.factor(), self.slopes())
        return self._fit[1], self._fit[2]

    def factor(self) -> float:
        pts = [(c.additive_loss, self.sign * (self.metric_before - c.measured)) for c in self.measured
               if c.measured is not None]
        den = sum(a * a for a, _ in pts)
        if den <= 0:
            return 1.0
        return max(0.0, sum(a * m for a, m in pts) / den)

    def losses(self, plan: Plan) -> list[float]:
        """Per set (in ``keys`` order), the single-set loss of the plan's sparsity (0 when not pruned)."""
        return [self.set_loss(k, plan[k]) if plan.get(k, 0.0) > 0 else 0.0 for k in self.keys]

    def slopes(self) -> list[float]:
        """Per-set interaction factors ``w``: ``before − measured ≈ Σ_k w_k · loss_k`` over the measured plans
        (least squares, weakly pulled towards the common factor :meth:`factor` so that few measurements stay
        well posed)."""
        done = [q for q in self.measured if q.measured is not None]
        prior = np.full(len(self.keys), self.factor())
        if not done:
            return prior.tolist()
        x = np.array([self.losses(q.plan) for q in done])
        y = np.array([self.sign * (self.metric_before - float(q.measured)) for q in done])  # type: ignore[arg-type]
        lam = 1e-2 * max(float(np.trace(x.T @ x)) / len(self.keys), 1e-12)  # scale-free ridge
        w = np.linalg.solve(x.T @ x + lam * np.eye(len(self.keys)), x.T @ y + lam * prior)
        return w.tolist()

    def predict(self, c: Candidate) -> float:
        """Before ``c`` is measured: a first-order step from the nearest measured plan ``Q`` (L1 distance of the
        sparsity vectors; the earlier one on ties), ``measured(Q) − Σ_k w_k · (loss_k(P) − loss_k(Q))`` with the
        per-set factors of :meth:`slopes`; the additive prediction while nothing is measured."""
        return self.predict_plan(c.plan, c.additive_loss, c)

    def predict_plan(self, plan: Plan, additive: float, exclude: Candidate | None = None) -> float:
        """:meth:`predict` of a plan that need not be a counted candidate (``additive``: its additive loss;
        ``exclude``: a measured candidate not to step from, the plan's own)."""
        return float(self.predict_many([plan], [additive], exclude)[0])

    def predict_many(self, plans: Sequence[Plan], additives: Sequence[float],
                     exclude: Candidate | None = None) -> np.ndarray:
        """:meth:`predict_plan` of many plans at once (the same arithmetic, vectorised over the plans: distances
        and steps are summed left to right over the keys)."""
        done = [q for q in self.measured if q.measured is not None and q is not exclude]
        factor, w = self._fitted()
        if not done:
            return np.array([self.metric_before - self.sign * factor * a for a in additives], dtype=np.float64)
        keys = sorted(set(self.keys).union(*(q.plan for q in done), *plans))
        mat = np.array([[q.plan.get(k2, 0.0) for k2 in keys] for q in done], dtype=np.float64)
        lq = np.array([self.losses(q.plan) for q in done], dtype=np.float64)
        got = np.array([float(q.measured) for q in done], dtype=np.float64)  # type: ignore[arg-type]
        wv = np.asarray(w, dtype=np.float64)
        out = np.empty(len(plans), dtype=np.float64)
        for lo in range(0, len(plans), 256):  # blocks bound the (plans, measured, keys) array
            part = plans[lo: lo + 256]
            vec = np.array([[p.get(k2, 0.0) for k2 in keys] for p in part], dtype=np.float64)
            # L1 distance to each measured plan, rounded: equal distances tie exactly (the earlier one wins)
            dist = np.round(np.cumsum(np.abs(vec[:, None, :] - mat[None, :, :]), axis=2)[:, :, -1], 9)
            near = np.argmin(dist, axis=1)
            lp = np.array([self.losses(p) for p in part], dtype=np.float64).reshape(len(part), len(self.keys))
            step = np.cumsum(wv * (lp - lq[near]), axis=1)[:, -1] if len(self.keys) else np.zeros(len(part))
            out[lo: lo + len(part)] = got[near] - self.sign * step
        return out

    def feasible(self, c: Candidate) -> bool:
        return c.macs <= self.target_macs

    def run_measure(self, c: Candidate) -> Candidate:
        if c.measured is None:
            c.predicted = self.predict(c)
            c.measured = float(self.measure(c.plan))
            c.order = len(self.measured)
            self.measured.append(c)
            if self.on_measure is not None:
                self.on_measure(c)
        return c

    def better(self, a: Candidate, b: Candidate | None) -> bool:
        if b is None or b.measured is None:
            return True
        assert a.measured is not None
        return self.sign * (a.measured - b.measured) > 1e-12 or (
            abs(a.measured - b.measured) <= 1e-12 and a.macs < b.macs)

    # ------------------------------------------------------------------ the search
    def uniform(self, common: Callable[[float], Plan] | None = None, steps: int = 24) -> Candidate | None:
        """The uniform baseline: the smallest common sparsity whose plan meets the target (bisection on
        ``s`` in (0, 1); ``common(s)`` gives the plan of a common sparsity, by default every set at ``s``)."""
        common = common or (lambda s: {k: s for k in self.keys})
        hi_c = self.candidate(common(0.99), "uniform 0.99")
        if not self.feasible(hi_c):
            return None
        lo, hi = 0.0, 0.99
        for _ in range(steps):
            mid = round((lo + hi) / 2, 4)
            if mid in (lo, hi):
                break
            if self.feasible(self.candidate(common(mid), f"uniform {mid:g}")):
                hi = mid
            else:
                lo = mid
        return self.candidate(common(hi), f"uniform {hi:g}")

    def proposals(self, c: Candidate) -> list[tuple[Plan, str]]:
        """The neighbour plans of ``c`` with their sources, not counted: every set one step heavier, and every
        ordered pair ``(a, b)``: ``a`` one step lighter, ``b`` one step heavier."""
        out: list[tuple[Plan, str]] = []
        steps = {k: list(self.grid.get(k, ())) for k in self.keys}

        def move(k: str, d: int, plan: Plan) -> bool:
            levels = [0.0, *steps[k]]
            cur = plan.get(k, 0.0)
            nxt = [v for v in levels if v > cur + 1e-12] if d > 0 else [v for v in levels if v < cur - 1e-12]
            if not nxt:
                return False
            plan[k] = nxt[0] if d > 0 else nxt[-1]
            return True

        for a in self.keys:
            p = dict(c.plan)
            if move(a, +1, p):
                out.append((p, f"neighbour: {a} heavier"))
            for b in self.keys:
                if a == b:
                    continue
                p = dict(c.plan)
                if move(a, -1, p) and move(b, +1, p):
                    out.append((p, f"neighbour: {a} lighter, {b} heavier"))
        res = []
        for p, source in out:
            p = {k: v for k, v in p.items() if v > 0}
            self._proposed.setdefault(self._key(p), source)  # the label it keeps when counted later
            res.append((p, source))
        return res

    def neighbours(self, c: Candidate) -> list[Candidate]:
        """The feasible neighbours of ``c`` (:meth:`proposals`), every one counted."""
        return [n for n in (self.candidate(p, src) for p, src in self.proposals(c)) if self.feasible(n)]

    def ranked(self, c: Candidate) -> list[list[tuple[Plan, str]]]:
        """The unmeasured neighbours of ``c`` best predicted first, in runs of equal prediction (a run is
        ordered by MACs once counted, see :meth:`run`); no plan is counted here."""
        props = []
        for p, src in self.proposals(c):
            hit = self.candidates.get(self._key(p))
            if hit is None or hit.measured is None:
                props.append((p, src))
        pred = self.predict_many([p for p, _ in props], [self.additive(p) for p, _ in props])
        todo = [(float(-self.sign * v), p, src) for v, (p, src) in zip(pred, props)]
        todo.sort(key=lambda t: t[0])  # stable: generation order within equal predictions
        runs: list[list[tuple[Plan, str]]] = []
        last = None
        for score, p, src in todo:
            if not runs or score != last:
                runs.append([])
            runs[-1].append((p, src))
            last = score
        return runs

    def run(self, start: Sequence[Candidate]) -> Candidate | None:
        """Measure ``start`` (uniform, knapsack ...) then search; return the best measured feasible candidate.

        Neighbours are measured best predicted first (ties: fewer MACs first), infeasible ones skipped; the
        search moves to the first that measures better. Each run of equal prediction is counted when reached
        (:meth:`ranked`), so a move counts the plans ranked above the one it measures, not the whole
        neighbourhood."""
        best: Candidate | None = None
        for c in start:
            if c is not None and self.feasible(c) and len(self.measured) < self.budget:
                self.run_measure(c)
                if self.better(c, best):
                    best = c
        while best is not None and len(self.measured) < self.budget:
            moved = False
            for run in self.ranked(best):
                if moved or len(self.measured) >= self.budget:
                    break
                group = sorted((self.candidate(p, src) for p, src in run), key=lambda n: n.macs)
                for n in group:
                    if not self.feasible(n) or n.measured is not None:
                        continue
                    if len(self.measured) >= self.budget:
                        break
                    self.run_measure(n)
                    if self.better(n, best):
                        best, moved = n, True
                        break
            if not moved:
                break
        return best
