"""``modse-preprocess``: jsonl/text files -> megatron indexed dataset (``OUT.bin``/``OUT.idx``).

Input formats (chosen by file name):

* ``*.jsonl`` / ``*.json``: one JSON object per line; the document is ``obj[--json-key]``
  (default ``text``). Blank lines are skipped; any other unreadable line is an error naming
  the file and line number (silently dropping data would skew the corpus).
* anything else (``*.txt``, ``*.md``, ``*.py`` ...): UTF-8 text. With ``--txt-document
  paragraph`` (default) documents are separated by one or more blank lines, the convention of
  BERT/Megatron text corpora (one document per paragraph/article); with ``--txt-document
  file`` each file is one document (right for source code, where blank lines are everywhere).

Each document is tokenized on its own (``encode_batch`` over batches of documents, in parallel)
and becomes one sequence of the indexed dataset, followed by the tokenizer's end-of-document
token with ``--append-eod`` (what GPT pretraining wants: megatron's ``GPTDataset`` concatenates
documents, and the EOD marks the boundary). Token ids are stored with the dtype megatron picks
for the vocabulary size (``uint16`` below 65500 ids, else ``int32``).

Nothing on disk is overwritten unless ``--overwrite``: outputs are written under temporary
names and renamed into place only after the whole input was read without error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from . import DataError

TEXT_MODES = ("paragraph", "file")
JSON_SUFFIXES = (".jsonl", ".json")
_BATCH_DOCS = 512
_BATCH_CHARS = 2 << 20  # encode ~2 MB of text per call: enough to keep every core busy
_PROGRESS_MIN_BYTES = 16 << 20


@dataclass
class PreprocessStats:
    """What one preprocessing run produced (the CLI prints it as one line)."""

    documents: int
    tokens: int
    seconds: float
    skipped_empty: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self, output_prefix: str) -> str:
        return (
            f"wrote {output_prefix}.bin/.idx: {self.documents} documents, {self.tokens} tokens "
            f"in {self.seconds:.2f} s ({self.tokens_per_second:,.0f} tokens/s)"
            + (f", skipped {self.skipped_empty} empty documents" if self.skipped_empty else "")
        )


# --- reading documents ----------------------------------------------------------------------
def read_documents(path: str, json_key: str = "text", txt_document: str = "paragraph",
                   progress=None) -> Iterator[str]:
    """Yield the documents of one input file (format by suffix, see the module docstring).

    Reads line by line (inputs may be far larger than memory); ``progress`` (a tqdm) advances
    by the bytes read.
    """
    if not os.path.isfile(path):
        raise DataError(f"input file {path} does not exist; check the --input paths")
    lines = _numbered_lines(path, progress)
    if path.endswith(JSON_SUFFIXES):
        yield from _read_jsonl(path, lines, json_key)
    else:
        yield from _read_text(path, lines, txt_document)


def _numbered_lines(path: str, progress) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if progress is not None:
                progress.update(len(raw))
            yield lineno, raw


def _read_jsonl(path: str, lines, key: str) -> Iterator[str]:
    for lineno, raw in lines:
        if not raw.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError:
            raise DataError(f"{where} is not UTF-8; re-encode the file as UTF-8") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); "
                            f"fix or remove that line") from None
        if not isinstance(obj, dict) or key not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(
                f"{where} has no key {key!r} (it has: {keys}); pass --json-key with the "
                f"key that holds the text"
            )
        text = obj[key]
        if not isinstance(text, str):
            raise DataError(
                f"{where}: {key!r} is a {type(text).__name__}, not a string; pass "
                f"--json-key with the key that holds the text"
            )
        yield text


def _read_text(path: str, lines, mode: str) -> Iterator[str]:
    if mode not in TEXT_MODES:
        raise DataError(f"unknown --txt-document {mode!r}; use one of {', '.join(TEXT_MODES)}")
    document: list[str] = []
    for lineno, raw in lines:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} line {lineno} is not UTF-8; re-encode the file as UTF-8") from None
        if mode == "file" or line.strip():
            document.append(line)
        elif document:  # a blank line ends a paragraph
            yield "".join(document)
            document = []
    if document:
        yield "".join(document)


def iter_documents(paths: Sequence[str], json_key: str = "text",
                   txt_document: str = "paragraph", progress=None) -> Iterator[str]:
    """Documents of all ``paths`` in order."""
    for path in paths:
        yield from read_documents(path, json_key, txt_document, progress)


# --- writing the indexed dataset ------------------------------------------------------------
def token_dtype(vocab_size: int):
    """The numpy dtype megatron's ``DType.optimal_dtype`` picks for ids below ``vocab_size``."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def write_indexed_dataset(documents: Iterable[str], tokenizer, bin_path: str, idx_path: str,
                          append_eod: bool = False) -> PreprocessStats:
    """Tokenize ``documents`` in batches and write them with megatron's IndexedDatasetBuilder.

    Writes exactly ``bin_path``/``idx_path`` (callers pass temporary names and rename them;
    see :func:`atomic_outputs`). Documents that tokenize to nothing are skipped: a zero-length
    sequence carries no training signal.
    """
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(bin_path, dtype=dtype)
    stats = PreprocessStats(documents=0, tokens=0, seconds=0.0)

    def flush(batch: list[str]) -> None:
        for ids in tokenizer.tokenize_batch(batch):
            if append_eod:
                ids.append(tokenizer.eod)
            if not ids:
                stats.skipped_empty += 1
                continue
            builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
            stats.documents += 1
            stats.tokens += len(ids)

    try:
        batch, chars = [], 0
        for doc in documents:
            batch.append(doc)
            chars += len(doc)
            if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
    finally:
        builder.data_file.close()  # also on error: the caller deletes the temporary file
    if stats.documents == 0:
        raise DataError("the input has no non-empty documents; check --input (and --json-key)")
    builder.finalize(idx_path)
    stats.seconds = time.perf_counter() - start
    return stats


@contextlib.contextmanager
def atomic_outputs(final_paths: Sequence[str], overwrite: bool = False):
    """Yield temporary paths; on success rename each onto its final path, on error delete them.

    Refuses (before any work) to replace an existing output unless ``overwrite``, so a typo'd
    ``--output-prefix`` cannot destroy a previous run's data.
    """
    if not overwrite:
        for path in final_paths:
            if os.path.exists(path):
                raise DataError(
                    f"{path} already exists; pass --overwrite to replace it or choose another --output-prefix"
                )
    for path in final_paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_paths = [f"{p}.tmp-{os.getpid()}" for p in final_paths]
    try:
        yield tmp_paths
        for tmp, final in zip(tmp_paths, final_paths):
            os.replace(tmp, final)
    finally:
        for tmp in tmp_paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def preprocess(inputs: Sequence[str], output_prefix: str, *, tokenizer_path: str | None = None,
               train_tokenizer: bool = False, vocab_size: int = 8192, json_key: str = "text",
               txt_document: str = "paragraph", append_eod: bool = False,
               overwrite: bool = False, progress: bool = True) -> PreprocessStats:
    """Library form of ``modse-preprocess`` (see the module docstring); returns the stats.

    With ``train_tokenizer`` a byte-level BPE of ``vocab_size`` is trained on the inputs first
    (one extra pass) and saved as ``OUTPUT_PREFIX.tokenizer.json``.
    """
    from .tokenizer import load_tokenizer, train_bpe_tokenizer

    if train_tokenizer == (tokenizer_path is not None):
        raise DataError("give exactly one of --tokenizer PATH or --train-tokenizer")
    if not inputs:
        raise DataError("no input files; pass --input FILE[,FILE...]")
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input file {path} does not exist; check the --input paths")
    if txt_document not in TEXT_MODES:
        raise DataError(f"unknown --txt-document {txt_document!r}; use one of {', '.join(TEXT_MODES)}")
    tokenizer = None if train_tokenizer else load_tokenizer(tokenizer_path)

    outputs = [output_prefix + ".bin", output_prefix + ".idx"]
    if train_tokenizer:
        outputs.append(output_prefix + ".tokenizer.json")
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    start = time.perf_counter()
    with atomic_outputs(outputs, overwrite) as tmp:
        if train_tokenizer:
            bpe = train_bpe_tokenizer(iter_documents(inputs, json_key, txt_document), vocab_size)
            bpe.save(tmp[2])
            tokenizer = load_tokenizer(tmp[2])
        with _progress(total_bytes, enabled=progress) as bar:
            docs = iter_documents(inputs, json_key, txt_document, progress=bar)
            stats = write_indexed_dataset(docs, tokenizer, tmp[0], tmp[1], append_eod)
    stats.seconds = time.perf_counter() - start
    return stats


@contextlib.contextmanager
def _progress(total_bytes: int, enabled: bool):
    if not enabled or total_bytes < _PROGRESS_MIN_BYTES:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr) as bar:
        yield bar


# --- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modse-preprocess",
        description="Tokenize jsonl/text files into a megatron indexed dataset (OUT.bin/OUT.idx).",
    )
    p.add_argument("--input", required=True,
                   help="comma-separated input files: *.jsonl/*.json (one JSON object per line) or text")
    p.add_argument("--output-prefix", required=True, help="writes OUT.bin and OUT.idx")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="a Hugging Face tokenizer.json")
    tok.add_argument("--train-tokenizer", action="store_true",
                     help="train a byte-level BPE on the inputs, saved as OUT.tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=8192, help="with --train-tokenizer (default 8192)")
    p.add_argument("--json-key", default="text", help="jsonl key holding the text (default: text)")
    p.add_argument("--txt-document", choices=TEXT_MODES, default="paragraph",
                   help="text files: a document per blank-line-separated paragraph (default) or per file")
    p.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document token to every document (wanted for GPT pretraining)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; bad input prints one ``error: ...`` line and exits with status 2."""
    args = build_parser().parse_args(argv)
    if args.workers is not None:
        if args.workers < 1:
            print("error: --workers must be >= 1", file=sys.stderr)
            return 2
        # The tokenizers library sizes its Rust thread pool from this on first use.
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    import modse_megatron  # noqa: F401  (megatron-core on CPU)

    inputs = [p for p in args.input.split(",") if p]
    try:
        stats = preprocess(
            inputs, args.output_prefix, tokenizer_path=args.tokenizer,
            train_tokenizer=args.train_tokenizer, vocab_size=args.vocab_size,
            json_key=args.json_key, txt_document=args.txt_document, append_eod=args.append_eod,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(stats.summary(args.output_prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
