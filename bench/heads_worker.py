"""One model, one tool: remove ~25% of the attention heads, run the smaller model, compare with the masked one.
Prints one JSON line.

``python bench/heads_worker.py TOOL MODEL [RATIO]`` with TOOL in ``prunescope`` or ``torch_pruning`` (run with
prunescope's venv, which has Torch-Pruning installed for the benchmarks only) and MODEL in :data:`MODELS`.

- prunescope: ``HeadDependency(model, x)`` lists the attentions and their units (one head, or one whole kv group
  under GQA); per attention the ``ceil(RATIO * units)`` units with the smallest L2 norm of their q/k/v rows are
  masked (output-channel masks, NNI layout) and ``shrink(model, masks, x, graph=hd.graph)`` builds the copy.
  Nothing else is passed by hand.
- torch_pruning: the head-pruning path of Torch-Pruning's own examples (``examples/transformers/
  prune_timm_vit.py``, ``prune_hf_vit.py``, ``examples/LLMs/prune_llm.py``): a hand-built ``num_heads`` dict
  of the q/k/v layers, ``BasePruner(..., num_heads=..., prune_num_heads=True, prune_head_dims=False,
  head_pruning_ratio=RATIO)``, ``step(interactive=True)``, then the attention attributes the forward reads
  updated by hand as the examples do (timm: the example's replacement ``forward`` is installed first). To
  prune heads only, every other Linear/Conv is in ``ignored_layers`` and ``pruning_ratio=RATIO`` (with
  ``pruning_ratio=0`` ``step`` returns before it reaches the head branch).

The reference for both tools is the dense model with the removed heads zeroed: q rows of every removed query
head, k/v rows of every removed kv head, and the output projection's input columns of every removed query head
(needed for Torch-Pruning's GQA rule, which keeps the kv head a removed query head shared). ``ok`` = the
smaller model runs and keeps the output shape; ``exact`` = its output equals the reference (fp32, rtol 1e-4,
atol 1e-5). Timed inside this process, one torch thread: ``analysis_s`` (HeadDependency / BasePruner built)
and ``prune_s`` (masks + shrink / step + prune + attribute updates) of a second run on a fresh copy;
``cold_s``: analysis + prune of the first run in the process (one-time costs included); imports and model
construction excluded.
MACs and params of both tools' results are counted with prunescope's counter (same formulas for all).
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import time
import traceback
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("timm_vit_small", "hf_vit_tiny", "hf_llama_gqa", "gqa_norope")


class GQAAttention(nn.Module):
    """LLaMA's attention without rotary embeddings (``repeat_kv`` by expand + reshape, causal SDPA): Torch-Pruning's
    dependency graph does not finish on HF LLaMA (its RoPE ``cat``), so this model shows its GQA rule at work."""

    def __init__(self, dim: int = 64, heads: int = 8, kv_heads: int = 2) -> None:
        super().__init__()
        self.head_dim, self.num_key_value_groups = dim // heads, heads // kv_heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        r = self.num_key_value_groups
        k, v = (t[:, :, None].expand(b, t.shape[1], r, n, self.head_dim).reshape(b, -1, n, self.head_dim)
                for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class GQABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.self_attn, self.norm2 = nn.LayerNorm(64), GQAAttention(), nn.LayerNorm(64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64))

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------------- models
def build(name: str):
    """``(model, x, out_fn, spec)``; ``spec``: per attention ``{module, q, k, v, o, heads, kv_heads, head_dim,
    fused}`` written by hand from the model code (used only for the masked reference and the TP recipe)."""
    torch.manual_seed(0)
    if name == "timm_vit_small":
        import timm

        model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
        x = torch.randn(1, 3, 224, 224)
        spec = [dict(module=f"blocks.{i}.attn", q=f"blocks.{i}.attn.qkv", k=f"blocks.{i}.attn.qkv",
                     v=f"blocks.{i}.attn.qkv", o=f"blocks.{i}.attn.proj", heads=b.attn.num_heads,
                     kv_heads=b.attn.num_heads, head_dim=b.attn.head_dim, fused=True)
                for i, b in enumerate(model.blocks)]
        return model, x, (lambda m, x: m(x)), spec
    if name == "hf_vit_tiny":
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        image_size=32, patch_size=8)
        model = ViTModel(cfg, add_pooling_layer=False).eval()
        x = torch.randn(1, 3, 32, 32)
        from transformers.models.vit.modeling_vit import ViTAttention

        spec = [dict(module=n, q=f"{n}.q_proj", k=f"{n}.k_proj", v=f"{n}.v_proj", o=f"{n}.o_proj",
                     heads=m.num_attention_heads, kv_heads=m.num_attention_heads, head_dim=m.head_dim, fused=False)
                for n, m in model.named_modules() if isinstance(m, ViTAttention)]
        return model, x, (lambda m, x: m(pixel_values=x).last_hidden_state), spec
    if name == "hf_llama_gqa":
        from transformers import LlamaConfig, LlamaModel

        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
                          num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
        model = LlamaModel(cfg).eval()
        x = torch.randint(0, 128, (1, 16))
        spec = [dict(module=f"layers.{i}.self_attn", q=f"layers.{i}.self_attn.q_proj",
                     k=f"layers.{i}.self_attn.k_proj", v=f"layers.{i}.self_attn.v_proj",
                     o=f"layers.{i}.self_attn.o_proj", heads=8, kv_heads=2, head_dim=8, fused=False)
                for i in range(cfg.num_hidden_layers)]
        return model, x, (lambda m, x: m(input_ids=x).last_hidden_state), spec
    if name == "gqa_norope":
        model = nn.Sequential(GQABlock(), GQABlock()).eval()
        x = torch.randn(1, 16, 64)
        spec = [dict(module=f"{i}.self_attn", q=f"{i}.self_attn.q_proj", k=f"{i}.self_attn.k_proj",
                     v=f"{i}.self_attn.v_proj", o=f"{i}.self_attn.o_proj", heads=8, kv_heads=2, head_dim=8, fused=False)
                for i in range(2)]
        return model, x, (lambda m, x: m(x)), spec
    raise SystemExit(f"unknown model {name}; choose from {', '.join(MODELS)}")


# ------------------------------------------------------------------------------------ masked reference
def masked_reference(model: nn.Module, spec: list[dict], removed: dict[str, tuple[list[int], list[int]]]):
    """A copy of ``model`` with, per attention ``removed[module] = (query heads, kv heads)``, the q rows of the
    query heads, the k/v rows of the kv heads and the o input columns of the query heads set to zero."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    unknown = set(removed) - {s["module"] for s in spec}
    if unknown:
        raise RuntimeError(f"removed heads in attentions the reference does not know: {sorted(unknown)}")
    with torch.no_grad():
        for s in spec:
            qh, kvh = removed.get(s["module"], ([], []))
            d, attn_dim, kv_dim = s["head_dim"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
            rows = {s["q"]: [], s["k"]: [], s["v"]: []}
            k_off, v_off = (attn_dim, attn_dim + kv_dim) if s["fused"] else (0, 0)
            for h in qh:
                rows[s["q"]] += range(h * d, (h + 1) * d)
            for g in kvh:
                rows[s["k"]] += range(k_off + g * d, k_off + (g + 1) * d)
                rows[s["v"]] += range(v_off + g * d, v_off + (g + 1) * d)
            for layer, r in rows.items():
                if r:
                    mods[layer].weight[r] = 0
                    if mods[layer].bias is not None:
                        mods[layer].bias[r] = 0
            cols = [c for h in qh for c in range(h * d, (h + 1) * d)]
            if cols:
                mods[s["o"]].weight[:, cols] = 0
    return ref


# ------------------------------------------------------------------------------------------- prunescope
def run_prunescope(model, x, spec, ratio):
    from prunescope.narrow import shrink
    from prunescope.topology import HeadDependency

    t0 = time.perf_counter()
    hd = HeadDependency(model, x)
    t1 = time.perf_counter()
    mods = dict(model.named_modules())
    keep: dict[str, torch.Tensor] = {}
    removed: dict[str, tuple[list[int], list[int]]] = {}
    units_info = []
    for a in hd.attentions:
        units_info.append(dict(module=a.module, q=a.q, k=a.k, v=a.v, o=a.o, heads=a.heads, head_dim=a.head_dim,
                               kv_heads=a.kv_heads, units=[len(u) for u in a.units], pinned=a.pinned))
        if not a.units:
            continue
        n = math.ceil(ratio * len(a.units))
        for layer in dict.fromkeys((a.q, a.k, a.v)):
            keep.setdefault(layer, torch.ones(mods[layer].out_features))

        def rows(u, a=a):
            kv = sorted({a.kv_group[j] for j in u})
            return ([(a.q, c) for j in u for c in a.q_channels[j]] + [(a.k, c) for g in kv for c in a.k_channels[g]]
                    + [(a.v, c) for g in kv for c in a.v_channels[g]])

        def norm(u):
            return sum(float(mods[layer].weight[c].pow(2).sum()) for layer, c in rows(u))

        gone = sorted(a.units, key=norm)[:n]
        qh = sorted(j for u in gone for j in u)
        kvh = sorted({a.kv_group[j] for j in qh} - {a.kv_group[j] for j in range(a.heads) if j not in qh})
        for u in gone:
            for layer, c in rows(u):
                keep[layer][c] = 0
        removed[a.module] = (qh, kvh)
    masks = {layer: {"weight": k[:, None].expand_as(mods[layer].weight).clone(),
                     "bias": k.clone() if mods[layer].bias is not None else None} for layer, k in keep.items()}
    small = shrink(model, masks, x, graph=hd.graph)
    t2 = time.perf_counter()
    return small, removed, {"analysis_s": t1 - t0, "prune_s": t2 - t1, "units": units_info,
                            "by_hand": "nothing (HeadDependency finds q/k/v/o, heads, kv groups; shrink updates "
                                       "the attributes)"}


# ----------------------------------------------------------------------------------------- Torch-Pruning
def _timm_example_forward(self, x, attn_mask=None, is_causal=False):
    """The replacement ``Attention.forward`` of Torch-Pruning's examples/transformers/prune_timm_vit.py, with one
    change: it accepts (and, like the example, ignores) ``attn_mask``/``is_causal``, which timm 1.0.31's
    ``Block`` passes (the example's ``forward(self, x)`` fails there with "unexpected keyword argument
    'attn_mask'"). Both are None/False in vit_small."""
    assert attn_mask is None and not is_causal
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p)
    else:
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
    x = x.transpose(1, 2).reshape(B, N, -1)  # original implementation: x = x.transpose(1, 2).reshape(B, N, C)
    x = self.proj(x)
    x = self.proj_drop(x)
    return x


def run_torch_pruning(model, x, spec, ratio, model_name):
    import torch_pruning as tp

    mods = dict(model.named_modules())
    names = {m: n for n, m in mods.items()}
    t0 = time.perf_counter()
    num_heads: dict[nn.Module, int] = {}
    kw: dict = {}
    if model_name == "timm_vit_small":  # as prune_timm_vit.py
        import timm

        for m in model.modules():
            if isinstance(m, timm.layers.Attention):
                m.forward = types.MethodType(_timm_example_forward, m)
                num_heads[m.qkv] = m.num_heads
        imp = tp.importance.GroupMagnitudeImportance(p=1)
        by_hand = ("num_heads={qkv: num_heads}; Attention.forward replaced by the example's (reshape(B, N, -1); "
                   "made to accept attn_mask for timm 1.0.31); after: num_heads, head_dim set per Attention")
    elif model_name == "hf_vit_tiny":  # as prune_hf_vit.py (transformers 5: ViTAttention, q_proj/k_proj/v_proj)
        from transformers.models.vit.modeling_vit import ViTAttention

        for m in model.modules():
            if isinstance(m, ViTAttention):
                for p in (m.q_proj, m.k_proj, m.v_proj):
                    num_heads[p] = m.num_attention_heads
        imp = tp.importance.MagnitudeImportance(p=1)
        kw["output_transform"] = lambda o: o.last_hidden_state
        by_hand = ("num_heads={q,k,v: num_attention_heads}; output_transform; after: num_attention_heads set "
                   "(the example's ViTSelfAttention/query/attention_head_size/all_head_size are gone in "
                   "transformers 5)")
    else:  # as prune_llm.py
        for n, m in model.named_modules():
            if n.endswith("self_attn"):
                num_heads[m.q_proj] = m.q_proj.out_features // m.head_dim
                num_heads[m.k_proj] = m.k_proj.out_features // m.head_dim
                num_heads[m.v_proj] = m.v_proj.out_features // m.head_dim
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
        if model_name == "hf_llama_gqa":
            kw["output_transform"] = lambda o: o.last_hidden_state
        by_hand = ("num_heads={q: heads, k/v: kv_heads}" + ("; output_transform" if kw else "")
                   + "; after: num_key_value_groups" + (", config.num_attention_heads" if kw else "") + " set")
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in num_heads]
    given = {names[m]: h for m, h in num_heads.items()}
    pruner = tp.pruner.BasePruner(model, x, importance=imp, global_pruning=False, pruning_ratio=ratio,
                                  ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
                                  prune_head_dims=False, head_pruning_ratio=ratio, round_to=1, **kw)
    t1 = time.perf_counter()
    groups, removed_ch = [], {}
    for g in pruner.step(interactive=True):
        _, qkv = pruner._is_atten_group(g)
        groups.append([names[m] for m in qkv])
        for dep, idxs in g:
            if dep.target.module in num_heads and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                removed_ch.setdefault(names[dep.target.module], []).extend(int(i) for i in idxs)
        g.prune()
    removed = {}
    for s in spec:
        d = s["head_dim"]
        if s["fused"]:
            ch = removed_ch.get(s["q"], [])
            qh = sorted({c // d for c in ch if c < s["heads"] * d})
            kvh = sorted({(c - s["heads"] * d) // d for c in ch if s["heads"] * d <= c < 2 * s["heads"] * d})
        else:
            qh = sorted({c // d for c in removed_ch.get(s["q"], [])})
            kvh = sorted({c // d for c in removed_ch.get(s["k"], [])})
        removed[s["module"]] = (qh, kvh)
    # the attribute updates of the examples
    if model_name == "timm_vit_small":
        import timm

        for m in model.modules():
            if isinstance(m, timm.layers.Attention):
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
    elif model_name == "hf_vit_tiny":
        from transformers.models.vit.modeling_vit import ViTAttention

        for m in model.modules():
            if isinstance(m, ViTAttention):
                m.num_attention_heads = pruner.num_heads[m.q_proj]
    else:
        for n, m in model.named_modules():
            if n.endswith("self_attn"):
                heads = m.q_proj.out_features // m.head_dim
                m.num_key_value_groups = heads // (m.k_proj.out_features // m.head_dim)
                if hasattr(model, "config"):
                    model.config.num_attention_heads = heads
    t2 = time.perf_counter()
    after = {names[m]: h for m, h in pruner.num_heads.items()}
    units = [dict(group=gr, num_heads_given={n: given[n] for n in gr}, num_heads_after={n: after[n] for n in gr})
             for gr in groups]
    return model, removed, {"analysis_s": t1 - t0, "prune_s": t2 - t1, "units": units, "by_hand": by_hand}


# ----------------------------------------------------------------------------------------------------- main
class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout("did not finish within the time limit")


def main() -> None:
    warnings.simplefilter("ignore")
    tool, name = sys.argv[1], sys.argv[2]
    ratio = float(sys.argv[3]) if len(sys.argv) > 3 else 0.25
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    torch.set_num_threads(1)
    model, x, out, spec = build(name)
    from prunescope.flops import flops_report

    with torch.no_grad():
        want = out(model, x)
    dense = flops_report(model, x)
    dense_model = copy.deepcopy(model)  # Torch-Pruning prunes in place; the reference is built from this copy
    res: dict = {"tool": tool, "model": name, "macs_dense": dense.total_flops, "params_dense": dense.total_params,
                 "heads_dense": sum(s["heads"] for s in spec), "kv_heads_dense": sum(s["kv_heads"] for s in spec)}
    if limit:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit)
    t0 = time.perf_counter()
    try:
        if tool == "prunescope":
            def fn(m):
                return run_prunescope(m, x, spec, ratio)
        elif tool == "torch_pruning":
            def fn(m):
                return run_torch_pruning(m, x, spec, ratio, name)
        else:
            raise SystemExit(f"unknown tool {tool}")
        # twice, each on its own copy: the first call in a process pays one-time costs (lazy imports, first
        # meta-device trace: ~2 s for prunescope on a model whose library did not warm them up)
        _, _, cold = fn(copy.deepcopy(model))
        small, removed, info = fn(copy.deepcopy(model))
        signal.alarm(0)
        res.update(info)
        res["cold_s"] = cold["analysis_s"] + cold["prune_s"]
        res["removed"] = {k: {"q_heads": v[0], "kv_heads": v[1]} for k, v in removed.items()}
        res["heads_removed"] = sum(len(v[0]) for v in removed.values())
        res["kv_heads_removed"] = sum(len(v[1]) for v in removed.values())
        with torch.no_grad():
            got = out(small, x)
            ref = out(masked_reference(dense_model, spec, removed), x)
        res["ok"] = got.shape == want.shape
        if not res["ok"]:
            res["error"] = f"output shape {tuple(got.shape)} instead of {tuple(want.shape)}"
        else:
            res["max_abs_diff"] = float((got - ref).abs().max())
            res["ref_vs_dense"] = float((ref - want).abs().max())  # > 0: the reference did remove something
            res["exact"] = bool(torch.allclose(got, ref, rtol=1e-4, atol=1e-5))
            rep = flops_report(small, x)
            res["macs"], res["params"] = rep.total_flops, rep.total_params
    except Exception as e:  # noqa: BLE001 - the benchmark records every failure
        signal.alarm(0)
        res.setdefault("seconds", time.perf_counter() - t0)
        res["ok"] = False
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        res["error"] = f"{type(e).__name__}: {msg}"
        tb = traceback.extract_tb(e.__traceback__)
        res["where"] = [f"{f.filename.split('site-packages/')[-1].split('/src/')[-1]}:{f.lineno} {f.name}"
                        for f in tb[-3:]]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
