"""group_dependencies=True prunes a channel-dependency set as one unit (same channels in every member)."""

import torch
from sens_helpers import state_bytes
from torch import nn

from prunescope.sensitivity import SensitivityAnalysis


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(torch.relu(y + self.b(torch.relu(y))))


def test_group_prunes_same_channels_in_every_member():
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    seen = []

    def val(m):
        za = (m.a.weight.flatten(1).abs().sum(1) == 0).tolist()
        zb = (m.b.weight.flatten(1).abs().sum(1) == 0).tolist()
        seen.append((za, zb))
        with torch.no_grad():
            return m(x).abs().mean()

    before = state_bytes(model)
    sa = SensitivityAnalysis(model, val, sparsities=[0.5], group_dependencies=True, dummy_input=x, progress=False)
    assert sa.groups == {"a+b": ("a", "b")}  # c's channels are the model's output: shrink cannot narrow them
    assert sa.excluded == {"c": "its channels reach the model output"}
    res = sa.analysis([model])
    assert list(res) == ["a+b"]
    za, zb = seen[1]
    assert za == zb and sum(za) == 4
    assert state_bytes(model) == before
