"""Unit tables (heads, head_dim, kv heads, units, tied layers, pins) of real attention implementations.

Hand-derived from the configs and the attention code of each library:

* BERT, GPT-2, LLaMA-GQA tiny configs: the tables of ``test_head_dependency.EXPECTED`` (not repeated here),
  plus: no layer outside q/k/v/o is tied to a head, nothing pins a head.
* T5 (d_model 32, d_kv 8, 4 heads, 2 + 2 layers): ``view(B, L, -1, d_kv)`` makes every head one unit of 8 q/k/v
  channels. Self attention adds the relative position bias computed once per stack by block 0's
  ``relative_attention_bias`` (Embedding(32 buckets, 4 heads), column h = head h) and reused by block 1: head h
  of both blocks and bias column h are one unit (``tied``). Cross attention adds ``torch.zeros(1, n_heads, ..)``
  (no bias): a fixed-size operand, so its heads are listed as units but pinned.
* torchvision ``vit_b_16`` (real sizes, meta device): 12 ``nn.MultiheadAttention`` of 12 heads x 64; head h =
  rows 64h.. of ``in_proj_weight`` for q, 768 + 64h.. for k, 1536 + 64h.. for v, columns 64h.. of ``out_proj``;
  pinned (``F.multi_head_attention_forward`` derives head_dim = embed_dim // num_heads). MLP hidden units are
  free: every ``mlp.0`` is a set of its own, not unsafe.
* torchvision ``swin_t``: 12 window attentions (depths 2, 2, 6, 2; heads 3, 6, 12, 24; head_dim 32), the five
  shifted ones included (their scores are viewed per window to add the shift mask); the fused ``qkv`` holds q, k,
  v at offsets 0, C, 2C; heads pinned by ``reshape(B, N, 3, heads, C // heads)`` (sizes written).
* timm ``vit_small_patch16_224`` / ``deit_tiny_patch16_224``: 12 blocks of 6 / 3 heads x 64, fused ``qkv``
  (offsets 0, 384, 768 / 0, 192, 384), ``proj``; ``fused_attn`` switches SDPA and eager: same table. Heads
  pinned by ``reshape(B, N, 3, self.num_heads, self.head_dim)`` (sizes read from attributes are literals in a
  trace).

Every model: equal tables with eager and SDPA attention, no TopologyWarning.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from test_attention_topology import tiny  # noqa: E402
from test_head_dependency import EXPECTED, heads  # noqa: E402
from test_units_beyond_heads import t5  # noqa: E402

from prunescope.removal import not_safe_to_prune  # noqa: E402
from prunescope.topology import ChannelDependency, HeadDependency, TopologyWarning  # noqa: E402

FIELDS = ("module", "q", "k", "v", "o", "heads", "head_dim", "kv_heads", "v_head_dim", "q_channels", "k_channels",
          "v_channels", "o_columns", "kv_group", "units", "tied", "weights")


def table(model, x) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", TopologyWarning)
        hd = HeadDependency(model, x)
    # the op in a pin reason differs between eager and SDPA (T5's bias: an 'add' to the scores, or SDPA's
    # attn_mask), and so do op numbers: compare the reasons without them
    return [dict({f: getattr(a, f) for f in FIELDS},
                 pinned=[re.sub(r"^'\w+' ", "", re.sub(r" \('\w+' op #\d+ in ", " (in ", p)) for p in a.pinned])
            for a in hd.attentions]


def one_unit_per_head(n: int) -> list[list[int]]:
    return [[h] for h in range(n)]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_hf_tables_eager_equals_sdpa_nothing_else_tied(kind: str) -> None:
    tabs = [table(*tiny(kind, attn)) for attn in ("eager", "sdpa")]
    assert tabs[0] == tabs[1] and len(tabs[0]) == 2
    for i, row in enumerate(tabs[0]):
        assert {k: row[k] for k in EXPECTED[kind] if k != "layers"} == {
            k: (v.format(i) if isinstance(v, str) else v) for k, v in EXPECTED[kind].items() if k != "layers"}
        assert (row["tied"], row["weights"], row["pinned"]) == ([], {}, [])


def test_t5_table() -> None:
    tabs = [table(*t5(attn)) for attn in ("eager", "sdpa")]
    assert tabs[0] == tabs[1]
    enc, dec = "encoder.block.{}.layer.0.SelfAttention", "decoder.block.{}.layer.{}.{}"
    modules = [enc.format(0), enc.format(1), dec.format(0, 0, "SelfAttention"), dec.format(0, 1, "EncDecAttention"),
               dec.format(1, 0, "SelfAttention"), dec.format(1, 1, "EncDecAttention")]
    assert [r["module"] for r in tabs[0]] == modules

    def qkv(m: str) -> list[str]:
        return [f"{m}.{p}" for p in "qkv"]

    bias = {s: f"{s}.relative_attention_bias" for s in (modules[0], modules[2])}
    tied = [[bias[modules[0]], *qkv(modules[1])], [*qkv(modules[0]), bias[modules[0]]],
            [bias[modules[2]], *qkv(modules[4])], [], [*qkv(modules[2]), bias[modules[2]]], []]
    for row, m, t in zip(tabs[0], modules, tied):
        assert {k: row[k] for k in ("q", "k", "v", "o")} == {p: f"{m}.{p}" for p in "qkvo"}
        assert (row["heads"], row["head_dim"], row["kv_heads"], row["v_head_dim"]) == (4, 8, 4, 8)
        assert row["q_channels"] == row["k_channels"] == row["v_channels"] == row["o_columns"] == heads(4, 8)
        assert row["units"] == one_unit_per_head(4) and row["tied"] == t
        cross = "EncDec" in m
        assert len(row["pinned"]) == cross and (not cross or "cannot shrink" in row["pinned"][0])


def _meta(build):
    with torch.device("meta"):
        model = build().eval()
    return model, torch.empty(1, 3, 224, 224, device="meta")


def test_torchvision_vit_b_16_table() -> None:
    torchvision = pytest.importorskip("torchvision")
    model, x = _meta(torchvision.models.vit_b_16)
    tab = table(model, x)
    assert len(tab) == 12
    for i, row in enumerate(tab):
        m = f"encoder.layers.encoder_layer_{i}.self_attention"
        assert (row["module"], row["q"], row["k"], row["v"], row["o"]) == (m, m, m, m, m + ".out_proj")
        assert (row["heads"], row["head_dim"], row["kv_heads"], row["units"]) == (12, 64, 12, one_unit_per_head(12))
        assert row["q_channels"] == heads(12, 64) and row["k_channels"] == heads(12, 64, 768)
        assert row["v_channels"] == heads(12, 64, 1536) and row["o_columns"] == heads(12, 64)
        assert row["weights"] == {"q": m + ".in_proj_weight", "k": m + ".in_proj_weight", "v": m + ".in_proj_weight",
                                  "o": m + ".out_proj.weight"}
        assert row["tied"] == [] and len(row["pinned"]) == 1 and "embed_dim // num_heads" in row["pinned"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TopologyWarning)
        unsafe = not_safe_to_prune(model, x)
        sets = ChannelDependency(model, x, include_linear=True).sets
    mlp = [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(12)]
    assert not set(mlp) & set(unsafe)
    assert all([n] in sets for n in mlp)


def test_torchvision_swin_t_table() -> None:
    torchvision = pytest.importorskip("torchvision")
    tab = table(*_meta(torchvision.models.swin_t))
    blocks = [(s, b) for s, depth in ((1, 2), (3, 2), (5, 6), (7, 2)) for b in range(depth)]
    assert [r["module"] for r in tab] == [f"features.{s}.{b}.attn" for s, b in blocks]
    for row, (s, b) in zip(tab, blocks):
        n = {1: 3, 3: 6, 5: 12, 7: 24}[s]
        c = 32 * n
        m = f"features.{s}.{b}.attn"
        assert (row["q"], row["k"], row["v"], row["o"]) == (m + ".qkv",) * 3 + (m + ".proj",)
        assert (row["heads"], row["head_dim"], row["kv_heads"]) == (n, 32, n)
        assert row["q_channels"] == heads(n, 32) and row["k_channels"] == heads(n, 32, c)
        assert row["v_channels"] == heads(n, 32, 2 * c) and row["o_columns"] == heads(n, 32)
        assert row["units"] == one_unit_per_head(n) and row["tied"] == []
        # the shifted blocks (odd, but not in the last stage, whose 7x7 map is one window) also write the head
        # count in the views that add the shift mask per window
        shifted = b % 2 == 1 and s != 7
        assert len(row["pinned"]) == (3 if shifted else 1)
        assert all(f"writes the size {n} " in p for p in row["pinned"])


@pytest.mark.parametrize("name,n", [("vit_small_patch16_224", 6), ("deit_tiny_patch16_224", 3)])
def test_timm_vit_table_fused_equals_eager(name: str, n: int) -> None:
    timm = pytest.importorskip("timm")
    model, x = _meta(lambda: timm.create_model(name, pretrained=False))
    tabs = []
    for fused in (True, False):
        for mod in model.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = fused
        tabs.append(table(model, x))
    assert tabs[0] == tabs[1] and len(tabs[0]) == 12
    c = 64 * n
    for i, row in enumerate(tabs[0]):
        m = f"blocks.{i}.attn"
        assert (row["module"], row["q"], row["k"], row["v"], row["o"]) == (m,) + (m + ".qkv",) * 3 + (m + ".proj",)
        assert (row["heads"], row["head_dim"], row["kv_heads"]) == (n, 64, n)
        assert row["q_channels"] == heads(n, 64) and row["k_channels"] == heads(n, 64, c)
        assert row["v_channels"] == heads(n, 64, 2 * c) and row["o_columns"] == heads(n, 64)
        assert row["units"] == one_unit_per_head(n) and row["tied"] == []
        assert len(row["pinned"]) == 1 and row["pinned"][0].startswith(f"writes the size {n} ")
