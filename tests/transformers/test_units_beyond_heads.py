"""Engine units beyond plain heads: T5's shared relative position bias, nn.MultiheadAttention, tied embeddings,
LSTM/GRU hidden units, repeat_interleave on the batch axis, unfold/fold.

Every answer is checked on a physically pruned copy: removing what the engine calls one unit runs and gives
exactly the masked model's output; where the engine pins, the pruned copy is shown to fail (or to need an
attribute the forward reads updated, which the engine cannot see in a trace and so keeps pinned).
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

from prune_helpers import classes_of, mask, prune  # noqa: E402

from prunescope.graph import trace  # noqa: E402
from prunescope.removal import not_safe_to_prune  # noqa: E402
from prunescope.topology import ChannelDependency, HeadDependency, TopologyWarning, channel_atoms  # noqa: E402


def atoms(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", TopologyWarning)
        return channel_atoms(trace(model, x))


def t5(attn: str = "eager", lm: bool = False):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, num_heads=4, d_ff=24, num_layers=2,
                                num_decoder_layers=2, attn_implementation=attn, decoder_start_token_id=0)
    m = (transformers.T5ForConditionalGeneration if lm else transformers.T5Model)(cfg).eval()
    return m, {"input_ids": torch.randint(0, 50, (2, 6)), "decoder_input_ids": torch.randint(0, 50, (2, 5))}


def _t5_out(m, x) -> torch.Tensor:
    with torch.no_grad():
        return m(**x).last_hidden_state


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_t5_head_goes_with_its_relative_bias_column_in_every_layer_that_reuses_it(attn: str) -> None:
    model, x = t5(attn)
    ca = atoms(model, x)
    enc = "encoder.block.{}.layer.0.SelfAttention."
    # head 1 = q/k/v channels 8..15 of both encoder layers and column 1 of block 0's relative_attention_bias
    cls = classes_of(ca, enc.format(0) + "q", range(8, 16))
    assert len(cls) == 1
    members = ca.class_members(int(cls[0]))
    assert sorted({n for n, _ in members}) == sorted(
        [enc.format(b) + p for b in (0, 1) for p in "qkv"] + [enc.format(0) + "relative_attention_bias"])
    assert {c for n, c in members if n.endswith("relative_attention_bias")} == {1}
    assert {c for n, c in members if n.endswith(".q")} == set(range(8, 16))
    torch.testing.assert_close(_t5_out(prune(model, ca, cls), x), _t5_out(mask(model, ca, cls), x),
                               rtol=1e-4, atol=1e-5)
    # removing the head from layer 0 only (the bias column goes, layer 1 still adds 4 heads of bias) breaks
    only0 = [enc.format(0) + p for p in ("q", "k", "v", "o", "relative_attention_bias")]
    with pytest.raises(RuntimeError):
        _t5_out(prune(model, ca, cls, layers=only0), x)


def test_t5_cross_attention_heads_are_listed_but_pinned_by_the_zero_bias() -> None:
    """T5's cross attention adds ``torch.zeros(1, self.n_heads, q, k)`` (no relative bias): a size read from an
    attribute is a literal in the trace, so the heads stay pinned. Physically they go once ``n_heads`` is
    updated in every decoder layer (block 0's zero bias is reused by the others): shrink's job."""
    model, x = t5()
    unsafe = not_safe_to_prune(model, x)
    cross = [f"decoder.block.{b}.layer.1.EncDecAttention.{p}" for b in (0, 1) for p in "qkv"]
    # and the residual stream: T5LayerNorm's mean(-1) of its squares changes when a channel goes
    stream = {"shared"} | {f"encoder.block.{b}.layer.{p}" for b in (0, 1) for p in ("0.SelfAttention.o",
                                                                                      "1.DenseReluDense.wo")} | {
        f"decoder.block.{b}.layer.{p}" for b in (0, 1) for p in ("0.SelfAttention.o", "1.EncDecAttention.o",
                                                                 "2.DenseReluDense.wo")}
    assert set(unsafe) == set(cross) | stream and len(unsafe) == len(cross) + len(stream)
    ca = atoms(model, x)
    cls = np.concatenate([classes_of(ca, f"decoder.block.{b}.layer.1.EncDecAttention.q", range(8)) for b in (0, 1)])
    with pytest.raises(RuntimeError):
        _t5_out(prune(model, ca, cls), x)
    small = prune(model, ca, cls)
    for b in (0, 1):
        small.decoder.block[b].layer[1].EncDecAttention.n_heads = 3
    torch.testing.assert_close(_t5_out(small, x), _t5_out(mask(model, ca, cls), x), rtol=1e-4, atol=1e-5)
    cross_att = [a for a in HeadDependency(model, x).attentions if "EncDec" in a.module]
    assert len(cross_att) == 2
    for a in cross_att:
        assert (a.heads, a.head_dim, a.units, a.tied) == (4, 8, [[0], [1], [2], [3]], [])
        assert len(a.pinned) == 1 and "cannot shrink" in a.pinned[0]


def test_t5_tied_lm_head() -> None:
    model, x = t5(lm=True)
    assert model.lm_head.weight is model.shared.weight
    ca = atoms(model, x)  # used to stop: "layer 'shared' is used with 50 and 32 output channels"
    assert "lm_head" not in ca.layers and ca.stopped_ops == []
    dep = ChannelDependency(model, x, include_linear=True)
    assert "shared" in dep.dependency["encoder.block.0.layer.0.SelfAttention.o"]


class TiedLM(nn.Module):
    """Embedding -> residual MLP -> output layer that reuses the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.lm_head(h)


def test_tied_input_output_embedding() -> None:
    torch.manual_seed(0)
    model, ids = TiedLM().eval(), torch.randint(0, 20, (2, 5))
    ca = atoms(model, ids)
    assert ca.unsafe == {} and "lm_head" not in ca.layers
    assert ca.layer_sets(["emb", "fc1", "fc2"]) == [["emb", "fc2"], ["fc1"]]
    cls = classes_of(ca, "emb", [3])
    assert ca.class_members(int(cls[0])) == [("emb", 3), ("fc2", 3)]
    small = prune(model, ca, cls)
    small.lm_head.weight = small.emb.weight  # one parameter: narrowed once, everywhere it is used
    with torch.no_grad():
        torch.testing.assert_close(small(ids), mask(model, ca, cls)(ids), rtol=1e-4, atol=1e-5)


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], bidirectional: bool = False) -> None:
        super().__init__()
        self.fc0 = nn.Linear(6, 8)
        self.rnn = cell(8, 10, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(10 * (2 if bidirectional else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(self.fc0(x))[0])


def _rnn_units(rnn: nn.RNNBase, drop: list[int], zero: bool) -> None:
    """Remove (or zero) hidden units ``drop`` of every layer and direction: gate-block rows, w_hh columns and
    the next layer's input columns; ``hidden_size`` follows (the attribute the forward checks)."""
    h = rnn.hidden_size
    gates = rnn.weight_ih_l0.shape[0] // h
    dirs = 2 if rnn.bidirectional else 1
    rows = [g * h + j for g in range(gates) for j in drop]
    keep_rows = [r for r in range(gates * h) if r not in rows]
    keep_h = [j for j in range(h) if j not in drop]
    keep_in = [d * h + j for d in range(dirs) for j in keep_h]
    with torch.no_grad():
        for name, p in list(rnn.named_parameters()):
            layer = int(name.rsplit("_l", 1)[1][0])
            if zero:
                p[rows] = 0
                continue
            new = p[keep_rows]
            if name.startswith("weight_hh"):
                new = new[:, keep_h]
            elif name.startswith("weight_ih") and layer > 0:
                new = new[:, keep_in]
            setattr(rnn, name, nn.Parameter(new))
    if not zero:
        rnn.hidden_size = len(keep_h)


@pytest.mark.parametrize("cell,bidirectional", [(nn.LSTM, False), (nn.GRU, True), (nn.RNN, False)])
def test_recurrent_hidden_units(cell: type[nn.RNNBase], bidirectional: bool) -> None:
    torch.manual_seed(0)
    model, x = Recurrent(cell, bidirectional).eval(), torch.randn(2, 5, 6)
    ca = atoms(model, x)  # used to stop at 'lstm'/'gru' and mark fc0 unsafe
    assert ca.unsafe == {}
    li = ca.layers["rnn"]
    assert (li.kind, li.out_channels, li.in_channels) == ("rnn", 10, 8)
    assert ChannelDependency(model, x, include_linear=True).sets == [["fc0"], ["rnn"], ["fc"]]
    # fc reads hidden unit j at column j (and 10 + j from the backward direction)
    cols = [ca.atom_name(int(a)) for a in ca.layers["fc"].inputs[0]]
    assert cols == [("rnn", j) for j in range(10)] * (2 if bidirectional else 1)
    assert [ca.atom_name(int(a)) for a in li.inputs[0]] == [("fc0", c) for c in range(8)]

    small, masked = copy.deepcopy(model), copy.deepcopy(model)
    _rnn_units(small.rnn, [3], zero=False)
    _rnn_units(masked.rnn, [3], zero=True)
    keep = [c for c in range(small.fc.in_features) if c % 10 != 3]
    small.fc.weight = nn.Parameter(small.fc.weight[:, keep].detach())
    # and fc0's output channel 5 (the LSTM's input column 5; input_size follows)
    with torch.no_grad():
        small.fc0.weight = nn.Parameter(small.fc0.weight[[c for c in range(8) if c != 5]])
        small.fc0.bias = nn.Parameter(small.fc0.bias[[c for c in range(8) if c != 5]])
        small.rnn.weight_ih_l0 = nn.Parameter(small.rnn.weight_ih_l0[:, [c for c in range(8) if c != 5]])
        if bidirectional:
            small.rnn.weight_ih_l0_reverse = nn.Parameter(
                small.rnn.weight_ih_l0_reverse[:, [c for c in range(8) if c != 5]])
        small.rnn.input_size = 7
        masked.fc0.weight[5] = 0
        masked.fc0.bias[5] = 0
        torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-5)


class GivenState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec, self.fc = nn.GRU(4, 6, batch_first=True), nn.GRU(3, 6, batch_first=True), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        _, h = self.enc(x, h0)
        return self.fc(self.dec(y, h)[0])


def test_recurrent_initial_state() -> None:
    x, y = torch.randn(2, 5, 4), torch.randn(2, 3, 3)
    model = GivenState().eval()
    ca = atoms(model, (x, y))
    # the decoder starts from the encoder's final state: hidden unit j of both is one unit
    assert ca.layer_sets() == [["enc", "dec"], ["fc"]] and ca.unsafe == {}
    # an initial state given as an input has a fixed width: the encoder's units are pinned
    reasons = not_safe_to_prune(model, (x, y, torch.zeros(1, 2, 6)), with_reasons=True)
    assert list(reasons) == ["enc", "dec"] and "fixed hidden size 6" in reasons["enc"][0]


class RepeatInterleave(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b, self.dim = nn.Conv2d(3, 8, 1), nn.Conv2d(8 * (2 if dim == 1 else 1), 4, 1), dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).repeat_interleave(2, dim=self.dim))


class Fold(nn.Module):
    """im2col / col2im round trip, and a Linear whose outputs are folded into channels (4 outputs per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.c, self.d = nn.Linear(5, 6 * 4), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = F.unfold(self.a(x), 2, padding=1, stride=2)
        y = F.fold(u, (8, 8), 2, padding=1, stride=2)
        z = F.fold(self.c(t).transpose(1, 2), (8, 8), 2, stride=2)  # (N, 16, 24) -> (N, 6, 8, 8)
        return self.b(y) + self.d(z)


@pytest.mark.parametrize("dim", [0, 1])
def test_repeat_interleave(dim: int) -> None:
    torch.manual_seed(0)
    model, x = RepeatInterleave(dim).eval(), torch.randn(2, 3, 4, 4)
    ca = atoms(model, x)  # used to stop at 'repeat_interleave'
    assert ca.unsafe == {} and ca.layer_sets() == [["a"], ["b"]]
    cls = classes_of(ca, "a", [5])
    small = prune(model, ca, cls)
    cols = [ca.atom_name(int(a))[1] for a in ca.layers["b"].inputs[0]]
    assert cols == (list(range(8)) if dim == 0 else [c for c in range(8) for _ in (0, 1)])
    with torch.no_grad():
        torch.testing.assert_close(small(x), mask(model, ca, cls)(x), rtol=1e-4, atol=1e-5)


def test_unfold_fold() -> None:
    torch.manual_seed(0)
    model, x, t = Fold().eval(), torch.randn(2, 3, 8, 8), torch.randn(2, 16, 5)
    ca = atoms(model, (x, t))  # used to stop at 'unfold'
    assert ca.unsafe == {} and ca.layer_sets() == [["a"], ["c"], ["b", "d"]]
    # the 4 outputs of c folded into one channel are one unit
    assert [sorted(c for _, c in ca.class_members(int(k))) for k in classes_of(ca, "c", [0, 5])] == [
        [0, 1, 2, 3], [4, 5, 6, 7]]
    cls = np.concatenate([classes_of(ca, "a", [2]), classes_of(ca, "c", [5])])
    small = prune(model, ca, cls)
    with torch.no_grad():
        torch.testing.assert_close(small(x, t), mask(model, ca, cls)(x, t), rtol=1e-4, atol=1e-5)


def test_multihead_attention_heads_listed_and_pinned() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)

    class Self(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    model = Self().eval()
    (a,) = HeadDependency(model, x).attentions
    assert (a.module, a.q, a.k, a.v, a.o) == ("attn", "attn", "attn", "attn", "attn.out_proj")
    assert (a.heads, a.head_dim, a.kv_heads, a.units) == (4, 4, 4, [[0], [1], [2], [3]])
    assert a.q_channels[1] == [4, 5, 6, 7] and a.k_channels[1] == [20, 21, 22, 23] and a.v_channels[1] == [
        36, 37, 38, 39]
    assert a.o_columns[1] == [4, 5, 6, 7]
    assert a.weights == {"q": "attn.in_proj_weight", "k": "attn.in_proj_weight", "v": "attn.in_proj_weight",
                         "o": "attn.out_proj.weight"}
    assert len(a.pinned) == 1 and "embed_dim // num_heads" in a.pinned[0]
    # physically: head 1 out of in_proj (q, k, v rows) and out_proj (columns), num_heads 3 -> the op refuses
    small = copy.deepcopy(model)
    rows = [r for r in range(48) if r % 16 not in (4, 5, 6, 7)]
    small.attn.in_proj_weight = nn.Parameter(small.attn.in_proj_weight[rows].detach())
    small.attn.in_proj_bias = nn.Parameter(small.attn.in_proj_bias[rows].detach())
    small.attn.out_proj.weight = nn.Parameter(small.attn.out_proj.weight[:, [0, 1, 2, 3] + list(range(8, 16))]
                                              .detach())
    small.attn.num_heads = 3
    with pytest.raises((AssertionError, RuntimeError)), torch.no_grad():
        small(x)


class CrossAttention(nn.Module):
    """nn.MultiheadAttention whose query and key/value come from different layers (packed in_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(5, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kv = self.b(y)
        return self.attn(self.a(x), kv, kv, need_weights=False)[0]


def test_multihead_attention_packed_weights_tie_query_and_key_channels() -> None:
    model, x, y = CrossAttention().eval(), torch.randn(2, 3, 6), torch.randn(2, 4, 5)
    ca = atoms(model, (x, y))
    # in_proj_weight's columns read the query and the key/value alike: channel c of a and of b go together
    assert all(ca.atom_class(ca.atom("a", c)) == ca.atom_class(ca.atom("b", c)) for c in range(16))
    assert ca.layer_sets() == [["b", "a", "attn"]]  # b runs first (kv is computed before the call)


class UnbindQKV(nn.Module):
    """timm's split with the head count derived: ``reshape(B, N, 3, -1, 4).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, -1, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


def test_unbind_of_qkv_keeps_heads_as_units() -> None:
    torch.manual_seed(0)
    model, x = UnbindQKV().eval(), torch.randn(2, 5, 16)
    ca = atoms(model, x)  # unbind used to pin qkv ("cuts the channel axis at fixed sizes 1")
    assert ca.unsafe == {}
    (a,) = HeadDependency(model, x).attentions
    assert (a.heads, a.head_dim, a.units, a.pinned) == (4, 4, [[0], [1], [2], [3]], [])
    cls = classes_of(ca, "qkv", a.q_channels[2])
    assert sorted(c for _, c in ca.class_members(int(cls[0]))) == [8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43]
    with torch.no_grad():
        torch.testing.assert_close(prune(model, ca, cls)(x), mask(model, ca, cls)(x), rtol=1e-4, atol=1e-5)


def test_gpt2_lm_head_tied_to_wte() -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    model, x = transformers.GPT2LMHeadModel(cfg).eval(), {"input_ids": torch.randint(0, 50, (2, 6))}
    ca = atoms(model, x)  # used to stop: "layer 'transformer.wte' is used with 50 and 16 output channels"
    assert "lm_head" not in ca.layers and ca.stopped_ops == []
    assert ca.atom_class(ca.atom("transformer.wte", 3)) == ca.atom_class(ca.atom("transformer.h.1.mlp.c_proj", 3))


class PackedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.rnn, self.fc = nn.Linear(6, 8), nn.GRU(8, 10, batch_first=True), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = nn.utils.rnn.pack_padded_sequence(self.fc0(x), torch.tensor([5, 3]), batch_first=True)
        out, h = self.rnn(p)
        y, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return self.fc(y) + self.fc(h[-1]).unsqueeze(1)


def test_packed_sequences_keep_the_feature_axis() -> None:
    torch.manual_seed(0)
    model, x = PackedGRU().eval(), torch.randn(2, 5, 6)
    ca = atoms(model, x)  # used to stop at '_pack_padded_sequence'
    assert ca.unsafe == {} and ca.layer_sets() == [["fc0"], ["rnn"], ["fc"]]
    assert [ca.atom_name(int(a)) for a in ca.layers["fc"].inputs[0]] == [("rnn", j) for j in range(10)]
    small, masked = copy.deepcopy(model), copy.deepcopy(model)
    _rnn_units(small.rnn, [4], zero=False)
    _rnn_units(masked.rnn, [4], zero=True)
    small.fc.weight = nn.Parameter(small.fc.weight[:, [c for c in range(10) if c != 4]].detach())
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-5)
