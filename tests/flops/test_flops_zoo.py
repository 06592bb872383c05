"""Every torchvision classification model: MACs and params equal torchvision's published metadata.

The reference is ``weights.meta['_ops']`` (GMACs, despite the name 'GFLOPS' in the docs) and
``weights.meta['num_params']`` of each model's DEFAULT weights, at that weight's crop size. Counted on the
meta device: no weights are downloaded and nothing is computed.
"""

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from prunescope.flops import flops_report  # noqa: E402
from zoo_helpers import NAMES, zoo_model  # noqa: E402


def test_zoo_is_the_whole_zoo():
    assert len(NAMES) >= 80


@pytest.mark.parametrize("name", NAMES)
def test_published_macs_and_params(name):
    model, size, meta = zoo_model(name)
    rep = flops_report(model, torch.ones(1, 3, size, size, device="meta"))
    assert round(rep.total_flops / 1e9, 3) == round(meta["_ops"], 3), (rep.total_flops, meta["_ops"])
    assert rep.total_params == meta["num_params"]
    assert not rep.uncounted  # default mode never reports uncounted ops
