"""SensitivityAnalysis(as_pruned=True) measures the physically shrunk model; the default stays NNI's masks."""

import pytest
import torch
from torch import nn

from prunescope import SensitivityAnalysis
from prunescope.masks.pruners import group_masks
from prunescope.narrow import shrink


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + y)  # c1 and c2 tied
        return self.head(y)


def make():
    torch.manual_seed(0)
    net = Net().eval()
    for b in (net.b1, net.b2):
        b.running_mean.uniform_(-1, 1)
        b.running_var.uniform_(0.5, 2)
        b.bias.data.uniform_(-1, 1)
    return net


X = torch.randn(2, 3, 6, 6)


def metric(model):
    with torch.no_grad():
        return model(X).abs().sum().item()


@pytest.mark.parametrize("workers", [None, 2])
def test_as_pruned_values_are_the_shrunk_models(workers):
    net = make()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sa = SensitivityAnalysis(net, metric, sparsities=[0.25, 0.5], layer_types=(nn.Conv2d,), group_dependencies=True,
                             dummy_input=X, as_pruned=True, workers=workers, progress=False)
    sens = sa.analysis(val_args=[net], specified_layers=["c1"])
    assert list(sens) == ["c1+c2"]
    for s, value in sens["c1+c2"].items():
        masks = dict(zip(["c1", "c2"], group_masks([net.c1, net.c2], s, "l1")))
        small = shrink(net, masks, X)
        assert small.c1.out_channels == 8 - int(8 * s)
        assert value == pytest.approx(metric(small), rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.b1._forward_hooks and not net.b2._forward_hooks
    # NNI's semantics (the default) keep the BatchNorm constant of the zeroed channels: other numbers
    nni = SensitivityAnalysis(net, metric, sparsities=[0.25, 0.5], layer_types=(nn.Conv2d,),
                              group_dependencies=True, dummy_input=X, progress=False)
    other = nni.analysis(val_args=[net], specified_layers=["c1"])
    assert all(abs(other["c1+c2"][s] - sens["c1+c2"][s]) > 1e-3 for s in (0.25, 0.5))


def test_as_pruned_needs_dummy_input():
    from prunescope.errors import ConfigError

    with pytest.raises(ConfigError, match="as_pruned=True needs dummy_input"):
        SensitivityAnalysis(make(), metric, as_pruned=True)


def test_parametrized_layer_is_refused_by_name():
    from prunescope.errors import ConfigError

    net = make()
    net.c2 = nn.utils.parametrizations.weight_norm(net.c2)
    with pytest.raises(ConfigError, match="layer 'c2' has a parametrized weight"):
        SensitivityAnalysis(net, metric, sparsities=[0.5]).analysis(val_args=[net])


def _count_traces(monkeypatch):
    """Count calls to prunescope.graph.trace, wherever a module bound the name."""
    import sys

    import prunescope.graph

    original, calls = prunescope.graph.trace, []

    def counting(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("model"))
        return original(*args, **kwargs)

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("prunescope") and getattr(mod, "trace", None) is original:
            monkeypatch.setattr(mod, "trace", counting)
    return original, calls


def test_graph_feeds_groups_and_as_pruned_without_tracing_again(monkeypatch):
    """SensitivityAnalysis(graph=) reads the dependency sets and the as-pruned zeros from the given trace: the
    model is not traced again, and the values are those of the sweep that traces it itself."""
    kw = dict(sparsities=[0.25, 0.5], layer_types=(nn.Conv2d,), group_dependencies=True, dummy_input=X,
              as_pruned=True, progress=False)
    net = make()
    own = SensitivityAnalysis(net, metric, **kw).analysis(val_args=[net])
    trace, calls = _count_traces(monkeypatch)
    SensitivityAnalysis(make(), metric, **kw).analysis(val_args=[make()])
    assert len(calls) == 1  # the counter sees the one trace a sweep without graph= makes (sets, prunable, zeros)
    graph = trace(net, X)
    calls.clear()
    given = SensitivityAnalysis(net, metric, graph=graph, **kw)
    sens = given.analysis(val_args=[net])
    assert calls == []
    assert sens == own and list(sens) == ["c1+c2"]  # head's channels are the output: not swept


def test_graph_of_another_model_is_refused():
    from prunescope.errors import ConfigError
    from prunescope.graph import trace

    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ConfigError, match="graph was traced from another model"):
        SensitivityAnalysis(make(), metric, group_dependencies=True, dummy_input=X, graph=trace(other, X),
                            progress=False)
