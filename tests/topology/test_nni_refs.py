"""ChannelDependency / GroupDependency against the NNI docs (spec) and NNI 2.10.1's recorded answers.

The JSON files under tests/data/nni/topology are made by tests/data/nni/make_topology_refs.py with NNI 2.10.1
(see that script); NNI is not needed to run these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from prunescope.graph import trace
from prunescope.removal import not_safe_to_prune
from prunescope.topology import ChannelDependency, GroupDependency, channel_atoms

REFS = Path(__file__).resolve().parents[1] / "data" / "nni" / "topology"

SPEC_RESNET18 = """Dependency Set,Convolutional Layers
Set 1,layer1.1.conv2,layer1.0.conv2,conv1
Set 2,layer1.0.conv1
Set 3,layer1.1.conv1
Set 4,layer2.0.conv1
Set 5,layer2.1.conv2,layer2.0.conv2,layer2.0.downsample.0
Set 6,layer2.1.conv1
Set 7,layer3.0.conv1
Set 8,layer3.0.downsample.0,layer3.1.conv2,layer3.0.conv2
Set 9,layer3.1.conv1
Set 10,layer4.0.conv1
Set 11,layer4.0.downsample.0,layer4.1.conv2,layer4.0.conv2
Set 12,layer4.1.conv1
"""


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    size = 299 if name == "inception_v3" else 224
    return torchvision.models.get_model(name, weights=None, **kw).eval(), torch.ones(1, 3, size, size)


def _ref(name: str) -> dict:
    return json.loads((REFS / f"{name}.json").read_text())


def _nni_conv_sets(ref: dict) -> list[list[str]]:
    types = ref["layer_types"]
    sets = [sorted(n for n in s if types[n].startswith("Conv")) for s in ref["channel_sets"]]
    return sorted(s for s in sets if s)


def test_spec_resnet18_table_and_csv(tmp_path: Path) -> None:
    model, x = _model("resnet18")
    dep = ChannelDependency(model, x)
    spec_rows = [line.split(",") for line in SPEC_RESNET18.strip().splitlines()[1:]]
    assert [set(r[1:]) for r in spec_rows] == dep.dependency_sets  # same 12 sets, same set order
    assert dep.sets[0] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]  # execution order inside a set
    out = tmp_path / "deps.csv"
    dep.export(out)
    expected = "Dependency Set,Convolutional Layers\r\n" + "".join(
        f"Set {k},{','.join(s)}\r\n" for k, s in enumerate(dep.sets, 1))
    assert out.read_bytes() == expected.encode()
    assert [p.name for p in tmp_path.iterdir()] == ["deps.csv"]  # no temp file left behind
    # the spec's layout, only the member order differs (NNI's is string-hash order)
    got = [r.split(",") for r in out.read_text().splitlines()]
    assert got[0] == ["Dependency Set", "Convolutional Layers"]
    assert [(r[0], set(r[1:])) for r in got[1:]] == [(r[0], set(r[1:])) for r in spec_rows]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2",
                                  "regnet_y_400mf", "densenet121", "googlenet", "inception_v3"])
def test_equals_nni(name: str) -> None:
    model, x = _model(name)
    g = trace(model, x)
    ref = _ref(name)
    dep = ChannelDependency(model, x, traced_model=g)
    assert sorted(sorted(s) for s in dep.sets) == _nni_conv_sets(ref)
    gd = GroupDependency(model, x, traced_model=g)
    assert gd.dependency == ref["group_dependency"]
    assert gd.min_groups == ref["min_groups"]
    assert not_safe_to_prune(model, x, traced_model=g) == ref["not_safe_to_prune"] == []


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"])
def test_nni_plus_depthwise_ties(name: str) -> None:
    """NNI leaves depthwise ties to its speedup step: ours = NNI's sets merged along depthwise convs."""
    model, x = _model(name)
    g = trace(model, x)
    dep = ChannelDependency(model, x, traced_model=g)
    ours = [set(s) for s in dep.sets]
    nni = [set(s) for s in _nni_conv_sets(_ref(name))]
    for s in nni:  # every NNI set lies inside one of ours
        assert sum(s <= o for o in ours) == 1, s
    # merge NNI's sets along (depthwise conv, the layers whose channels it reads): must give ours exactly
    ca = channel_atoms(g)
    parent = {n: n for s in nni for n in s}

    def find(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    for s in nni:
        for n in s:
            parent[find(n)] = find(sorted(s)[0])
    n_dw = 0
    for name_, li in ca.layers.items():
        if li.depthwise:
            n_dw += 1
            producers = {ca.atom_name(int(a))[0] for a in li.inputs[0] if a >= 0}
            for p in producers:
                parent[find(p)] = find(name_)
    assert n_dw > 10
    merged: dict[str, set[str]] = {}
    for n in parent:
        merged.setdefault(find(n), set()).add(n)
    assert sorted(map(sorted, merged.values())) == sorted(map(sorted, ours))


def test_shufflenet_by_hand() -> None:
    """NNI finds no ties in shufflenet_v2; the channel shuffle ties every branch output of a stage.

    Unit i of a stage: out = shuffle(cat(x1, branch2(x2))), with view(N, 2, C/2) → transpose → view. Channel j
    of the concatenation's first half and channel j of the second half land in one shuffle group, so the
    pass-through half (the previous unit's outputs) and branch2.5's output channel j are pruned together;
    chaining units ties every branch2.5 of the stage and, in the stride-2 first unit, branch1.2. The next
    stage's first unit reads the stage output with a depthwise conv (branch1.0), tied as well.
    Inside a branch, the 1x1 conv (branch2.0) is tied to the depthwise conv (branch2.3) that follows it.
    """
    model, x = _model("shufflenet_v2_x1_0")
    dep = ChannelDependency(model, x)
    repeats = {2: 4, 3: 8, 4: 4}
    expected = [{"conv1.0", "stage2.0.branch1.0"}]
    for s, n in repeats.items():
        stage = {f"stage{s}.0.branch1.2"} | {f"stage{s}.{i}.branch2.5" for i in range(n)}
        if s < 4:
            stage.add(f"stage{s + 1}.0.branch1.0")
        expected.append(stage)
        expected += [{f"stage{s}.{i}.branch2.0", f"stage{s}.{i}.branch2.3"} for i in range(n)]
    expected.append({"conv5.0"})
    assert sorted(map(sorted, dep.dependency_sets)) == sorted(map(sorted, expected))
    assert all(len(s) == 1 for s in _nni_conv_sets(_ref("shufflenet_v2_x1_0")))  # NNI: no ties at all
    assert not_safe_to_prune(model, x) == []


def test_vit_by_hand() -> None:
    """NNI cannot trace vit_b_16; ours: the hidden size is one group, pinned by reshape(n, 768, n_h * n_w)."""
    assert "TracingCheckError" in _ref("vit_b_16")["channel_error"]
    model, x = _model("vit_b_16")
    g = trace(model, x)
    assert ChannelDependency(model, x, traced_model=g).sets == [["conv_proj"]]
    dep = ChannelDependency(model, x, traced_model=g, include_linear=True)
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    hidden = ["conv_proj"] + [n for i in layers for n in (f"{i}.self_attention", f"{i}.mlp.3")]
    assert sorted(dep.sets[0]) == sorted(hidden)
    assert sorted(dep.sets[1:]) == sorted([[f"{i}.mlp.0"] for i in layers] + [["heads.head"]])
    unsafe = not_safe_to_prune(model, x, traced_model=g, with_reasons=True)
    assert list(unsafe) == [n for n in dep.sets[0]]  # the whole hidden group, in execution order
    assert "'reshape' writes the size 768" in unsafe["conv_proj"][0]
