"""GPU checks (skipped without CUDA): the trace, counts, topology and masks give the CPU/meta answers on CUDA."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
tv = pytest.importorskip("torchvision")


def meta_count(name):
    from prunescope.flops import flops_report

    with torch.device("meta"):
        m = tv.models.get_model(name)
    return flops_report(m, torch.ones(1, 3, 224, 224, device="meta"))


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "mobilenet_v3_small"])
def test_counts_on_cuda_equal_meta(name):
    from prunescope.flops import flops_report

    m = tv.models.get_model(name).cuda().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rep = flops_report(m, (1, 3, 224, 224))  # a size tuple: ones are made on the model's device
    ref = meta_count(name)
    assert (rep.total_flops, rep.total_params) == (ref.total_flops, ref.total_params)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not torch.nn.modules.module._global_forward_hooks


def test_topology_and_effective_flops_on_cuda():
    from prunescope import ChannelDependency, count_flops_params
    from prunescope.masks import L1FilterPruner, fix_mask_conflict

    torch.manual_seed(0)
    cpu = tv.models.resnet18().eval()
    gpu = tv.models.resnet18().eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.ones(1, 3, 64, 64)
    assert ChannelDependency(cpu, x).dependency_sets == ChannelDependency(gpu, x.cuda()).dependency_sets
    cfg = [{"sparsity": 0.5, "op_types": ["Conv2d"]}]
    mc = fix_mask_conflict(L1FilterPruner(cpu, cfg).compute_masks(), cpu, x)
    mg = fix_mask_conflict(L1FilterPruner(gpu, cfg).compute_masks(), gpu, x.cuda())
    assert all(torch.equal(mc[k]["weight"], mg[k]["weight"].cpu()) for k in mc)
    a = count_flops_params(cpu, x, masks=mc, effective=True, verbose=False)
    b = count_flops_params(gpu, x.cuda(), masks=mg, effective=True, verbose=False)
    assert a[:2] == b[:2] and a[0] < count_flops_params(cpu, x, verbose=False)[0]


def test_sensitivity_restores_cuda_model():
    from prunescope import SensitivityAnalysis

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sa = SensitivityAnalysis(m, lambda model: float(model(x).detach().abs().mean()), sparsities=[0.25, 0.5],
                             progress=False)
    res = sa.analysis(val_args=[m])
    assert set(res) == {"0", "2"}
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
