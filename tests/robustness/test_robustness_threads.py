"""Counting from several threads gives the single-thread answer (the trace's module hooks are per call)."""

from __future__ import annotations

import threading

import robust_models as rm
import torch
from torch import nn

from prunescope import count_flops_params
from prunescope.topology import ChannelDependency


def _run_threads(n: int, work) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return errors


def test_one_model_counted_from_several_threads():
    torch.manual_seed(0)
    model = rm.TinyCNN().train()  # train mode: a race on the train/eval flags would show in the BN statistics
    ref = count_flops_params(model, (2, 3, 8, 8), verbose=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got: list = []

    def work(i: int) -> None:
        for _ in range(4):
            got.append(count_flops_params(model, (2, 3, 8, 8), verbose=False))

    assert _run_threads(4, work) == []
    assert len(got) == 16
    for r in got:
        assert r == ref
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_different_models_in_parallel_threads():
    torch.manual_seed(0)
    models = [rm.TinyCNN().eval(), rm.plain_net(), nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))]
    inputs = [(1, 3, 8, 8), (1, 3, 8, 8), (3, 5)]
    refs = [count_flops_params(m, x, verbose=False) for m, x in zip(models, inputs)]
    deps_ref = ChannelDependency(models[0], torch.ones(inputs[0])).sets
    bad: list = []

    def work(i: int) -> None:
        for _ in range(3):
            k = i % 3
            if count_flops_params(models[k], inputs[k], verbose=False) != refs[k]:
                bad.append(k)
            if i == 0 and ChannelDependency(models[0], torch.ones(inputs[0])).sets != deps_ref:
                bad.append("deps")

    assert _run_threads(6, work) == []
    assert bad == []


def test_shared_submodule_in_two_models_counted_in_parallel():
    shared = nn.Conv2d(3, 3, 3, padding=1)
    a = nn.Sequential(shared, nn.ReLU())
    b = nn.Sequential(nn.Conv2d(3, 3, 1), shared)
    ra = count_flops_params(a, (1, 3, 8, 8), verbose=False)[2]
    rb = count_flops_params(b, (1, 3, 8, 8), verbose=False)[2]
    bad: list = []

    def work(i: int) -> None:
        for _ in range(5):
            m, r = (a, ra) if i % 2 else (b, rb)
            if count_flops_params(m, (1, 3, 8, 8), verbose=False)[2] != r:
                bad.append(i)

    assert _run_threads(4, work) == []
    assert bad == []
