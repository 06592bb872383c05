"""Benchmark: what shrink's built-in safety net costs (``shrink(..., verify=True)``, the default, against
``verify=False``), as a ratio of the whole ``shrink`` call.

``python bench/bench_verify.py [--repeats 3]`` (or ``bench/run_all.py verify``). Two models, random weights:

* torchvision ``resnet50`` at 1x3x224x224 with L1 masks at 30% on a few dependency sets (first conv of a block
  in each stage, the residual-free ones, so no conflict fixing is timed);
* a tiny LLaMA (``transformers.LlamaConfig``: hidden 64, 8 heads, 2 kv heads, 2 layers, SDPA) with the unit
  masks of :func:`prunescope.unit_masks` at 30% (heads/kv groups and gated-MLP units).

Each call is timed end to end (trace, plan, narrowing, the checks), the two settings interleaved, one torch
thread; the median of ``--repeats`` runs is printed with the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def resnet50():
    import torchvision

    from prunescope.masks import L1FilterPruner

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    names = ["layer1.0.conv1", "layer2.1.conv1", "layer3.2.conv2", "layer4.0.conv1"]
    masks = L1FilterPruner(model, [{"sparsity": 0.3, "op_names": names}]).compute_masks()
    return "resnet50 1x3x224x224, L1 30% on 4 sets", model, x, masks


def tiny_llama():
    from prunescope import unit_masks
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaModel(cfg).eval()
    x = torch.randint(0, 128, (1, 16))
    masks = unit_masks(model, x, 0.3)
    return "tiny LLaMA (2 layers, GQA), unit masks 30%", model, x, masks


def timed(model, masks, x, verify: bool) -> float:
    from prunescope.narrow import shrink

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shrink(model, masks, x, verify=verify)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'model':<44} {'verify=False':>13} {'verify=True':>12} {'ratio':>6}")
    for make in (resnet50, tiny_llama):
        label, model, x, masks = make()
        timed(model, masks, x, True)  # warm-up (and proof that the net passes)
        off, on = [], []
        for _ in range(a.repeats):
            off.append(timed(model, masks, x, False))
            on.append(timed(model, masks, x, True))
        t0, t1 = statistics.median(off), statistics.median(on)
        print(f"{label:<44} {t0:>12.3f}s {t1:>11.3f}s {t1 / t0:>6.2f}")


if __name__ == "__main__":
    main()
