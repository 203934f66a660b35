"""A megatron-core tokenizer backed by a Hugging Face ``tokenizer.json``, and BPE training.

Why not megatron's own ``HuggingFaceTokenizer``: in megatron-core 0.16.1 it goes through
``transformers.AutoTokenizer`` (a large dependency we do not need) and a metadata JSON written
next to the tokenizer. What ``GPTDatasetConfig``/``GPTDataset`` actually use is small: ``eod``,
``pad``, ``vocab_size`` and ``unique_identifiers`` (hashed into the names of megatron's index
caches). :class:`HFTokenizer` subclasses megatron's ``MegatronTokenizerBase`` (the type those
configs are annotated with) and provides exactly that over the fast ``tokenizers`` library.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron.core.tokenizers import MegatronTokenizerBase

from . import DataError
from .special_tokens import EOD_CANDIDATES, EOD_TOKEN, PAD_CANDIDATES, PAD_TOKEN  # noqa: F401 (re-exported)

# megatron's sentinel for "no pad token" (megatron/core/datasets/megatron_dataset.py).
NO_PAD = -1
MIN_VOCAB = 256 + 2  # every byte plus the two special tokens


class HFTokenizer(MegatronTokenizerBase):
    """Megatron tokenizer interface over a ``tokenizers.Tokenizer`` loaded from ``path``.

    ``eod`` is the end-of-document token appended after every document at preprocessing time
    (GPTDataset concatenates documents, so the model learns where one ends). ``pad`` is only used
    by megatron to fill a short last sample; without a pad token it is ``-1``, megatron's own
    "never in the data" sentinel. Special tokens are never added by :meth:`tokenize` (no BOS/CLS
    from a post-processor), so preprocessing controls exactly what lands in the ``.bin``.
    """

    def __init__(self, path: str, eod_token: str | None = None, pad_token: str | None = None):
        path = os.path.abspath(path)
        super().__init__(path, {"library": "tokenizers", "model_type": "gpt"})
        self._tokenizer = _read_tokenizer_file(path)
        with open(path, "rb") as f:
            self._sha256 = hashlib.sha256(f.read()).hexdigest()
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self._eod = _special_id(vocab, path, "end-of-document", eod_token, EOD_CANDIDATES)
        self._pad = _special_id(vocab, path, "pad", pad_token, PAD_CANDIDATES, required=False)

    # --- encoding -------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once, in parallel (Rust threads); same ids as tokenize."""
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept so document boundaries stay visible."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("HFTokenizer is for pretraining; it has no chat template")

    # --- what megatron reads --------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the model's embedding must cover (special tokens included)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron hashes into its index-cache file names.

        The file's content hash, not its path: the same tokenizer loaded from another copy (a
        node-local cache, a moved run directory) keeps the same cache names, and a tokenizer
        retrained in place gets new ones.
        """
        ids = OrderedDict()
        ids["class"] = type(self).__name__
        ids["tokenizer_sha256"] = self._sha256
        return ids

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tokenizer

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def load_tokenizer(
    tokenizer_json_path: str, eod_token: str | None = None, pad_token: str | None = None
) -> HFTokenizer:
    """Load a Hugging Face ``tokenizer.json`` as a megatron tokenizer.

    ``eod_token``/``pad_token`` name the special tokens when the file uses names other than
    the usual ones (:data:`EOD_CANDIDATES`, :data:`PAD_CANDIDATES`). Raises :class:`DataError`
    if the file is missing or unreadable or has no end-of-document token.
    """
    return HFTokenizer(tokenizer_json_path, eod_token=eod_token, pad_token=pad_token)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE with ``<|endoftext|>`` (id 0) and ``<|pad|>`` (id 1).

    Byte-level means every input (code, any script, stray bytes) encodes without unknown
    tokens and decodes back exactly. Training is deterministic for the same texts in the same
    order (the builtin corpus relies on that).
    """
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"vocab size {vocab_size} is too small for a byte-level BPE; use --vocab-size >= {MIN_VOCAB}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def _read_tokenizer_file(path: str) -> Tokenizer:
    if not os.path.isfile(path):
        raise DataError(
            f"tokenizer file {path} does not exist; pass the path of a Hugging Face tokenizer.json "
            f"(or train one: modse-preprocess --train-tokenizer --vocab-size N)"
        )
    try:
        return Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception with a serde message
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"tokenizer file {path} is not a valid Hugging Face tokenizer.json ({reason}); "
            f"point to an intact tokenizer.json or retrain it with --train-tokenizer"
        ) from None


def _special_id(vocab, path, role, name, candidates, required=True) -> int:
    if name is not None:
        if name not in vocab:
            raise DataError(f"tokenizer {path} has no token {name!r} to use as {role} token; "
                            f"pass a token that is in its vocabulary")
        return vocab[name]
    for candidate in candidates:
        if candidate in vocab:
            return vocab[candidate]
    if not required:
        return NO_PAD
    raise DataError(
        f"tokenizer {path} has no {role} token (looked for {', '.join(candidates)}); "
        f"name one with eod_token=... or retrain with --train-tokenizer"
    )
