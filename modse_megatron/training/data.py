"""Pretraining data: megatron-core ``GPTDataset`` train/valid/test splits over indexed datasets.

The API the pretraining driver uses::

    prefix, tokenizer_json = builtin_corpus()            # or a modse-preprocess output
    tokenizer = load_tokenizer(tokenizer_json)
    train, valid, test = build_gpt_datasets(prefix, tokenizer, seq_length=512,
                                            num_samples=(10_000, 200, 200))

Everything megatron would reject with an ``assert`` or a hang (missing/corrupt files, a split
too small for one sequence, a tokenizer that does not match the data) is checked first and
raised as :class:`DataError` with a one-line message naming the file and the fix.
"""
from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy
import torch

from ..platform.megatron_0_16.datasets import SingleProcessSafeBuilder
from . import DataError
from .corpus import builtin_corpus, default_cache_dir, file_lock
from .tokenizer import HFTokenizer, load_tokenizer

__all__ = ["DataError", "IndexInfo", "HFTokenizer", "builtin_corpus", "build_gpt_datasets",
           "check_indexed_dataset", "load_tokenizer", "parse_data_prefix"]

_HEADER = b"MMIDIDX\x00\x00"  # megatron/core/datasets/indexed_dataset.py _INDEX_HEADER
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
_VOCAB_SCAN_BYTES = 256 << 20  # check token ids against the vocabulary in the first 256 MiB
SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class IndexInfo:
    """What :func:`check_indexed_dataset` found in one ``.bin``/``.idx`` pair."""

    prefix: str
    num_documents: int
    num_sequences: int
    num_tokens: int
    dtype: type
    sequence_lengths: numpy.ndarray


def _bad(path: str, what: str) -> DataError:
    return DataError(
        f"{path} {what}; regenerate it with modse-preprocess --overwrite (or fix --data-path)"
    )


def check_indexed_dataset(prefix: str, vocab_size: int | None = None) -> IndexInfo:
    """Validate ``prefix.idx``/``prefix.bin`` the way megatron will read them, but with errors.

    Checks the header, that the index is complete and self-consistent, that the ``.bin`` has
    exactly the bytes the index points to, and (given ``vocab_size``) that the token ids in the
    first 256 MiB fit the tokenizer - data made with another tokenizer would otherwise fail deep
    inside the embedding.
    """
    from megatron.core.datasets.indexed_dataset import DType

    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(
                f"{path} does not exist; check --data-path (a prefix, without .bin/.idx) or "
                f"create the dataset with modse-preprocess --output-prefix {prefix}"
            )
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _HEADER:
        raise _bad(idx_path, "is not a megatron index file (bad header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise _bad(idx_path, f"has index version {version}, megatron-core reads version 1")
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:
        raise _bad(idx_path, f"has an unknown token dtype code {code}") from None
    expected = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if idx_size not in (expected, expected + n_seq):  # + one mode byte per sequence if multimodal
        raise _bad(idx_path, f"is truncated or corrupt ({idx_size} bytes, expected {expected})")
    if n_seq == 0 or n_doc < 2:
        raise _bad(idx_path, "holds no documents")
    mm = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
    lengths = numpy.frombuffer(mm, numpy.int32, n_seq, _HEADER_BYTES)
    pointers = numpy.frombuffer(mm, numpy.int64, n_seq, _HEADER_BYTES + 4 * n_seq)
    doc_idx = numpy.frombuffer(mm, numpy.int64, n_doc, _HEADER_BYTES + 12 * n_seq)
    itemsize = numpy.dtype(dtype).itemsize
    offsets = numpy.concatenate([[0], numpy.cumsum(lengths, dtype=numpy.int64)[:-1]]) * itemsize
    if (lengths < 0).any() or not numpy.array_equal(pointers, offsets):
        raise _bad(idx_path, "has inconsistent sequence lengths/pointers")
    if doc_idx[0] != 0 or doc_idx[-1] != n_seq or (numpy.diff(doc_idx) < 0).any():
        raise _bad(idx_path, "has inconsistent document boundaries")
    num_tokens = int(lengths.sum(dtype=numpy.int64))
    bin_size = os.path.getsize(bin_path)
    if bin_size != num_tokens * itemsize:
        raise _bad(bin_path, f"has {bin_size} bytes but its .idx describes {num_tokens * itemsize}")
    if vocab_size is not None:
        count = min(num_tokens, _VOCAB_SCAN_BYTES // itemsize)
        largest = int(numpy.memmap(bin_path, mode="r", dtype=dtype, shape=(count,)).max())
        if largest >= vocab_size:
            raise DataError(
                f"{bin_path} holds token id {largest} but the tokenizer has only {vocab_size} ids; "
                f"pass the tokenizer the data was preprocessed with"
            )
    return IndexInfo(prefix, n_doc - 1, n_seq, num_tokens, dtype, numpy.array(lengths))


def parse_data_prefix(data_prefix: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """``"p"``, ``"w1 p1 w2 p2"`` or a list of those words -> (prefixes, weights or None).

    Same convention as Megatron-LM's ``--data-path``: alternating weight/prefix pairs form a
    weighted blend; a list of prefixes alone is blended in proportion to their sizes. A
    trailing ``.bin``/``.idx`` is dropped (people paste file names).
    """
    words = data_prefix.split() if isinstance(data_prefix, str) else [str(w) for w in data_prefix]
    if not words:
        raise DataError("empty data path; pass a dataset prefix such as data/corpus (for data/corpus.bin/.idx)")

    def as_weight(word):
        try:
            return float(word)
        except ValueError:
            return None

    weights = [as_weight(w) for w in words[0::2]]
    if len(words) % 2 == 0 and all(w is not None for w in weights):
        prefixes = words[1::2]
        if any(w <= 0 for w in weights) or any(as_weight(p) is not None for p in prefixes):
            raise DataError(f"bad blend {' '.join(words)!r}; write positive weights and prefixes: 'w1 p1 w2 p2'")
    elif all(as_weight(w) is None for w in words):
        prefixes, weights = words, None
    else:
        raise DataError(f"bad blend {' '.join(words)!r}; write 'w1 p1 w2 p2' or only prefixes")
    prefixes = [p[:-4] if p.endswith((".bin", ".idx")) else p for p in prefixes]
    return [os.path.abspath(p) for p in prefixes], weights


def _split_ranges(split: str, num_documents: int) -> list[tuple[int, int] | None]:
    """The document range megatron gives each split (BlendedMegatronDatasetBuilder's rounding)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    try:
        with numpy.errstate(invalid="ignore", divide="ignore"):  # all-zero split -> NaN, below
            vector = parse_and_normalize_split(split)
        if not numpy.isfinite(vector).all():
            raise ValueError
    except (AssertionError, ValueError, ZeroDivisionError):
        raise DataError(f"bad split {split!r}; write three non-negative weights like '98,1,1'") from None
    return [None if m is None else (int(round(m[0] * num_documents)), int(round(m[1] * num_documents)))
            for m in convert_split_vector_to_split_matrix(vector)]


def _check_splits(info: IndexInfo, split: str, seq_length: int, sizes: Sequence[int | None]) -> None:
    for name, bounds, size in zip(SPLIT_NAMES, _split_ranges(split, info.num_documents), sizes):
        if size == 0:
            continue  # not built at all (see build_gpt_datasets)
        if bounds is None:
            raise DataError(f"split {split!r} gives the {name} split no data but {size} {name} "
                            f"samples were requested; give it a weight or request 0")
        tokens = int(info.sequence_lengths[bounds[0]:bounds[1]].sum())
        if tokens < seq_length + 1:
            raise DataError(
                f"{info.prefix}: the {name} split of {split!r} has {bounds[1] - bounds[0]} of "
                f"{info.num_documents} documents ({tokens} tokens), too few for one sample of "
                f"seq_length {seq_length} + 1; use more data, a shorter seq_length or another split"
            )


def default_index_cache(prefixes: Sequence[str]) -> str:
    """``index-cache/`` next to the first dataset if writable, else in the modse cache."""
    data_dir = os.path.dirname(prefixes[0])
    if os.access(data_dir, os.W_OK):
        return os.path.join(data_dir, "index-cache")
    return os.path.join(default_cache_dir(), "index-cache")


def build_gpt_datasets(
    data_prefix: str | Sequence[str],
    tokenizer: HFTokenizer,
    seq_length: int,
    split: str = "98,1,1",
    num_samples: Sequence[int | None] = (None, None, None),
    seed: int = 1234,
    cache_dir: str | None = None,
    *,
    eod_mask_loss: bool = True,
    create_attention_mask: bool = False,
    is_built_on_rank: Callable[[], bool] | None = None,
):
    """Build ``[train, valid, test]`` megatron ``GPTDataset``s (or a ``BlendedDataset`` per split).

    ``data_prefix`` is one indexed-dataset prefix or a blend (see :func:`parse_data_prefix`);
    ``split`` divides each dataset's *documents* into contiguous train/valid/test ranges.
    ``num_samples[i]`` is how many samples split ``i`` must give: the dataset returned has
    exactly that length (megatron repeats the data in reshuffled epochs as needed; extra samples
    of the last epoch are cut off). ``None`` means one pass over the split; ``0`` (or a zero
    split weight) gives ``None`` for that split.

    Each item is a dict of ``seq_length`` tensors: ``tokens`` (int64), ``labels`` (int64,
    ``tokens`` shifted left by one: each sample reads ``seq_length + 1`` tokens), ``loss_mask``
    (float32, 0 where ``tokens`` is the end-of-document token - with ``eod_mask_loss`` the model
    is not asked to guess the first token of an unrelated next document - and on padding),
    ``position_ids`` (int64, ``0..seq_length-1``: documents are packed, positions not reset),
    ``attention_mask`` (bool ``[1, S, S]``, True = masked) only with ``create_attention_mask``
    (megatron's attention builds the causal mask itself when it is absent), and ``dataset_id``
    for blends.

    Index caches: megatron saves each split's document/sample/shuffle indices as ``.npy`` files
    in ``cache_dir`` (default: ``index-cache/`` next to the data, or in the modse cache if that
    directory is read-only), named by a hash of the data, tokenizer file content, seq_length,
    split, seed and sample count, so later runs load them instantly.

    Several processes, what the caller must do:

    * ``torch.distributed`` **not** initialised (independent processes): nothing. The build is
      serialised by an ``fcntl`` lock in ``cache_dir``; the first process writes the caches,
      the others then load them.
    * ``torch.distributed`` initialised: **call this on every rank** (it is collective: megatron
      builds on global rank 0, barriers, then the other ranks load rank 0's cache files), with
      the **same arguments** (megatron names its cache files by a hash that includes the data
      path, so every rank must see the data under the same path), and a ``cache_dir`` that every
      rank can read (the same directory on one machine, or a shared file system across
      machines). Do not call it on rank 0 first and on the others afterwards: rank 0 would wait
      in megatron's barrier for ranks that are not in the call. ``is_built_on_rank`` (default:
      every rank) lets ranks that never read data (e.g. TP rank > 0) get ``None`` instead.
    """
    prefixes, weights = parse_data_prefix(data_prefix)
    if seq_length < 1:
        raise DataError(f"seq_length must be >= 1, got {seq_length}")
    sizes = list(num_samples)
    if len(sizes) != 3 or any(s is not None and (int(s) != s or s < 0) for s in sizes):
        raise DataError(f"num_samples must be three sample counts (or None), got {num_samples!r}")
    if weights is not None and None in sizes:
        raise DataError("a weighted blend needs explicit num_samples for every split (None is "
                        "only for single datasets or unweighted blends)")
    for prefix in prefixes:  # in a blend, every dataset contributes to every requested split
        _check_splits(check_indexed_dataset(prefix, tokenizer.vocab_size), split, seq_length, sizes)

    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    cache_dir = os.path.abspath(cache_dir or default_index_cache(prefixes))
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    for i, size in enumerate(sizes):
        if size == 0:  # not building it beats megatron's endless epoch loop on an empty request
            config.split_matrix[i] = None
    builder = SingleProcessSafeBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True), config)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    os.makedirs(cache_dir, exist_ok=True)
    with contextlib.nullcontext() if distributed else file_lock(os.path.join(cache_dir, ".build.lock")):
        datasets = builder.build()
    return [_exact_length(ds, size, name, prefixes)
            for ds, size, name in zip(datasets, sizes, SPLIT_NAMES)]


def _exact_length(dataset, size, name, prefixes):
    if dataset is None or size is None:
        return dataset
    if len(dataset) < size:  # only unweighted blends cap the count (one pass over each dataset)
        raise DataError(
            f"the unweighted blend {' '.join(prefixes)} has only {len(dataset)} {name} samples, "
            f"{size} requested; give weights ('w1 p1 w2 p2') so megatron repeats data, or request fewer"
        )
    return dataset if len(dataset) == size else torch.utils.data.Subset(dataset, range(size))
