#!/usr/bin/env python
"""Tokenize jsonl/text into a megatron indexed dataset from a source checkout; same as the
``modse-preprocess`` command.

    python tools/preprocess_data.py --input docs.jsonl --output-prefix data/docs \
        --train-tokenizer --vocab-size 8192 --append-eod
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modse_megatron.training.preprocess import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
