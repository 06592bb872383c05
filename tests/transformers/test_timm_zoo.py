"""timm models on meta: unsafe layers with the pin probe, and prune-and-run on every answer it changes.

A representative subset (the whole zoo is ``bench/timm_unsafe.py``): models whose answer the probe changes
(sizes read from ``x.shape`` in window partitions, attention pooling, conv-as-token reshapes) and models
whose pins are true literals (a fixed ``head_dim`` in timm's ``Attention``, MixNet's fixed ``split`` sizes).

Prune-and-run: on each model whose answer changes, one channel class is removed from several newly-safe
layers — classes *other* than the one the probe removed wherever possible, since the probe clears a whole
group from one removal — each alone and then all together, on a fresh meta copy narrowed by the removal
plan; the forward must run and give the same output shapes. Anything unsafe before and safe now must pass.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from prunescope.commands.common import build_on_meta  # noqa: E402
from prunescope.graph import trace  # noqa: E402
from prunescope.removal import not_safe_to_prune  # noqa: E402
from prunescope.removal.narrow import apply_plan  # noqa: E402
from prunescope.removal.plan import plan_removal  # noqa: E402
from prunescope.removal.probe import probe_pins  # noqa: E402
from prunescope.topology import channel_atoms  # noqa: E402

CHANGES = ["swin_s3_tiny_224", "tiny_vit_5m_224", "mobilevitv2_050", "sam2_hiera_tiny"]
STAYS = {"test_vit": "reshape", "mixnet_s": "split", "resnet18": None}
# pins the probe clears in these models while the true literals stay: test_vit's residual stream is pinned only by
# the patch flatten's view (it follows the width once the class token narrows with the stream)
_STREAM = ["patch_embed.proj"] + [f"blocks.{b}.{m}" for b in range(6) for m in ("attn.proj", "mlp.fc2")]
CLEARED = {"test_vit": _STREAM}
_KINDS = ("conv", "conv_transpose", "linear")


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_on_meta(lambda: timm.create_model(name, pretrained=False)).eval()
    cfg = getattr(model, "pretrained_cfg", None) or model.default_cfg
    return model, torch.empty((1, *cfg["input_size"]), device="meta")


def _masks(model: torch.nn.Module, ca, classes: list[int]) -> dict:
    """Masks (NNI layout, full weight shape) zeroing every member channel of ``classes``."""
    masks: dict = {}
    for c in classes:
        for layer, ch in ca.class_members(c):
            w = model.get_submodule(layer).weight
            m = masks.setdefault(layer, {"weight": torch.ones(tuple(w.shape), dtype=torch.bool)})["weight"]
            li = ca.layers[layer]
            assert li.kind in ("conv", "linear") and not li.weight_out_dim, layer
            m[ch] = False
    return masks


def _prune_and_run(model: torch.nn.Module, g, classes: list[int], want: list[tuple[int, ...]]) -> None:
    ca = channel_atoms(g)
    plan = plan_removal(g, _masks(model, ca, classes), check_pins=False)
    assert np.array_equal(plan.atom_removed, np.isin(ca.root, classes)), "the plan removes exactly the classes"
    small = copy.deepcopy(model)
    apply_plan(small, plan)
    with torch.no_grad():
        out = small(torch.empty(g.inputs[0].shape, device="meta"))
    got = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])]
    assert got == want


@pytest.mark.parametrize("name", CHANGES)
def test_newly_safe_layers_prune_and_run(name: str) -> None:
    model, x = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = trace(model, x)
    ca = channel_atoms(g)
    res = probe_pins(g, x)
    layers = [n for n, li in ca.layers.items() if li.kind in _KINDS and not n.startswith("<")]
    before = [n for n in layers if n in ca.unsafe]
    after = [n for n in layers if n in res.unsafe]
    assert set(after) <= set(before) and len(after) < len(before), name  # the probe only ever removes pins
    assert res.probes <= 32
    assert not_safe_to_prune(None, None, traced_model=g) == [n for n in res.unsafe if not n.startswith("<")]
    newly = [n for n in before if n not in after]
    picks = [newly[i] for i in sorted({0, len(newly) // 3, 2 * len(newly) // 3, len(newly) - 1})]
    want = [tuple(t.shape) for t in g.outputs]
    chosen: list[int] = []
    for layer in picks:
        cls = [int(c) for c in np.unique(ca.layer_classes(layer)) if int(c) in res.cleared]
        assert cls, layer  # a newly safe layer had pinned classes, all cleared
        inferred = [c for c in cls if "same group" in res.cleared[c]]
        c = (inferred or cls)[-1]  # prefer a class the probe did not remove itself
        if c not in chosen:
            chosen.append(c)
            _prune_and_run(model, g, [c], want)
    _prune_and_run(model, g, chosen, want)  # all together


@pytest.mark.parametrize("name", sorted(STAYS))
def test_true_literals_stay_pinned(name: str) -> None:
    model, x = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = trace(model, x)
    ca = channel_atoms(g)
    res = probe_pins(g, x)
    cleared = CLEARED.get(name, [])
    assert sorted(res.cleared_layers) == sorted(cleared)  # every other probe failed physically: nothing changes
    assert res.unsafe == {k: v for k, v in ca.unsafe.items() if k not in cleared}
    op = STAYS[name]
    if op is None:
        assert ca.unsafe == {} and res.probes == 0
    else:
        assert res.kept and all("fails" in why or "keeps it" in why for why in res.kept.values())
        assert any(op in why for why in res.kept.values())
