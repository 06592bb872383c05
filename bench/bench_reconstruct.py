"""Benchmark: post-training reconstruction (issue 17) — time and peak memory vs model size, and accuracy at
fixed masks on the digits CNN (L1 vs activation unit scores, with and without reconstruction).

``python bench/bench_reconstruct.py [--cases digits,vit-digits,resnet50,llama-s,llama-m,llama-0.5b,count]
[--json out.json]``; a case name with ``:old`` (``resnet50:old``) runs the whole-model path (``block_cache_mb=0``:
every pass reruns the shrunk model from its input) instead of the block chain.

* ``resnet50``: torchvision, random weights, 1x3x224x224, half of every prunable dependency set removed
  (``unit_masks``, L1), calibration 4 batches of 2 images (random inputs: time and memory only).
* ``llama-*``: ``LlamaForCausalLM`` from a config (GQA, 4 query heads per kv head), half of the heads (whole kv
  groups) and half of the MLP units removed, calibration 8 sequences x 512 tokens in 4 batches (4,096 rows: at
  least 4 per unknown up to 1,024 inputs, so no layer needs the ridge cross-validation). ``llama-0.5b``: hidden
  1,024, 24 layers, 16 heads / 4 kv heads, MLP 5,120, vocab 32,000 (506 M parameters), 16 sequences x 128
  tokens in 2 batches with a fixed ridge (1e-3: no cross-validation), so that one run fits the shared machine;
  ``llama-0.5b-d2/4/8``: its blocks at depth 2/4/8.
* ``count``: block forwards started per calibration batch, block chain vs whole-model path, on a narrow LLaMA
  (hidden 64) at depth 6/12/24 with the same pruning (the counts do not depend on the width).
* ``digits``: the embedded CNN trained here; 50 / 62.5 / 75 % of every prunable set removed; calibration =
  128 unlabeled training inputs (three seeded draws, mean); held-out accuracy as-pruned, after BatchNorm
  re-estimation, after reconstruction, for L1 and activation (Wanda-sp/FLAP) scores.
* ``vit-digits``: the embedded ViT (cached weights); 25 / 50 % of the heads and MLP units, 256 inputs.

Measured on a 2-core machine shared with 6 other jobs (load 7-8: this process got 15-40 % of a core, so wall
times are inflated several-fold and vary run to run), one torch thread, back to back:

* block forwards per batch (``count``): 6 layers 47 (chain) vs 96 (whole model); 12 layers 95 vs 336; 24 layers
  191 vs 1,248 — ``8·L − 1`` vs ``2·L² + 4·L``.
* resnet50 (25.6 M params, 54 layers, 50 passes, a chain of 16 bottlenecks, cache ~6 MB): 116 s, +0.52 GB
  (chain) vs 150 s, +0.73 GB (whole model). Both are dominated by the Gram matrices of 3x3 patches; the dense
  targets already fit the 1 GB cache, so the whole-model path's dense side was linear before too.
* llama-0.5b-d2 / d4 / d8 (16 x 128 tokens, cross-validated ridge): chain 203 / 132 / 321 s, whole model
  86 / 139 s (d8 not finished): at this size and calibration the ridge cross-validation's eigendecompositions
  (4 folds x 5 layers of 1,024 inputs per block) dominate both paths, and the machine's load swung between runs.
* llama-0.5b (506 M params; 168 layers in 96 passes, a chain of 24 decoder layers, cache ~16 MB; 2 batches of
  8 x 128 tokens): 549 s (refit 534 s), peak RSS 7.8 GB (+3.1 GB over the dense model, its trace and the
  shrunk copy); one shrunk block forward on a batch took 0.45 s. The whole-model path was not run at this
  size; extrapolated from the counts above: ~1,060 more shrunk block forwards per batch (24 layers: 1,248 vs
  191) ≈ +950 s, and as many dense ones (its dense targets, ~1.6 GB, exceed the 1 GB target cache) ≈ +1,700 s
  at about twice the cost each, so roughly 3,000 s before vs 549 s now on the same machine.

Earlier (before the block chain, load ~11): llama-s 25 s, +0.4 GB; llama-m (123 M) 343 s, +1.7 GB.

Each case runs in its own process (one torch thread); peak memory is the process's maximum resident set size
(``ru_maxrss``) measured before the reconstruction and at its end, so the difference is what it added.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA = {  # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "llama-s": (512, 4, 8, 2, 1408, 8000),
    "llama-m": (1024, 8, 16, 4, 2816, 16000),
    "llama-l": (2048, 8, 16, 4, 5632, 32000),
    "llama-0.5b": (1024, 24, 16, 4, 5120, 32000),  # 506 M parameters (440 M in the 24 blocks)
}
for _d in (2, 4, 8):  # the 0.5B model's blocks at smaller depths: the old (whole-model) path's growth with depth
    LLAMA[f"llama-0.5b-d{_d}"] = (1024, _d, 16, 4, 5120, 32000)
CALIB = {"llama-0.5b": (16, 128, 8)}  # (sequences, tokens, sequences per batch); default (8, 512, 2)
RIDGE = {"llama-0.5b": 1e-3}  # a fixed ridge: no cross-validation (its eigendecompositions are not the point here)
for _d in (2, 4, 8):
    CALIB[f"llama-0.5b-d{_d}"] = (16, 128, 8)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _case_resnet50(block_cache_mb: float) -> dict:
    import torch
    import torchvision

    from prunescope import unit_masks
    from prunescope.narrow import reconstruct

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    masks = unit_masks(model, x, 0.5)
    calib = [torch.randn(2, 3, 224, 224) for _ in range(4)]
    params = sum(p.numel() for p in model.parameters())
    before = _rss_mb()
    t = time.perf_counter()
    small, res = reconstruct(model, masks, x, calib, return_result=True, block_cache_mb=block_cache_mb)
    total = time.perf_counter() - t
    r = res.reconstruction
    return {"case": "resnet50", "blocks": len(r.blocks), "block_cache_MB": r.block_cache_mb,
            "params_M": params / 1e6, "calib": "4 x 2 images 224x224",
            "layers_refit": len(r.layers), "passes": r.passes, "seconds_total": total, "seconds_refit": r.seconds,
            "rss_before_MB": before, "rss_peak_MB": _rss_mb()}


def _case_llama(name: str, block_cache_mb: float) -> dict:
    import torch

    import transformers
    from prunescope import head_masks, unit_masks
    from prunescope.graph import trace
    from prunescope.narrow import reconstruct

    hidden, layers, heads, kv, inter, vocab = LLAMA[name]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                                   max_position_embeddings=1024, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = {"input_ids": torch.randint(0, vocab, (1, 16))}
    g = trace(model, x)
    masks = head_masks(model, x, 0.5, graph=g)
    masks.update(unit_masks(model, x, 0.5, graph=g,
                            layers=[n for n, _ in model.named_modules() if n.endswith("mlp.up_proj")]))
    n_seq, n_tok, per = CALIB.get(name, (8, 512, 2))
    calib = [{"input_ids": torch.randint(0, vocab, (per, n_tok))} for _ in range(n_seq // per)]
    params = sum(p.numel() for p in model.parameters())
    before = _rss_mb()
    t = time.perf_counter()
    small, res = reconstruct(model, masks, x, calib, graph=g, return_result=True, block_cache_mb=block_cache_mb,
                             ridge=RIDGE.get(name))
    total = time.perf_counter() - t
    r = res.reconstruction
    blk = _time_block(small, small.model.layers[0], calib[0])
    return {"case": name, "shrunk_block_s": blk, "params_M": params / 1e6, "config": dict(zip(
        ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"), LLAMA[name])),
        "calib": f"{n_seq // per} batches x {per} sequences x {n_tok} tokens", "blocks": len(r.blocks),
        "block_cache_MB": r.block_cache_mb, "layers_refit": len(r.layers), "passes": r.passes,
        "seconds_total": total, "seconds_refit": r.seconds, "rss_before_MB": before, "rss_peak_MB": _rss_mb()}


def _time_block(model, block, batch: dict) -> float:
    """Seconds of one forward of ``block`` on its input from ``batch`` (median of 3): the unit of the
    whole-model path's extra cost."""
    import torch

    got = []
    h = block.register_forward_pre_hook(lambda m, a, k: got.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        try:
            model(**batch, use_cache=False)
        finally:
            h.remove()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            block(*got[0][0], **got[0][1])
            ts.append(time.perf_counter() - t)
    return sorted(ts)[1]


def _case_count() -> dict:
    """Block forwards started per calibration batch, block path vs whole-model path, on a narrow LLaMA with the
    0.5B model's depth (24) and the same pruning (counts do not depend on the width)."""
    import torch

    import transformers
    from prunescope import head_masks, unit_masks
    from prunescope.graph import trace
    from prunescope.narrow import refit, shrink

    calls = [0]
    cls = transformers.models.llama.modeling_llama.LlamaDecoderLayer
    fwd = cls.forward

    def counted(self, *a, **k):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return fwd(self, *a, **k)

    cls.forward = counted
    rows = []
    for depth in (6, 12, 24):
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=depth,
                                       num_attention_heads=16, num_key_value_heads=4, intermediate_size=320,
                                       max_position_embeddings=64)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        x = {"input_ids": torch.randint(0, 256, (1, 16))}
        g = trace(model, x)
        masks = head_masks(model, x, 0.5, graph=g)
        masks.update(unit_masks(model, x, 0.5, graph=g,
                                layers=[n for n, _ in model.named_modules() if n.endswith("mlp.up_proj")]))
        calib = [{"input_ids": torch.randint(0, 256, (4, 16))} for _ in range(2)]
        small, res = shrink(model, masks, x, graph=g, return_result=True)
        row = {"layers": depth}
        for key, mb in (("blocks", 4096.0), ("whole_model", 0.0)):
            s = copy.deepcopy(small)
            calls[0] = 0
            refit(model, s, res.plan, calib, block_cache_mb=mb)
            row[key] = calls[0] / len(calib)
        rows.append(row)
    cls.forward = fwd
    return {"case": "count", "rows": rows}


def _case_digits() -> dict:
    import numpy as np
    import torch

    from prunescope import unit_masks
    from prunescope.examples import digits
    from prunescope.narrow import reconstruct, shrink
    from prunescope.report.recovery import recalibrate_bn

    model = digits.train()
    xt = digits.load_data()[0]
    draws = [xt[torch.randperm(len(xt), generator=torch.Generator().manual_seed(s))[:128]] for s in (1, 2, 3)]
    x = torch.ones(digits.INPUT_SIZE)
    rows = []
    for sp in (0.5, 0.625, 0.75):
        for score in ("l1", "activation"):
            acc: dict[str, list[float]] = {"as_pruned": [], "bn": [], "reconstructed": []}
            secs = []
            for calib in draws:
                masks = unit_masks(model, x, sp, prune_type=score, calibration=[calib])
                plain = shrink(model, masks, x)
                acc["as_pruned"].append(digits.evaluate(plain))
                recalibrate_bn(plain, [calib])
                acc["bn"].append(digits.evaluate(plain))
                t = time.perf_counter()
                small = reconstruct(model, masks, x, [calib])
                secs.append(time.perf_counter() - t)
                acc["reconstructed"].append(digits.evaluate(small))
            rows.append({"sparsity": sp, "score": score, **{k: float(np.mean(v)) for k, v in acc.items()},
                         "reconstructed_each": acc["reconstructed"], "seconds": float(np.mean(secs))})
    return {"case": "digits", "dense": digits.evaluate(model), "rows": rows}


def _case_vit() -> dict:
    import numpy as np
    import torch

    from prunescope import head_masks, unit_masks
    from prunescope.examples import digits, vit_digits
    from prunescope.graph import trace
    from prunescope.narrow import reconstruct, shrink

    model = vit_digits.load_trained()
    xt = digits.load_data()[0]
    draws = [xt[torch.randperm(len(xt), generator=torch.Generator().manual_seed(s))[:256]] for s in (1, 2, 3)]
    x = torch.ones(digits.INPUT_SIZE)
    g = trace(model, x)
    fc1 = [n for n, _ in model.named_modules() if n.endswith("mlp.fc1")]
    rows = []
    for sp in (0.25, 0.5):
        for score in ("l1", "activation"):
            acc: dict[str, list[float]] = {"as_pruned": [], "reconstructed": []}
            for calib in draws:
                masks = head_masks(model, x, sp, graph=g, prune_type=score, calibration=[calib])
                masks.update(unit_masks(model, x, sp, layers=fc1, graph=g, prune_type=score, calibration=[calib]))
                acc["as_pruned"].append(digits.evaluate(shrink(model, masks, x, graph=g)))
                acc["reconstructed"].append(digits.evaluate(reconstruct(model, masks, x, [calib], graph=g)))
            rows.append({"sparsity": sp, "score": score, **{k: float(np.mean(v)) for k, v in acc.items()}})
    return {"case": "vit-digits", "dense": digits.evaluate(model), "rows": rows}


def _worker(case: str) -> None:
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    old = case.endswith(":old")  # the whole-model path (every pass reruns the model from its input)
    case = case.removesuffix(":old")
    mb = 0.0 if old else 4096.0
    if case == "resnet50":
        out = _case_resnet50(mb)
    elif case.startswith("llama"):
        out = _case_llama(case, mb)
    elif case == "count":
        out = _case_count()
    elif case == "digits":
        out = _case_digits()
    elif case == "vit-digits":
        out = _case_vit()
    else:
        raise SystemExit(f"unknown case {case!r}")
    if old:
        out["case"] += ":old"
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="digits,vit-digits,resnet50,llama-s,llama-m")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return
    results = []
    for case in a.cases.split(","):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", case], capture_output=True,
                               text=True, timeout=a.timeout, env=env)
        except subprocess.TimeoutExpired:
            print(f"{case}: > {a.timeout:.0f} s")
            continue
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            print(f"{case}: failed\n{p.stderr[-2000:]}")
            continue
        r = json.loads(lines[-1])
        results.append(r)
        if case == "count":
            print("block forwards started per calibration batch (narrow LLaMA, 0.5B model's pruning)")
            for row in r["rows"]:
                print(f"  {row['layers']:>3} layers: blocks {row['blocks']:.0f}, whole-model {row['whole_model']:.0f}")
        elif case == "digits":
            print(f"digits (dense {r['dense']:.3f}); mean of 3 draws of 128 unlabeled inputs")
            print(f"{'removed':>8} {'score':>10} {'as-pruned':>10} {'BN re-est.':>10} {'reconstr.':>10} {'s':>6}")
            for row in r["rows"]:
                print(f"{row['sparsity']:>8.3f} {row['score']:>10} {row['as_pruned']:>10.3f} {row['bn']:>10.3f} "
                      f"{row['reconstructed']:>10.3f} {row['seconds']:>6.2f}")
        elif case == "vit-digits":
            print(f"vit-digits (dense {r['dense']:.3f}); heads + MLP units; mean of 3 draws of 256 unlabeled inputs")
            print(f"{'removed':>8} {'score':>10} {'as-pruned':>10} {'reconstr.':>10}")
            for row in r["rows"]:
                print(f"{row['sparsity']:>8.3f} {row['score']:>10} {row['as_pruned']:>10.3f} "
                      f"{row['reconstructed']:>10.3f}")
        else:
            print(f"{case}: {r['params_M']:.1f} M params, {r['calib']}, {r['layers_refit']} layers in {r['passes']} "
                  f"passes, {r['blocks']} blocks (cache ~{r['block_cache_MB']:.0f} MB), reconstruct "
                  f"{r['seconds_total']:.1f} s (refit {r['seconds_refit']:.1f} s), peak RSS "
                  f"{r['rss_peak_MB']:.0f} MB (+{r['rss_peak_MB'] - r['rss_before_MB']:.0f} MB)"
                  + (f"; one shrunk block forward {r['shrunk_block_s']:.2f} s" if "shrunk_block_s" in r else ""),
                  flush=True)
    if a.json:
        sys.path.insert(0, os.path.join(HERE, "..", "src"))
        from prunescope._io import atomic_open

        with atomic_open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
