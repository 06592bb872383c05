"""shrink's safety net (its output equals the as-pruned masked model's, or ShrinkError), as_pruned = what shrink
ships for any masks (conflicts fixed the same way), and norms over removed channels (#16.1, #19, #20)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from prunescope import SensitivityAnalysis
from prunescope.masks import FPGMPruner, L1FilterPruner, L2FilterPruner
from prunescope.masks.pruners import group_masks
from prunescope.narrow import ShrinkError, ShrinkWarning, as_pruned, shrink


def rows(n_out, n_in, drop, *k):
    m = torch.ones(n_out, n_in, *k)
    m[list(drop)] = 0
    return {"weight": m, "bias": None}


def masked_out(model, masks, x, **kw):
    with as_pruned(model, masks, x, **kw), torch.no_grad():
        return model(x)


def randomize_norms(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
            for p in m.parameters():
                nn.init.uniform_(p, -1.5, 1.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)


# ------------------------------------------------------------------------------------------------ the safety net
class TimesChannels(nn.Module):
    """Multiplies by its input's channel count: the engine sees an elementwise op, shrink changes the count."""

    def forward(self, x):
        return x * x.shape[1]


def test_the_net_catches_a_difference_and_names_the_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), TimesChannels(), nn.Conv2d(8, 4, 3))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 3, 8, 8)
    masks = {"0": rows(8, 3, range(3), 3, 3)}
    with pytest.raises(ShrinkError) as e:
        shrink(net, masks, x)
    assert e.value.layer == "3" and e.value.op == "mul"
    assert "module '3' (TimesChannels)" in str(e.value) and "layers '0'" in str(e.value)
    # the user's model is exactly as it was: weights, training flags, no hooks left
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(m.training for m in net.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    # without the net the silently different model comes back: what the net exists for
    small = shrink(net, masks, x, verify=False)
    assert not torch.allclose(small.eval()(x), masked_out(net.eval(), masks, x), rtol=1e-3)


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        z = F.relu(self.b2(self.c2(y)))
        y = F.relu(self.b3(self.c3(z)) + y)
        return self.fc(y.mean((2, 3)))


class Block(nn.Module):
    """A small pre-norm transformer block with hand-written attention."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.h = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


@pytest.mark.parametrize("case", ["bn_relu_cnn", "residual_cnn", "transformer_block"])
def test_normal_models_pass_with_the_net_on(case):
    torch.manual_seed(0)
    if case == "bn_relu_cnn":
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                            nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))
        x, masks = torch.randn(2, 3, 9, 9), {"0": rows(8, 3, [1, 5], 3, 3), "3": rows(6, 8, [0], 3, 3)}
        layer, width = "3", 5
    elif case == "residual_cnn":
        net = Res()
        x = torch.randn(2, 3, 8, 8)
        masks = {n: rows(8, 8 if n != "c1" else 3, [2, 6], 3, 3) for n in ("c1", "c2", "c3")}
        layer, width = "c2", 6
    else:
        net = Block()
        x = torch.randn(2, 5, 16)
        masks = {"fc1": rows(32, 16, range(0, 32, 3))}
        layer, width = "fc1", 21
    randomize_norms(net)
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to fix, nothing kept
        small = shrink(net, masks, x)
    mod = small.get_submodule(layer)
    assert getattr(mod, "out_channels", getattr(mod, "out_features", None)) == width
    got = small(x)
    assert torch.allclose(got, masked_out(net, masks, x), rtol=1e-4, atol=1e-5 * float(got.detach().abs().max()))


def test_meta_model_skips_the_value_check():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).to("meta")
    small = shrink(net, {"0": rows(8, 3, [0, 1], 3, 3)}, torch.ones(1, 3, 8, 8, device="meta"))
    assert small[0].out_channels == 6 and small[0].weight.device.type == "meta"


# ------------------------------------------------------------------------ as_pruned = shrink, for raw masks
@pytest.mark.parametrize("arch, pruner", [("resnet18", L1FilterPruner), ("resnet18", L2FilterPruner),
                                           ("resnet18", FPGMPruner), ("mobilenet_v2", L1FilterPruner)])
def test_as_pruned_equals_shrink_with_raw_pruner_masks(arch, pruner):
    from prunescope.graph import trace

    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(num_classes=10).eval()
    randomize_norms(net)
    x = torch.randn(1, 3, 64, 64)
    g = trace(net, x)
    cfg = {"sparsity": 0.3, "op_types": ["Conv2d"]}
    if pruner is FPGMPruner:  # its pairwise distances are slow on the wide layers: the first stages are enough
        cfg["op_names"] = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and "layer3" not in n
                           and "layer4" not in n]
    masks = pruner(net, [cfg]).compute_masks()
    with pytest.warns(ShrinkWarning, match="as_pruned: the masks had .* conflicts and were fixed first"):
        ref = masked_out(net, masks, x, graph=g)
    with pytest.warns(ShrinkWarning, match="shrink: the masks had"):
        small = shrink(net, masks, x, graph=g)
    with torch.no_grad():
        got = small(x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # the raw masks without the fix compute something else: the fix is what makes the two agree
    unfixed = masked_out(net, masks, x, graph=g, fix_conflicts=False)
    assert not torch.allclose(unfixed, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


# --------------------------------------------------------------------------------- norms over removed channels
class ConvNeXtBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.ln = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 16), nn.Linear(16, 4)

    def forward(self, x):
        y = self.dw(self.stem(x)).permute(0, 2, 3, 1)
        return self.fc2(F.gelu(self.fc1(self.ln(y))))


class TokenMLP(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), norm, nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class GNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.gn, self.c2 = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.gn(self.c1(x))))


NORM_CASES = {
    "convnext_layernorm": (ConvNeXtBlock, torch.randn(2, 3, 5, 5), "stem", [1, 2, 6], (1, 1), "ln", -1),
    "token_mlp_layernorm": (lambda: TokenMLP(nn.LayerNorm(8)), torch.randn(2, 4, 6), "fc1", [0, 3, 7], (), "norm",
                            -1),
    # group 0 (channels 0-3) loses three channels, group 1 (4-7) one (conflicts not fixed): the narrowed
    # GroupNorm(2, 4) regroups the kept channels 3, 4 | 5, 6
    "groupnorm_uneven": (GNNet, torch.randn(2, 3, 6, 6), "c1", [0, 1, 2, 7], (3, 3), "gn", 1),
}


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_as_pruned_renormalises_over_kept_channels_like_shrink(case):
    make, x, layer, drop, k, norm, axis = NORM_CASES[case]
    torch.manual_seed(0)
    net = make().eval()
    randomize_norms(net)
    masks = {layer: rows(8, 3 if layer != "fc1" else 6, drop, *k)}
    if case == "convnext_layernorm":  # the depthwise conv follows its input channels
        masks["dw"] = rows(8, 1, drop, 3, 3)
    fix = case != "groupnorm_uneven"  # fixing would make both groups lose the same number of channels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = shrink(net, masks, x, fix_conflicts=fix)
        ref = masked_out(net, masks, x, fix_conflicts=fix)
    assert small.get_submodule(norm).weight.numel() == 8 - len(drop)  # narrowed
    got = small(x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    mod = net.get_submodule(norm)
    assert not mod._forward_hooks and not mod._forward_pre_hooks
    # zeroing after the full-width norm (what as_pruned did before) is another function
    from prunescope.masks import apply_masks

    h = mod.register_forward_hook(lambda m, a, o: o.index_fill(axis, torch.tensor(drop), 0))
    try:
        with apply_masks(net, masks), torch.no_grad():
            naive = net(x)
    finally:
        h.remove()
    assert (naive - ref).abs().max() > 1e-2 * ref.abs().max()


def test_rmsnorm_over_removed_channels_is_the_narrowed_rmsnorm():
    """shrink removes the channels an ``rms_norm`` reads (the op catalogue's norm table), and both the shrunk
    model and as_pruned's emulation equal a hand-narrowed model: Linear(6, 5) -> RMSNorm(5) -> Linear(5, 3)."""
    torch.manual_seed(0)
    net = TokenMLP(nn.RMSNorm(8, eps=1e-6)).eval()
    randomize_norms(net)
    x = torch.randn(2, 4, 6)
    drop = [1, 4, 5]
    keep = [i for i in range(8) if i not in drop]
    hand = TokenMLP(nn.RMSNorm(5, eps=1e-6)).eval()
    hand.fc1 = nn.Linear(6, 5)
    with torch.no_grad():
        hand.fc1.weight.copy_(net.fc1.weight[keep]), hand.fc1.bias.copy_(net.fc1.bias[keep])
        hand.norm.weight.copy_(net.norm.weight[keep])
        hand.fc2 = nn.Linear(5, 3)
        hand.fc2.weight.copy_(net.fc2.weight[:, keep]), hand.fc2.bias.copy_(net.fc2.bias)
        want = hand(x)
    from prunescope.graph import trace
    from prunescope.removal.plan import plan_removal

    g = trace(net, x)
    masks = {"fc1": {"weight": torch.ones(8, 6).index_fill(0, torch.tensor(drop), 0), "bias": None}}
    plan = plan_removal(g, masks, check_pins=False)
    assert plan.removed["fc1"].tolist() == [i in drop for i in range(8)]  # the engine follows rms_norm
    with torch.no_grad():
        small = shrink(net, masks, x)
        assert small.norm.normalized_shape == (5,)
        assert torch.allclose(small(x), want, rtol=1e-4, atol=1e-6)
    with as_pruned(net, masks, plan=plan), torch.no_grad():
        got = net(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("workers", [None, 2])
def test_sensitivity_as_pruned_value_is_the_shrunk_models_metric(workers):
    torch.manual_seed(0)
    net = TokenMLP(nn.LayerNorm(8)).eval()
    randomize_norms(net)
    x = torch.randn(4, 3, 6)

    def metric(model):
        with torch.no_grad():
            return model(x).square().mean().item()

    sa = SensitivityAnalysis(net, metric, sparsities=[0.25, 0.5], layer_types=(nn.Linear,), dummy_input=x,
                             as_pruned=True, progress=False, workers=workers)
    sens = sa.analysis(val_args=[net], specified_layers=["fc1"])
    for s, value in sens["fc1"].items():
        masks = {"fc1": group_masks([net.fc1], s, "l1")[0]}
        small = shrink(net, masks, x)
        assert small.norm.normalized_shape == (8 - int(8 * s),)
        assert value == pytest.approx(metric(small), rel=1e-5)
    assert not net.norm._forward_hooks and not net.norm._forward_pre_hooks


def test_timm_swin_as_pruned_equals_shrink():
    """A tiny Swin (timm, random weights): unit masks at 30% remove channels its LayerNorms normalise over; the
    masked model used to zero after the full-width norm (rel. diff 0.16 on this config), now it renormalises."""
    timm = pytest.importorskip("timm")
    from prunescope import unit_masks

    torch.manual_seed(0)
    net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=64,
                            window_size=4, embed_dim=32, depths=(1, 1), num_heads=(2, 4)).eval()
    x = torch.randn(1, 3, 64, 64)
    masks = unit_masks(net, x, 0.3)
    small = shrink(net, masks, x)  # the net inside shrink compares too; here as_pruned is called as users do
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
    ref = masked_out(net, masks, x)
    with torch.no_grad():
        got = small(x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
