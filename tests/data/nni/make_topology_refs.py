"""Record NNI 2.10.1's topology answers for torchvision models (reference data for tests/topology).

Run with the NNI interpreter (NNI is never a dependency of prunescope)::

    /work/nni-venv/bin/python tests/data/nni/make_topology_refs.py [model ...]

For each model it writes ``tests/data/nni/topology/<model>.json`` with NNI's ChannelDependency sets (each
set sorted, sets sorted), the module type of every layer named in them, GroupDependency's ``dependency`` and
``min_groups``, ``not_safe_to_prune`` (sorted; limited by a timeout because NNI's search is exponential on
some models) and the wall time of each call. A model NNI cannot analyse is recorded with its error.
Weights are random: topology does not depend on them.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torchvision

MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_y_400mf", "densenet121",
    "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "shufflenet_v2_x1_0", "vit_b_16",
]
OUT = Path(__file__).resolve().parent / "topology"
UNSAFE_TIMEOUT_S = 60


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout()


def build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def record(name: str) -> dict:
    from nni.compression.pytorch.utils import ChannelDependency, GroupDependency, not_safe_to_prune

    torch.manual_seed(0)
    size = 299 if name == "inception_v3" else 224
    x = torch.ones(1, 3, size, size)
    model = build(name)
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    res: dict = {"model": name, "nni_version": "2.10.1", "torch": torch.__version__,
                 "torchvision": torchvision.__version__, "input_size": list(x.shape)}
    try:
        t = time.perf_counter()
        cd = ChannelDependency(model, x)
        res["channel_seconds"] = time.perf_counter() - t
        sets = [sorted(s) for s in cd.dependency_sets]
        res["channel_sets"] = sorted(sets)
        res["layer_types"] = {n: types[n] for s in sets for n in s}
    except Exception as e:  # recorded, e.g. vit_b_16's jit failure
        res["channel_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["channel_traceback_tail"] = traceback.format_exc().splitlines()[-3:]
        return res
    t = time.perf_counter()
    gd = GroupDependency(model, x)
    res["group_seconds"] = time.perf_counter() - t
    res["group_dependency"] = {k: int(v) for k, v in sorted(gd.dependency.items())}
    res["min_groups"] = {k: int(v) for k, v in sorted(gd.min_groups.items())}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(UNSAFE_TIMEOUT_S)
    try:
        t = time.perf_counter()
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # NNI prints "Parent layers ..."
            unsafe = not_safe_to_prune(model, x)
        res["unsafe_seconds"] = time.perf_counter() - t
        res["not_safe_to_prune"] = sorted(unsafe)
    except _Timeout:
        res["not_safe_to_prune_error"] = f"timeout after {UNSAFE_TIMEOUT_S} s"
    finally:
        signal.alarm(0)
    return res


def main(argv: list[str]) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in argv or MODELS:
        t = time.perf_counter()
        res = record(name)
        (OUT / f"{name}.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {time.perf_counter() - t:.1f} s", "error" if "channel_error" in res else "", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
