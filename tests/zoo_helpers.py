"""Shared by the zoo tests: every torchvision classification model, built on the meta device."""

import warnings

import torchvision

from prunescope.commands.common import build_on_meta

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
