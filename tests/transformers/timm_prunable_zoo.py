"""The timm zoo for "one meaning of prunable" (issue 19): what ``unit_masks`` offers is what ``shrink`` narrows.

Used by ``tests/transformers/test_timm_prunable.py`` (a representative subset by default, every model with
``PRUNESCOPE_TIMM_ZOO=1``) and ``bench/timm_prunable.py`` (the whole list, with the fraction of MACs offered).

Per model (random weights, CPU, a small input where the architecture allows): ``unit_masks`` at 30 % on every
set it offers -> ``shrink`` with no conflict fix and no protected channel -> the shrunk output equals the
``as_pruned`` masked model's (relative 1e-4 of the output's scale) and the dense count of the shrunk model equals
the effective count of the masked model.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

# family -> [(timm name, create_model kwargs, input size)]; the smallest member of each family, small inputs
# where the architecture takes them (img_size for models with fixed position tables / windows).
ZOO: dict[str, list[tuple[str, dict[str, Any], tuple[int, ...]]]] = {
    "resnet": [("test_resnet", {}, (3, 64, 64)), ("resnet10t", {}, (3, 64, 64)), ("resnet18", {}, (3, 64, 64)),
               ("resnetv2_50x1_bit", {}, (3, 64, 64))],  # BiT: weight-standardised convolutions (StdConv2d)
    "mobilenet": [("mobilenetv2_035", {}, (3, 64, 64)), ("mobilenetv3_small_050", {}, (3, 64, 64)),
                  ("mobilenetv4_conv_small", {}, (3, 64, 64)),
                  ("mobilenetv4_hybrid_medium", {}, (3, 96, 96)), ("lcnet_035", {}, (3, 64, 64))],
    "efficientnet": [("test_efficientnet", {}, (3, 64, 64)), ("test_efficientnet_gn", {}, (3, 64, 64)),
                     ("test_efficientnet_ln", {}, (3, 64, 64)), ("efficientnet_b0", {}, (3, 64, 64)),
                     ("mixnet_s", {}, (3, 64, 64)), ("tinynet_e", {}, (3, 64, 64)),
                     ("mnasnet_small", {}, (3, 64, 64)), ("hardcorenas_a", {}, (3, 64, 64))],
    "ghost/rep": [("ghostnet_050", {}, (3, 64, 64)), ("ghostnetv2_100", {}, (3, 64, 64)),
                  ("repvgg_a0", {}, (3, 64, 64)), ("repvit_m0_9", {}, (3, 64, 64)),
                  ("mobileone_s0", {}, (3, 64, 64))],
    "grouped": [("regnetx_002", {}, (3, 64, 64)), ("regnety_002", {}, (3, 64, 64)),
                ("regnetz_005", {}, (3, 64, 64)), ("resnext26ts", {}, (3, 64, 64)),
                ("resnest14d", {}, (3, 64, 64)), ("seresnext26ts", {}, (3, 64, 64)),
                ("skresnet18", {}, (3, 64, 64)), ("skresnext50_32x4d", {}, (3, 64, 64))],
    "other-cnn": [("dla46_c", {}, (3, 64, 64)), ("dpn48b", {}, (3, 64, 64)), ("densenet121", {}, (3, 64, 64)),
                  ("hrnet_w18_small", {}, (3, 64, 64)), ("selecsls42", {}, (3, 64, 64)),
                  ("gernet_s", {}, (3, 64, 64)), ("test_byobnet", {}, (3, 64, 64)),
                  ("hgnetv2_b0", {}, (3, 64, 64)), ("starnet_s050", {}, (3, 64, 64)),
                  ("cs3darknet_focus_s", {}, (3, 64, 64)), ("rexnet_100", {}, (3, 64, 64)),
                  ("res2net50_14w_8s", {}, (3, 64, 64))],
    "nfnet": [("test_nfnet", {}, (3, 64, 64)), ("nf_regnet_b0", {}, (3, 64, 64))],
    "convnext": [("test_convnext", {}, (3, 64, 64)), ("convnext_atto", {}, (3, 64, 64)),
                 ("convnextv2_atto", {}, (3, 64, 64)), ("inception_next_atto", {}, (3, 64, 64)),
                 ("edgenext_xx_small", {}, (3, 64, 64)), ("rdnet_tiny", {}, (3, 64, 64)),
                 ("test_mambaout", {}, (3, 64, 64))],
    "metaformer": [("poolformer_s12", {}, (3, 64, 64)), ("poolformerv2_s12", {}, (3, 64, 64))],
    "vit": [("test_vit", {}, (3, 160, 160)), ("vit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64)),
            ("deit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64)),
            ("deit3_small_patch16_224", {"img_size": 64}, (3, 64, 64)),
            ("test_vit_relpos", {}, (3, 160, 160)),
            ("vit_relpos_small_patch16_224", {"img_size": 64}, (3, 64, 64)),
            ("beit_base_patch16_224", {"img_size": 64, "depth": 2}, (3, 64, 64)),
            ("eva02_tiny_patch14_224", {"img_size": 56}, (3, 56, 56)),
            # layer scale 1 (timm's 1e-5 makes every pruned branch change the output by ~2e-5: the 1e-4 check
            # could not fail; with 1 pruning at 30 % changes it by ~0.6)
            ("cait_xxs24_224", {"img_size": 64, "depth": 2, "init_values": 1.0}, (3, 64, 64)),
            ("xcit_nano_12_p16_224", {"img_size": 64}, (3, 64, 64)),
            ("pit_ti_224", {"img_size": 64}, (3, 64, 64)), ("convit_tiny", {"img_size": 64}, (3, 64, 64)),
            ("crossvit_tiny_240", {}, (3, 240, 240)), ("tnt_s_patch16_224", {"img_size": 64}, (3, 64, 64)),
            ("levit_128s", {"img_size": 64}, (3, 64, 64)), ("volo_d1_224", {"img_size": 64}, (3, 64, 64))],
    "hierarchical": [("swin_tiny_patch4_window7_224", {"img_size": 56, "window_size": 7}, (3, 56, 56)),
                     ("swinv2_tiny_window8_256", {"img_size": 64}, (3, 64, 64)),
                     ("swin_s3_tiny_224", {}, (3, 224, 224)),
                     ("test_maxvit", {}, (3, 160, 160)), ("test_coatnet", {}, (3, 160, 160)),
                     ("pvt_v2_b0", {}, (3, 64, 64)), ("twins_svt_small", {}, (3, 64, 64)),
                     ("coat_lite_tiny", {"img_size": 64}, (3, 64, 64)), ("tiny_vit_5m_224", {}, (3, 224, 224)),
                     ("davit_tiny", {}, (3, 64, 64)), ("focalnet_tiny_srf", {}, (3, 64, 64)),
                     ("mvitv2_tiny", {"img_size": 64}, (3, 64, 64)), ("hiera_tiny_224", {"img_size": 64},
                                                                       (3, 64, 64)),
                     ("nest_tiny", {"img_size": 64}, (3, 64, 64)), ("gcvit_xxtiny", {"img_size": 64},
                                                                     (3, 64, 64))],
    "mobile-hybrid": [("efficientformer_l1", {}, (3, 224, 224)),
                      ("efficientformerv2_s0", {"img_size": 64}, (3, 64, 64)),
                      ("fastvit_t8", {}, (3, 64, 64)), ("mobilevit_xxs", {}, (3, 64, 64)),
                      ("mobilevitv2_050", {}, (3, 64, 64)), ("efficientvit_b0", {}, (3, 64, 64)),
                      ("efficientvit_m0", {"img_size": 64}, (3, 64, 64))],
    "mlp": [("mixer_s16_224", {"img_size": 64}, (3, 64, 64)), ("resmlp_12_224", {"img_size": 64}, (3, 64, 64)),
            ("gmlp_ti16_224", {"img_size": 64}, (3, 64, 64))],
}
FAMILY = {name: fam for fam, rows in ZOO.items() for name, _, _ in rows}
SPEC = {name: (kw, size) for rows in ZOO.values() for name, kw, size in rows}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The timm model (random weights, eval mode, CPU) and a random input of its small size."""
    import timm

    kw, size = SPEC[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    return model, torch.randn(1, *size)


def mac_share(model: torch.nn.Module, x: torch.Tensor, sets: list[tuple[str, ...]]) -> float:
    """Fraction of the model's MACs in the conv/linear layers of ``sets`` (what pruning them can reach)."""
    from prunescope.flops import count_flops_params

    total, _, res = count_flops_params(model, x, verbose=False)
    members = {m for s in sets for m in s}
    return sum(sum(v["flops"]) for k, v in res.items() if k in members) / max(1, total)


def normalised_over_removed(plan: Any) -> list[str]:
    """Modules of a LayerNorm/GroupNorm/RMSNorm that normalises across channels the plan removes: there the
    shrunk model normalises over the kept channels only, which ``as_pruned`` does not emulate yet (helper A1)."""
    out = []
    for node in plan.graph.nodes:
        if node.name not in ("layer_norm", "group_norm", "rms_norm") or not node.inputs:
            continue
        ci = plan.atoms.info(node.inputs[0])
        if ci is not None and len(ci.axes) and not plan.alive(ci.atoms).all():
            out.append(node.module)
    return out


def check(name: str, sparsity: float = 0.3) -> dict[str, Any]:
    """Run the issue's pipeline on one model; returns a row with what happened (never raises for a model's
    outcome: ``row['error']`` says what failed)."""
    from prunescope import unit_masks
    from prunescope.flops import count_flops_params
    from prunescope.graph import trace
    from prunescope.narrow import ShrinkWarning, as_pruned, shrink

    row: dict[str, Any] = {"name": name, "family": FAMILY.get(name, "?")}
    t0 = time.perf_counter()
    model, x = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = trace(model, x)
        masks = unit_masks(model, x, sparsity, graph=g)
    row["layers"] = len(masks)
    if not masks:
        row["error"] = "no set offered"
        return row
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            small, res = shrink(model, masks, x, graph=g, return_result=True)
    except Exception as e:  # noqa: BLE001 - reported per model
        row["error"] = f"shrink refused: {type(e).__name__}: {str(e)[:300]}"
        return row
    row["norms"] = normalised_over_removed(res.plan)
    row["fixed"] = len(res.fixed)
    row["protected"] = len(res.protected)
    row["warnings"] = [str(w.message)[:200] for w in caught if issubclass(w.category, ShrinkWarning)]
    with torch.no_grad():
        got = small(x)
        with as_pruned(model, masks, x, graph=g) as m:
            want = m(x)
    scale = float(want.abs().max()) or 1.0
    row["rel"] = float((got - want).abs().max()) / scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eff = count_flops_params(model, x, verbose=False, masks=masks, effective=True)[:2]
        dense = count_flops_params(small, x, verbose=False)[:2]
    row["counts"] = (tuple(dense), tuple(eff))
    row["seconds"] = time.perf_counter() - t0
    return row
