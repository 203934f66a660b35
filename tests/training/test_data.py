"""build_gpt_datasets: megatron GPTDataset splits over real indexed datasets, and its checks."""
import os
import shutil
import struct
from collections import Counter

import pytest
import torch

from modse_megatron.training.data import (DataError, build_gpt_datasets, check_indexed_dataset,
                                          load_tokenizer, parse_data_prefix)

from . import make_dataset, run_concurrently

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(prefix, tokenizer, texts) of 300 random documents ending in EOD."""
    prefix, tokenizer_json, texts = make_dataset(tmp_path_factory.mktemp("data"))
    return prefix, load_tokenizer(tokenizer_json), texts


def _tokens(ds, i):
    return ds[i]["tokens"].tolist()


def test_split_sizes_and_items(corpus, tmp_path):
    prefix, tok, _ = corpus
    train, valid, test = build_gpt_datasets(prefix, tok, SEQ, split="90,5,5",
                                            num_samples=(700, 13, 0), cache_dir=str(tmp_path))
    assert (len(train), len(valid), test) == (700, 13, None)  # more than one epoch of train
    for ds in (train, valid):
        for i in (0, len(ds) - 1):
            item = ds[i]
            assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert all(v.shape == (SEQ,) for v in item.values())
            assert item["tokens"].dtype == item["labels"].dtype == torch.int64
            # labels are the next tokens: each sample reads SEQ + 1 tokens of the stream
            assert torch.equal(item["labels"][:-1], item["tokens"][1:])
            assert torch.equal(item["position_ids"], torch.arange(SEQ))
            # no loss for the token after an EOD (first token of an unrelated document)
            assert torch.equal(item["loss_mask"] == 0, item["tokens"] == tok.eod)
    assert any((train[i]["tokens"] == tok.eod).any() for i in range(20))  # documents are packed


def test_one_epoch_is_the_split_documents(corpus, tmp_path):
    prefix, tok, texts = corpus
    train, valid, _ = build_gpt_datasets(prefix, tok, SEQ, split="90,10,0",
                                         num_samples=(None, None, 0), cache_dir=str(tmp_path))
    n_train = round(0.9 * len(texts))  # megatron splits by document, in order
    for ds, docs in ((train, texts[:n_train]), (valid, texts[n_train:])):
        expected = Counter(t for d in docs for t in tok.tokenize(d) + [tok.eod])
        got = Counter(t for i in range(len(ds)) for t in _tokens(ds, i))
        # one epoch = every document once, in shuffled order; only the tail that does not
        # fill a last sample is dropped
        assert not got - expected
        assert sum(expected.values()) - SEQ - 1 <= sum(got.values()) <= sum(expected.values())


def test_seed_and_caching(corpus, tmp_path):
    prefix, tok, _ = corpus
    first = build_gpt_datasets(prefix, tok, SEQ, num_samples=(50, 2, 2), cache_dir=str(tmp_path))[0]
    cached = sorted(os.listdir(tmp_path))
    assert any(f.endswith("shuffle_index.npy") for f in cached)
    again = build_gpt_datasets(prefix, tok, SEQ, num_samples=(50, 2, 2), cache_dir=str(tmp_path))[0]
    assert sorted(os.listdir(tmp_path)) == cached  # loaded, not rebuilt under new names
    other = build_gpt_datasets(prefix, tok, SEQ, num_samples=(50, 2, 2), seed=7, cache_dir=str(tmp_path))[0]
    assert [_tokens(first, i) for i in range(50)] == [_tokens(again, i) for i in range(50)]
    assert [_tokens(first, i) for i in range(50)] != [_tokens(other, i) for i in range(50)]


def test_weighted_blend(corpus, tmp_path):
    prefix, tok, _ = corpus
    other, _, _ = make_dataset(tmp_path, "other", n_docs=200, seed=5)
    # the second dataset was made with its own BPE; its ids still fit this vocabulary
    train, valid, _ = build_gpt_datasets(f"3 {prefix} 1 {other}.bin", tok, SEQ, split="90,10,0",
                                         num_samples=(400, 20, 0), cache_dir=str(tmp_path / "c"))
    assert (len(train), len(valid)) == (400, 20)
    share = Counter(int(train[i]["dataset_id"]) for i in range(400))
    assert share == {0: 300, 1: 100}


def _build_in_subprocess(prefix, tokenizer_json, cache_dir, queue):
    tok = load_tokenizer(tokenizer_json)
    train = build_gpt_datasets(prefix, tok, SEQ, num_samples=(300, 5, 5), cache_dir=cache_dir)[0]
    queue.put([_tokens(train, i) for i in range(0, 300, 7)])


def test_concurrent_processes_share_one_cache(corpus, tmp_path):
    prefix, tok, _ = corpus
    results = run_concurrently(_build_in_subprocess, (prefix, tok.path, str(tmp_path)))
    assert results[0] == results[1]
    train = build_gpt_datasets(prefix, tok, SEQ, num_samples=(300, 5, 5), cache_dir=str(tmp_path))[0]
    assert results[0] == [_tokens(train, i) for i in range(0, 300, 7)]
    assert len([f for f in os.listdir(tmp_path) if f.endswith("-GPTDataset-train-shuffle_index.npy")]) == 1


def _distributed_build(prefix, tokenizer_json, cache_dir):
    import torch.distributed as dist

    tok = load_tokenizer(tokenizer_json)
    train = build_gpt_datasets(prefix, tok, SEQ, num_samples=(200, 4, 4), cache_dir=cache_dir)[0]
    return dist.get_rank(), [_tokens(train, i) for i in range(0, 200, 9)]


def test_distributed_ranks_get_the_same_samples(corpus, tmp_path, dist2):
    prefix, tok, _ = corpus
    (r0, s0), (r1, s1) = dist2.run(_distributed_build, prefix, tok.path, str(tmp_path))
    assert (r0, r1) == (0, 1) and s0 == s1 and len(s0) == 23


def _copy(prefix, dst):
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, str(dst) + ext)
    return str(dst)


def _corrupt(kind, prefix, tmp_path):
    """A broken copy of the corpus -> (data path to pass, text the error must name)."""
    if kind == "missing":
        return str(tmp_path / "nope"), "nope.idx does not exist"
    bad = _copy(prefix, tmp_path / "bad")
    idx = bytearray(open(bad + ".idx", "rb").read())
    if kind == "truncated idx":
        open(bad + ".idx", "wb").write(idx[: len(idx) // 2])
        return bad, "bad.idx is truncated or corrupt"
    if kind == "bad header":
        open(bad + ".idx", "wb").write(b"NOTANIDX!" + idx[9:])
        return bad, "bad.idx is not a megatron index"
    if kind == "short bin":
        with open(bad + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(bad + ".bin") - 2)
        return bad, "bad.bin has"
    if kind == "bad pointers":
        struct.pack_into("<q", idx, 34 + 4 * 300 + 8, 12345)  # second sequence pointer
        open(bad + ".idx", "wb").write(idx)
        return bad, "bad.idx has inconsistent sequence"
    if kind == "other tokenizer":  # ids up to 8191 against a 400-id vocabulary
        big, _, _ = make_dataset(tmp_path, "big", n_docs=300, vocab_size=8192, seed=9)
        return big, "big.bin holds token id"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "truncated idx", "bad header", "short bin",
                                  "bad pointers", "other tokenizer"])
def test_bad_data_is_a_one_line_data_error(corpus, tmp_path, kind):
    prefix, tok, _ = corpus
    data_path, expected = _corrupt(kind, prefix, tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        build_gpt_datasets(data_path, tok, SEQ, num_samples=(10, 1, 1), cache_dir=str(cache))
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert not cache.exists()  # refused before megatron wrote anything


@pytest.mark.parametrize("kwargs, expected", [
    (dict(seq_length=5000), "too few for one sample of seq_length 5000"),
    (dict(split="100,0,0"), "gives the valid split no data"),
    (dict(split="99.9,0.05,0.05"), "valid split of .* has 0 of 300 documents"),
    (dict(split="a,b"), "bad split"),
    (dict(num_samples=(10, -1, 1)), "num_samples must be"),
])
def test_bad_request_is_a_data_error(corpus, tmp_path, kwargs, expected):
    prefix, tok, _ = corpus
    args = dict(seq_length=SEQ, num_samples=(10, 1, 1), cache_dir=str(tmp_path)) | kwargs
    with pytest.raises(DataError, match=expected) as err:
        build_gpt_datasets(prefix, tok, **args)
    assert "\n" not in str(err.value)


def test_parse_data_prefix():
    assert parse_data_prefix("/d/a") == (["/d/a"], None)
    assert parse_data_prefix("0.3 /d/a.bin 0.7 /d/b") == (["/d/a", "/d/b"], [0.3, 0.7])
    assert parse_data_prefix(["/d/a", "/d/b.idx"]) == (["/d/a", "/d/b"], None)
    for bad, fix in (("0.3 /d/a /d/b", "write 'w1 p1 w2 p2' or only prefixes"),
                     ("-1 /d/a", "write positive weights and prefixes"),
                     ("", "pass a dataset prefix such as data/corpus")):
        with pytest.raises(DataError) as err:
            parse_data_prefix(bad)
        assert fix in str(err.value) and "\n" not in str(err.value)


def test_check_indexed_dataset_counts(corpus):
    prefix, tok, texts = corpus
    info = check_indexed_dataset(prefix, tok.vocab_size)
    assert info.num_documents == info.num_sequences == len(texts)
    assert info.num_tokens == sum(len(tok.tokenize(t)) + 1 for t in texts)
