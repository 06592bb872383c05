"""Channel engine on attention: heads as units, SDPA = eager, GQA, GPT-2 Conv1D, literal head sizes, masks.

References are hand-derived tables (which output channels of each projection form one unit) and physically
pruned models: removing a unit the engine reports must run and give exactly the masked model's output, and
removing what the old answer called a unit must not.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from prune_helpers import classes_of, mask, partition, prune  # noqa: E402

from prunescope.graph import trace  # noqa: E402
from prunescope.removal import not_safe_to_prune  # noqa: E402
from prunescope.topology import ChannelDependency, TopologyWarning, channel_atoms  # noqa: E402

HEADS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # 4 heads of head_dim 4
SAME_INDEX = [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


def tiny(kind: str, attn: str):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, attn_implementation=attn)
    if kind == "bert":
        m = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, max_position_embeddings=32,
                                                           **common))
        x = {"input_ids": torch.randint(0, 50, (2, 6))}
    elif kind == "llama":
        m = transformers.LlamaModel(transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_key_value_heads=2,
                                                             max_position_embeddings=32, **common))
        x = {"input_ids": torch.randint(0, 50, (2, 6))}
    elif kind == "vit":
        m = transformers.ViTModel(transformers.ViTConfig(hidden_size=16, image_size=8, patch_size=4, **common))
        x = {"pixel_values": torch.randn(2, 3, 8, 8)}
    else:
        cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                                      attn_implementation=attn, bos_token_id=0, eos_token_id=0)
        m = transformers.GPT2Model(cfg)
        x = {"input_ids": torch.randint(0, 50, (2, 6))}
    return m.eval(), x


def atoms(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", TopologyWarning)
        return channel_atoms(trace(model, x))


def out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).last_hidden_state


def check_removal(model, x, ca, classes, fix=None) -> None:
    """Removing ``classes`` physically runs and equals zeroing them."""
    small = prune(model, ca, classes)
    if fix is not None:
        fix(small)
    torch.testing.assert_close(out(small, x), out(mask(model, ca, classes), x), rtol=1e-4, atol=1e-5)


ATTN = {
    "bert": ("encoder.layer.0.attention.self.{}", ("query", "key", "value"), "encoder.layer.0.attention.output.dense"),
    "vit": ("layers.0.attention.{}", ("q_proj", "k_proj", "v_proj"), "layers.0.attention.o_proj"),
}


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_mha_heads_are_units_and_sdpa_equals_eager(kind: str) -> None:
    res = {}
    for attn in ("eager", "sdpa"):
        model, x = tiny(kind, attn)
        ca = atoms(model, x)
        assert ca.unsafe == {}  # SDPA used to pin q/k/v: 36 layers unsafe on BERT-base
        fmt, qkv, _ = ATTN[kind]
        for p in qkv:
            assert partition(ca, fmt.format(p)) == HEADS  # view(B, L, -1, head_size): whole heads
        q, k, v = (fmt.format(p) for p in qkv)
        for h in range(4):  # head h of q, k and v is one unit
            assert len({int(ca.atom_class(ca.atom(n, 4 * h))) for n in (q, k, v)}) == 1
        res[attn] = {n: partition(ca, n) for n in ca.layers}
        # physical proof: remove head 1 everywhere it lives
        check_removal(model, x, ca, classes_of(ca, q, [4]))
    assert res["eager"] == res["sdpa"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_gqa_kv_groups(attn: str) -> None:
    model, x = tiny("llama", attn)
    ca = atoms(model, x)  # SDPA crashed here ("operands could not be broadcast together")
    # only the residual stream is unsafe: LlamaRMSNorm's mean(-1) over it changes when a channel goes
    stream = ["embed_tokens"] + [f"layers.{i}.{p}" for i in (0, 1) for p in ("mlp.down_proj", "self_attn.o_proj")]
    assert sorted(ca.unsafe) == stream
    assert all(r[0].startswith("'mean' reduces over channel axis 2") for r in ca.unsafe.values())
    a = "layers.0.self_attn."
    # hidden 32, 4 query heads and 2 kv heads of head_dim 8: kv head j serves query heads 2j, 2j+1
    assert partition(ca, a + "q_proj") == [list(range(16)), list(range(16, 32))]
    assert partition(ca, a + "k_proj") == partition(ca, a + "v_proj") == [list(range(8)), list(range(8, 16))]
    for j in range(2):
        cls = {int(ca.atom_class(ca.atom(a + p, c))) for p, c in (("q_proj", 16 * j), ("q_proj", 16 * j + 15),
                                                                    ("k_proj", 8 * j), ("v_proj", 8 * j + 7))}
        assert len(cls) == 1
    # gated MLP: gate unit i is tied to up unit i only
    m = "layers.0.mlp."
    assert partition(ca, m + "gate_proj") == [[i] for i in range(24)]
    assert ca.atom_class(ca.atom(m + "gate_proj", 5)) == ca.atom_class(ca.atom(m + "up_proj", 5))
    # physical proof: remove kv group 1 (k/v head 1, query heads 2 and 3) and MLP unit 5
    check_removal(model, x, ca, list(classes_of(ca, a + "k_proj", [8])) + list(classes_of(ca, m + "up_proj", [5])))


def test_llama_sdpa_equals_eager() -> None:
    parts = [{n: partition(ca, n) for n in ca.layers} for ca in (atoms(*tiny("llama", a)) for a in ("eager", "sdpa"))]
    assert parts[0] == parts[1]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_conv1d_is_a_linear_layer(attn: str) -> None:
    model, x = tiny("gpt2", attn)
    ca = channel_atoms(trace(model, x))
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8
    for n in conv1d:
        li = ca.layers[n]
        assert (li.kind, li.module_type, li.weight_out_dim) == ("linear", "Conv1D", 1)
    dep = ChannelDependency(model, x, include_linear=True)
    assert set(conv1d) <= set().union(*dep.dependency_sets)
    # c_attn = [q | k | v] of 16 each; one unit = head h of q, k and v (same position of every split piece)
    c = "h.0.attn.c_attn"
    assert partition(ca, c) == [[p + 16 * s for s in range(3) for p in head] for head in HEADS]
    assert c not in ca.unsafe and "h.0.mlp.c_fc" not in ca.unsafe

    def fix(m):  # what a shrink updates: the widths GPT-2's forward reads from attributes
        for mod in m.modules():
            if type(mod).__name__ == "Conv1D":
                mod.nf = mod.weight.shape[1]
            if type(mod).__name__ == "GPT2Attention" and mod.c_attn.weight.shape[1] != 48:
                mod.split_size = mod.c_attn.weight.shape[1] // 3

    check_removal(model, x, ca, list(classes_of(ca, c, [4])) + list(classes_of(ca, "h.0.mlp.c_fc", [3])), fix)


class Attention(nn.Module):
    """Self-attention whose head split is ``view(B, L, -1, 4)`` (literal head size) or ``view(B, L, 4, -1)``."""

    def __init__(self, split: str, sdpa: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.split, self.sdpa = split, sdpa

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return (t.view(b, n, -1, 4) if self.split == "head_size" else t.view(b, n, 4, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=0.5)
        else:
            s = q @ k.transpose(-2, -1) * 0.5
            a = (s if attn_mask is None else s + attn_mask).softmax(-1) @ v
        return self.o(a.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def _run(m: nn.Module, x, am=None) -> torch.Tensor:
    with torch.no_grad():
        return m(x, am)


@pytest.mark.parametrize("sdpa", [True, False])
def test_literal_head_size_makes_whole_heads(sdpa: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for split, units in (("head_size", HEADS), ("head_count", SAME_INDEX)):
        model = Attention(split, sdpa).eval()
        ca = atoms(model, x)
        assert ca.unsafe == {}
        for p in "qkv":
            assert partition(ca, p) == units
        cls = classes_of(ca, "q", [1])
        small = prune(model, ca, cls)
        torch.testing.assert_close(_run(small, x), _run(mask(model, ca, cls), x), rtol=1e-4, atol=1e-5)
    # the old answer for view(B, L, -1, 4) was the same in-head index of every head: physically wrong
    model = Attention("head_size", sdpa).eval()
    ca = atoms(model, x)
    wrong = [ca.atom(p, c) for p in "qkv" for c in SAME_INDEX[1]]
    other = prune_channels(model, {p: SAME_INDEX[1] for p in "qkv"}, {"o": SAME_INDEX[1]})
    zeroed = zero_channels(model, {p: SAME_INDEX[1] for p in "qkv"})
    assert wrong  # channels of 4 different units
    assert len(set(ca.atom_class(np.array(wrong)).tolist())) == 4
    assert not torch.allclose(_run(other, x), _run(zeroed, x), atol=1e-3)


def prune_channels(model: nn.Module, rows: dict[str, list[int]], cols: dict[str, list[int]]) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, drop in rows.items():
            lin = getattr(m, name)
            keep = [i for i in range(lin.weight.shape[0]) if i not in drop]
            lin.weight, lin.bias = nn.Parameter(lin.weight[keep]), nn.Parameter(lin.bias[keep])
        for name, drop in cols.items():
            lin = getattr(m, name)
            keep = [i for i in range(lin.weight.shape[1]) if i not in drop]
            lin.weight = nn.Parameter(lin.weight[:, keep])
    return m


def zero_channels(model: nn.Module, rows: dict[str, list[int]]) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, drop in rows.items():
            getattr(m, name).weight[drop] = 0
            getattr(m, name).bias[drop] = 0
    return m


@pytest.mark.parametrize("sdpa", [True, False])
def test_attention_mask_with_a_head_axis_fixes_the_head_count(sdpa: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    per_head, shared = torch.randn(1, 4, 5, 5), torch.randn(1, 1, 5, 5)
    model = Attention("head_size", sdpa).eval()
    assert not_safe_to_prune(model, (x, shared)) == []
    ca = atoms(model, (x, shared))
    cls = classes_of(ca, "q", [0])
    torch.testing.assert_close(_run(prune(model, ca, cls), x, shared), _run(mask(model, ca, cls), x, shared),
                               rtol=1e-4, atol=1e-5)
    # a per-head mask: a head cannot go (the mask keeps 4 heads), so q, k, v are pinned
    assert not_safe_to_prune(model, (x, per_head)) == ["q", "k", "v"]
    ca = atoms(model, (x, per_head))
    with pytest.raises(RuntimeError):
        _run(prune(model, ca, classes_of(ca, "q", [0])), x, per_head)
    # with the head count written (view(B, L, 4, -1)) the units are in-head positions: the mask does not matter
    model = Attention("head_count", sdpa).eval()
    assert not_safe_to_prune(model, (x, per_head)) == []
    ca = atoms(model, (x, per_head))
    cls = classes_of(ca, "q", [0])
    torch.testing.assert_close(_run(prune(model, ca, cls), x, per_head), _run(mask(model, ca, cls), x, per_head),
                               rtol=1e-4, atol=1e-5)


class SwinLikeQKV(nn.Module):
    """torchvision swin's split: ``reshape(B, N, 3, heads, C // heads)`` with ``C`` the block's input width."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 4, c // 4).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, scale=0.5)
        return self.proj(a.transpose(1, 2).reshape(b, n, -1))


def test_split_with_every_size_written_pins() -> None:
    x = torch.randn(2, 5, 16)
    model = SwinLikeQKV().eval()
    assert not_safe_to_prune(model, x) == ["qkv"]
    ca = channel_atoms(trace(model, x))
    with pytest.raises(RuntimeError):  # the size read from the input does not follow the pruned qkv
        _run_plain(prune(model, ca, classes_of(ca, "qkv", [0])), x)


def _run_plain(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)
