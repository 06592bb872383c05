"""Bad or unusual inputs (issue 12), table-driven: each is refused with a PrunescopeError naming the culprit,
or analysed right against an independent reference. The CLI cases expect exit code 2 and one line on stderr.

Add a row whenever a new bad input is found.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import robust_models as rm
import torch
from torch import nn

from prunescope import count_flops_params, head_masks, unit_masks
from prunescope._io import atomic_write
from prunescope.cli import main
from prunescope.errors import ConfigError, MaskError, OutputError, PrunescopeError, TraceError, UnsupportedModelError
from prunescope.flops import flops_report
from prunescope.graph import trace
from prunescope.masks import apply_masks, load_masks, save_masks, validate_masks
from prunescope.narrow import ShrinkError, as_pruned, save_pruned, shrink
from prunescope.removal import not_safe_to_prune
from prunescope.report import run_report
from prunescope.report.recovery import recalibrate_bn
from prunescope.topology import ChannelDependency

HERE = os.path.dirname(os.path.abspath(__file__))
CONTRACT = "fn(module, inputs, output) -> int >= 0"
X = (1, 3, 8, 8)


@pytest.fixture(autouse=True)
def _models_on_path(monkeypatch):
    monkeypatch.syspath_prepend(HERE)


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def dynamic_quantized(model: nn.Module) -> nn.Module:
    return _quiet(lambda: torch.ao.quantization.quantize_dynamic(model, {nn.Linear, nn.LSTM}, dtype=torch.qint8))


class _QuantConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.ao.quantization.QuantStub()
        self.c = nn.Conv2d(3, 4, 3)
        self.r = nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 2)
        self.dq = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        y = self.c2(self.r(self.c(self.q(x))))
        return self.dq(self.fc(y.flatten(1)))


def static_quantized() -> tuple[nn.Module, nn.Module]:
    """(float model, its static-quantized copy)."""
    torch.manual_seed(0)
    fm = _QuantConvNet().eval()
    if not torch.backends.quantized.supported_engines or torch.backends.quantized.engine == "none":
        pytest.skip("no quantized engine in this torch build")

    def build():
        import copy

        q = copy.deepcopy(fm)
        q.qconfig = torch.ao.quantization.get_default_qconfig(torch.backends.quantized.engine)
        torch.ao.quantization.prepare(q, inplace=True)
        q(torch.randn(4, 3, 8, 8))
        torch.ao.quantization.convert(q, inplace=True)
        return q

    return fm, _quiet(build)


def _linear_net():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU())


def _custom(fn):
    return lambda: count_flops_params(_linear_net(), (2, 4), custom_ops={nn.Linear: fn}, verbose=False)


def _meta_mask_file(tmp_path):
    p = tmp_path / "meta.pth"
    torch.save({"0": {"weight": torch.ones(4, 3, 3, 3, device="meta"), "bias": None}}, p)
    return lambda: load_masks(p)


def _json_file(tmp_path):
    p = tmp_path / "masks.json"
    p.write_text(json.dumps({"conv1": {"weight": [1, 0]}}))
    return lambda: load_masks(p)


def _text_file(tmp_path):
    p = tmp_path / "masks.txt"
    p.write_text("conv1 0 1 1 0\n")
    return lambda: load_masks(p)


def _wider_cnn():
    """``small_cnn`` with 6 channels instead of 4 after the first conv: the same classes and names."""
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))


def _write_under_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return lambda: atomic_write(tmp_path / "afile" / "out.csv", "data")


# (id, builder(tmp_path) -> callable, exception type, substrings the message must contain)
API_CASES = [
    ("torchscript-count", lambda t: lambda: count_flops_params(rm.scripted(), X, verbose=False),
     UnsupportedModelError, ["TorchScript", "the model"]),
    ("torchscript-deps", lambda t: lambda: ChannelDependency(rm.scripted(), torch.ones(X)),
     UnsupportedModelError, ["TorchScript"]),
    ("torchscript-unsafe", lambda t: lambda: not_safe_to_prune(rm.scripted(), torch.ones(X)),
     UnsupportedModelError, ["TorchScript"]),
    ("torchscript-submodule", lambda t: lambda: count_flops_params(nn.Sequential(nn.Identity(), rm.scripted()), X,
                                                                   verbose=False),
     UnsupportedModelError, ["TorchScript", "module '1'"]),
    ("dynamic-quantized-deps", lambda t: lambda: ChannelDependency(dynamic_quantized(_linear_net()), torch.ones(2, 4),
                                                                   include_linear=True),
     UnsupportedModelError, ["module '0'", "quantized"]),
    ("static-quantized-deps", lambda t: lambda: ChannelDependency(static_quantized()[1], torch.ones(X)),
     UnsupportedModelError, ["module 'c'", "quantized"]),
    ("dynamic-quantized-lstm-count", lambda t: lambda: count_flops_params(
        dynamic_quantized(nn.Sequential(nn.LSTM(4, 4))), (2, 3, 4), verbose=False),
     UnsupportedModelError, ["module '0'", "quantized", "LSTM"]),
    ("custom-negative", lambda t: _custom(lambda m, i, o: -5), ConfigError,
     ["custom_ops", "module '0'", CONTRACT, "-5"]),
    ("custom-none", lambda t: _custom(lambda m, i, o: None), ConfigError,
     ["custom_ops", "module '0'", CONTRACT, "None"]),
    ("custom-string", lambda t: _custom(lambda m, i, o: "12"), ConfigError, ["custom_ops", "module '0'", CONTRACT]),
    ("custom-nan", lambda t: _custom(lambda m, i, o: math.nan), ConfigError, ["custom_ops", "module '0'", "nan"]),
    ("custom-list", lambda t: _custom(lambda m, i, o: [1, 2]), ConfigError, ["custom_ops", "module '0'", CONTRACT]),
    ("custom-bool", lambda t: _custom(lambda m, i, o: True), ConfigError, ["custom_ops", "module '0'"]),
    ("custom-dict-negative-params", lambda t: _custom(lambda m, i, o: {"flops": 3, "params": -1}), ConfigError,
     ["custom_ops", "module '0'", "params"]),
    ("custom-dict-bad-key", lambda t: _custom(lambda m, i, o: {"macs": 3}), ConfigError, ["custom_ops", "'macs'"]),
    ("custom-arity", lambda t: _custom(lambda m, i: 3), ConfigError, ["custom_ops[Linear]", CONTRACT]),
    ("custom-raises", lambda t: _custom(lambda m, i, o: 1 // 0), ConfigError,
     ["custom_ops[Linear]", "module '0'", "ZeroDivisionError"]),
    ("custom-string-key", lambda t: lambda: count_flops_params(_linear_net(), (2, 4), custom_ops={"Linear": len},
                                                               verbose=False),
     ConfigError, ["custom_ops", "'Linear'", "module class"]),
    ("custom-not-callable", lambda t: _custom(5), ConfigError, ["custom_ops[Linear]", "not callable"]),
    ("custom-not-a-dict", lambda t: lambda: flops_report(_linear_net(), (2, 4), custom_ops=[nn.Linear]),
     ConfigError, ["custom_ops", "dict"]),
    ("size-with-float", lambda t: lambda: count_flops_params(rm.small_cnn(), (1, 3, 8.0, 8), verbose=False),
     ConfigError, ["8.0", "position 2", "integer"]),
    ("size-missing-batch-conv", lambda t: lambda: count_flops_params(rm.small_cnn(), (3, 8, 8), verbose=False),
     TraceError, ["module '0'", "batch dimension", "(3, 8, 8)"]),
    ("size-1-3-8-for-conv2d", lambda t: lambda: count_flops_params(rm.small_cnn(), (1, 3, 8), verbose=False),
     TraceError, ["module '0'", "batch dimension", "(1, 1, 3, 8)"]),
    ("missing-batch-inner-module", lambda t: lambda: count_flops_params(rm.bn1d_net(), (16,), verbose=False),
     TraceError, ["module '1.0'", "BatchNorm1d"]),
    ("load-masks-directory", lambda t: lambda: load_masks(t), MaskError, ["is a directory", "{tmp}"]),
    ("load-masks-json", _json_file, MaskError, ["not a mask file", "masks.json"]),
    ("load-masks-text", _text_file, MaskError, ["not a mask file", "masks.txt"]),
    ("load-masks-meta", _meta_mask_file, MaskError, ["meta", "layer '0'", "meta.pth"]),
    ("validate-meta-mask", lambda t: lambda: validate_masks({"0": {"weight": torch.ones(4, 3, 3, 3, device="meta")}},
                                                            rm.small_cnn()),
     MaskError, ["meta", "layer '0'"]),
    ("unit-masks-sparsity-1.5", lambda t: lambda: unit_masks(rm.small_cnn(), torch.ones(X), 1.5), ConfigError,
     ["unit_masks", "0 <= sparsity < 1", "1.5"]),
    ("unit-masks-sparsity-nan", lambda t: lambda: unit_masks(rm.small_cnn(), torch.ones(X), math.nan), ConfigError,
     ["unit_masks", "0 <= sparsity < 1", "nan"]),
    ("unit-masks-sparsity-negative", lambda t: lambda: unit_masks(rm.small_cnn(), torch.ones(X), -0.1),
     ConfigError, ["unit_masks", "0 <= sparsity < 1", "-0.1"]),
    ("unit-masks-sparsity-1", lambda t: lambda: unit_masks(rm.small_cnn(), torch.ones(X), 1), ConfigError,
     ["unit_masks", "0 <= sparsity < 1", "1.0"]),
    ("unit-masks-sparsity-string", lambda t: lambda: unit_masks(rm.small_cnn(), torch.ones(X), "0.5"), ConfigError,
     ["unit_masks", "'0.5'"]),
    ("head-masks-sparsity-1.5", lambda t: lambda: head_masks(rm.small_cnn(), torch.ones(X), 1.5), ConfigError,
     ["head_masks", "0 <= sparsity < 1", "1.5"]),
    ("head-masks-sparsity-nan", lambda t: lambda: head_masks(rm.small_cnn(), torch.ones(X), math.nan), ConfigError,
     ["head_masks", "nan"]),
    ("head-masks-sparsity-negative", lambda t: lambda: head_masks(rm.small_cnn(), torch.ones(X), -0.1),
     ConfigError, ["head_masks", "-0.1"]),
    ("shrink-graph-of-another-model", lambda t: lambda: shrink(rm.small_cnn(), {}, torch.ones(X),
                                                               graph=trace(_wider_cnn(), torch.ones(X))),
     ConfigError, ["shrink", "traced from another model", "'0.weight' is (6, 3, 3, 3) in the traced model, "
                   "(4, 3, 3, 3) in the model given"]),
    ("shrink-graph-of-another-class", lambda t: lambda: shrink(rm.small_cnn(), {}, torch.ones(X),
                                                               graph=trace(rm.plain_net(), torch.ones(X))),
     ConfigError, ["shrink", "traced from another model", "ParamNet", "Sequential"]),
    ("as-pruned-graph-of-another-model", lambda t: lambda: as_pruned(rm.small_cnn(), {}, graph=trace(
        _wider_cnn(), torch.ones(X))).__enter__(), ConfigError, ["as_pruned", "traced from another model"]),
    ("flops-graph-of-another-model", lambda t: lambda: flops_report(rm.small_cnn(), torch.ones(X), graph=trace(
        _wider_cnn(), torch.ones(X))), ConfigError, ["flops_report", "traced from another model"]),
    ("effective-flops-graph-of-another-model", lambda t: lambda: flops_report(
        rm.small_cnn(), torch.ones(X), graph=trace(_wider_cnn(), torch.ones(X)), effective=True, masks={}),
     ConfigError, ["flops_report", "traced from another model"]),
    ("shrink-graph-not-a-graph", lambda t: lambda: shrink(rm.small_cnn(), {}, torch.ones(X), graph="g"),
     ConfigError, ["shrink", "ModelGraph", "str"]),
    ("shrink-masks-none", lambda t: lambda: shrink(rm.small_cnn(), None, torch.ones(X)), MaskError,
     ["shrink masks", "NoneType"]),
    ("as-pruned-masks-none", lambda t: lambda: as_pruned(rm.small_cnn(), None, torch.ones(X)).__enter__(),
     MaskError, ["as_pruned masks", "NoneType"]),
    ("save-pruned-meta-model", lambda t: lambda: save_pruned(rm.small_cnn().to("meta"), t / "s.pt"), ShrinkError,
     ["meta", "'0.weight'"]),
    ("calibration-batch-wrong-shape", lambda t: lambda: recalibrate_bn(rm.TinyCNN(), [torch.ones(2, 3, 8, 8),
                                                                                      torch.ones(2, 5, 8, 8)]),
     ConfigError, ["calibration batch 1", "(2, 5, 8, 8)", "5 channels"]),
    ("calibration-batches-not-iterable", lambda t: lambda: recalibrate_bn(rm.TinyCNN(), 5), ConfigError,
     ["calibration batches", "iterable", "int"]),
    ("report-calibrate-not-iterable", lambda t: lambda: run_report(rm.small_cnn(), rm.small_val, torch.ones(X),
                                                                   t / "r", calibrate=5, console=None),
     ConfigError, ["calibrate", "int"]),
    ("write-over-directory", lambda t: lambda: atomic_write(t, "x"), OutputError, ["is a directory", "{tmp}"]),
    ("write-under-a-file", _write_under_file, OutputError, ["is a file", "afile"]),
    ("write-missing-folder", lambda t: lambda: atomic_write(t / "no" / "such" / "f.csv", "x"), OutputError,
     ["does not exist", "f.csv"]),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_refused_by_name(case, tmp_path):
    _, build, exc_type, needles = case
    fn = build(tmp_path)
    with pytest.raises(exc_type) as info:
        _quiet(fn)
    assert isinstance(info.value, PrunescopeError)
    msg = str(info.value)
    for n in (n.replace("{tmp}", str(tmp_path)) for n in needles):
        assert n in msg, f"{n!r} not in {msg!r}"
    assert ".tmp" not in msg


@pytest.fixture
def temp_files_denied(monkeypatch):
    """Creating the atomic writer's temporary file fails with EACCES (as in a read-only folder, even for root)."""
    real_open = os.open

    def deny(path, *a, **k):
        if str(path).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", deny)


def test_unwritable_output_names_the_given_path(tmp_path, temp_files_denied):
    """The temporary file cannot be created (EACCES): the error names the path given, not the temp file."""
    target = tmp_path / "out.csv"
    with pytest.raises(OutputError) as info:
        atomic_write(target, "x")
    assert str(target) in str(info.value) and "Permission denied" in str(info.value)
    assert ".tmp" not in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_names_the_given_path(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="no permission") as info:
            atomic_write(ro / "f.csv", "x")
        assert "f.csv" in str(info.value)
    finally:
        ro.chmod(0o700)


# ---- inputs that must work: the right answer against an independent reference ----------------------------------


def _mask_rows(n_out: int, keep: int, shape: tuple[int, ...]) -> torch.Tensor:
    m = torch.zeros(shape)
    m[:keep] = 1
    return m


def test_parametrized_conv_counts_as_the_plain_conv():
    plain, param = rm.plain_net(), rm.param_net()
    fp, pp, rp = count_flops_params(plain, X, verbose=False)
    fq, pq, rq = count_flops_params(param, X, verbose=False)
    assert fq == fp
    assert rq["conv3"] == rp["conv3"] and "conv3.parametrizations.weight" not in rq
    assert pq == pp + 4  # weight_norm adds the magnitude g, one per output channel, to the model's parameters
    masks = {"conv3": {"weight": _mask_rows(4, 2, (4, 6, 3, 3)), "bias": None}}
    fpm = count_flops_params(plain, X, verbose=False, masks=masks)[0]
    fqm = count_flops_params(param, X, verbose=False, masks=masks)[0]
    assert fqm == fpm < fp  # the masks are honoured, as for the plain conv
    # effective=True is not compared: the removal plan deliberately keeps a parametrized layer's channels (shrink
    # cannot narrow a parametrization), so its effective count differs from the plain conv's by design.


def test_parametrized_layer_is_named_like_the_plain_layer():
    x = torch.ones(X)
    plain = ChannelDependency(rm.plain_net(), x, include_linear=True).sets
    param = ChannelDependency(rm.param_net(), x, include_linear=True).sets
    assert param == plain and ["conv3"] in param


def test_apply_masks_masks_the_effective_parametrized_weight():
    param, plain = rm.param_net(), rm.plain_net()
    with torch.no_grad():
        plain.conv3.weight.copy_(param.conv3.weight)
    mask = _mask_rows(4, 2, (4, 6, 3, 3))
    masks = {"conv3": {"weight": mask, "bias": torch.tensor([1.0, 1.0, 0.0, 0.0])}}
    x = torch.randn(X)
    before_state = {k: v.clone() for k, v in param.state_dict().items()}
    before_modules = [n for n, _ in param.named_modules()]
    with apply_masks(param, masks), apply_masks(plain, masks), torch.no_grad():
        assert torch.count_nonzero(param.conv3.weight[2:]) == 0
        assert torch.allclose(param(x), plain(x), atol=1e-6)
        assert param.state_dict().keys() == before_state.keys()
    assert [n for n, _ in param.named_modules()] == before_modules
    for k, v in param.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    assert torch.count_nonzero(param.conv3.weight[2:]) > 0


def test_dynamic_quantized_linear_counts_as_float_linear():
    torch.manual_seed(0)
    fm = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    qm = dynamic_quantized(fm)
    ff, fpar, fres = count_flops_params(fm, (3, 8), verbose=False)
    qf, qpar, qres = count_flops_params(qm, (3, 8), verbose=False)
    assert (qf, qpar) == (ff, fpar) == (3 * (8 * 6 + 6 * 2), 8 * 6 + 6 + 6 * 2 + 2)
    for k in ("flops", "params", "weight_size"):
        assert qres["0"][k] == fres["0"][k] and qres["2"][k] == fres["2"][k]


def test_static_quantized_conv_counts_as_float_conv():
    fm, qm = static_quantized()
    ff, fpar, fres = count_flops_params(fm, X, verbose=False)
    qf, qpar, qres = count_flops_params(qm, X, verbose=False)
    assert (qf, qpar) == (ff, fpar)
    for layer in ("c", "c2", "fc"):
        assert qres[layer]["flops"] == fres[layer]["flops"]
        assert qres[layer]["params"] == fres[layer]["params"]


def test_custom_ops_accepts_counts_of_number_types():
    for value in (7, 7.0, torch.tensor(7), {"flops": 7, "params": 0}):
        flops, _, res = count_flops_params(_linear_net(), (2, 4), custom_ops={nn.Linear: lambda m, i, o, v=value: v},
                                           verbose=False)
        assert res["0"]["flops"] == [7] and flops == 7


# ---- CLI ---------------------------------------------------------------------------------------------------------


def _cli_file_under(tmp_path):
    (tmp_path / "afile").write_text("x")
    return str(tmp_path / "afile" / "out.csv")


def _cli_json(tmp_path):
    p = tmp_path / "m.json"
    p.write_text("{}")
    return str(p)


def _cli_masks(tmp_path):
    """A mask file for ``small_cnn``: the first conv keeps channels 0 and 1."""
    p = tmp_path / "m.pth"
    w = torch.ones(4, 3, 3, 3)
    w[2:] = 0
    save_masks({"0": {"weight": w, "bias": torch.tensor([1.0, 1.0, 0.0, 0.0])}}, p)
    return str(p)


SMALL = "robust_models:small_cnn"
REPORT = ["report", SMALL, "--input-size", "1,3,8,8", "--val", "robust_models:small_val", "--no-progress"]
# (id, argv builder(tmp_path), substrings of the one error line)
CLI_CASES = [
    ("flops-out-is-directory", lambda t: ["flops", SMALL, "--input-size", "1,3,8,8", "--out", str(t)],
     ["is a directory", "{tmp}"]),
    ("flops-out-under-a-file", lambda t: ["flops", SMALL, "--input-size", "1,3,8,8", "--out", _cli_file_under(t)],
     ["afile", "is a file"]),
    ("flops-out-missing-folder", lambda t: ["flops", SMALL, "--input-size", "1,3,8,8", "--out",
                                            str(t / "nope" / "f.csv")], ["does not exist", "f.csv"]),
    ("masks-out-is-directory", lambda t: ["masks", SMALL, "--sparsity", "0.5", "--out", str(t)],
     ["is a directory", "{tmp}"]),
    ("deps-csv-is-directory", lambda t: ["deps", SMALL, "--input-size", "1,3,8,8", "--csv", str(t)],
     ["is a directory", "--csv"]),
    ("device-gpu0", lambda t: ["flops", SMALL, "--input-size", "1,3,8,8", "--device", "gpu0"],
     ["--device 'gpu0'"]),
    ("deps-device-gpu0", lambda t: ["deps", SMALL, "--input-size", "1,3,8,8", "--device", "gpu0"],
     ["--device 'gpu0'"]),
    ("masks-device-gpu0", lambda t: ["masks", SMALL, "--sparsity", "0.5", "--device", "gpu0", "--out",
                                     str(t / "m.pth")], ["--device 'gpu0'"]),
    ("input-size-1-3-8", lambda t: ["flops", SMALL, "--input-size", "1,3,8"], ["batch dimension", "module '0'"]),
    ("input-size-float", lambda t: ["flops", SMALL, "--input-size", "1,3,8.5,8"], ["--input-size", "1,3,8.5,8"]),
    ("masks-file-is-directory", lambda t: ["flops", SMALL, "--input-size", "1,3,8,8", "--masks", str(t)],
     ["is a directory"]),
    ("masks-file-is-json", lambda t: ["flops", SMALL, "--input-size", "1,3,8,8", "--masks", _cli_json(t)],
     ["not a mask file", "m.json"]),
    ("torchscript-model", lambda t: ["flops", "robust_models:scripted", "--input-size", "1,3,8,8"],
     ["TorchScript"]),
    ("torchscript-deps", lambda t: ["unsafe", "robust_models:scripted", "--input-size", "1,3,8,8"],
     ["TorchScript"]),
    ("shrink-device-meta", lambda t: ["shrink", SMALL, "--input-size", "1,3,8,8", "--masks", _cli_masks(t), "--out",
                                      str(t / "s.pt"), "--device", "meta"], ["--device meta", "--device cpu"]),
    ("report-calibrate-not-iterable", lambda t: [*REPORT, "--calibrate", "robust_models:NOT_BATCHES", "--out",
                                                 str(t / "r")], ["calibrate", "int"]),
]
if os.path.isdir("/proc") and os.path.isfile("/proc/self/status"):  # Linux: nothing can be created under /proc
    CLI_CASES.append(("report-out-under-proc", lambda t: [*REPORT, "--out", "/proc/prunescope-x"],
                      ["/proc/prunescope-x", "cannot create a folder"]))
if not torch.cuda.is_available():
    CLI_CASES.append(("device-cuda-without-gpu", lambda t: ["flops", SMALL, "--input-size", "1,3,8,8", "--device",
                                                            "cuda"], ["--device 'cuda'", "no CUDA GPU"]))


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
    _, argv, needles = case
    code = main(argv(tmp_path))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("prunescope: error: ")
    assert "Traceback" not in err and ".tmp" not in err
    for n in (n.replace("{tmp}", str(tmp_path)) for n in needles):
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def test_cli_unwritable_output_names_the_given_path(tmp_path, capsys, temp_files_denied):
    out = tmp_path / "masks.pth"
    code = main(["masks", SMALL, "--sparsity", "0.5", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert str(out) in err and "Permission denied" in err and ".tmp" not in err


def test_cli_process_prints_no_traceback(tmp_path):
    """The same refusal through a real process: exit status 2, one stderr line."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "prunescope.cli", "flops", SMALL, "--input-size", "1,3,8,8", "--out",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "is a directory" in r.stderr and "Traceback" not in r.stderr


def test_cli_good_run_still_works(tmp_path, capsys):
    out = tmp_path / "f.csv"
    assert main(["flops", SMALL, "--input-size", "1,3,8,8", "--format", "csv", "--out", str(out)]) == 0
    ref = count_flops_params(rm.small_cnn(), X, verbose=False)[0]
    import csv

    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert rows and sum(int(r["flops_macs"]) for r in rows) == ref
    m = tmp_path / "m.pth"
    assert main(["masks", SMALL, "--sparsity", "0.5", "--out", str(m), "--quiet"]) == 0
    save_masks(load_masks(m), m)  # round trip through the atomic writer
