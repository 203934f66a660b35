"""modse-preprocess: jsonl/txt -> .bin/.idx read back by megatron's own IndexedDataset."""
import json
import os

import numpy
import pytest

import modse_megatron  # noqa: F401  (megatron-core on CPU)
from megatron.core.datasets.indexed_dataset import IndexedDataset

from modse_megatron.training import DataError
from modse_megatron.training.preprocess import main, preprocess, read_documents
from modse_megatron.training.tokenizer import load_tokenizer

from . import make_dataset, random_texts, write_jsonl


def _documents(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))], ds


def test_jsonl_round_trip_via_cli(tmp_path, capsys):
    texts = random_texts(120, seed=1) + ["", "   \n"]  # empty text: only the EOD token
    write_jsonl(tmp_path / "in.jsonl", texts)
    out = str(tmp_path / "out" / "docs")  # output directory is created
    rc = main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", out,
               "--train-tokenizer", "--vocab-size", "350", "--append-eod", "--no-progress"])
    assert rc == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "122 documents" in summary[0] and "tokens/s" in summary[0]

    tok = load_tokenizer(out + ".tokenizer.json")
    assert tok.vocab_size == 350
    docs, ds = _documents(out)
    assert ds.index.dtype == numpy.uint16  # megatron's choice for a small vocabulary
    assert docs == [tok.tokenize(t) + [tok.eod] for t in texts]
    assert [tok.detokenize(d[:-1]) for d in docs[:5]] == texts[:5]  # byte-level: exact


def test_txt_paragraphs_and_files_with_given_tokenizer(tmp_path):
    _, tokenizer_json, _ = make_dataset(tmp_path, "base")
    tok = load_tokenizer(tokenizer_json)
    paragraphs = ["first paragraph\nsecond line\n", "ñandú paragraph\n", "last one, no newline"]
    txt = tmp_path / "notes.txt"
    txt.write_text("\n\n" + paragraphs[0] + "\n\n\n" + paragraphs[1] + "  \n" + paragraphs[2],
                   encoding="utf-8")
    extra = random_texts(4, seed=2)
    write_jsonl(tmp_path / "more.jsonl", extra, key="body")

    out = str(tmp_path / "p")
    stats = preprocess([str(txt), str(tmp_path / "more.jsonl")], out, tokenizer_path=tokenizer_json,
                       json_key="body", progress=False)
    docs, _ = _documents(out)
    expected = paragraphs + extra  # input order kept; no --append-eod: no EOD
    assert docs == [tok.tokenize(t) for t in expected]
    assert stats.documents == len(expected) and stats.tokens == sum(map(len, docs))
    assert not os.path.exists(out + ".tokenizer.json")  # only written when training one

    preprocess([str(txt)], str(tmp_path / "f"), tokenizer_path=tokenizer_json,
               txt_document="file", progress=False)
    docs, _ = _documents(str(tmp_path / "f"))
    assert docs == [tok.tokenize(txt.read_text(encoding="utf-8"))]


def test_overwrite_flag_replaces_outputs(tmp_path):
    prefix, tokenizer_json, _ = make_dataset(tmp_path, n_docs=20)
    before = open(prefix + ".bin", "rb").read()
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        preprocess([prefix + ".jsonl"], prefix, tokenizer_path=tokenizer_json, progress=False)
    assert open(prefix + ".bin", "rb").read() == before
    preprocess([prefix + ".jsonl"], prefix, tokenizer_path=tokenizer_json, overwrite=True,
               progress=False)  # no EOD this time: the data changes
    assert open(prefix + ".bin", "rb").read() != before
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["corpus.jsonl", "corpus.bin", "corpus.idx", "corpus.tokenizer.json"])  # no temp files


def _bad_inputs(tmp_path, tokenizer_json):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, random_texts(5, seed=3))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n\n{"text": "cut off\n', encoding="utf-8")
    no_key = tmp_path / "nokey.jsonl"
    no_key.write_text('{"text": "ok"}\n{"content": "x"}\n', encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9\n".encode("latin-1"))
    broken_tok = tmp_path / "broken.tokenizer.json"
    broken_tok.write_text(open(tokenizer_json).read()[:200])
    tok = ["--tokenizer", tokenizer_json]
    return {  # case: (argv, what the message must name)
        "missing input": (["--input", str(tmp_path / "nope.jsonl"), *tok], "nope.jsonl does not exist"),
        "bad json line": (["--input", f"{good},{bad_json}", *tok], "bad.jsonl line 3 is not valid JSON"),
        "missing json key": (["--input", str(no_key), *tok], "nokey.jsonl line 2 has no key 'text'"),
        "wrong --json-key": (["--input", str(good), "--json-key", "body", *tok], "--json-key"),
        "not utf-8": (["--input", str(latin1), *tok], "latin1.txt line 1 is not UTF-8"),
        "missing tokenizer": (["--input", str(good), "--tokenizer", str(tmp_path / "t.json")],
                              "t.json does not exist"),
        "corrupt tokenizer": (["--input", str(good), "--tokenizer", str(broken_tok)],
                              "broken.tokenizer.json is not a valid"),
        "vocab too small": (["--input", str(good), "--train-tokenizer", "--vocab-size", "100"],
                            "--vocab-size >= 258"),
    }


CASES = ["missing input", "bad json line", "missing json key", "wrong --json-key", "not utf-8",
         "missing tokenizer", "corrupt tokenizer", "vocab too small"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_error_and_keeps_outputs(tmp_path, capsys, case):
    _, tokenizer_json, _ = make_dataset(tmp_path, "base", n_docs=20)
    argv, expected = _bad_inputs(tmp_path, tokenizer_json)[case]
    out = tmp_path / "out"
    existing = {out.with_suffix(s): os.urandom(64) for s in (".bin", ".idx", ".tokenizer.json")}
    for path, data in existing.items():
        path.write_bytes(data)
    # --overwrite: the only reason left to refuse is the bad input itself.
    rc = main([*argv, "--output-prefix", str(out), "--overwrite", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    for path, data in existing.items():
        assert path.read_bytes() == data, f"{path} was modified"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_reader_yields_documents_lazily(tmp_path):
    # Streaming matters for big inputs: documents before a bad line are readable.
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\nnot json\n", encoding="utf-8")
    docs = read_documents(str(path))
    assert next(docs) == "a"
    with pytest.raises(DataError, match="line 2"):
        next(docs)


def test_tokenizer_without_eod_needs_a_named_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "[END]": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "wl.json")
    word_level.save(path)
    with pytest.raises(DataError, match=r"wl.json has no end-of-document token .*eod_token="):
        load_tokenizer(path)
    tok = load_tokenizer(path, eod_token="[END]")
    assert (tok.eod, tok.pad, tok.vocab_size) == (2, -1, 3)  # -1: megatron's "no pad" sentinel
    assert tok.tokenize("hello world") == [1, 0]
    with pytest.raises(DataError, match="no token '<eos>'"):
        load_tokenizer(path, eod_token="<eos>")
