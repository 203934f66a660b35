"""The built-in corpus: stdlib sources -> cached, deterministic, concurrency-safe dataset."""
import json
import os

import pytest

import modse_megatron  # noqa: F401  (megatron-core on CPU)
from megatron.core.datasets.indexed_dataset import IndexedDataset

from modse_megatron.training.corpus import (builtin_corpus, chunk_text, corpus_meta,
                                            stdlib_documents, stdlib_files, stdlib_root)
from modse_megatron.training.data import build_gpt_datasets, check_indexed_dataset, load_tokenizer

from . import run_concurrently

# A real, small slice of the standard library: ~40 files, builds in well under a second.
SMALL_ROOT = os.path.join(stdlib_root(), "email")


def _builds(cache_dir):
    path = os.path.join(cache_dir, "corpus", "builds.log")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_chunks_reassemble_and_stay_bounded():
    text = open(os.path.join(stdlib_root(), "argparse.py"), encoding="utf-8").read()
    chunks = chunk_text(text, chunk_chars=2000)
    assert "".join(chunks) == text
    assert len(chunks) > 10
    for c in chunks[:-1]:  # cut after a blank line, or (no blank line for long) at the cap
        assert not c.splitlines()[-1].strip() or len(c) >= 4 * 2000
        assert len(c) < 4 * 2000 + 200


def test_stdlib_files_skip_tests_and_are_stable():
    files = stdlib_files()
    assert files == stdlib_files()
    assert len(files) > 500 and "json/decoder.py" in files
    assert not [f for f in files if f.split("/")[0] == "test" or "/tests/" in f or "idle_test" in f]
    assert files != sorted(files)  # seeded shuffle: held-out splits sample the whole library


def _build_small(cache_dir, queue):
    prefix, tokenizer_json = builtin_corpus(cache_dir, vocab_size=600, source_root=SMALL_ROOT)
    ds = IndexedDataset(prefix)
    queue.put((prefix, tokenizer_json, len(ds), ds[0].tolist()))


def test_concurrent_callers_build_once(tmp_path):
    results = run_concurrently(_build_small, (str(tmp_path),))
    assert results[0] == results[1]
    assert len(_builds(tmp_path)) == 1
    prefix, tokenizer_json, n_docs, first = results[0]
    tok = load_tokenizer(tokenizer_json)
    assert check_indexed_dataset(prefix, tok.vocab_size).num_documents == n_docs
    assert first[-1] == tok.eod and "import" in tok.detokenize(first)
    assert not [n for n in os.listdir(tmp_path / "corpus") if ".tmp-" in n]


def test_deterministic_and_half_written_cache_is_rebuilt(tmp_path):
    a, tok_a = builtin_corpus(str(tmp_path / "a"), vocab_size=600, source_root=SMALL_ROOT)
    b, tok_b = builtin_corpus(str(tmp_path / "b"), vocab_size=600, source_root=SMALL_ROOT)
    assert open(a + ".bin", "rb").read() == open(b + ".bin", "rb").read()
    assert open(tok_a).read() == open(tok_b).read()

    # A build that died mid-way leaves a temp dir; a directory without meta.json is not a cache.
    final = os.path.dirname(b)
    os.rename(final, final + ".tmp-99999")
    os.makedirs(final)
    with open(b + ".bin", "wb") as f:
        f.write(b"garbage")
    again, _ = builtin_corpus(str(tmp_path / "b"), vocab_size=600, source_root=SMALL_ROOT)
    assert again == b and open(b + ".bin", "rb").read() == open(a + ".bin", "rb").read()
    assert not os.path.exists(final + ".tmp-99999")
    assert len(_builds(tmp_path / "b")) == 2
    os.remove(b + ".idx")  # a file deleted by hand: rebuilt, not returned broken
    assert builtin_corpus(str(tmp_path / "b"), vocab_size=600, source_root=SMALL_ROOT)[0] == b
    assert os.path.isfile(b + ".idx") and len(_builds(tmp_path / "b")) == 3


@pytest.mark.slow  # tokenizes the whole standard library (~5 s)
def test_real_stdlib_corpus_builds_and_caches(tmp_path):
    prefix, tokenizer_json = builtin_corpus(str(tmp_path), vocab_size=8192)
    stamps = {p: os.stat(p).st_mtime_ns for p in (prefix + ".bin", prefix + ".idx", tokenizer_json)}
    assert builtin_corpus(str(tmp_path), vocab_size=8192) == (prefix, tokenizer_json)
    # cached: the second call neither rebuilt (builds.log) nor rewrote a file
    assert len(_builds(tmp_path)) == 1
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps

    meta = corpus_meta(prefix)
    tok = load_tokenizer(tokenizer_json)
    info = check_indexed_dataset(prefix, tok.vocab_size)
    assert meta["tokens"] == info.num_tokens > 2_500_000
    assert meta["documents"] == info.num_documents > 1000
    assert tok.vocab_size == 8192
    indexed = IndexedDataset(prefix)  # keep it alive: items are views of its mmap
    first_doc = indexed[0].tolist()
    assert tok.detokenize(first_doc) == next(stdlib_documents()) + "<|endoftext|>"
    train, _, _ = build_gpt_datasets(prefix, tok, 256, num_samples=(100, 10, 10))
    assert len(train) == 100
