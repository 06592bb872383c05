"""Generate NNI 2.10.1 mask references for tests/masks (run ONCE, with the NNI virtual environment).

    /work/nni-venv/bin/python tests/data/nni/make_mask_refs.py

Writes ``tests/data/nni/masks/*.json`` (and one NNI-saved mask file). Each case stores the model's
parameter checksum (to prove both environments built identical weights), the config or input masks, and
NNI's masks in a compact form:

* ``{"filters": [pruned indices along dim 0]}`` when every dim-0 slice is all ones or all zeros;
* otherwise ``{"bits": hex of numpy.packbits(mask.flatten() != 0)}``.

NNI is never imported by prunescope or its tests; only this script uses it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "masks")
sys.path.insert(0, HERE)

from ref_models import INPUT_SIZES, build, param_checksum  # noqa: E402

logging.disable(logging.CRITICAL)
warnings.filterwarnings("ignore")


def encode(t: torch.Tensor | None) -> dict | None:
    if t is None:
        return None
    t = t.detach().cpu()
    flat = t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)
    s = flat.sum(dim=1)
    if bool(((s == 0) | (s == flat.shape[1])).all()) and bool(((t == 0) | (t == 1)).all()):
        return {"shape": list(t.shape), "filters": [int(i) for i in torch.nonzero(s == 0).flatten()]}
    bits = np.packbits((t.flatten() != 0).numpy().astype(np.uint8))
    return {"shape": list(t.shape), "bits": bits.tobytes().hex()}


def encode_masks(masks: dict) -> dict:
    return {name: {"weight": encode(m["weight"]), "bias": encode(m.get("bias"))} for name, m in masks.items()}


def nni_masks(pruner_cls, model, config_list) -> dict:
    """Run an NNI v1 one-shot pruner and return its exported mask dict (model weights left untouched)."""
    import copy
    import tempfile

    model = copy.deepcopy(model)
    pruner = pruner_cls(model, config_list)
    pruner.compress()
    with tempfile.TemporaryDirectory() as d:
        pruner.export_model(os.path.join(d, "m.pth"), os.path.join(d, "mask.pth"))
        return torch.load(os.path.join(d, "mask.pth"))


def pruner_cases() -> dict:
    from nni.algorithms.compression.pytorch.pruning import (
        FPGMPruner,
        L1FilterPruner,
        L2FilterPruner,
        LevelPruner,
    )

    classes = {"l1": L1FilterPruner, "l2": L2FilterPruner, "fpgm": FPGMPruner, "level": LevelPruner}
    cases = []
    for model_name in ("smallcnn", "resnet18"):
        for p in ("l1", "l2"):
            for s in (0.2, 0.5, 0.8):
                cases.append((model_name, p, [{"sparsity": s, "op_types": ["Conv2d"]}]))
        cases.append((model_name, "fpgm", [{"sparsity": 0.5, "op_types": ["Conv2d"]}]))
    rn_names = [
        {"sparsity": 0.5, "op_types": ["Conv2d"]},
        {"sparsity": 0.8, "op_names": ["layer1.0.conv1", "layer2.0.downsample.0"]},
        {"sparsity": 0.3, "op_types": ["Conv2d"], "op_names": ["layer3.1.conv2"]},
        {"exclude": True, "op_names": ["conv1", "layer4.1.conv2"]},
    ]
    cases.append(("resnet18", "l1", rn_names))
    cases.append(("resnet18", "l2", rn_names))
    cases.append(("smallcnn", "l1", [{"sparsity": 0.6, "op_types": ["Conv2d"]},
                                     {"exclude": True, "op_types": ["Conv2d"], "op_names": ["conv2"]}]))
    cases.append(("smallcnn", "level", [{"sparsity": 0.5, "op_types": ["default"]}]))
    cases.append(("smallcnn", "level", [{"sparsity": 0.3, "op_types": ["Conv2d"]},
                                        {"sparsity": 0.9, "op_names": ["fc1"]},
                                        {"exclude": True, "op_names": ["conv3"]}]))
    cases.append(("smallcnn", "fpgm", [{"sparsity": 0.3, "op_types": ["Conv2d"]}]))
    for p in ("l1", "l2", "fpgm"):
        for s in (0.2, 0.3, 0.5, 0.7):
            cases.append(("tied", p, [{"sparsity": s, "op_types": ["Conv2d"]}]))
    for s in (0.3, 0.5):
        cases.append(("tied", "level", [{"sparsity": s, "op_types": ["Conv2d", "Linear"]}]))

    out = []
    for model_name, p, cfg in cases:
        model = build(model_name)
        masks = nni_masks(classes[p], model, cfg)
        out.append({"model": model_name, "pruner": p, "config_list": cfg, "checksum": param_checksum(model),
                    "masks": encode_masks(masks)})
    return {"nni_version": __import__("nni").__version__, "torch": torch.__version__, "cases": out}


def conflict_cases() -> dict:
    from nni.algorithms.compression.pytorch.pruning import L1FilterPruner
    from nni.compression.pytorch.utils.mask_conflict import fix_mask_conflict

    out = []
    # resnet18: a different sparsity for every conv so that residual sets conflict
    model = build("resnet18")
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    spars = [0.1, 0.3, 0.5, 0.7, 0.2, 0.6]
    cfg = [{"sparsity": spars[i % len(spars)], "op_names": [n]} for i, n in enumerate(convs)]
    cfg.append({"exclude": True, "op_names": ["layer3.0.conv2"]})  # an unmasked member keeps its set whole
    out.append(("resnet18", cfg))
    # grouped conv: group + channel conflicts
    out.append(("groupnet", [{"sparsity": 0.25, "op_names": ["conv1"]}, {"sparsity": 0.5, "op_names": ["conv2"]},
                             {"sparsity": 0.75, "op_names": ["conv3"]}, {"sparsity": 0.5, "op_names": ["conv4"]}]))
    out.append(("groupnet", [{"sparsity": 0.4, "op_names": ["conv1"]}, {"sparsity": 0.3, "op_names": ["conv2"]},
                             {"sparsity": 0.6, "op_names": ["conv3"]}]))
    cases = []
    for model_name, cfg in out:
        model = build(model_name)
        masks = nni_masks(L1FilterPruner, model, cfg)
        before = encode_masks(masks)
        dummy = torch.randn(*INPUT_SIZES[model_name])
        fixed = fix_mask_conflict(masks, model, dummy)
        cases.append({"model": model_name, "config_list": cfg, "checksum": param_checksum(model),
                      "input_size": list(INPUT_SIZES[model_name]), "input_masks": before,
                      "fixed_masks": encode_masks(fixed)})
    return {"nni_version": __import__("nni").__version__, "torch": torch.__version__, "cases": cases}


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "pruners.json"), "w") as f:
        json.dump(pruner_cases(), f, indent=1, sort_keys=True)
    with open(os.path.join(OUT, "fix_mask_conflict.json"), "w") as f:
        json.dump(conflict_cases(), f, indent=1, sort_keys=True)
    # a mask file exactly as NNI's export_model writes it (torch.save of the dict), for load_masks
    from nni.algorithms.compression.pytorch.pruning import L1FilterPruner

    model = build("tied")
    masks = nni_masks(L1FilterPruner, model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}])
    torch.save(masks, os.path.join(OUT, "nni_saved_tied_l1.pth"))


if __name__ == "__main__":
    main()
