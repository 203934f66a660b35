"""The small real corpus tests and benchmarks train on: 60 Python stdlib sources tokenized with
a freshly trained BPE of 512 tokens (a few seconds to build, nothing downloaded)."""
from __future__ import annotations

import json
from pathlib import Path


def small_stdlib_corpus(root: Path, documents: int = 60, vocab_size: int = 512) -> dict[str, str]:
    """Build the corpus under ``root``; returns ``{"prefix", "tokenizer", "cache"}`` for
    ``--data-path``, ``--tokenizer`` and ``--data-cache-dir``."""
    import sysconfig

    from modse_megatron.training.preprocess import preprocess

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    src = Path(sysconfig.get_paths()["stdlib"])
    docs = root / "docs.jsonl"
    with docs.open("w") as f:
        for path in sorted(src.glob("*.py"))[:documents]:
            f.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")
    preprocess([str(docs)], str(root / "corpus"), train_tokenizer=True, vocab_size=vocab_size, progress=False)
    return {"prefix": str(root / "corpus"), "tokenizer": str(root / "corpus.tokenizer.json"), "cache": str(root / "cache")}
