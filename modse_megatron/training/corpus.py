"""The built-in corpus: the Python standard library's own source, tokenized, cached.

No dataset can be downloaded, yet every machine that runs us has CPython's standard library:
~730 non-test modules, ~12 MB of real code and docstrings (English prose). That is the default
pretraining corpus and the one tests use. It is built on first use (read the files, train a
byte-level BPE on them, encode) and cached; later calls return the cached paths at once.

Documents: each file is cut at blank lines into chunks of about :data:`CHUNK_CHARS` characters
(a few thousand tokens; no chunk exceeds ``4 * CHUNK_CHARS`` - a blank-line-free stretch is cut
at a line end), so megatron's document-level train/valid/test split has thousands of units to
divide instead of a few hundred uneven files. Files are visited in a fixed shuffled order (seeded,
a file's chunks stay together), so the held-out splits sample the whole library rather than the
alphabetically last packages, and a file never straddles two splits.

Cache layout: ``<cache>/corpus/stdlib-py<X.Y.Z>-v<vocab>-b<BUILDER_VERSION>/`` holding
``corpus.bin``, ``corpus.idx``, ``tokenizer.json`` and ``meta.json``. The directory is
assembled under a temporary name and renamed into place in one step, under an ``fcntl`` lock,
so concurrent callers (several ranks, several jobs) build it once and never see a half-written
cache. Bump :data:`BUILDER_VERSION` whenever the output would change.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from typing import Iterator

from . import DataError

BUILDER_VERSION = 1
CHUNK_CHARS = 8000
_SHUFFLE_SEED = 1234
# Directory names under the stdlib that hold test suites, not library code.
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}


def default_cache_dir() -> str:
    """``$MODSE_CACHE_DIR`` if set, else ``~/.cache/modse_megatron``."""
    return os.environ.get("MODSE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "modse_megatron"
    )


def stdlib_root() -> str:
    """Where this interpreter's standard library lives."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """Relative paths of the stdlib's non-test ``.py`` files, in a fixed shuffled order."""
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(os.path.normpath(os.path.join(rel, name)))
    files.sort()
    random.Random(_SHUFFLE_SEED).shuffle(files)
    return files


def chunk_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` at blank lines into chunks of about ``chunk_chars`` (see module docstring).

    Concatenating the chunks gives back ``text`` exactly.
    """
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if (size >= chunk_chars and not line.strip()) or size >= 4 * chunk_chars:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return chunks


def stdlib_documents(root: str | None = None) -> Iterator[str]:
    """The corpus documents: chunks of every file of :func:`stdlib_files`, in that order."""
    root = root or stdlib_root()
    for rel in stdlib_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        yield from chunk_text(text)


def corpus_key(vocab_size: int, source_root: str | None = None) -> str:
    """Cache directory name: what makes two built corpora differ."""
    v = sys.version_info
    source = f"stdlib-py{v.major}.{v.minor}.{v.micro}"
    if source_root is not None:
        digest = hashlib.sha256(os.path.abspath(source_root).encode()).hexdigest()[:12]
        source = f"dir-{digest}"
    return f"{source}-v{vocab_size}-b{BUILDER_VERSION}"


def builtin_corpus(cache_dir: str | None = None, vocab_size: int = 8192, *,
                   source_root: str | None = None) -> tuple[str, str]:
    """Build (first time) and return ``(prefix, tokenizer_json)`` of the built-in corpus.

    ``prefix`` is the indexed-dataset path prefix (``prefix + ".bin"``/``".idx"``), ready for
    :func:`modse_megatron.training.data.build_gpt_datasets`; ``tokenizer_json`` is the BPE it was
    encoded with (for :func:`~modse_megatron.training.tokenizer.load_tokenizer`). Every document
    ends with the tokenizer's ``<|endoftext|>``.

    Safe to call from many processes at once (all ranks may call it; no barrier needed): one
    builds while the others wait on the lock, then all return the same paths. The cache is
    keyed by Python version, ``vocab_size`` and :data:`BUILDER_VERSION`; delete the directory
    to force a rebuild. Each build appends one line to ``<cache>/corpus/builds.log``.

    ``source_root`` replaces the standard library by another directory of ``.py`` files (same
    rules: test directories skipped); tests use it to build small corpora quickly.
    """
    root = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), "corpus")
    final = os.path.join(root, corpus_key(vocab_size, source_root))
    paths = (os.path.join(final, "corpus"), os.path.join(final, "tokenizer.json"))
    if _complete(final):
        return paths
    os.makedirs(root, exist_ok=True)
    with file_lock(final + ".lock"):
        if not _complete(final):
            meta = _build(final, vocab_size, source_root or stdlib_root())
            with open(os.path.join(root, "builds.log"), "a") as log:
                log.write(json.dumps({"key": os.path.basename(final), "pid": os.getpid(),
                                      "seconds": meta["build_seconds"]}) + "\n")
    return paths


def _complete(final: str) -> bool:
    """The directory only ever appears complete (atomic rename); this also catches files
    deleted by hand afterwards, which then get rebuilt."""
    names = ("meta.json", "corpus.bin", "corpus.idx", "tokenizer.json")
    return all(os.path.isfile(os.path.join(final, n)) for n in names)


@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive ``fcntl`` lock on ``path`` (created if missing) for the ``with`` block.

    Released by the kernel if the process dies, so a crashed builder never blocks the next.
    """
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(final: str, vocab_size: int, source_root: str) -> dict:
    """Assemble the corpus in a private directory, then rename it to ``final`` atomically.

    The tokenizer is trained on every other document (half the time of training on all, and
    on ~6 MB of stdlib text the vocabulary barely changes: +0.3% tokens); all are encoded.
    """
    from .preprocess import write_indexed_dataset
    from .tokenizer import load_tokenizer, train_bpe_tokenizer

    start = time.perf_counter()
    # Leftovers of builds that died (we hold the lock, so no build is running).
    parent = os.path.dirname(final)
    for name in os.listdir(parent):
        if name.startswith(os.path.basename(final) + ".tmp-"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    if os.path.isdir(final):  # incomplete (see _complete)
        shutil.rmtree(final)
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        documents = list(stdlib_documents(source_root))
        if not documents:
            raise DataError(f"no .py files under {source_root} to build a corpus from; "
                            f"pass a directory with Python sources")
        sample = documents[::2]
        bpe = train_bpe_tokenizer(sample, vocab_size, length=len(sample))
        tokenizer_json = os.path.join(tmp, "tokenizer.json")
        bpe.save(tokenizer_json)
        tokenizer = load_tokenizer(tokenizer_json)
        prefix = os.path.join(tmp, "corpus")
        stats = write_indexed_dataset(documents, tokenizer, prefix + ".bin", prefix + ".idx",
                                      append_eod=True)
        meta = {
            "source": source_root,
            "python": sys.version.split()[0],
            "documents": stats.documents,
            "tokens": stats.tokens,
            "characters": sum(map(len, documents)),
            "vocab_size": tokenizer.vocab_size,
            "builder_version": BUILDER_VERSION,
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, final)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def corpus_meta(prefix: str) -> dict:
    """The ``meta.json`` written next to a built-in corpus (documents, tokens, build time...)."""
    with open(os.path.join(os.path.dirname(prefix), "meta.json")) as f:
        return json.load(f)
