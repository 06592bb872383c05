"""Effective count of ``scaled_dot_product_attention`` when only the value is narrowed (issue 19.3).

Multi-query attention (MobileNetV4-hybrid): ``H`` query heads read one shared key/value head. Removing value
channels narrows the A·V product only, not Q·Kᵀ: the counted MACs are ``H·L·S·(E_qk + E_v kept)`` (the op's
formula on the narrowed shapes), not the dense count scaled by the output's kept fraction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunescope import count_flops_params
from prunescope.narrow import shrink

H, E, EV, L, D = 4, 8, 8, 6, 16


class MQA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, H * E), nn.Linear(D, E), nn.Linear(D, EV)
        self.o = nn.Linear(H * EV, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, H, E).transpose(1, 2)
        k = self.k(x).unsqueeze(1)  # one key/value head, broadcast over the H query heads
        v = self.v(x).unsqueeze(1)
        o = F.scaled_dot_product_attention(q, k, v)  # (b, H, n, EV)
        return self.o(o.transpose(1, 2).reshape(b, n, H * v.shape[-1]))


def _sdpa_macs(report: dict) -> int:
    row = report[""]  # the attention op runs in the root module
    return sum(row["flops"])


def test_value_only_narrowing_counts_av_only() -> None:
    torch.manual_seed(0)
    model = MQA().eval()
    x = torch.randn(1, L, D)
    kept = 3
    keep = torch.zeros(EV)
    keep[:kept] = 1
    masks = {"v": {"weight": keep[:, None].expand(EV, D).clone(), "bias": keep.clone()}}
    _, _, eff = count_flops_params(model, x, masks=masks, effective=True, verbose=False)
    assert _sdpa_macs(eff) == H * L * L * (E + kept)  # by hand: Q·Kᵀ untouched, A·V over the kept value dims
    small = shrink(model, masks, x)
    _, _, dense = count_flops_params(small, x, verbose=False)
    assert _sdpa_macs(dense) == H * L * L * (E + kept)
