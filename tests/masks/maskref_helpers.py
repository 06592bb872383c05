"""Shared helpers for the mask tests: reference models, NNI references, compact mask decoding."""

from __future__ import annotations

import json
import os
import sys
from functools import cache

import numpy as np
import torch

NNI_DIR = os.path.join(os.path.dirname(__file__), "..", "data", "nni")
REF_DIR = os.path.join(NNI_DIR, "masks")
if NNI_DIR not in sys.path:
    sys.path.insert(0, NNI_DIR)

import ref_models  # noqa: E402,F401


@cache
def load_ref(name: str) -> dict:
    with open(os.path.join(REF_DIR, name)) as f:
        return json.load(f)


def decode(enc: dict | None) -> torch.Tensor | None:
    """Inverse of make_mask_refs.encode: a float32 0/1 tensor."""
    if enc is None:
        return None
    shape = tuple(enc["shape"])
    if "filters" in enc:
        t = torch.ones(shape)
        if enc["filters"]:
            t[torch.tensor(enc["filters"])] = 0
        return t
    n = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(enc["bits"]), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(np.float32)).reshape(shape)


def decode_masks(enc: dict) -> dict:
    return {n: {"weight": decode(m["weight"]), "bias": decode(m["bias"])} for n, m in enc.items()}


def build_checked(case: dict) -> torch.nn.Module:
    """Build the case's model and prove its weights equal those NNI saw."""
    model = ref_models.build(case["model"])
    assert ref_models.param_checksum(model) == case["checksum"], f"weights differ from NNI's for {case['model']}"
    return model


def assert_masks_equal(ours: dict, ref: dict, what: str = "") -> int:
    """Exact equality of two mask dicts (same keys, same values; bias None vs None). Returns #tensors compared."""
    assert sorted(ours) == sorted(ref), f"{what}: layers differ: {sorted(set(ours) ^ set(ref))}"
    n = 0
    for name in ref:
        for key in ("weight", "bias"):
            a, b = ours[name][key], ref[name][key]
            if b is None:
                assert a is None, f"{what}: {name}.{key} should be None"
                continue
            assert a is not None, f"{what}: {name}.{key} is None, NNI has a mask"
            assert a.shape == b.shape, f"{what}: {name}.{key} shape {tuple(a.shape)} != {tuple(b.shape)}"
            diff = (a.float().cpu() != b).nonzero()
            assert diff.numel() == 0, f"{what}: {name}.{key} differs at {diff[:5].tolist()}"
            n += 1
    return n
