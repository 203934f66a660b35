#!/usr/bin/env python
"""Continue a prompt with an exported MoDSE model from a source checkout; same as the
``modse-generate`` command.

    python tools/generate.py --load out/export --prompt "def main(" --max-new-tokens 32
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modse_megatron.inference.generate import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
