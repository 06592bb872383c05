"""The model is borrowed, not owned: every analysis leaves it exactly as it was (property-style).

For several models (eval and train mode, user hooks, frozen parameters, a shared module called several times,
a parametrized weight) and every analysis, the state dict (values and tensor identity), training flags, hooks
(the model's and the global ones), module attributes (``vars(module)`` keys), the module tree and
``requires_grad``/``.grad`` are compared before and after — also when the forward or ``val_func`` raises and when
a KeyboardInterrupt arrives mid-way.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import robust_models as rm
import torch
from torch import nn

from prunescope import count_flops_params
from prunescope.graph import trace
from prunescope.masks import FPGMPruner, L1FilterPruner, L2FilterPruner, LevelPruner, apply_masks, fix_mask_conflict
from prunescope.removal import not_safe_to_prune
from prunescope.topology import ChannelDependency, GroupDependency

X = (2, 3, 8, 8)
CFG = [{"sparsity": 0.5, "op_types": ["Conv2d"]}]
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
                 "_global_forward_hooks_with_kwargs", "_global_module_registration_hooks",
                 "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def snapshot(model: nn.Module) -> dict:
    mods = list(model.named_modules(remove_duplicate=False))
    sd = model.state_dict(keep_vars=True)
    g = nn.modules.module
    return {
        "modules": [(n, type(m)) for n, m in mods],
        "state": {k: v.detach().clone() for k, v in sd.items()},
        "ids": {k: id(v) for k, v in sd.items()},
        "training": [m.training for _, m in mods],
        "hooks": [tuple(tuple(getattr(m, h, {}).items()) for h in _HOOK_DICTS) for _, m in mods],
        "vars": [tuple(sorted(vars(m))) for _, m in mods],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grad": [(n, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        "global": [len(getattr(g, h, {})) for h in _GLOBAL_HOOKS],
    }


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    for key in ("modules", "ids", "training", "hooks", "vars", "requires_grad", "global"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"state_dict[{k!r}] changed"
    for (n, g0), (_, g1) in zip(before["grad"], after["grad"]):
        assert (g0 is None) == (g1 is None) and (g0 is None or torch.equal(g0, g1)), f"{n}.grad changed"


class SharedConvNet(rm.TinyCNN):
    """conv2 (8 -> 8) is called twice."""

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.conv2(self.act(self.bn2(self.conv2(y)))) + y)
        return self.fc(self.pool(self.act(self.conv3(y))).flatten(1))


def _seen(*_a, **_k):
    return None


def model_variant(name: str) -> nn.Module:
    torch.manual_seed(0)
    m = SharedConvNet() if name == "shared-conv" else rm.TinyCNN()
    if name.startswith("train") or name in ("frozen", "shared-conv"):
        m.train()
        with torch.no_grad():  # non-trivial running statistics
            for _ in range(2):
                m(torch.randn(X))
    else:
        m.eval()
    if name == "hooks":
        m.conv1.register_forward_hook(_seen)
        m.bn2.register_forward_pre_hook(_seen)
        m.fc.register_full_backward_hook(_seen)
        m.register_forward_hook(_seen, with_kwargs=True)
        m.conv3.register_forward_pre_hook(_seen, with_kwargs=True)
    if name == "frozen":
        m.conv1.weight.requires_grad_(False)
        m.bn1.requires_grad_(False)
        m(torch.randn(X)).sum().backward()  # grads present on the trainable parameters
    if name == "parametrized":
        nn.utils.parametrizations.weight_norm(m.conv2)
    return m


VARIANTS = ["eval", "train", "hooks", "frozen", "shared-conv", "parametrized"]


def val(model: nn.Module) -> float:
    with torch.no_grad():
        return float(model(torch.ones(X)).sum())


def _masks(model: nn.Module) -> dict:
    return L1FilterPruner(copy.deepcopy(model), CFG).compute_masks()


def _report(model, tmp_path, val_func=val):
    from prunescope.report import run_report

    return run_report(model, val_func, torch.ones(X), tmp_path / "r", flops_target=0.9, sparsities=[0.5],
                      progress=False, console=None)


def _sensitivity(model, val_func=val):
    from prunescope.sensitivity import SensitivityAnalysis

    return SensitivityAnalysis(model, val_func, sparsities=[0.5], progress=False).analysis(val_args=[model])


def _apply(model, masks):
    with apply_masks(model, masks):
        assert torch.count_nonzero(model.conv1.weight) < model.conv1.weight.numel()


# analysis name -> fn(model, masks, tmp_path)
ANALYSES = {
    "trace": lambda m, k, t: trace(m, torch.ones(X)),
    "trace-train-grad": lambda m, k, t: trace(m, torch.ones(X), training=None, grad=True),
    "count": lambda m, k, t: count_flops_params(m, X, verbose=False),
    "count-full": lambda m, k, t: count_flops_params(m, X, verbose=False, mode="full"),
    "count-masks": lambda m, k, t: count_flops_params(m, X, verbose=False, masks=k),
    "count-effective": lambda m, k, t: count_flops_params(m, X, verbose=False, masks=k, effective=True),
    "channel-dependency": lambda m, k, t: ChannelDependency(m, torch.ones(X), include_linear=True),
    "group-dependency": lambda m, k, t: GroupDependency(m, torch.ones(X)),
    "not-safe-to-prune": lambda m, k, t: not_safe_to_prune(m, torch.ones(X)),
    "fix-mask-conflict": lambda m, k, t: fix_mask_conflict(k, m, torch.ones(X)),
    "l1-pruner": lambda m, k, t: L1FilterPruner(m, CFG).compute_masks(),
    "l2-pruner": lambda m, k, t: L2FilterPruner(m, CFG).compute_masks(),
    "fpgm-pruner": lambda m, k, t: FPGMPruner(m, CFG).compute_masks(),
    "level-pruner": lambda m, k, t: LevelPruner(m, [{"sparsity": 0.5, "op_types": ["default"]}]).compute_masks(),
    "apply-masks": lambda m, k, t: _apply(m, k),
    "sensitivity": lambda m, k, t: _sensitivity(m),
    "run-report": lambda m, k, t: _report(m, t),
}
# Combinations that are refused with a clear PrunescopeError today (the model must still come back unchanged):
# the sensitivity sweep prunes stored weights, so it refuses a parametrized target layer by name. (run_report
# leaves the sets of a parametrized layer alone, with the reason, and completes.)
KNOWN_REFUSALS = {("parametrized", "sensitivity")}


@pytest.mark.parametrize("variant,analysis", list(itertools.product(VARIANTS, ANALYSES)),
                         ids=[f"{v}-{a}" for v, a in itertools.product(VARIANTS, ANALYSES)])
def test_analysis_leaves_model_unchanged(variant, analysis, tmp_path):
    from prunescope.errors import PrunescopeError

    model = model_variant(variant)
    masks = _masks(model)
    before = snapshot(model)
    try:
        ANALYSES[analysis](model, masks, tmp_path)
    except PrunescopeError:
        if (variant, analysis) not in KNOWN_REFUSALS:
            raise
    assert_unchanged(before, model)


# ---- failures mid-way ------------------------------------------------------------------------------------------


class _Failing:
    """A val_func that works ``ok`` times, then raises ``exc``."""

    def __init__(self, ok: int, exc: BaseException) -> None:
        self.ok, self.exc, self.calls = ok, exc, 0

    def __call__(self, model):
        self.calls += 1
        if self.calls > self.ok:
            raise self.exc
        return val(model)


FORWARD_ANALYSES = ["trace", "count", "count-masks", "channel-dependency", "not-safe-to-prune", "fix-mask-conflict"]


@pytest.mark.parametrize("variant", ["eval", "train", "hooks", "parametrized"])
@pytest.mark.parametrize("analysis", FORWARD_ANALYSES)
@pytest.mark.parametrize("how", ["raises", "interrupt"])
def test_forward_failure_leaves_model_unchanged(variant, analysis, how, tmp_path):
    from prunescope.errors import PrunescopeError

    model = model_variant(variant)
    masks = _masks(model)
    setattr(model, "fail" if how == "raises" else "interrupt", True)
    before = snapshot(model)
    with pytest.raises(PrunescopeError if how == "raises" else KeyboardInterrupt) as info:
        ANALYSES[analysis](model, masks, tmp_path)
    if how == "raises":
        assert "forward failed on purpose" in str(info.value)
    assert_unchanged(before, model)


# (the parametrized variant is refused before the first evaluation: see KNOWN_REFUSALS)
@pytest.mark.parametrize("variant", ["eval", "train", "hooks"])
@pytest.mark.parametrize("exc", [RuntimeError("val broke"), KeyboardInterrupt()], ids=["raises", "interrupt"])
@pytest.mark.parametrize("where", ["sensitivity", "run-report"])
def test_val_func_failure_leaves_model_unchanged(variant, exc, where, tmp_path):
    model = model_variant(variant)
    before = snapshot(model)
    failing = _Failing(2, exc)  # baseline and one evaluation succeed, then it fails mid-sweep
    with pytest.raises(BaseException) as info:
        if where == "sensitivity":
            _sensitivity(model, failing)
        else:
            _report(model, tmp_path, failing)
    assert failing.calls == 3
    assert isinstance(info.value, KeyboardInterrupt) == isinstance(exc, KeyboardInterrupt)
    assert_unchanged(before, model)


def test_apply_masks_restores_after_exception_and_interrupt():
    for variant in ("eval", "parametrized"):
        model = model_variant(variant)
        masks = _masks(model)
        before = snapshot(model)
        for exc in (RuntimeError("inside"), KeyboardInterrupt()):
            with pytest.raises(type(exc)):
                with apply_masks(model, masks):
                    raise exc
            assert_unchanged(before, model)


def test_the_snapshot_sees_changes():
    """The comparison itself can fail: each kind of change is detected."""
    changes = [
        lambda m: m.train(not m.training),
        lambda m: m.bn1.running_mean.add_(1),
        lambda m: m.conv1.register_forward_hook(_seen),
        lambda m: setattr(m.conv1, "extra", 1),
        lambda m: m.fc.weight.requires_grad_(False),
        lambda m: setattr(m.fc, "weight", nn.Parameter(m.fc.weight.detach().clone())),
        lambda m: nn.modules.module.register_module_forward_hook(_seen),
        lambda m: m.conv3.add_module("x", nn.ReLU()),
    ]
    for change in changes:
        model = model_variant("eval")
        before = snapshot(model)
        handle = change(model)
        with pytest.raises(AssertionError):
            assert_unchanged(before, model)
        if hasattr(handle, "remove"):
            handle.remove()
