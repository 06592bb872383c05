"""Every torchvision classification model: 30% of every prunable set removed, conflict-fixed, shrunk.

On the meta device (nothing computed, the whole zoo in seconds): the shrunk model runs, its output shape is
the model's, and its dense count equals the effective count of the masked model (MACs and params). On the CPU,
for the BatchNorm models small enough to run at 64x64 (96 for the Inceptions) in a fraction of a second: the
shrunk output equals the as-pruned masked output (rtol 1e-4 of the output scale); ConvNeXt and the other
LayerNorm-over-channels models legitimately differ and are checked for shapes and counts only.
"""

import warnings

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from prunescope.flops import flops_report  # noqa: E402
from prunescope.graph import trace  # noqa: E402
from prunescope.narrow import as_pruned, shrink  # noqa: E402
from prunescope.report import prunable_sets  # noqa: E402
from zoo_helpers import NAMES, zoo_model  # noqa: E402

pytestmark = pytest.mark.slow


def set_masks(model, sets, frac=0.3, seed=0):
    """Remove the same pseudo-random ``frac`` of channels in every member of every set (CPU mask tensors)."""
    rng = np.random.default_rng(seed)
    mods = dict(model.named_modules())
    masks = {}
    for members in sets:
        n = mods[members[0]].weight.shape[0]
        drop = rng.choice(n, int(n * frac), replace=False)
        for m in members:
            w = mods[m].weight
            mk = torch.ones(tuple(w.shape))
            mk[drop] = 0
            b = getattr(mods[m], "bias", None)
            bk = None
            if isinstance(b, torch.Tensor):
                bk = torch.ones(tuple(b.shape))
                bk[drop] = 0
            masks[m] = {"weight": mk, "bias": bk}
    return masks


def conv_sets(model, graph, x):
    sets, _, _ = prunable_sets(model, graph, x)
    mods = dict(model.named_modules())
    return [s for s in sets if any(isinstance(mods[m], torch.nn.modules.conv._ConvNd) for m in s)]


@pytest.mark.parametrize("name", NAMES)
def test_zoo_shrinks_on_meta(name):
    model, size, _ = zoo_model(name)
    x = torch.ones(1, 3, size, size, device="meta")
    g = trace(model, x)
    sets = conv_sets(model, g, x)
    if not sets:  # only the transformers (their convs are patch embeddings feeding the residual stream)
        assert name.startswith(("vit_", "swin_")), f"{name}: no prunable conv set"
        pytest.skip("no prunable conv set")
    masks = set_masks(model, sets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, res = shrink(model, masks, x, graph=g, return_result=True)
    assert sum(res.removed.values()) > 0
    eff = flops_report(model, x, graph=g, masks=res.masks, effective=True)
    dense = flops_report(small, x)
    assert (dense.total_flops, dense.total_params) == (eff.total_flops, eff.total_params)
    assert dense.total_flops < flops_report(model, x, graph=g).total_flops
    out = trace(small, x).outputs
    assert [tuple(t.shape) for t in out] == [tuple(t.shape) for t in g.outputs]


_BN = [n for n in NAMES if not n.startswith(("vit_", "swin", "maxvit", "convnext", "alexnet", "squeezenet",
                                              "vgg11", "vgg13", "vgg16", "vgg19"))
       and not n.startswith(("regnet_y_16", "regnet_y_32", "regnet_y_128", "regnet_x_16", "regnet_x_32",
                             "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
                             "efficientnet_v2_m", "resnet152", "wide_resnet101"))]
_BN += ["vgg11_bn"]


def randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)


@pytest.mark.parametrize("name", sorted(set(_BN)))
def test_zoo_output_equals_as_pruned_masked(name):
    kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, **kw).eval()
    randomize_bn(model)
    size = 96 if name == "inception_v3" else 64
    x = torch.randn(2, 3, size, size)
    g = trace(model, x)
    sets = conv_sets(model, g, x)
    masks = set_masks(model, sets)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, res = shrink(model, masks, x, graph=g, return_result=True)
    with torch.no_grad():
        with as_pruned(model, res.masks, graph=g):
            ref = model(x)
        out = small(x)
    scale = ref.abs().max().item()
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * scale), (out - ref).abs().max().item() / scale
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
