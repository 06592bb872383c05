import sys
from pathlib import Path

NNI_DATA = Path(__file__).resolve().parents[1] / "data" / "nni"
if str(NNI_DATA) not in sys.path:
    sys.path.insert(0, str(NNI_DATA))
