"""Run every benchmark: ``python bench/run_all.py [flops|topology|sensitivity ...]``.

Each benchmark prints its figures as ratios against a baseline measured in the same run.
"""

from __future__ import annotations

import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BENCHES = ("flops", "topology", "sensitivity", "sensitivity_scale", "shrink", "heads", "verify")


def main(argv: list[str]) -> int:
    chosen = argv or list(BENCHES)
    for name in chosen:
        try:
            mod = importlib.import_module(f"bench_{name}")
        except ModuleNotFoundError as e:
            print(f"[{name}] not available: {e}")
            continue
        print(f"\n##### {name} #####")
        mod.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
