"""One model, one tool: prune 30% of every conv/linear layer except the classifier, shrink, run. Prints JSON.

``python bench/shrink_worker.py TOOL MODEL [SPARSITY]`` with TOOL in ``prunescope`` (``prunescope_strict``: the
unsafe layers masked too), ``torch_pruning`` (run with
prunescope's venv, which has Torch-Pruning 1.6.1 installed for the benchmark) or ``nni`` (run with NNI 2.10.1's
interpreter). Timed inside this process: from the model with random weights to the smaller model (masks or
importance, dependency graph, pruning/speedup); model construction and imports are excluded. ``ok`` means the
smaller model ran on the example input and kept the output shape; ``macs_ratio`` is its MACs / the dense MACs
counted by the same formulas (prunescope's counter where it is importable).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings

import torch
import torchvision


def classifier_names(model: torch.nn.Module) -> list[str]:
    """The layer(s) that produce the logits: the last Linear, or the last conv for conv-headed models."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if names:
        return [names[-1]]
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return [convs[-1]]


def size_of(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def build(name: str) -> torch.nn.Module:
    kw: dict = {}
    if name in ("googlenet", "inception_v3"):
        kw = dict(aux_logits=False, init_weights=True)
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kw).eval()


def run_prunescope(model, x, sparsity, cls, strict=False):
    """The documented workflow: layers ``not_safe_to_prune`` reports are excluded like the classifier (with
    ``strict``, masks on them too: shrink then refuses by name, e.g. swin's window reshape ``view(..., C)``)."""
    from prunescope import not_safe_to_prune, trace
    from prunescope.masks import L1FilterPruner
    from prunescope.narrow import shrink

    g = trace(model, x)
    unsafe = [] if strict else sorted(not_safe_to_prune(model, x, traced_model=g))
    cfg = [{"sparsity": sparsity, "op_types": ["Conv2d", "Linear"]}, {"exclude": True, "op_names": cls + unsafe}]
    masks = L1FilterPruner(model, cfg).compute_masks()
    return shrink(model, masks, x, graph=g)


def run_torch_pruning(model, x, sparsity, cls):
    import torch_pruning as tp

    mods = dict(model.named_modules())
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=sparsity, ignored_layers=[mods[c] for c in cls])
    pruner.step()
    return model


def run_nni(model, x, sparsity, cls):
    from nni.compression.pytorch.pruning import L1NormPruner
    from nni.compression.pytorch.speedup import ModelSpeedup

    cfg = [{"sparsity_per_layer": sparsity, "op_types": ["Conv2d", "Linear"]}, {"exclude": True, "op_names": cls}]
    pruner = L1NormPruner(model, cfg)
    _, masks = pruner.compress()
    pruner._unwrap_model()
    ModelSpeedup(model, x, masks).speedup_model()
    return model


def main() -> None:
    warnings.simplefilter("ignore")
    tool, name = sys.argv[1], sys.argv[2]
    sparsity = float(sys.argv[3]) if len(sys.argv) > 3 else 0.3
    torch.set_num_threads(1)
    model = build(name)
    x = torch.randn(1, 3, size_of(name), size_of(name))
    with torch.no_grad():
        want = model(x).shape
    try:
        from prunescope.flops import flops_report

        dense = flops_report(model, x).total_flops
    except ImportError:
        flops_report, dense = None, None
    cls = classifier_names(model)
    fn = {"prunescope": run_prunescope, "prunescope_strict": lambda *a: run_prunescope(*a, strict=True),
          "torch_pruning": run_torch_pruning, "nni": run_nni}[tool]
    res: dict = {"tool": tool, "model": name}
    t0 = time.perf_counter()
    try:
        small = fn(model, x, sparsity, cls)
        res["seconds"] = time.perf_counter() - t0
        with torch.no_grad():
            got = small(x).shape
        res["ok"] = got == want
        if got != want:
            res["error"] = f"output shape {tuple(got)} instead of {tuple(want)}"
        if flops_report is not None and res["ok"]:
            res["macs_ratio"] = flops_report(small, x).total_flops / dense
    except Exception as e:  # noqa: BLE001 - the benchmark records every failure
        res.setdefault("seconds", time.perf_counter() - t0)
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        res["where"] = traceback.extract_tb(e.__traceback__)[-1].filename.split("site-packages/")[-1]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
