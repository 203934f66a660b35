#!/usr/bin/env python
"""Plan MoDSE expert placement from a source checkout; same as the ``modse-plan`` command.

    python tools/plan_placement.py --ratios 4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5 --unit 256 --ranks 4
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modse_megatron.placement.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
