"""Benchmark: attention-head pruning side by side with Torch-Pruning 1.6.1 (its own ViT and LLaMA head paths).

``python bench/bench_heads.py [--models a,b] [--tools prunescope,torch_pruning] [--ratio 0.25] [--limit 90]``
(or ``bench/run_all.py heads``). Models, built from configs with random weights: timm ``vit_small_patch16_224``
(pretrained=False), HF ``ViTModel`` tiny (hidden 64, 4 heads, 2 layers, 32x32 images, no pooler), HF
``LlamaModel`` tiny GQA (hidden 64, 8 heads, 2 kv heads, 2 layers; SDPA, the transformers 5 default) and
``gqa_norope``: LLaMA's attention without RoPE (``repeat_kv``, causal SDPA) in a 2-block model, because
Torch-Pruning does not finish on HF LLaMA (below), so that its GQA rule can be seen running.

Each (tool, model) runs in its own process (``bench/heads_worker.py``, one torch thread; its docstring has the
recipes). prunescope: ``HeadDependency`` units, ``ceil(ratio * units)`` units per attention with the smallest
q/k/v norm masked, ``shrink``. Torch-Pruning: the recipe of ``examples/transformers/prune_timm_vit.py``,
``prune_hf_vit.py`` and ``examples/LLMs/prune_llm.py`` (hand-written ``num_heads`` dict, ``BasePruner(...,
prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)``, attributes updated by hand after),
with every other layer ignored so that only heads go. Both results are compared with the dense model in which
the removed heads are zeroed (q rows, k/v rows of removed kv heads, o input columns); MACs/params by
prunescope's counter for both; ``analysis`` = HeadDependency / BasePruner built, ``prune`` = masks + shrink /
step + prune + attribute updates. A run whose analysis + prune exceeds ``--limit`` seconds is stopped and
recorded with the place it was in.

Findings on the versions installed here (torch 2.14.1 CPU, transformers 5.24, timm 1.0.31, Torch-Pruning 1.6.1
— ``tp.__version__`` says 1.6.0, the code is tag v1.6.1):

- Units. prunescope finds every attention from the trace with nothing passed by hand (q/k/v/o, heads, head_dim,
  kv groups; a unit = one head, or one whole kv group under GQA). Torch-Pruning needs the user to name the
  q/k/v layers and their head counts (``num_heads`` dict), to set the attention attributes after pruning, and,
  for timm, to replace ``Attention.forward`` (the example's replacement takes no ``attn_mask`` and fails on timm
  1.0.31: "unexpected keyword argument 'attn_mask'"; the bench passes one that accepts it). ``prune_hf_vit.py``
  is written for transformers 4 (``ViTSelfAttention``, ``query``, ``attention_head_size``): none of these exist
  in transformers 5, the bench uses ``ViTAttention.q_proj/k_proj/v_proj``. With ``pruning_ratio=0`` its
  ``step()`` prunes no head at all (the head branch sits in the width loop); head-only pruning needs
  ``pruning_ratio > 0`` and all other layers ignored.
- GQA rule. prunescope removes whole kv groups (a kv head and its query heads; ``num_key_value_groups`` and
  ``head_dim`` stay), so with 2 kv heads the smallest step is 50% of the heads. Torch-Pruning keeps every kv
  head and removes ``ceil(ceil(ratio * heads) / kv_heads)`` query heads from each group (the k/v indices of
  the group are emptied), so ``num_key_value_groups`` must be changed by hand; its pruned model runs and
  equals the masked model (gqa_norope). The two rules are different unit sets, not a faster/slower answer.
- HF LLaMA: Torch-Pruning's ``BasePruner`` does not finish building its groups
  (``DependencyGraph._fix_dependency_graph_non_recursive``); the q_proj group grows past 20,000 entries in a
  1-layer model, through RoPE's ``rotate_half`` ``cat`` and the mul/add around it, with or without GQA and with
  eager or SDPA attention (measured once by hand; compare Torch-Pruning issue #456, same loop on CogVideoX).
- timm ViT: prunescope's shrink works on the unmodified timm model and equals the masked model; its
  ``AttentionHeads.pinned`` still lists "'reshape' writes the size 6 of a channel-carrying axis" for every
  block (shrink updates ``num_heads``), i.e. ``pinned`` is over-cautious there.

Timings come from a machine shared by several engineers (2 cores, loaded): read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("timm_vit_small", "hf_vit_tiny", "hf_llama_gqa", "gqa_norope")


def run_one(tool: str, model: str, ratio: float, limit: int) -> dict:
    timeout = limit + 180  # model construction, dense counts and imports come on top of the limit
    try:
        p = subprocess.run([sys.executable, os.path.join(HERE, "heads_worker.py"), tool, model, str(ratio),
                            str(limit)], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return {"tool": tool, "model": model, "ok": False, "error": f"process > {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"tool": tool, "model": model, "ok": False, "error": tail[:200]}
    return json.loads(lines[-1])


def units_text(r: dict) -> str:
    """One line per tool: what it found per attention (identical attentions folded)."""
    if r["tool"] == "prunescope":
        kinds: dict[str, int] = {}
        for a in r.get("units", []):
            k = (f"{a['heads']}h x {a['head_dim']}, kv {a['kv_heads']}, units {len(a['units'])} of "
                 f"{sorted(set(a['units']))} q-heads" + (", pinned note" if a["pinned"] else ""))
            kinds[k] = kinds.get(k, 0) + 1
        return "; ".join(f"{n} x [{k}]" for k, n in kinds.items()) or "no attention found"
    kinds = {}
    for g in r.get("units", []):
        heads = ", ".join(f"{n.rsplit('.', 1)[-1]} {g['num_heads_given'][n]}->{g['num_heads_after'][n]}"
                          for n in sorted(g["num_heads_given"], key=lambda n: "qkv".find(n.rsplit(".", 1)[-1][:1])))
        k = f"group of {len(g['group'])} layer(s), num_heads {heads}"
        kinds[k] = kinds.get(k, 0) + 1
    return "; ".join(f"{n} x [{k}]" for k, n in kinds.items()) or "no attention group"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tools", default="prunescope,torch_pruning")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--limit", type=int, default=90, help="seconds for analysis + prune per run")
    a = ap.parse_args(argv if argv is not None else [])
    tools = [t for t in a.tools.split(",") if t]
    if "torch_pruning" in tools:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            print("(Torch-Pruning skipped: pip install torch-pruning==1.6.1 into this interpreter)")
            tools.remove("torch_pruning")
    models = [m for m in a.models.split(",") if m]
    print(f"head pruning, ratio {a.ratio}, one torch thread per run; timings on a loaded shared machine "
          "(compare ratios within this run)")
    hdr = (f"{'model':<15}{'tool':<14}{'heads q/kv removed':>19}{'runs':>6}{'==masked':>9}{'max|diff|':>10}"
           f"{'MACs':>7}{'params':>8}{'analysis s':>11}{'prune s':>9}{'cold s':>8}")
    print(hdr)
    print("-" * len(hdr))
    results: dict[str, dict[str, dict]] = {}
    for m in models:
        for t in tools:
            r = run_one(t, m, a.ratio, a.limit)
            results.setdefault(m, {})[t] = r
            if r.get("ok"):
                rem = f"{r['heads_removed']}/{r['heads_dense']}, {r['kv_heads_removed']}/{r['kv_heads_dense']}"
                print(f"{m:<15}{t:<14}{rem:>19}{'yes':>6}{'yes' if r['exact'] else 'NO':>9}"
                      f"{r['max_abs_diff']:>10.1e}{r['macs'] / r['macs_dense']:>7.3f}"
                      f"{r['params'] / r['params_dense']:>8.3f}{r['analysis_s']:>11.3f}{r['prune_s']:>9.3f}"
                      f"{r['cold_s']:>8.2f}",
                      flush=True)
            else:
                where = (r.get("where") or [""])[0]
                print(f"{m:<15}{t:<14}  FAIL {r.get('error', '')[:70]}" + (f"  [{where}]" if where else ""),
                      flush=True)
    print("\n(MACs, params: ratio to the dense model; ==masked: output equals the dense model with the removed "
          "heads zeroed, rtol 1e-4, atol 1e-5; analysis/prune: a second run on a fresh copy; cold: analysis + prune of "
          "the first run in the process)")
    print("\nunits found per model:")
    for m, by_tool in results.items():
        for t, r in by_tool.items():
            if "units" in r:
                print(f"  {m:<15}{t:<14}{units_text(r)}")
            if "by_hand" in r:
                print(f"  {'':<15}{'':<14}by hand: {r['by_hand']}")
    print("\nprunescope (analysis + prune) / Torch-Pruning (analysis + prune), second runs, same bench run:")
    for m, by_tool in results.items():
        p, q = by_tool.get("prunescope", {}), by_tool.get("torch_pruning", {})
        if p.get("ok") and q.get("ok"):
            ps, ts = p["analysis_s"] + p["prune_s"], q["analysis_s"] + q["prune_s"]
            print(f"  {m:<15}{ps / ts:6.2f}  ({ps:.2f} s vs {ts:.2f} s)")
        elif p.get("ok"):
            print(f"  {m:<15}  -     (Torch-Pruning: {q.get('error', 'not run')[:60]})")


if __name__ == "__main__":
    main(sys.argv[1:])
