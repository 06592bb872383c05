"""One meaning of "prunable" across the timm zoo (issue 19): what ``unit_masks`` offers, ``shrink`` narrows.

Per model (random weights, CPU, small inputs; the list and the pipeline are in ``timm_prunable_zoo.py``):
``unit_masks`` at 30 % on every set it offers -> ``shrink`` needs no conflict fix and keeps no masked channel
(grouped convolutions lose the same number of units per group; sets shrink cannot narrow are not offered) ->
the shrunk output equals the ``as_pruned`` masked model's (relative 1e-4) -> the dense count of the shrunk model
equals the effective count of the masks. A representative subset runs by default; ``PRUNESCOPE_TIMM_ZOO=1``
runs every model (``bench/timm_prunable.py`` also reports the fraction of MACs offered, before and after).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("timm")

from timm_prunable_zoo import SPEC, check  # noqa: E402

# the cheapest model of each failure the issue found (grouped convs needing a conflict fix, ConvNeXt's reshaped
# layer scale, relative-position attention, SK-ResNet's softmax over the paths axis) and two plain references;
# the whole list: PRUNESCOPE_TIMM_ZOO=1
SUBSET = ["test_resnet", "regnetx_002", "resnest14d", "skresnet18", "test_convnext", "test_vit", "test_vit_relpos"]
NAMES = list(SPEC) if os.environ.get("PRUNESCOPE_TIMM_ZOO") else SUBSET


@pytest.mark.parametrize("name", NAMES)
def test_offered_units_shrink_as_pruned(name: str) -> None:
    try:
        row = check(name)
    except Exception as e:  # noqa: BLE001 - a model this timm cannot build or trace on small inputs
        if type(e).__name__ in ("TraceError", "TypeError", "AssertionError"):
            pytest.skip(f"{name}: {type(e).__name__}: {str(e)[:120]}")
        raise
    if row.get("error") == "no set offered":
        pytest.skip(f"{name}: no prunable set")
    assert "error" not in row, row["error"]  # shrink never refuses what unit_masks offered
    assert row["fixed"] == 0, row["warnings"]  # unit masks respect the groups: nothing to fix
    assert row["protected"] == 0, row["warnings"]  # every masked channel is removed
    dense, eff = row["counts"]
    assert dense == eff  # the shrunk model costs what the effective counter said
    # norms over removed channels included: as_pruned normalises over the kept ones, as the narrowed norm does
    assert row["rel"] <= 1e-4
