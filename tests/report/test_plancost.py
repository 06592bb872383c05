"""A plan's effective MACs from per-set contributions (:meth:`prunescope.report.plans.PlanMasks.macs_of`,
:class:`prunescope.flops.plancost.PlanCost`)
equal a count from scratch: ``flops_report(..., effective=True)`` of ``fix_mask_conflict`` of the plan's raw
``group_masks``, on random plans of a resnet18, a residual CNN with shared and grouped sets, and a tiny BERT with
head and MLP units. The plan's masks (merged per-set conflict-free masks) equal the whole-plan fix too."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from prunescope.flops import flops_report
from prunescope.masks import fix_mask_conflict
from prunescope.masks.pruners import group_masks
from prunescope.removal.plan import decide_removal, plan_removal
from prunescope.report.context import Context
from prunescope.report.plans import PlanMasks
from prunescope.report.stages import dense_cost, topology
from prunescope.topology.values import value_states


class SharedCNN(nn.Module):
    """Residual adds (one set over three convs), a concat, a grouped conv and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 1)
        self.d = nn.Conv2d(16, 8, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 5)
        with torch.no_grad():  # the g+dw set's weakest channels spread over g's groups (else shrink keeps them)
            order = torch.tensor([1 + 4 * p + j for j in range(4) for p in range(4)], dtype=torch.float)
            self.g.weight.mul_(5 * order.view(16, 1, 1, 1) / self.g.weight.abs().sum((1, 2, 3), keepdim=True))
            self.dw.weight.mul_(0.01)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + torch.relu(self.a(x))
        x = x + self.b(x)
        x = torch.cat([self.c(x), self.d(x)], 1)
        x = torch.relu(self.g(x))
        x = self.pw(torch.relu(self.dw(x)))
        return self.fc(x.mean((2, 3)))


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def _plans(model, x) -> PlanMasks:
    """The report's first two stages (trace + counts, topology) and its per-set plan caches."""
    ctx = Context(model, lambda m: 0.0, x, console=None, progress=False)
    dense = dense_cost(ctx)
    return PlanMasks(model, x, dense, topology(ctx, dense))


def _reference(r: PlanMasks, plan: dict[str, float]) -> tuple[dict, int]:
    """The count from scratch: raw group masks of every set, one conflict fix of the whole plan, the effective
    counter."""
    modules = dict(r.model.named_modules())
    raw: dict = {}
    for k, s in plan.items():
        st = r.topology.get(k)
        raw.update(zip(st.members, group_masks([modules[m] for m in st.members], s, "l1", units=st.unit_lists())))
    graph = r.dense.graph
    fixed = dict(fix_mask_conflict(raw, r.model, r.x, traced=graph))
    return fixed, flops_report(r.model, r.x, graph=graph, masks=fixed, effective=True).total_flops


def _same_plan(got, want) -> None:
    """Two removal plans agree on what as_pruned and shrink read: removed channels, cuts, folds, protections."""
    assert set(got.removed) == set(want.removed)
    assert all(np.array_equal(got.removed[k], want.removed[k]) for k in want.removed)
    assert set(got.cuts) == set(want.cuts) and got.protected == want.protected and got.attrs == want.attrs
    for k, c in want.cuts.items():
        g = got.cuts[k]
        assert g.shape == c.shape and set(g.keep) == set(c.keep), k
        assert all(np.array_equal(g.keep[a], c.keep[a]) for a in c.keep), k
    assert {k: (f.layer, f.bias, f.columns.tolist()) for k, f in got.folds.items()} == \
        {k: (f.layer, f.bias, f.columns.tolist()) for k, f in want.folds.items()}


@pytest.mark.parametrize("kind", ["resnet18", "shared", "bert"])
def test_plan_macs_equal_the_effective_count_from_scratch(kind):
    torch.manual_seed(0)
    if kind == "resnet18":
        model, x, n = torchvision.models.resnet18().eval(), torch.ones(1, 3, 32, 32), 6
    elif kind == "shared":
        model, x, n = SharedCNN().eval(), torch.ones(1, 3, 8, 8), 12
    else:
        model, x, n = _bert(), {"input_ids": torch.randint(0, 50, (2, 8))}, 12
    r = _plans(model, x)
    keys = r.topology.names
    assert len(keys) >= (2 if kind == "shared" else 3), (keys, r.topology.excluded)
    if kind == "shared":  # the grouped-conv set goes through the conflict fix, the others through the fast path
        assert any(r.constrained(k) for k in keys) and not all(r.constrained(k) for k in keys)
    if kind == "bert":  # heads (4 units over 3 members of 32 channels) and MLP units
        assert any(s.units is not None for s in r.topology.sets)
    rng = random.Random(1)
    levels = [0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9]
    seen = set()
    for _ in range(n):
        plan = {k: rng.choice(levels) for k in keys if rng.random() < 0.7}
        if not plan:
            continue
        fixed, want = _reference(r, plan)
        got = r.macs_of(plan)
        assert got == want, (plan, got, want)
        seen.add(got)
        masks = r.masks_for(plan)
        assert set(masks) == set(fixed)
        for layer, m in fixed.items():
            assert torch.equal(masks[layer]["weight"], m["weight"]), layer
        _same_plan(r.removal_plan(plan), plan_removal(r.dense.graph, fixed, check_pins=False))
    assert len(seen) >= 3  # the plans differ in cost: the comparison is not between constants
    assert r.macs_of({}) == r.dense.macs == flops_report(model, x).total_flops


@pytest.mark.parametrize("kind", ["shared", "bert"])
def test_incremental_walk_equals_the_full_count_along_a_neighbour_walk(kind):
    """The plan search counts plans that differ from the previous ones in a set or two; PlanCost restarts the
    value-state walk of the removal decision from the nearest vector it has seen (IncrementalStates). Along
    such a walk every count equals the effective count from scratch, and the states equal a full walk (the
    residual/grouped/depthwise CNN and a tiny BERT; resnet18's random plans above take this path too)."""
    torch.manual_seed(0)
    if kind == "shared":
        model, x = SharedCNN().eval(), torch.ones(1, 3, 8, 8)
    else:
        model, x = _bert(), {"input_ids": torch.randint(0, 50, (2, 8))}
    r = _plans(model, x)
    keys = r.topology.names
    rng = random.Random(3)
    levels = [0.25, 0.5, 0.75]
    plan = {k: rng.choice(levels) for k in keys if rng.random() < 0.6}
    states = r.cost._planner.states
    seen, moved = set(), 0
    for step in range(10):
        p = dict(plan)
        for k in rng.sample(keys, 2 if step % 2 else 1):  # one set changed, or two (a swap)
            p[k] = rng.choice([0.0, *levels])
        p = {k: v for k, v in p.items() if v > 0}
        _, want = _reference(r, p)
        assert r.macs_of(p) == want, (p, r.macs_of(p), want)
        seen.add(want)
        masked = np.zeros(r.cost.n_atoms, dtype=bool)
        for k, v in p.items():
            masked |= r.set_atoms(k, v)
        ar = decide_removal(r.cost.ca, masked, r.cost._prot0)
        full, got = value_states(r.cost.ca, ar, r.cost._planner.const_ids), states(ar)
        assert set(full.states) == set(got.states) and full.explain == got.explain
        assert all(np.array_equal(full.states[t], got.states[t]) for t in full.states)
        moved += bool(full.states)
        if step % 3 == 2:
            plan = p
    assert len(seen) >= 4 and moved >= 5  # different costs, and walks with removed channels to follow
