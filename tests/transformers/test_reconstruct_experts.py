"""Reconstruction of fused experts (issue 17): every expert's down projection refit from the tokens routed to it.

A tiny Mixtral (transformers 5 fused experts, ``grouped_mm``) trained here on a synthetic sequence task loses half
of every expert's units. References: (1) the first MoE layer's input is the same in the dense and the shrunk
model (only expert units are removed), so with ``ridge=0`` each expert's refit down projection must be the
ordinary least-squares solution computed by hand from the modelling formulas (``h = silu(x Gᵀ) * (x Uᵀ)`` with the
kept gate/up rows, target ``y = h_dense D_denseᵀ``) over the tokens the router sends to that expert; (2) the
output error vs the dense model on held-out sequences drops after reconstruction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from prunescope.graph import trace  # noqa: E402
from prunescope.masks.expert_masks import expert_masks  # noqa: E402
from prunescope.narrow import reconstruct, shrink  # noqa: E402

E, W, H = 4, 16, 32


def _sequences(n: int, g: torch.Generator, vocab: int = 32, length: int = 12) -> torch.Tensor:
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % vocab


def _trained() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=32, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=32,
                                     intermediate_size=W, num_local_experts=E)
    model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():  # experts are created empty
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(40):
        ids = _sequences(32, g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_experts_refit_by_hand_and_error_drops() -> None:
    model = _trained()
    g = torch.Generator().manual_seed(1)
    x = {"input_ids": _sequences(2, g)}
    gr = trace(model, x)
    masks = expert_masks(model, x, 0.5, graph=gr)
    assert set(masks) == {f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)}
    calib = [{"input_ids": _sequences(32, g)} for _ in range(3)]
    small, res = reconstruct(model, masks, x, calib, graph=gr, ridge=0.0, return_result=True)
    plain = shrink(model, masks, x, graph=gr)
    r = res.reconstruction
    downs = [f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)]
    assert r.layers == downs and not r.skipped
    assert all(r.error_after[n] < r.error_before[n] for n in downs)

    # (1) by hand, layer 0: its input and routing are the dense model's
    ex, sx = model.model.layers[0].mlp.experts, small.model.layers[0].mlp.experts
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    h = ex.register_forward_pre_hook(lambda m, a: seen.append((a[0].detach(), a[1].detach())))
    with torch.no_grad():
        for b in calib:
            model(**b)
    h.remove()
    xs, idx = torch.cat([s[0] for s in seen]).double(), torch.cat([s[1] for s in seen])
    half = sx.gate_up_proj.shape[1] // 2
    assert half == W // 2
    for e in range(E):
        rows = (idx == e).any(-1)
        xe = xs[rows]
        gu = sx.gate_up_proj[e].detach().double()
        hk = torch.nn.functional.silu(xe @ gu[:half].T) * (xe @ gu[half:].T)  # kept units of the shrunk expert
        gd = ex.gate_up_proj[e].detach().double()
        hd = torch.nn.functional.silu(xe @ gd[:W].T) * (xe @ gd[W:].T)
        y = hd @ ex.down_proj[e].detach().double().T
        want = torch.linalg.lstsq(hk, y).solution.T  # (H, W/2)
        got = small.model.layers[0].mlp.experts.down_proj[e].detach().double()
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())), e

    # (2) held-out output error vs the dense model
    held = _sequences(64, g)
    with torch.no_grad():
        dense = model(input_ids=held).logits
        err = {k: float(((m(input_ids=held).logits - dense) ** 2).sum() / (dense ** 2).sum())
               for k, m in (("plain", plain), ("reconstructed", small))}
    assert err["reconstructed"] < 0.8 * err["plain"], err
    assert np.isfinite(list(err.values())).all()
