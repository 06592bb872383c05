"""Post-training reconstruction (issue 17): least-squares refit of the narrowed layers from unlabeled inputs.

References are independent of the code under test: a layer whose input and kept outputs are what the dense
model computes must come back as the dense layer's kept rows (the least-squares solution is exact there); the
quality bar is held-out accuracy of a CNN trained here on real data (scikit-learn digits), compared with
BatchNorm re-estimation on the same masks; the activation score is recomputed by hand.
"""

from __future__ import annotations

import copy
import sys
import warnings
from functools import lru_cache

import numpy as np
import pytest
import torch
from torch import nn

import prunescope
from prunescope import unit_masks
from prunescope.errors import ConfigError
from prunescope.masks.units import input_channel_norms
from prunescope.narrow import ShrinkWarning, reconstruct, shrink

R = sys.modules["prunescope.narrow.reconstruct"]


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1)).eval()


def _mask(n_out: int, shape: tuple[int, ...], drop: list[int]) -> dict[str, torch.Tensor]:
    keep = torch.ones(n_out)
    keep[drop] = 0
    return {"weight": keep.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone(), "bias": keep}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def test_public_api_and_user_model_untouched() -> None:
    net = _conv_net()
    net[1].train()  # a mixed train/eval state must come back as it was
    flags = [m.training for m in net.modules()]
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    calib = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    masks = {"0": _mask(8, (8, 3, 3, 3), [0, 1, 2])}
    small = prunescope.reconstruct(net, masks, x, calib)
    assert small[0].out_channels == 5 and small[3].in_channels == 5
    small2, res = shrink(net, masks, x, calibration=calib, return_result=True)
    assert res.reconstruction.layers == ["0", "3"]
    for a, b in zip(small.state_dict().values(), small2.state_dict().values()):
        assert torch.equal(a, b)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert [m.training for m in net.modules()] == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_user_model_untouched_on_error() -> None:
    net = _conv_net().eval()
    before = copy.deepcopy(net.state_dict())
    masks = {"0": _mask(8, (8, 3, 3, 3), [0, 1])}
    bad = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 8, 8)]  # the second batch has the wrong channel count
    with pytest.raises(RuntimeError):
        reconstruct(net, masks, torch.randn(1, 3, 8, 8), bad)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert not any(m.training for m in net.modules())


def test_bad_arguments_are_refused() -> None:
    net = _conv_net()
    masks = {"0": _mask(8, (8, 3, 3, 3), [0])}
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="empty"):
        reconstruct(net, masks, x, [])
    with pytest.raises(ConfigError, match="iterable of batches"):
        reconstruct(net, masks, x, torch.randn(4, 3, 8, 8))
    with pytest.raises(ConfigError, match="ridge"):
        reconstruct(net, masks, x, [x], ridge=-1.0)
    with pytest.raises(ConfigError, match="layers"):
        reconstruct(net, masks, x, [x], layers="some")
    with pytest.raises(ConfigError, match="calibration"):
        unit_masks(net, x, 0.5, prune_type="activation")


# ------------------------------------------------------------------------------------------------ exactness
_CONVS = {
    "conv2d": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "strided-dilated": lambda: nn.Conv2d(6, 8, 3, stride=2, dilation=2, padding=2),
    "reflect-same": lambda: nn.Conv2d(6, 8, (3, 2), padding="same", padding_mode="reflect"),
    "grouped": lambda: nn.Conv2d(6, 8, 3, groups=2, padding=1),
    "depthwise": lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1),
    "conv1d": lambda: nn.Conv1d(6, 8, 5, stride=2, padding=1),
    "conv3d": lambda: nn.Conv3d(6, 8, 3, padding=(1, 0, 1)),
}


@pytest.mark.parametrize("kind", sorted(_CONVS))
def test_exact_where_the_solution_is_exact(kind: str) -> None:
    """Each conv below keeps what it needs: its input is the dense one (or loses only channels it does not mix)
    and its target is its own kept output, so the refit must return the narrowed weight up to float noise;
    the last layer lost input channels and must get closer to the dense output than as-pruned."""
    torch.manual_seed(0)
    mid = _CONVS[kind]()
    nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(mid)]
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
    net = nn.Sequential(conv(3, 6, 1), nn.ReLU(), mid, nn.ReLU(), conv(mid.out_channels, 2, 1)).eval()
    x = torch.randn(2, 3, *([7] * nd))
    calib = [torch.randn(8, 3, *([7] * nd)) for _ in range(3)]
    layer = "0" if kind == "depthwise" else "2"
    with warnings.catch_warnings():  # grouped: the fixer keeps the same count per group (a ShrinkWarning)
        warnings.simplefilter("ignore", ShrinkWarning)
        masks = unit_masks(net, x, 0.5, layers=[layer])
        small, res = reconstruct(net, masks, x, calib, return_result=True)
        plain = shrink(net, masks, x)
    assert "2" in res.reconstruction.layers and "4" in res.reconstruction.layers
    assert ("0" in res.reconstruction.layers) == (kind == "depthwise")
    for name in ("0", "2"):
        w, w0 = small.get_submodule(name).weight.detach(), plain.get_submodule(name).weight.detach()
        assert torch.allclose(w, w0, atol=1e-4 * float(w0.abs().max())), name
        assert res.reconstruction.error_after.get(name, 0.0) < 1e-6
    with torch.no_grad():
        xs = torch.randn(16, 3, *([7] * nd))
        dense = net(xs)
        assert _rel_err(small(xs), dense) < _rel_err(plain(xs), dense)  # random weights: little to recover


def test_linear_and_bias_free_conv_with_batchnorm() -> None:
    """A bias-free conv before an eval BatchNorm gets its intercept in the running mean; Linear layers refit."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 4, 4)
    calib = [torch.randn(64, 3, 4, 4) for _ in range(4)]
    masks = unit_masks(net, x, 0.5)
    assert set(masks) == {"0", "4"}
    small, res = reconstruct(net, masks, x, calib, return_result=True)
    plain = shrink(net, masks, x)
    assert res.reconstruction.layers == ["0", "4", "6"]
    assert torch.allclose(small[1].running_mean, plain[1].running_mean, atol=1e-4)  # conv 0: nothing to fold
    assert torch.allclose(small[0].weight, plain[0].weight, atol=1e-4)
    xs = torch.randn(256, 3, 4, 4)
    with torch.no_grad():
        assert _rel_err(small(xs), net(xs)) < 0.7 * _rel_err(plain(xs), net(xs))


def test_intercept_of_a_bias_free_conv_goes_into_the_batchnorm() -> None:
    """conv -> BN with the input channel that carries a constant removed: the refit must put the constant's
    contribution into BN's running mean (checked against the hand-computed shift)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3)).eval()
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
        net[0].weight[0, 0] = 1.0
        net[0].weight[1, 1] = 1.0
    x = torch.randn(1, 2, 3, 3)
    masks = {"0": _mask(4, (4, 2, 1, 1), [3])}  # channel 3 is the constant 2
    small = reconstruct(net, masks, x, [torch.randn(32, 2, 3, 3)], ridge=0.0)
    want = net[2].running_mean - 2.0 * net[1].weight[:, 3, 0, 0]
    assert torch.allclose(small[2].running_mean, want, atol=1e-4)
    xs = torch.randn(8, 2, 3, 3)
    with torch.no_grad():
        assert torch.allclose(small(xs), net(xs), atol=1e-4)


# ------------------------------------------------------------------------------------------- quality: digits
digits = pytest.importorskip("prunescope.examples.digits")
pytest.importorskip("sklearn")


@lru_cache(maxsize=1)
def _digits_model() -> nn.Module:
    return digits.train()  # trained here (a few seconds), not read from a cache


def _draws(n: int = 128, seeds: tuple[int, ...] = (1, 2, 3)) -> list[torch.Tensor]:
    xt = digits.load_data()[0]
    return [xt[torch.randperm(len(xt), generator=torch.Generator().manual_seed(s))[:n]] for s in seeds]


@pytest.mark.parametrize("sparsity,bar", [(0.5, 0.97), (0.625, 0.96), (0.75, 0.92)])
def test_digits_quality_bar(sparsity: float, bar: float, one_thread: None) -> None:
    """Every prunable set of the digits CNN loses ``sparsity`` of its units (activation scores); reconstruction
    from 128 unlabeled training inputs: mean held-out accuracy over three random draws of those inputs >= the
    bar, far above BatchNorm re-estimation on the same masks and inputs. Measured (session 16, one thread):
    0.977 / 0.966 / 0.941; at 50 % single draws 0.970-0.980 over 5 draws, and float noise alone (two threads)
    moves a draw by 0.004, so the floor here is 0.97: issue 17's 0.975 on every draw is the next test's.
    BatchNorm re-estimation alone 0.63-0.71 at 50 %."""
    from prunescope.report.recovery import recalibrate_bn

    model = _digits_model()
    assert digits.evaluate(model) > 0.97
    x = torch.ones(digits.INPUT_SIZE)
    rec, bn = [], []
    for calib in _draws():
        masks = unit_masks(model, x, sparsity, prune_type="activation", calibration=[calib])
        small = reconstruct(model, masks, x, [calib])
        rec.append(digits.evaluate(small))
        plain = shrink(model, masks, x)
        recalibrate_bn(plain, [calib])
        bn.append(digits.evaluate(plain))
    assert np.mean(rec) >= bar, (rec, bn)
    assert min(rec) > max(bn) + 0.1, (rec, bn)


def _shifted(calib: torch.Tensor) -> list[torch.Tensor]:
    """The inputs and their four one-pixel (cyclic) shifts: more rows for the refit, no new data, no labels."""
    return [calib] + [torch.roll(calib, s, d) for d in (2, 3) for s in (1, -1)]


@pytest.mark.parametrize("sparsity,bar", [(0.5, 0.975), (0.625, 0.96), (0.75, 0.92)])  # issue 17's bar
def test_digits_quality_bar_every_draw(sparsity: float, bar: float, one_thread: None) -> None:
    """The bar on EVERY draw, not only the mean: units chosen by their refit error (``prune_type=
    'reconstruction'``) on the 128 inputs, the refit on those inputs and their one-pixel shifts (what limits the
    plain case is the refit's variance from 128 inputs: from 1,024 inputs it reaches 0.985). Chosen on training
    digits outside the draw (0.997 there, vs 0.991 without the shifts and 0.986 with activation scores), not on
    the held-out split. Measured over 5 draws: 0.982 / 0.974 / 0.956 mean, 0.978 / 0.968 / 0.950 min."""
    model = _digits_model()
    x = torch.ones(digits.INPUT_SIZE)
    rec = []
    for calib in _draws():
        masks = unit_masks(model, x, sparsity, prune_type="reconstruction", calibration=[calib])
        rec.append(digits.evaluate(reconstruct(model, masks, x, _shifted(calib))))
    assert min(rec) >= bar, rec


def test_activation_scores_by_hand() -> None:
    """score(unit) = Σ_rows |W[row, c]| · ‖X_c‖₂ over the consumer's input column c (Wanda-sp / FLAP)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    calib = [torch.randn(10, 4), torch.randn(5, 4)]
    norms = input_channel_norms(net, calib)
    hidden = torch.cat([torch.relu(net[0](b)) for b in calib]).detach()
    assert torch.allclose(norms["2"].float(), hidden.norm(dim=0), rtol=1e-5)
    score = net[2].weight.detach().abs().sum(0) * hidden.norm(dim=0)
    masks = unit_masks(net, torch.ones(1, 4), 0.5, prune_type="activation", calibration=calib)
    keep = masks["0"]["bias"].bool()
    assert set(torch.argsort(score)[:3].tolist()) == set((~keep).nonzero().flatten().tolist())


# -------------------------------------------------------------------------------------------- transformers
def _sequences(n: int, g: torch.Generator, vocab: int = 32, length: int = 12) -> torch.Tensor:
    """Arithmetic progressions mod ``vocab``: the next token follows from the previous two."""
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % vocab


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2", "bert"])
def test_transformer_heads_and_mlp_units(kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    from prunescope import head_masks
    from prunescope.graph import trace

    torch.manual_seed(0)
    common = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=32, attn_implementation="eager")
    if kind == "llama-gqa":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
        first = "mlp.up_proj"
    elif kind == "gpt2":  # Hugging Face Conv1D layers (weights stored transposed), fused q/k/v
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=32, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=32, attn_implementation="eager"))
        first = "mlp.c_fc"
    else:  # an encoder classifying a progression's step (1-3); no dropout, so that 150 steps learn it (~0.65)
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common))
        first = "intermediate.dense"
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(150 if kind == "bert" else 40):
        ids = _sequences(32, g)
        if kind == "bert":
            step = (ids[:, 1] - ids[:, 0]) % 32 - 1
            loss = model(input_ids=ids, labels=step).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = {"input_ids": _sequences(2, g)}
    calib = [{"input_ids": _sequences(32, g)} for _ in range(3)]
    held = _sequences(64, g)
    gr = trace(model, x)
    masks = head_masks(model, x, 0.5, graph=gr)
    masks.update(unit_masks(model, x, 0.5, layers=[n for n, _ in model.named_modules() if n.endswith(first)],
                            graph=gr))
    small, res = reconstruct(model, masks, x, calib, graph=gr, return_result=True)
    plain = shrink(model, masks, x, graph=gr)
    refit_names = res.reconstruction.layers
    assert any(n.endswith(("o_proj", "attn.c_proj", "attention.output.dense")) for n in refit_names)
    assert any(n.endswith(("down_proj", "mlp.c_proj", "layer.0.output.dense", "layer.1.output.dense"))
               for n in refit_names)
    with torch.no_grad():
        dense = model(input_ids=held).logits
        e_plain = _rel_err(plain(input_ids=held).logits, dense)
        e_rec = _rel_err(small(input_ids=held).logits, dense)
    assert e_rec < 0.7 * e_plain, (e_rec, e_plain)


def test_skipped_layer_warns() -> None:
    """A layer whose kept outputs disagree with the plan is left alone with a ShrinkWarning naming it."""
    net = _conv_net()
    x = torch.randn(1, 3, 8, 8)
    small, res = shrink(net, {"0": _mask(8, (8, 3, 3, 3), [0])}, x, return_result=True)
    res.plan.removed["3"] = np.zeros(5, dtype=bool)  # a wrong length: the refit cannot map the outputs
    with pytest.warns(ShrinkWarning, match="'3'"):
        out = R.refit(net, small, res.plan, [torch.randn(4, 3, 8, 8)])
    assert "3" in out.skipped and "3" not in out.layers


def test_cached_targets_equal_recomputed_and_options() -> None:
    """The dense-target cache changes nothing; 'downstream' also refits later layers that lost no channel."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 6, 6)
    calib = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    masks = unit_masks(net, x, 0.5, layers=["0"])
    a, ra = reconstruct(net, masks, x, calib, return_result=True)
    b, rb = reconstruct(net, masks, x, calib, cache_mb=0, return_result=True)
    assert ra.reconstruction.cached and not rb.reconstruction.cached
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-5), k
    assert ra.reconstruction.layers == ["0", "3"]
    c, rc = reconstruct(net, masks, x, calib, layers="downstream", bn="recalibrate", return_result=True)
    assert rc.reconstruction.layers == ["0", "3", "5", "7"]
    assert not torch.equal(c[5].weight, net[5].weight)
    assert not torch.equal(c[1].running_var, a[1].running_var)  # statistics re-estimated


def test_nothing_removed_changes_nothing() -> None:
    net = _conv_net()
    masks = {"0": _mask(8, (8, 3, 3, 3), [])}
    x = torch.randn(1, 3, 8, 8)
    small, res = reconstruct(net, masks, x, [torch.randn(4, 3, 8, 8)], layers="downstream", return_result=True)
    assert res.reconstruction.layers == []
    for (k, v), w in zip(small.state_dict().items(), net.state_dict().values()):
        assert torch.equal(v, w), k


class _Routed(nn.Module):
    """``b`` runs only for inputs with a positive mean (data-dependent routing, like a mixture of experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if float(x.mean()) > 0:
            h = h + self.b(h)
        return self.c(h)


def test_data_dependent_calls_are_skipped_with_a_warning() -> None:
    torch.manual_seed(0)
    net = _Routed().eval()
    x = torch.ones(1, 4)
    masks = unit_masks(net, x, 0.5, layers=["a"])
    calib = [torch.randn(16, 4) + 1, torch.randn(16, 4) - 1]  # b runs on the first batch only
    with pytest.warns(ShrinkWarning, match="'b'.*data-dependent"):
        small, res = reconstruct(net, masks, x, calib, return_result=True)
    assert "b" in res.reconstruction.skipped and "b" not in res.reconstruction.layers
    assert "c" in res.reconstruction.layers
