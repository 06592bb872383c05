"""Mask files (atomic, safe loading, NNI files) and apply_masks (bit-identical restore)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from maskref_helpers import REF_DIR, ref_models
from torch import nn

from prunescope.errors import MaskError
from prunescope.masks import L1FilterPruner, apply_masks, load_masks, save_masks, validate_masks


def _masks(model: nn.Module) -> dict:
    return L1FilterPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d", "Linear"]}]).compute_masks()


def test_round_trip(tmp_path) -> None:
    model = ref_models.build("smallcnn")
    masks = _masks(model)
    path = tmp_path / "m.pth"
    save_masks(masks, path)
    loaded = load_masks(path)
    assert list(loaded) == list(masks)
    for name in masks:
        assert torch.equal(loaded[name]["weight"], masks[name]["weight"])
        b = masks[name]["bias"]
        assert (loaded[name]["bias"] is None) if b is None else torch.equal(loaded[name]["bias"], b)
    assert os.listdir(tmp_path) == ["m.pth"]  # no temporary file left behind


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch) -> None:
    path = tmp_path / "m.pth"
    save_masks({"a": {"weight": torch.ones(2), "bias": None}}, path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_masks({"b": {"weight": torch.zeros(3), "bias": None}}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.pth"]


def test_nni_saved_file_loads() -> None:
    """A file written by NNI 2.10.1's export_model (L1, 50%, tied model: L1 norms 2,2,2,4,4,6,8,8)."""
    masks = load_masks(os.path.join(REF_DIR, "nni_saved_tied_l1.pth"))
    assert list(masks) == ["conv"]
    assert masks["conv"]["bias"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    ours = L1FilterPruner(ref_models.build("tied"), [{"sparsity": 0.5, "op_types": ["Conv2d"]}]).compute_masks()
    assert torch.equal(ours["conv"]["weight"], masks["conv"]["weight"])
    assert torch.equal(ours["conv"]["bias"], masks["conv"]["bias"])


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv": {"weight": torch.ones(1), "bias": _Evil(str(marker))}}, path)
    with pytest.raises(MaskError, match="evil.pth.*refused"):
        load_masks(path)
    assert not marker.exists()
    # a raw (non-zip) pickle too
    raw = tmp_path / "evil2.pth"
    with open(raw, "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    with pytest.raises(MaskError, match="evil2.pth"):
        load_masks(raw)
    assert not marker.exists()


def test_bad_files(tmp_path) -> None:
    with pytest.raises(MaskError, match="does not exist"):
        load_masks(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(MaskError, match="junk.pth"):
        load_masks(junk)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv": torch.ones(2)}, wrong)
    with pytest.raises(MaskError, match="wrong.pth.*'conv'.*expected a dict"):
        load_masks(wrong)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_apply_masks_restores_bit_identical() -> None:
    model = ref_models.build("smallcnn")
    with torch.no_grad():  # awkward values: NaN, -0.0 and inf survive the restore bit for bit
        model.conv1.weight[0, 0, 0, 0] = float("nan")
        model.conv1.weight[0, 0, 0, 1] = -0.0
        model.conv1.weight[1, 0, 0, 0] = float("inf")
    masks = _masks(model)
    params = {n: p for n, p in model.named_parameters()}
    before = _snapshot(model)
    x = torch.randn(2, 3, 16, 16)
    with apply_masks(model, masks) as m:
        assert m is model
        w = model.conv2.weight
        assert (w[masks["conv2"]["weight"] == 0] == 0).all()
        assert (model.fc1.bias[masks["fc1"]["bias"] == 0] == 0).all()
        model(x)
    after = _snapshot(model)
    for k in before:
        assert _bit_equal(before[k], after[k]), k
    assert all(p is params[n] for n, p in model.named_parameters())  # same tensor objects


def test_apply_masks_restores_on_exception() -> None:
    model = ref_models.build("smallcnn")
    masks = _masks(model)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with apply_masks(model, masks):
            assert not torch.equal(model.conv1.weight, before["conv1.weight"])
            raise RuntimeError("inside")
    for k, v in _snapshot(model).items():
        assert _bit_equal(before[k], v), k


def test_apply_masks_filter_and_elementwise_masks_equal_multiplying() -> None:
    """Filter masks (only their zeroed slices are touched) and an elementwise mask (the whole tensor multiplied)
    leave the weights a plain multiplication by the masks leaves, NaN, inf and -0.0 in zeroed rows included; a
    weight tied between two layers is masked by both, and everything comes back bit for bit."""
    torch.manual_seed(0)
    a, b, conv = nn.Linear(4, 6), nn.Linear(4, 6), nn.Conv2d(2, 5, 3)
    b.weight = a.weight  # tied: masked by a's filter mask, then by b's elementwise mask
    model = nn.Sequential(a, b, conv)
    with torch.no_grad():
        a.weight[1, 0], a.weight[3, 2], a.weight[0, 0] = float("nan"), -0.0, -1.5
        conv.weight[4, 0, 0, 0] = float("inf")
    ma = torch.ones(6, 4)
    ma[[1, 3]] = 0
    mab = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    mb = (torch.rand(6, 4) > 0.5).float()
    mc = torch.ones(5, 2, 3, 3)
    mc[[0, 4]] = 0
    masks = {"0": {"weight": ma, "bias": mab}, "1": {"weight": mb}, "2": {"weight": mc, "bias": None}}
    want = {"0.weight": a.weight.detach() * ma * mb, "0.bias": a.bias.detach() * mab,
            "2.weight": conv.weight.detach() * mc, "2.bias": conv.bias.detach().clone()}
    before = _snapshot(model)
    with apply_masks(model, masks):
        got = _snapshot(model)
        assert all(_bit_equal(got[k], v) for k, v in want.items()), [k for k, v in want.items()
                                                                      if not _bit_equal(got[k], v)]
    for k, v in _snapshot(model).items():
        assert _bit_equal(before[k], v), k


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        ({"conv9": {"weight": torch.ones(1), "bias": None}}, "'conv9': no such layer"),
        ({"conv1": {"weight": torch.ones(16, 3, 3), "bias": None}}, r"'conv1': weight mask has shape \(16, 3, 3\)"),
        ({"conv1": {"weight": torch.full((16, 3, 3, 3), 0.5), "bias": None}}, "'conv1': weight mask has values other"),
        ({"conv1": {"weight": torch.full((16, 3, 3, 3), 2.0), "bias": None}}, "'conv1': weight mask has values other"),
        ({"conv1": {"weight": torch.full((16, 3, 3, 3), float("nan")), "bias": None}}, "'conv1': weight mask has"),
        ({"conv1": {"weight": torch.ones(16, 3, 3, 3), "bias": torch.full((16,), 0.5)}}, "'conv1': bias mask has val"),
        ({"conv1": {"weight": torch.ones(16, 3, 3, 3), "bias": torch.ones(3)}}, "'conv1': bias mask has shape"),
        ({"conv2": {"weight": torch.ones(32, 16, 3, 3), "bias": torch.ones(32)}}, "'conv2': a bias mask is given"),
        ({"pool": {"weight": torch.ones(1), "bias": None}}, "'pool': a AdaptiveAvgPool2d has no weight"),
        ({"conv1": {"weight": [1, 0], "bias": None}}, "'conv1': 'weight' must be a tensor"),
        ({"conv1": torch.ones(2)}, "'conv1': expected a dict"),
    ],
)
def test_bad_masks_name_the_layer(masks: dict, match: str) -> None:
    model = ref_models.build("smallcnn")
    before = _snapshot(model)
    with pytest.raises(MaskError, match=match):
        with apply_masks(model, masks):
            pass
    with pytest.raises(MaskError, match=match):
        validate_masks(masks, model)
    for k, v in _snapshot(model).items():
        assert torch.equal(before[k], v)


def test_cuda_saved_file_loads_on_cpu(tmp_path, monkeypatch) -> None:
    """NNI users often save masks of a model on the GPU; the file records 'cuda:0' storages."""
    import torch.serialization as ser

    path = tmp_path / "cuda.pth"
    with monkeypatch.context() as m:
        m.setattr(ser, "location_tag", lambda storage: "cuda:0")
        torch.save({"conv": {"weight": torch.ones(2, 1, 1, 1), "bias": torch.tensor([1.0, 0.0])}}, path)
    assert b"cuda:0" in path.read_bytes()
    masks = load_masks(path)
    assert masks["conv"]["bias"].device.type == "cpu" and masks["conv"]["bias"].tolist() == [1.0, 0.0]
