"""HFTokenizer: the megatron tokenizer interface over a tokenizer.json, and BPE training."""
import shutil

import pytest

from modse_megatron.training import DataError
from modse_megatron.training.tokenizer import EOD_TOKEN, PAD_TOKEN, load_tokenizer, train_bpe_tokenizer

from . import random_texts

AWKWARD = ["größe ñandú 专家 🙂\n", "\ttabs\tand  double  spaces\r\n", "\x00\x07 control", "", "a" * 300]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.json"
    train_bpe_tokenizer(random_texts(200, seed=4), vocab_size=320).save(str(path))
    return path


def test_megatron_interface(trained):
    from megatron.core.tokenizers import MegatronTokenizerBase

    tok = load_tokenizer(str(trained))
    assert isinstance(tok, MegatronTokenizerBase)  # what GPTDatasetConfig is annotated with
    assert tok.vocab_size == 320
    assert (tok.eod, tok.eos, tok.pad) == (0, 0, 1)  # the two special tokens come first
    assert tok.vocab[EOD_TOKEN] == 0 and tok.vocab[PAD_TOKEN] == 1
    assert tok.inv_vocab == {i: t for t, i in tok.vocab.items()} and len(tok.inv_vocab) == 320
    with pytest.raises(NotImplementedError):
        tok.apply_chat_template([])


@pytest.mark.parametrize("text", AWKWARD)
def test_byte_level_round_trip_without_special_tokens(trained, text):
    tok = load_tokenizer(str(trained))
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text  # byte-level: any input decodes back exactly
    assert tok.eod not in ids and tok.pad not in ids  # nothing added by a post-processor
    assert tok.tokenize_batch([text, text + "!"]) == [ids, tok.tokenize(text + "!")]
    assert tok.detokenize(ids + [tok.eod]) == text + EOD_TOKEN  # document ends stay visible


def test_cache_identity_is_the_file_content(trained, tmp_path):
    """megatron names its index caches after ``unique_identifiers``: a copy elsewhere shares
    them, a different tokenizer does not."""
    tok = load_tokenizer(str(trained))
    copy = tmp_path / "elsewhere" / "copy.json"
    copy.parent.mkdir()
    shutil.copy(trained, copy)
    assert load_tokenizer(str(copy)).unique_identifiers == tok.unique_identifiers
    assert list(tok.unique_identifiers) == ["class", "tokenizer_sha256"]
    other = tmp_path / "other.json"
    train_bpe_tokenizer(random_texts(200, seed=4), vocab_size=300).save(str(other))
    assert load_tokenizer(str(other)).unique_identifiers != tok.unique_identifiers


def test_training_is_deterministic():
    texts = random_texts(100, seed=8)
    a, b = (train_bpe_tokenizer(texts, vocab_size=300).to_str() for _ in range(2))
    assert a == b


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist; pass the path of a Hugging Face tokenizer.json"),
    ("corrupt", "is not a valid Hugging Face tokenizer.json"),
    ("named eod absent", "has no token '<eos>' to use as end-of-document token; pass a token that is in its vocabulary"),
])
def test_bad_tokenizer_is_a_one_line_data_error(trained, tmp_path, case, expected):
    path, kwargs = str(trained), {}
    if case == "missing":
        path = str(tmp_path / "nope.json")
    elif case == "corrupt":
        path = str(tmp_path / "cut.json")
        open(path, "w").write(trained.read_text()[:300])
    else:
        kwargs = {"eod_token": "<eos>"}
    with pytest.raises(DataError) as err:
        load_tokenizer(path, **kwargs)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_vocab_too_small_for_bytes_names_the_minimum():
    with pytest.raises(DataError) as err:
        train_bpe_tokenizer(["x"], vocab_size=100)
    assert str(err.value) == "vocab size 100 is too small for a byte-level BPE; use --vocab-size >= 258"
