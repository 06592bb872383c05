import csv
import json

import pytest

from prunescope.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_table_and_totals(capsys):
    code, out, _ = run(capsys, "flops", "resnet18", "--input-size", "1,3,224,224", "--device", "meta")
    assert code == 0
    assert "FLOPs total: 1,814,073,344 (MACs" in out and "#Params total: 11,689,512" in out


def test_json_and_csv(capsys, tmp_path):
    code, out, _ = run(capsys, "flops", "resnet18", "--input-size", "1,3,224,224", "--device", "meta",
                       "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["total_flops"] == 1_814_073_344 and data["unit"] == "MACs"
    path = tmp_path / "f.csv"
    code, out, _ = run(capsys, "flops", "resnet18", "--input-size", "1,3,224,224", "--device", "meta",
                       "--format", "csv", "--out", str(path))
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows[0][:3] == ["index", "name", "type"] and rows[1][1] == "conv1" and rows[1][4] == "(64, 3, 7, 7)"
    assert sum(int(r[7]) for r in rows[1:]) == 1_814_073_344


@pytest.mark.parametrize("argv,msg", [
    (["flops", "resnet18x", "--input-size", "1,3,224,224"], "unknown model 'resnet18x'"),
    (["flops", "resnet18", "--input-size", "1,3,a"], "malformed --input-size"),
    (["flops", "resnet18", "--input-size", "1,5,64,64"], "op 'conv2d' failed in module 'conv1'"),
    (["flops", "no.such.module:build", "--input-size", "1,3"], "cannot import module 'no.such.module'"),
])
def test_bad_input_is_one_line(capsys, argv, msg):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_callable_model_spec(capsys):
    code, out, _ = run(capsys, "flops", "torch.nn:Identity", "--input-size", "1,3", "--mode", "full")
    assert code == 0 and "#Params total: 0" in out
