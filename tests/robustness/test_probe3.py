"""The third reliability probe's defects (issue 16, item 4), each with the case that showed it.

Each test failed before its fix: a crash (AssertionError, raw torch errors), a wrong number in a note, or a bad
input accepted silently.
"""

from __future__ import annotations

import os
import types

import pytest
import robust_models as rm
import torch
from torch import nn

from prunescope.cli import main
from prunescope.masks import save_masks
from prunescope.narrow import ShrinkError, ShrinkWarning, as_pruned, load_pruned, save_pruned, shrink
from prunescope.narrow.files import tensor_digest
from prunescope.report.search import PlanSearch
from prunescope.report.stages import infeasible_reason, knapsack_plan

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _models_on_path(monkeypatch):
    monkeypatch.syspath_prepend(HERE)


# ---- the plan step's knapsack ----------------------------------------------------------------------------------


def _fake_run(base: int, target: int, exact_saving, grid: dict[str, list[float]]):
    """A plan problem with known, non-additive savings: ``exact_saving(plan)`` is what a plan really saves."""
    r = types.SimpleNamespace(base=base, keys=list(grid), target=target)
    r.macs_of = lambda plan: base - exact_saving({k: v for k, v in plan.items() if v > 0})
    search = PlanSearch(r.keys, grid, lambda k, s: s, r.macs_of, lambda p: 0.0, 1.0, 1.0, target)
    return r, search


def test_knapsack_resolve_jumps_past_a_plan_that_misses_the_exact_count():
    """a and b save 300 each alone, 499 together (their savings overlap): the additive optimum {a: .5, b: .5}
    misses a target of 500 by one MAC. Tightening the budget by that one MAC per re-solve found the same plan
    20 times and gave up (None, then an AssertionError in the plan step); now the next solve asks for more than
    that plan's additive saving and finds {a: .75, b: .5}."""
    single = {("a", 0.5): 300, ("a", 0.75): 450, ("b", 0.5): 300}

    def exact(plan):
        s = sum(single[(k, v)] for k, v in plan.items())
        return s - 101 if len(plan) == 2 else s  # 499 for .5/.5, 649 for .75/.5

    r, search = _fake_run(1000, 500, exact, {"a": [0.5, 0.75], "b": [0.5]})
    c = knapsack_plan(search, r, r.keys, r.base, r.target, fallback=True)
    assert c is not None and c.plan == {"a": 0.75, "b": 0.5}
    assert c.macs == 1000 - 649 <= 500 and search.feasible(c)


def test_unreachable_target_note_gives_the_heaviest_plans_exact_count():
    """Before: 'saves 700 of 1,000 MACs (keeps 30.0%)' (single-set savings summed); the heaviest plan really
    keeps 600 MACs."""
    single = {("a", 0.5): 350, ("b", 0.5): 350}
    r, search = _fake_run(1000, 100, lambda p: sum(single[(k, v)] for k, v in p.items()) - 300 * (len(p) == 2),
                          {"a": [0.5], "b": [0.5]})
    c = knapsack_plan(search, r, r.keys, r.base, r.target, fallback=True)
    assert c.plan == {"a": 0.5, "b": 0.5} and c.macs == 600 and not search.feasible(c)
    note = infeasible_reason(0.1, c, r.base, 0)
    assert "keeps 600 of 1,000 MACs (60.0%, saves 400)" in note, note
    assert "700" not in note


def test_report_sparsities_quarter_steps_completes(tmp_path, capsys):
    """`prunescope report --sparsities 0.25,0.5,0.75` on the embedded default died on an AssertionError."""
    code = main(["report", "--out", str(tmp_path / "r"), "--sparsities", "0.25,0.5,0.75", "--no-recovery",
                 "--plan-evals", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out  # 0: the target is met
    import json

    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["target_met"] and s["flops_after"] <= 0.5 * s["flops_before"]


# ---- parametrized (weight_norm) layers in the report ------------------------------------------------------------


def test_report_with_a_weight_norm_conv_excludes_its_sets_and_completes(tmp_path):
    """TinyCNN with a weight_norm conv2: the residual set conv1+conv2 is left alone with a reason, conv3 is still
    pruned, the report completes (it failed in step 3: the sweep refused every parametrized layer of the model)."""
    from prunescope.report import run_report

    torch.manual_seed(0)
    model = rm.TinyCNN().eval()
    nn.utils.parametrizations.weight_norm(model.conv2)
    x = torch.randn(2, 3, 8, 8)
    ref = model(x).detach()

    def val(m):
        with torch.no_grad():
            return -float((m(x) - ref).abs().mean())

    res = run_report(model, val, x, tmp_path / "r", flops_target=0.9, sparsities=[0.5], progress=False,
                     console=None)
    assert res.plan == {"conv3": 0.5}, res.plan
    assert "conv2" in res.summary["excluded_sets"]["conv1+conv2"] and "parametrized" in \
        res.summary["excluded_sets"]["conv1+conv2"]


# ---- shrink ------------------------------------------------------------------------------------------------------


def _conflicting(model: rm.TinyCNN) -> dict:
    """conv1 masks channels 0-3, conv2 (added to conv1's output: the same channels) masks none: a conflict."""
    w = torch.ones_like(model.conv1.weight)
    w[:4] = 0
    return {"conv1": {"weight": w, "bias": (w.flatten(1).amax(1) > 0).float()}}


def test_shrink_without_fixing_conflicts_names_them():
    torch.manual_seed(0)
    model = rm.TinyCNN().eval()
    with pytest.warns(ShrinkWarning, match="fix_conflicts=False") as rec:
        small = shrink(model, _conflicting(model), torch.randn(1, 3, 8, 8), fix_conflicts=False)
    msg = str(rec[0].message)
    assert "'conv1': 4 masked channels stay, kept by 'conv2'" in msg, msg
    assert small.conv1.out_channels == 8  # behaviour unchanged: the tied channels stay


def test_shrink_no_fix_cli_prints_the_conflict(tmp_path, capsys):
    torch.manual_seed(0)
    save_masks(_conflicting(rm.TinyCNN()), tmp_path / "m.pth")
    code = main(["shrink", "robust_models:TinyCNN", "--input-size", "1,3,8,8", "--masks", str(tmp_path / "m.pth"),
                 "--out", str(tmp_path / "s.pt"), "--no-fix", "--runs", "1", "--seed", "0"])
    err = capsys.readouterr().err
    assert code == 0
    assert "note: shrink: fix_conflicts=False" in err and "'conv1'" in err and "'conv2'" in err, err


def test_bool_masks_are_zero_one_masks():
    """A bool mask failed with a raw NotImplementedError ("abs_cpu" not implemented for 'Bool')."""
    torch.manual_seed(0)
    model = rm.TinyCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    keep = torch.tensor([True, False, True, False])
    bool_masks = {"conv3": {"weight": keep[:, None, None, None].expand(4, 8, 1, 1).clone(), "bias": keep}}
    float_masks = {"conv3": {k: v.float() for k, v in bool_masks["conv3"].items()}}
    a, b = shrink(model, bool_masks, x), shrink(model, float_masks, x)
    assert a.conv3.out_channels == b.conv3.out_channels == 2
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        with as_pruned(model, bool_masks, x):
            masked = model(x)
        assert torch.allclose(masked, a(x), atol=1e-6)


# ---- pruned-model files ----------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = rm.TinyCNN().eval()
    w = torch.ones_like(model.conv3.weight)
    w[:2] = 0
    small = shrink(model, {"conv3": {"weight": w, "bias": torch.tensor([0.0, 0.0, 1.0, 1.0])}},
                   torch.randn(1, 3, 8, 8))
    path = tmp_path / "small.pt"
    save_pruned(small, path)
    return small, path


def _rewrite(path, change):
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)


def test_flipped_byte_in_a_weight_is_refused_naming_the_tensor(saved):
    small, path = saved
    raw = bytearray(path.read_bytes())
    needle = small.fc.weight.detach().contiguous().numpy().tobytes()
    at = raw.find(needle)
    assert at >= 0  # the weight's bytes are stored as they are
    raw[at + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ShrinkError, match=r"tensor 'fc.weight' does not match the SHA-256 digest"):
        load_pruned(rm.TinyCNN(), path)


def test_file_without_digests_loads_as_before(saved):
    """Files written before the digests existed load unchecked."""
    small, path = saved
    _rewrite(path, lambda d: d.pop("digests", None))
    again = load_pruned(rm.TinyCNN(), path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


@pytest.mark.parametrize("how,needle", [
    ("missing", "the file has no weights for 'conv3.bias'"),
    ("reshaped", "tensor 'fc.weight' is (3, 4), the file lists (3, 8) for it"),
    ("extra", "the file has weights for 'conv3.extra'"),
])
def test_weights_that_do_not_fit_name_the_tensor(saved, how, needle):
    """Before: 'the file's weights do not fit the model: Error(s) in loading state_dict for TinyCNN:'."""
    _, path = saved

    def change(d):
        sd = d["state_dict"]
        if how == "missing":
            del sd["conv3.bias"]
            del d["digests"]["conv3.bias"]
        elif how == "reshaped":
            sd["fc.weight"] = sd["fc.weight"][:, :4].clone()
            d["digests"]["fc.weight"] = tensor_digest(sd["fc.weight"])
        else:
            sd["conv3.extra"] = torch.ones(2)
            d["digests"]["conv3.extra"] = tensor_digest(sd["conv3.extra"])
    _rewrite(path, change)
    with pytest.raises(ShrinkError) as info:
        load_pruned(rm.TinyCNN(), path)
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("value", [-3, 10**9, 2.5, "2", True, 3])
def test_crafted_attribute_values_are_refused(saved, value):
    """conv3 keeps 2 output channels: out_channels is 2; anything else (negative, huge, not an int, or an int
    its weight contradicts) was set on the module as it was."""
    _, path = saved
    _rewrite(path, lambda d: d["attrs"]["conv3"].__setitem__("out_channels", value))
    with pytest.raises(ShrinkError, match=r"layer 'conv3': attribute out_channels="):
        load_pruned(rm.TinyCNN(), path)


def test_crafted_in_channels_of_a_linear_is_refused(saved):
    _, path = saved
    _rewrite(path, lambda d: d["attrs"]["fc"].__setitem__("in_features", 7))
    with pytest.raises(ShrinkError, match=r"in_features=7 .* does not agree with its tensors, which give "
                                          r"in_features=8"):
        load_pruned(rm.TinyCNN(), path)


# ---- report: arguments checked before step 1 -------------------------------------------------------------------


class _Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model):
        self.calls += 1
        return rm.small_val(model)


@pytest.mark.parametrize("what", ["calibrate", "out"])
def test_report_checks_calibrate_and_out_before_any_work(tmp_path, what):
    if what == "out" and not os.path.isfile("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    from prunescope.errors import ConfigError
    from prunescope.report import run_report

    val = _Counting()
    out = "/proc/prunescope-x" if what == "out" else tmp_path / "r"
    with pytest.raises(ConfigError, match="calibrate" if what == "calibrate" else "cannot create a folder"):
        run_report(rm.small_cnn(), val, torch.ones(1, 3, 8, 8), out, calibrate=5 if what == "calibrate" else None,
                   console=None, progress=False)
    assert val.calls == 0



def test_a_trace_of_a_structural_copy_is_accepted():
    """The topology analyses trace a meta copy of the model (its graph.model is that copy): shrink and the
    counter take that graph for the model it was copied from, and answer as with the model's own trace."""
    from prunescope.flops import flops_report
    from prunescope.graph import trace
    from prunescope.topology import ChannelDependency

    torch.manual_seed(0)
    model = rm.TinyCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    g = ChannelDependency(model, x).graph
    assert g.model is not model  # the meta copy's trace
    w = torch.ones_like(model.conv3.weight)
    w[:2] = 0
    masks = {"conv3": {"weight": w, "bias": torch.tensor([0.0, 0.0, 1.0, 1.0])}}
    own = trace(model, x)
    assert shrink(model, masks, x, graph=g).conv3.out_channels == 2
    assert flops_report(model, x, graph=g, masks=masks, effective=True).total_flops == \
        flops_report(model, x, graph=own, masks=masks, effective=True).total_flops
