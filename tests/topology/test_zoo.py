"""Every torchvision classification model is analysed without error, on the meta device and on CPU.

All models run on ``meta`` at their native input size (no memory, no init compute: built with
``build_on_meta``). A CPU subset of small models (the big ones only cost random initialisation and
convolutions, not analysis time) runs the same analysis on real tensors and must give identical answers.
"""

from __future__ import annotations

import time
import warnings

import pytest
import torch
import torchvision

from prunescope.commands.common import build_on_meta
from prunescope.graph import trace
from prunescope.removal import not_safe_to_prune
from prunescope.topology import ChannelDependency, GroupDependency, InputChannelDependency

NAMES = torchvision.models.list_models(module=torchvision.models)
CPU_SUBSET = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "efficientnet_b0",
              "mnasnet0_5", "regnet_y_400mf", "googlenet", "convnext_tiny", "swin_t", "vit_b_16", "alexnet"]


def _size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def analyse(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown ops are reported in the results, checked below
        g = trace(model, x)
        t = time.perf_counter()
        cd = ChannelDependency(traced_model=g)
        cdl = ChannelDependency(traced_model=g, include_linear=True)
        icd = InputChannelDependency(traced_model=g)
        gd = GroupDependency(traced_model=g)
        unsafe = not_safe_to_prune(None, None, traced_model=g, with_reasons=True)
        dt = time.perf_counter() - t
    return (cd.sets, cdl.sets, icd.sets, gd.dependency, unsafe, cd.atoms.stopped_ops), dt


def test_zoo_is_classification_list() -> None:
    assert len(NAMES) >= 80


@pytest.mark.slow
def test_whole_zoo_on_meta() -> None:
    slow = {}
    for name in NAMES:
        kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = build_on_meta(lambda name=name, kw=kw: torchvision.models.get_model(name, weights=None, **kw)).eval()
        s = _size(name)
        res, dt = analyse(model, torch.ones(1, 3, s, s, device="meta"))
        sets, lsets, isets, groups, unsafe, stopped = res
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
        assert sorted(n for s_ in sets for n in s_) == sorted(convs), name  # every conv exactly once
        assert stopped == [] or name.startswith("maxvit"), (name, stopped)
        if dt > 60:  # a guard against a pathological walk (NNI's not_safe_to_prune: > 20 min), not a speed
            slow[name] = dt  # target: analysis time is measured by bench/bench_topology.py
    assert not slow, slow


@pytest.mark.parametrize("name", CPU_SUBSET)
def test_cpu_matches_meta(name: str) -> None:
    s = _size(name)
    cpu, _ = analyse(torchvision.models.get_model(name, weights=None).eval(), torch.ones(1, 3, s, s))
    meta_model = build_on_meta(lambda: torchvision.models.get_model(name, weights=None)).eval()
    meta, _ = analyse(meta_model, torch.ones(1, 3, s, s, device="meta"))
    assert cpu == meta
