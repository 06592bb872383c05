"""GPU timing check (run on a CUDA machine): counting on CUDA vs a plain CUDA forward, same process."""

import os
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from prunescope.flops import flops_report  # noqa: E402


def best(fn, n=10):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


for name in ("resnet50", "vit_b_16"):
    m = torchvision.models.get_model(name).cuda().eval()
    x = torch.randn(1, 3, 224, 224, device="cuda")

    def fwd(m=m, x=x):
        with torch.no_grad():
            m(x)

    tf = best(fwd)
    tc = best(lambda m=m, x=x: flops_report(m, x))
    rep = flops_report(m, x)
    print(f"{name}: forward {tf * 1e3:.1f} ms, counting {tc * 1e3:.1f} ms ({tc / tf:.1f}x), "
          f"{rep.total_flops / 1e9:.3f} GMACs, {torch.cuda.get_device_name()}")
