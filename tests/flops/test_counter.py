"""count_flops_params against hand-derived formulas, the spec's example and NNI 2.10.1's published totals."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunescope import count_flops_params
from prunescope.flops import flops_report


def spec_net():
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 5, 1))
    net.add_module("conv2", nn.Conv2d(5, 5, 1))
    return net


def test_spec_example_exactly():
    flops, params, results = count_flops_params(spec_net(), (1, 3, 2, 2), verbose=False)
    assert results["conv"] == {"flops": [60], "params": [20], "weight_size": [(5, 3, 1, 1)],
                               "input_size": [(1, 3, 2, 2)], "output_size": [(1, 5, 2, 2)], "module_type": ["Conv2d"]}
    assert results["conv2"] == {"flops": [100], "params": [30], "weight_size": [(5, 5, 1, 1)],
                                "input_size": [(1, 5, 2, 2)], "output_size": [(1, 5, 2, 2)],
                                "module_type": ["Conv2d"]}
    assert (flops, params) == (160, 50)
    assert isinstance(flops, int) and isinstance(params, int)


def test_input_forms_agree():
    net = spec_net()
    a = count_flops_params(net, (1, 3, 2, 2), verbose=False)[0]
    b = count_flops_params(net, torch.randn(1, 3, 2, 2), verbose=False)[0]
    c = count_flops_params(net, (torch.randn(1, 3, 2, 2),), verbose=False)[0]
    assert a == b == c == 160


def test_whole_batch_is_counted():
    assert count_flops_params(spec_net(), (4, 3, 2, 2), verbose=False)[0] == 4 * 160


def test_verbose_table(capsys):
    count_flops_params(spec_net(), (1, 3, 2, 2))
    out = capsys.readouterr().out
    assert "FLOPs total: 160 (MACs" in out
    assert "#Params total: 50" in out
    assert "| conv2 " in out and "Weight Shape" in out and "#Calls" not in out


@pytest.mark.parametrize("name,macs,params", [
    ("resnet18", 1_814_073_344, 11_689_512),   # NNI 2.10.1 MACs; torchvision num_params
    ("resnet50", 4_089_184_256, 25_557_032),
])
def test_nni_totals_resnet(name, macs, params):
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = tv.models.get_model(name)
    flops, p, _ = count_flops_params(model, torch.ones(1, 3, 224, 224, device="meta"), verbose=False)
    assert (flops, p) == (macs, params)


def test_cpu_and_meta_agree():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18()
    cpu = count_flops_params(model, (1, 3, 64, 64), verbose=False)
    with torch.device("meta"):
        meta_model = tv.models.resnet18()
    meta = count_flops_params(meta_model, torch.ones(1, 3, 64, 64, device="meta"), verbose=False)
    assert cpu[0] == meta[0] and cpu[1] == meta[1]
    assert cpu[2] == meta[2]


def test_transposed_and_depthwise_conv():
    # ConvTranspose2d(4->6, k4, s2, p1) on 1x4x8x8: N*Cin*HiWi*(Cout/g)*K = 4*64*6*16 = 24576
    ct = nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1)
    assert count_flops_params(ct, (1, 4, 8, 8), verbose=False)[0] == 4 * 64 * 6 * 16
    # depthwise transposed: Cin=4, groups=4, k3, s2, 8x8 -> 4*64*1*9 = 2304
    ctd = nn.ConvTranspose2d(4, 4, 3, stride=2, groups=4)
    assert count_flops_params(ctd, (1, 4, 8, 8), verbose=False)[0] == 2304
    # depthwise 3x3, 32 channels, 32x32 output: 32*32*32*9 = 294912
    dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
    assert count_flops_params(dw, (1, 32, 32, 32), verbose=False)[0] == 294_912
    # grouped conv1d and conv3d
    c1 = nn.Conv1d(8, 16, 3, groups=2)  # out len 8: 16*8*(8/2)*3
    assert count_flops_params(c1, (2, 8, 10), verbose=False)[0] == 2 * 16 * 8 * 4 * 3
    c3 = nn.Conv3d(2, 4, 2)  # out 3x3x3: 4*27*2*8
    assert count_flops_params(c3, (1, 2, 4, 4, 4), verbose=False)[0] == 4 * 27 * 2 * 8


def test_linear_counts_every_leading_dimension():
    lin = nn.Linear(768, 3072)
    for t in (1, 10, 197):
        assert count_flops_params(lin, (1, t, 768), verbose=False)[0] == t * 768 * 3072


def test_functional_and_matmul_ops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 4, 3, 3))

        def forward(self, x, a, b):
            y = F.conv2d(x, self.weight, padding=1)  # 8*16*4*9 = 4608
            z = a @ b  # (12,197,64)@(12,64,197): 12*197*197*64
            e = torch.einsum("bhqd,bhkd->bhqk", a.unsqueeze(0), a.unsqueeze(0))  # same
            m = torch.bmm(a, b)
            v = torch.matmul(a[0, 0], b[0])  # (64,)@(64,197): 64*197
            return y, z, e, m, v

    a, b = torch.randn(12, 197, 64), torch.randn(12, 64, 197)
    flops, params, res = count_flops_params(M(), (torch.randn(1, 4, 4, 4), a, b), verbose=False)
    mm = 12 * 197 * 197 * 64
    assert flops == 8 * 16 * 4 * 9 + 3 * mm + 64 * 197
    assert res[""]["params"] == [8 * 4 * 9]


def test_attention():
    q = torch.randn(1, 12, 197, 64)
    sdpa = nn.Module()
    sdpa.forward = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # type: ignore[method-assign]
    assert count_flops_params(sdpa, (q, q, q), verbose=False)[0] == 2 * 12 * 197 * 197 * 64
    mha = nn.MultiheadAttention(768, 12, batch_first=True).eval()
    x = torch.randn(1, 197, 768)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    # 4 projections (L*E*E each) + Q.K^T and A.V (L*L*E each); the eval/no-grad fast path counts the same
    expected = 4 * 197 * 768 * 768 + 2 * 197 * 197 * 768
    flops, params, res = count_flops_params(Wrap(), x, verbose=False)
    assert flops == expected
    assert params == sum(p.numel() for p in mha.parameters())
    assert res["attn"]["params"] == [params]


def test_native_mha_kernel_formula():
    from prunescope.flops.formulas import FORMULAS
    from prunescope.graph import OpNode, TensorInfo

    x = TensorInfo(0, (2, 10, 32), torch.float32, "input")
    w = TensorInfo(1, (96, 32), torch.float32, "param")
    out = TensorInfo(2, (2, 10, 32), torch.float32, "op")
    node = OpNode(0, "_native_multi_head_attention", None, (x, x, x, 32, 4, w), {}, [x, w], [out], "", None)
    # batch 2: 4 projections 2*10*32*32 each + 2 products 2*10*10*32 each
    assert FORMULAS[node.name].fn(node) == 4 * 2 * 10 * 32 * 32 + 2 * 2 * 10 * 10 * 32


def test_shared_and_reused_modules():
    lin = nn.Linear(100, 100, bias=False)

    class Shared(nn.Module):  # one Linear reachable under two parents, called once
        def __init__(self):
            super().__init__()
            self.a = lin
            self.b = nn.Sequential(lin)

        def forward(self, x):
            return self.a(x)

    flops, params, res = count_flops_params(Shared(), (1, 100), verbose=False)
    assert (flops, params) == (10_000, 10_000)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(100, 100)

        def forward(self, x):
            return self.lin(self.lin(x))

    flops, params, res = count_flops_params(Twice(), (1, 100), verbose=False)
    assert flops == 20_000 and params == 10_100
    assert res["lin"]["flops"] == [10_000, 10_000]


def test_rnn_family():
    # LSTM(32->64), T=10, B=1: 10 * (4*64*32 + 4*64*64) = 245760
    assert count_flops_params(nn.LSTM(32, 64), (10, 1, 32), verbose=False)[0] == 245_760
    assert count_flops_params(nn.GRU(32, 64), (10, 1, 32), verbose=False)[0] == 10 * 3 * 64 * 96
    # 2-layer bidirectional, batch_first, B=3, T=5: layer 0: 2 dirs * 4H(I+H); layer 1 input is 2H
    H, IN = 16, 8
    per_token = 2 * 4 * H * (IN + H) + 2 * 4 * H * (2 * H + H)
    lstm = nn.LSTM(IN, H, num_layers=2, bidirectional=True, batch_first=True)
    assert count_flops_params(lstm, (3, 5, IN), verbose=False)[0] == 15 * per_token
    cell = nn.LSTMCell(8, 16)
    assert count_flops_params(cell, (4, 8), verbose=False)[0] == 4 * (64 * 8 + 64 * 16)


def test_full_mode_hand_derived_and_uncounted():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)  # 2*16*9 = 288
            self.bn = nn.BatchNorm2d(2)  # eval: 2 * 32 = 64
            self.pool = nn.MaxPool2d(2)  # out 2*2*2=8 elements * 4 = 32
            self.fc = nn.Linear(8, 3)  # 24

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))  # relu 32
            y = self.pool(y).flatten(1)
            y = self.fc(y) + 1  # add: 3
            return y.cumprod(1)  # no formula -> uncounted

    rep = flops_report(Toy(), (1, 1, 4, 4), mode="full")
    assert rep.total_flops == 288 + 64 + 32 + 32 + 24 + 3
    assert rep.uncounted == {"cumprod": [""]}
    assert "Uncounted ops" in rep.table()
    default = flops_report(Toy(), (1, 1, 4, 4))
    assert default.total_flops == 288 + 24 and not default.uncounted


def test_custom_ops_override_module_count():
    class Mystery(nn.Module):
        def forward(self, x):
            return x.cumsum(-1)

    net = nn.Sequential(nn.Linear(4, 4), Mystery())
    seen = {}

    def count(m, inputs, output):
        seen["shape"] = tuple(inputs[0].shape), tuple(output.shape)
        return {"flops": 7 * output.numel(), "params": 0}

    flops, params, res = count_flops_params(net, (2, 4), custom_ops={Mystery: count}, verbose=False)
    assert seen["shape"] == ((2, 4), (2, 4))
    assert res["1"]["flops"] == [56] and flops == 2 * 16 + 56
    # overriding a built-in type: Linear counted as a constant
    flops, _, _ = count_flops_params(net, (2, 4), custom_ops={nn.Linear: lambda m, i, o: 5}, verbose=False)
    assert flops == 5


def test_nni_style_masks_count_remaining_filters():
    net = spec_net()
    mask = torch.ones(5, 3, 1, 1)
    mask[:2] = 0  # 3 of 5 filters kept
    flops, params, res = count_flops_params(net, (1, 3, 2, 2), masks={"conv": {"weight": mask, "bias": None}},
                                            verbose=False)
    assert res["conv"]["flops"] == [36]  # 3 filters * 4 positions * 3 inputs
    assert res["conv2"]["flops"] == [100]  # NNI convention: input channels not discounted
    assert params == 50


def test_model_left_untouched_even_when_it_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.drop = nn.Dropout()

        def forward(self, x):
            x = self.conv(x)
            raise RuntimeError("user code failed")

    m = Boom().train()
    m.drop.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    from prunescope.errors import TraceError

    with pytest.raises(TraceError, match="user code failed"):
        count_flops_params(m, (1, 3, 2, 2), verbose=False)
    assert m.training and not m.drop.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert set(vars(m)) == set(vars(Boom()))


def test_failing_op_is_named():
    from prunescope.errors import TraceError

    with pytest.raises(TraceError) as ei:
        count_flops_params(spec_net(), (1, 4, 2, 2), verbose=False)
    assert ei.value.module == "conv" and ei.value.op == "conv2d"


def test_keyword_inputs_and_dict_outputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 5)
            self.b = nn.Linear(6, 5)

        def forward(self, x, *, y):
            return {"out": self.a(x) + self.b(y)}

    flops, params, _ = count_flops_params(KW(), {"x": torch.randn(2, 4), "y": torch.randn(2, 6)}, verbose=False)
    assert flops == 2 * 4 * 5 + 2 * 6 * 5


def test_no_parameter_model():
    flops, params, res = count_flops_params(nn.ReLU(), (1, 8), verbose=False, mode="full")
    assert (flops, params) == (8, 0)


def test_bad_mode():
    from prunescope.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown mode"):
        count_flops_params(spec_net(), (1, 3, 2, 2), mode="fast", verbose=False)
