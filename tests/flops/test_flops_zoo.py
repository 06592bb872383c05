"""Every torchvision classification model: MACs and params equal torchvision's published metadata.

The reference is ``weights.meta['_ops']`` (GMACs, despite the name 'GFLOPS' in the docs) and
``weights.meta['num_params']`` of each model's DEFAULT weights, at that weight's crop size. Counted on the
meta device: no weights are downloaded and nothing is computed.
"""

import warnings

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from prunescope.commands.common import build_on_meta  # noqa: E402
from prunescope.flops import flops_report  # noqa: E402

NAMES = torchvision.models.list_models(module=torchvision.models)


def zoo_model(name: str):
    weights = torchvision.models.get_model_weights(name).DEFAULT
    crop = weights.transforms().crop_size
    size = crop[0] if isinstance(crop, (list, tuple)) else crop
    kw: dict = {}
    if name == "googlenet":  # the published weights have no auxiliary classifiers
        kw = dict(aux_logits=False, init_weights=False)
    elif name == "inception_v3":
        kw = dict(init_weights=False)
    elif name.startswith("vit_") and size != 224:
        kw = dict(image_size=size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_on_meta(lambda: torchvision.models.get_model(name, **kw))
    return model, size, weights.meta


def test_zoo_is_the_whole_zoo():
    assert len(NAMES) >= 80


@pytest.mark.parametrize("name", NAMES)
def test_published_macs_and_params(name):
    model, size, meta = zoo_model(name)
    rep = flops_report(model, torch.ones(1, 3, size, size, device="meta"))
    assert round(rep.total_flops / 1e9, 3) == round(meta["_ops"], 3), (rep.total_flops, meta["_ops"])
    assert rep.total_params == meta["num_params"]
    assert not rep.uncounted  # default mode never reports uncounted ops
