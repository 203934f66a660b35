#!/usr/bin/env python
"""Inspect, reshard, export, import and verify checkpoints from a source checkout; same as the
``modse-convert`` command.

    python tools/convert_checkpoint.py inspect runs/tiny_cpu/checkpoints
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modse_megatron.checkpoint.convert import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
