"""The top-level names are the documented objects, whatever the import order (lazy exports)."""

import subprocess
import sys


def test_shrink_is_the_function_after_importing_its_subpackage_names():
    code = ("from prunescope import as_pruned, shrink, load_pruned; import prunescope; "
            "assert callable(shrink) and not hasattr(shrink, '__path__'), shrink; "
            "assert prunescope.shrink is shrink and callable(as_pruned) and callable(load_pruned)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shrink_is_callable_whatever_the_import_order():
    code = ("import torch; from prunescope.narrow import save_pruned; from prunescope import shrink; "
            "import prunescope; net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)); "
            "m = {'0': {'weight': torch.tensor([[1.] * 4, [0.] * 4, [1.] * 4]), 'bias': torch.tensor([1., 0, 1])}}; "
            "assert shrink(net, m, torch.ones(1, 4))[0].out_features == 2; "
            "assert prunescope.shrink(net, m, torch.ones(1, 4))[1].in_features == 2")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_export_resolves():
    import prunescope

    for name in prunescope.__all__:
        obj = getattr(prunescope, name)
        assert not hasattr(obj, "__path__") or name not in ("shrink",), name
