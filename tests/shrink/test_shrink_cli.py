"""``prunescope shrink``: writes a pruned-model file equal to the library's shrink; cost and latency table."""

import torch

from prunescope.cli import main
from prunescope.masks import L1FilterPruner, fix_mask_conflict, save_masks
from prunescope.narrow import load_pruned, shrink


def test_cli_shrink_writes_the_library_model(tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    x = torch.ones(1, 3, 64, 64)
    masks = fix_mask_conflict(L1FilterPruner(net, [{"sparsity": 0.5, "op_types": ["Conv2d"]}]).compute_masks(),
                              net, x)
    save_masks(masks, tmp_path / "m.pth")
    rc = main(["shrink", "resnet18", "--seed", "0", "--input-size", "1,3,64,64", "--masks", str(tmp_path / "m.pth"),
               "--out", str(tmp_path / "small.pt"), "--runs", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    want = shrink(net, masks, x)
    got = load_pruned(torchvision.models.resnet18(), tmp_path / "small.pt")
    assert {k: v.shape for k, v in got.state_dict().items()} == {k: v.shape for k, v in want.state_dict().items()}
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.state_dict().items())
    from prunescope.flops import flops_report

    macs = flops_report(want, x).total_flops
    assert f"{macs:,}" in text and "latency" in text


def test_cli_shrink_bad_mask_file_is_one_line(tmp_path, capsys):
    (tmp_path / "m.pth").write_text("not a mask file")
    rc = main(["shrink", "resnet18", "--input-size", "1,3,32,32", "--masks", str(tmp_path / "m.pth"),
               "--out", str(tmp_path / "s.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "m.pth" in err and "Traceback" not in err and not (tmp_path / "s.pt").exists()
