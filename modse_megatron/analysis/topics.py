"""Which source file each document of the built-in corpus came from, and its "topic".

The corpus builder (:mod:`modse_megatron.training.corpus`) does not store a document's source
file, but it is deterministic: it visits :func:`~modse_megatron.training.corpus.stdlib_files`
in a fixed order and cuts each file with :func:`~modse_megatron.training.corpus.chunk_text`,
one document per chunk, and records the source directory in ``meta.json``. Replaying that
gives every document's file. The replay is trusted only if it yields the corpus's document
count and the documents actually analysed re-tokenise to exactly their stored tokens (a
changed standard library or builder would fail that, and topics are then reported as
unavailable instead of wrong).

Topic = the top-level package or module of the file (``email/mime/text.py`` -> ``email``,
``json/decoder.py`` -> ``json``, ``enum.py`` -> ``enum``): coarse enough that several documents
share one, and what a reader means by "the sequences about email handling".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class Sources:
    """Per document of the corpus: its source file (relative to ``root``) and topic."""

    root: str
    files: list[str]
    texts: list[str]

    def topic(self, document: int) -> str:
        return topic_of(self.files[document])


def topic_of(relative_path: str) -> str:
    first = relative_path.replace(os.sep, "/").split("/")[0]
    return first[:-3] if first.endswith(".py") else first


def replay_builtin(prefix: str, num_documents: int) -> tuple[Optional[Sources], str]:
    """``(sources, "")`` for a built-in corpus whose replay matches, else ``(None, reason)``."""
    from modse_megatron.training.corpus import BUILDER_VERSION, chunk_text, stdlib_files

    meta_path = os.path.join(os.path.dirname(prefix), "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None, "the data is not a built-in corpus (no meta.json naming its source files), so documents have no known source"
    root = meta.get("source") if isinstance(meta, dict) else None
    if not isinstance(root, str) or meta.get("builder_version") != BUILDER_VERSION:
        return None, f"{meta_path} is not from this corpus builder (version {BUILDER_VERSION}): source files unknown"
    if not os.path.isdir(root):
        return None, f"the corpus source directory {root} no longer exists: source files unknown"
    files, texts = [], []
    for rel in stdlib_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        for chunk in chunk_text(text):
            files.append(rel)
            texts.append(chunk)
    if len(files) != num_documents:
        return None, (f"replaying the corpus build over {root} gives {len(files)} documents, the data has "
                      f"{num_documents}: the sources changed since it was built (rebuild it)")
    return Sources(root, files, texts), ""


def verify(sources: Sources, documents: Sequence[int], tokens_of, tokenizer) -> str:
    """"" if every listed document re-tokenises (text + end-of-document) to its stored tokens,
    else the reason it does not; ``tokens_of(d)`` returns document ``d``'s stored tokens."""
    for d in sorted(set(documents)):
        expected = list(tokenizer.tokenize(sources.texts[d])) + [tokenizer.eod]
        if not np.array_equal(np.asarray(tokens_of(d), dtype=np.int64), np.asarray(expected, dtype=np.int64)):
            return (f"document {d} ({sources.files[d]}) does not re-tokenise to its stored tokens: the sources "
                    f"or the tokenizer differ from the corpus build, source files unknown")
    return ""
