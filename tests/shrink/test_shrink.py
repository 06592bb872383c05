"""shrink against hand-narrowed networks, every layer kind, refusals, and pruned-model files."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from narrow_models import DW, Cat, Chain, FlatLinear, Res, filt_mask
from prunescope import count_flops_params
from prunescope.errors import MaskError, PrunescopeError
from prunescope.flops import flops_report
from prunescope.narrow import ShrinkError, ShrinkWarning, as_pruned, load_pruned, save_pruned, shrink


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def randomize(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def check(full, masks, x, narrow=None, exact_output=True):
    """shrink == hand-narrowed shapes, dense count == effective count, output == as-pruned masked output."""
    before = {k: v.clone() for k, v in full.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ShrinkWarning)
        small, res = shrink(full, masks, x, return_result=True)
    if narrow is not None:
        assert shapes(small) == shapes(narrow)
    eff = flops_report(full, x, masks=res.masks, effective=True, mode="full")
    dense = flops_report(small, x, mode="full")
    assert (dense.total_flops, dense.total_params) == (eff.total_flops, eff.total_params)
    if exact_output:
        with torch.no_grad(), as_pruned(full, res.masks, x):
            ref = full(x)
        with torch.no_grad():
            out = small(x)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (out - ref).abs().max()
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())
    assert type(small) is type(full)
    return small, res


def test_conv_chain_matches_hand_narrowed():
    full = randomize(Chain())
    masks = {"conv1": filt_mask(full.conv1, [0, 2, 3, 7]), "conv2": filt_mask(full.conv2, [1, 4])}
    small, _ = check(full, masks, torch.randn(2, 3, 8, 8), Chain((3, 4, 2, 4)))
    assert (small.conv1.out_channels, small.bn1.num_features, small.conv2.in_channels) == (4, 4, 4)
    assert torch.equal(small.conv1.weight, full.conv1.weight[[0, 2, 3, 7]])
    assert torch.equal(small.conv2.weight, full.conv2.weight[[1, 4]][:, [0, 2, 3, 7]])


def test_residual_block_and_partial_masks_keep_the_tied_width():
    full = randomize(Res())
    keep = [0, 1, 5]
    masks = {"stem": filt_mask(full.stem, keep), "conv2": filt_mask(full.conv2, keep),
             "conv1": filt_mask(full.conv1, [2, 3, 4, 6])}
    check(full, masks, torch.randn(2, 3, 6, 6), Res(w=3, mid=4))
    # one side of the add only: conflict fixed (union keeps all), nothing of the tied width goes
    with pytest.warns(ShrinkWarning, match="conflicts"):
        small = shrink(full, {"stem": filt_mask(full.stem, keep)}, torch.randn(1, 3, 6, 6))
    assert shapes(small) == shapes(full)


@pytest.mark.parametrize("mask_dw", [False, True])
def test_depthwise_block(mask_dw):
    full = randomize(DW())
    keep = [0, 3, 4, 9, 10, 15]
    masks = {"expand": filt_mask(full.expand, keep)}
    if mask_dw:
        masks["dw"] = filt_mask(full.dw, keep)
        small, _ = check(full, masks, torch.randn(1, 8, 5, 5), DW(e=len(keep)))
    else:  # the depthwise conv keeps its channels (no mask): the union policy keeps the tied expand channels
        with pytest.warns(ShrinkWarning, match="conflicts"):
            assert shapes(shrink(full, masks, torch.randn(1, 8, 5, 5))) == shapes(full)
        small = shrink(full, masks, torch.randn(1, 8, 5, 5), fix_conflicts=False)  # as the masks say
        assert shapes(small) == shapes(DW(e=len(keep)))
    assert small.dw.groups == small.dw.in_channels == small.dw.out_channels == 6


def test_concat_and_flatten_linear():
    full = randomize(Cat())
    check(full, {"a": filt_mask(full.a, [1, 2, 5]), "b": filt_mask(full.b, [0])}, torch.randn(1, 3, 7, 7),
          Cat(3, 1))
    fl = FlatLinear()
    narrow = FlatLinear(c=2)
    narrow.fc = nn.Linear(2 * 16, 5)
    narrow.out = nn.Linear(5, 3)
    masks = {"conv": filt_mask(fl.conv, [0, 4]), "fc": filt_mask(fl.fc, [1, 2, 3, 8, 9])}
    small, _ = check(fl, masks, torch.randn(3, 2, 4, 4), narrow)
    assert small.fc.in_features == 32 and small.out.in_features == 5


class Kinds(nn.Module):
    """Conv1d, Conv3d-free 1-D path with PReLU, GroupNorm, InstanceNorm, a layer scale and an upsample."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.act = nn.PReLU(8)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.inorm = nn.InstanceNorm1d(8, affine=True)
        self.scale = nn.Parameter(torch.rand(8, 1) + 0.5)
        self.c3 = nn.ConvTranspose1d(8, 6, 2, stride=2)
        self.c4 = nn.Conv1d(6, 4, 1)

    def forward(self, x):
        x = self.act(self.gn(self.c1(x)))
        x = self.inorm(self.c2(x)) * self.scale
        x = F.interpolate(x, scale_factor=2.0)
        return self.c4(F.relu(self.c3(x)))


def test_layer_kinds_grouped_prelu_norms_layer_scale_transposed():
    full = Kinds().eval()
    x = torch.randn(2, 3, 10)
    m3 = torch.ones(8, 6, 2)
    m3[:, [1, 4]] = 0  # transposed conv: output channels 1 and 4 (dim 1 of its weight)
    masks = {"c1": filt_mask(full.c1, [0, 1, 4, 5]),  # two of each GroupNorm group / conv group
             "c2": filt_mask(full.c2, [0, 2, 4, 6]), "c3": {"weight": m3, "bias": None}}
    small, _ = check(full, masks, x, exact_output=False)  # GroupNorm re-normalises over fewer channels
    assert (small.c1.out_channels, small.gn.num_channels, small.act.num_parameters) == (4, 4, 4)
    assert (small.c2.in_channels, small.c2.out_channels, small.c2.groups) == (4, 4, 2)
    assert small.inorm.num_features == 4 and small.scale.shape == (4, 1)
    assert (small.c3.in_channels, small.c3.out_channels, small.c4.in_channels) == (4, 4, 4)
    assert small(x).shape == full(x).shape
    # without the GroupNorm the same masks give exactly the as-pruned output
    full.gn = nn.Identity()
    check(full, masks, x)


def test_grouped_conv_with_uneven_groups_keeps_channels_instead_of_breaking():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 2, 1))
    masks = {"0": filt_mask(net[0], [2, 3, 4, 5, 6, 7])}  # empties group 0 of the grouped conv
    with pytest.warns(ShrinkWarning):
        small, res = shrink(net, masks, torch.randn(1, 3, 5, 5), return_result=True)
    assert small[2].groups == 4 and small(torch.randn(1, 3, 5, 5)).shape == (1, 2, 3, 3)
    assert small[0].out_channels == 8 and res.fixed[0].kind == "group"  # fix_mask_conflict's group step
    with pytest.warns(ShrinkWarning, match="cannot be removed"):  # unfixed: the plan keeps them itself
        small, res = shrink(net, masks, torch.randn(1, 3, 5, 5), fix_conflicts=False, return_result=True)
    assert small[0].out_channels == 8 and "unequal input channels per group" in res.protected["0"][0]
    # an even removal (one channel of every group) goes through
    small = shrink(net, {"0": filt_mask(net[0], [1, 3, 5, 7])}, torch.randn(1, 3, 5, 5))
    assert (small[0].out_channels, small[2].in_channels, small[2].groups) == (4, 4, 4)


def test_conv3d_and_bias_free_chain():
    net = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1, bias=False), nn.BatchNorm3d(6), nn.ReLU(),
                        nn.Conv3d(6, 3, 1))
    randomize(net)
    small, _ = check(net, {"0": filt_mask(net[0], [1, 2, 5])}, torch.randn(1, 2, 4, 4, 4))
    assert (small[0].out_channels, small[1].num_features, small[3].in_channels) == (3, 3, 3)


def test_layernorm_over_channels_changes_shapes_and_counts():
    class MLP(nn.Module):
        def __init__(self, h=12):
            super().__init__()
            self.fc1 = nn.Linear(6, h)
            self.ln = nn.LayerNorm(h)
            self.fc2 = nn.Linear(h, 3)

        def forward(self, x):
            return self.fc2(F.gelu(self.ln(self.fc1(x))))

    full = MLP()
    masks = {"fc1": filt_mask(full.fc1, list(range(8)))}
    small, _ = check(full, masks, torch.randn(4, 5, 6), MLP(8), exact_output=False)
    assert small.ln.normalized_shape == (8,)


def test_the_result_traces_counts_and_shrinks_again():
    full = randomize(Chain())
    x = torch.randn(1, 3, 8, 8)
    small = shrink(full, {"conv1": filt_mask(full.conv1, [0, 1, 2, 3, 4, 5])}, x)
    smaller = shrink(small, {"conv2": filt_mask(small.conv2, [0, 1, 2])}, x)
    assert smaller.conv2.out_channels == 3 and small.conv2.out_channels == 6
    flops, params, _ = count_flops_params(smaller, x, verbose=False)
    assert params == sum(p.numel() for p in smaller.parameters())


def test_model_in_train_mode_with_hooks_is_untouched():
    full = randomize(Chain()).train()
    calls = []
    h = full.conv1.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in full.state_dict().items()}
    small = shrink(full, {"conv1": filt_mask(full.conv1, [0, 1, 2])}, torch.randn(2, 3, 8, 8))
    assert full.training and all(m.training for m in full.modules())
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())
    assert small.training and len(full.conv1._forward_hooks) == 1
    h.remove()


class Pinned(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 128))


def test_pinned_layer_is_refused_naming_layer_and_op():
    net = Pinned()
    with pytest.raises(ShrinkError, match=r"layer 'conv'.*view") as ei:
        shrink(net, {"conv": filt_mask(net.conv, [0, 1, 2])}, torch.randn(1, 3, 4, 4))
    assert ei.value.layer == "conv"


def test_bad_masks_are_clear_errors_and_leave_the_model_alone():
    net = randomize(Chain())
    x = torch.randn(1, 3, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(MaskError, match="nope"):
        shrink(net, {"nope": {"weight": torch.ones(1)}}, x)
    with pytest.raises(MaskError, match="conv1.*shape"):
        shrink(net, {"conv1": {"weight": torch.ones(3, 3)}}, x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_output_channels_are_kept():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 5, 1))
    with pytest.warns(ShrinkWarning, match="model output"):
        small = shrink(net, {"2": filt_mask(net[2], [0, 1])}, torch.randn(1, 3, 2, 2))
    assert small[2].out_channels == 5


def test_save_and_load_pruned_round_trip_and_mismatch(tmp_path):
    full = randomize(Res())
    x = torch.randn(2, 3, 6, 6)
    small = shrink(full, {"conv1": filt_mask(full.conv1, [0, 5])}, x)
    path = tmp_path / "small.pt"
    save_pruned(small, path)
    data = torch.load(path, weights_only=True)  # plain containers only
    assert data["shapes"]["conv1.weight"] == [2, 8, 3, 3]
    again = load_pruned(Res(), path).eval()
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    assert again.conv1.out_channels == 2 and again.bn1.num_features == 2
    with pytest.raises(ShrinkError, match="layer 'stem' does not fit"):
        load_pruned(Res(w=4), path)
    with pytest.raises(ShrinkError, match="pruned Res, the model given is a Chain"):
        load_pruned(Chain(), path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ShrinkError, match="not a prunescope pruned-model file"):
        load_pruned(Res(), tmp_path / "x.json")
    with pytest.raises(PrunescopeError, match="directory"):
        load_pruned(Res(), tmp_path)


def test_odd_models_tied_weights_parametrized_shared_all_removed():
    x = torch.randn(1, 3, 6, 6)

    class Tied(nn.Module):  # two modules share one weight (own biases); the consumer sees both
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.b.weight = self.a.weight
            self.c = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1))

    t = Tied()
    small, _ = check(t, {"a": filt_mask(t.a, [0, 1, 2, 3])}, x)
    assert small.a.weight is small.b.weight and small.b.bias.shape == (4,) and small.c.in_channels == 8
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    wn = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3))
    net[0] = wn
    with pytest.raises(ShrinkError, match="layer '0' has parametrized tensors"):
        shrink(net, {"0": filt_mask(nn.Conv2d(3, 8, 3), [0, 1])}, x)
    # channels feeding a parametrized layer stay (its weight is computed, not stored)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1)),
                        nn.ReLU(), nn.Conv2d(8, 4, 1))
    with pytest.warns(ShrinkWarning, match="computed"):
        small = shrink(net, {"0": filt_mask(net[0], [0, 1])}, x)
    assert small[0].out_channels == 8 and small(x).shape == net(x).shape
    chain = Chain()
    with pytest.raises(ShrinkError, match="remove all 8 output channels of layer 'conv1'"):
        shrink(chain, {"conv1": filt_mask(chain.conv1, [])}, torch.ones(1, 3, 8, 8))


def test_roll_along_channels_is_pinned_not_shrunk_wrongly():
    """roll(x, 3, dims=1) wraps at the channel count: removing channel 7 of 8 physically moves channels 5 and 6
    to other positions (the output differs from the masked model), so the layer is unsafe and shrink refuses."""
    import pytest

    from prunescope.narrow import ShrinkError
    from prunescope.removal import not_safe_to_prune

    class Roll(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.roll(self.a(x), 3, dims=1)) + torch.roll(x, 1, dims=3).mean()

    m = Roll().eval()
    x = torch.randn(1, 3, 4, 4)
    assert "roll" in not_safe_to_prune(m, x, with_reasons=True)["a"][0]
    mk, bk = torch.ones(8, 3, 1, 1), torch.ones(8)
    mk[7], bk[7] = 0, 0
    with pytest.raises(ShrinkError, match="roll"):
        shrink(m, {"a": {"weight": mk, "bias": bk}}, x)
