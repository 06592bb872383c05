"""Regenerate NNI 2.10.1 SensitivityAnalysis references for prunescope's bit-exactness tests.

Run with NNI's environment (same torch version as prunescope's)::

    /work/nni-venv/bin/python tests/data/nni/make_sensitivity_refs.py

For every configuration in ``CONFIGS`` it writes, under ``tests/data/nni/sensitivity/``:

* ``<name>.csv`` - the bytes of NNI's ``export()``;
* ``<name>.json`` - the configuration, the initial weights' checksum, the baseline metric, the number of
  ``val_func`` calls and the results with every float as ``repr`` (so that tests compare bit for bit).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sens_models  # noqa: E402

OUT = HERE / "sensitivity"
Q = [0.25, 0.5, 0.75]

# name, model, val, sparsities, prune_type, early_stop_mode, early_stop_value, analysis calls
CONFIGS: list[dict] = [
    dict(name="cnn_default_l1", model="cnn", val="accuracy"),
    dict(name="cnn_default_l2_loss", model="cnn", val="loss", prune_type="l2"),
    dict(name="cnn_level", model="cnn", val="loss", prune_type="level", sparsities=[0.9, 0.1, 0.5, 0.3, 0.7]),
    dict(name="cnn_fpgm", model="cnn", val="accuracy", prune_type="fpgm", sparsities=Q),
    dict(name="cnn_minimize", model="cnn", val="loss", sparsities=Q,
         early_stop_mode="minimize", early_stop_value=1.188),
    dict(name="cnn_maximize", model="cnn", val="accuracy", sparsities=Q,
         early_stop_mode="maximize", early_stop_value=0.651),
    dict(name="cnn_dropped", model="cnn", val="accuracy", sparsities=Q,
         early_stop_mode="dropped", early_stop_value=0.0001),
    dict(name="cnn_raised", model="cnn", val="loss", sparsities=Q,
         early_stop_mode="raised", early_stop_value=0.001),
    # strict comparison: conv1 reaches exactly this value at 0.5 and must not stop there
    dict(name="cnn_strict", model="cnn", val="accuracy", sparsities=[0.75, 0.25, 0.5],
         early_stop_mode="maximize", early_stop_value=0.6510528236394748),
    dict(name="cnn_specified", model="cnn", val="loss", sparsities=Q, calls=[["conv3", "conv1"]]),
    dict(name="cnn_accumulate", model="cnn", val="accuracy", sparsities=Q, calls=[["conv2"], ["conv1", "conv2"]]),
    dict(name="cnn_rounding", model="cnn", val="loss", sparsities=[0.3, 0.125, 0.124, 0.333]),
    dict(name="conv1d_default", model="conv1d", val="accuracy"),
    dict(name="conv1d_level", model="conv1d", val="loss", prune_type="level", sparsities=Q),
]


def run(cfg: dict) -> dict:
    from nni.compression.pytorch.utils.sensitivity_analysis import SensitivityAnalysis

    model = sens_models.build_cnn() if cfg["model"] == "cnn" else sens_models.build_conv1d()
    checksum = sens_models.checksum(model)
    metric = getattr(sens_models, cfg["val"])
    calls = 0

    def val(m: torch.nn.Module) -> float:
        nonlocal calls
        calls += 1
        return metric(m)

    sa = SensitivityAnalysis(model, val, sparsities=cfg.get("sparsities"), prune_type=cfg.get("prune_type", "l1"),
                             early_stop_mode=cfg.get("early_stop_mode"),
                             early_stop_value=cfg.get("early_stop_value"))
    baselines = []
    for layers in cfg.get("calls", [None]):
        sa.analysis(val_args=[model], specified_layers=layers)
        baselines.append(repr(float(sa.ori_metric)))
    csv_path = OUT / f"{cfg['name']}.csv"
    sa.export(str(csv_path))
    assert sens_models.checksum(model) == checksum, "NNI did not restore the weights"
    return {
        "config": cfg,
        "checksum": checksum,
        "torch": torch.__version__,
        "ori_metrics": baselines,
        "val_calls": calls,
        "sparsities": [repr(float(s)) for s in sa.sparsities],
        "results": {layer: [[repr(float(s)), repr(float(v))] for s, v in res.items()]
                    for layer, res in sa.sensitivities.items()},
    }


def main() -> None:
    logging.disable(logging.CRITICAL)
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    for cfg in CONFIGS:
        ref = run(cfg)
        with open(OUT / f"{cfg['name']}.json", "w") as f:
            json.dump(ref, f, indent=1)
            f.write("\n")
        print(cfg["name"], ref["val_calls"], {k: len(v) for k, v in ref["results"].items()})
    print("wrote", len(CONFIGS), "references to", os.path.relpath(OUT))


if __name__ == "__main__":
    main()
