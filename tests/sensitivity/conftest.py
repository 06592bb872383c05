import sys
from pathlib import Path

import pytest
import torch

NNI_DATA = Path(__file__).resolve().parents[1] / "data" / "nni"
if str(NNI_DATA) not in sys.path:
    sys.path.insert(0, str(NNI_DATA))


@pytest.fixture
def one_thread():
    """The references were made single-threaded; the val functions also set one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
