"""Reading and writing megatron ``torch_dist`` checkpoints in ONE process, one tensor at a time.

A ``torch_dist`` checkpoint directory (megatron ``dist_checkpointing`` over torch DCP) is::

    .metadata        pickled DCP ``Metadata``: every key's global shape, dtype and chunks
                     (offsets/sizes in the global tensor), and where each chunk's bytes are
    __R_I.distcp     the chunks, each a ``torch.save``'d tensor at an (offset, length)
    common.pt        megatron's non-sharded state (our ``meta``, scheduler, optimizer groups)
    metadata.json    megatron's format tag ({"sharded_backend": "torch_dist", ...})
    modse_manifest.json   our SHA-256 manifest (:mod:`modse_megatron.checkpoint.manifest`)

:class:`CheckpointReader` reads chunks straight from their byte ranges (through the
allow-listed loaders of :mod:`.safe_load`) and assembles global tensors key by key, so memory
stays bounded by the largest tensor. :class:`CheckpointWriter` writes the same format with one
chunk per call (a per-layer slice of a stacked key is one chunk), which megatron then loads and
reshards under any layout like a checkpoint it wrote itself. No process group is needed.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from modse_megatron.checkpoint import manifest, safe_load
from modse_megatron.checkpoint.errors import CheckpointError

COMMON = "common.pt"
MEGATRON_METADATA = "metadata.json"
_FORMAT = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
           "common_backend_version": 1}


@dataclass(frozen=True)
class TensorInfo:
    """One global tensor of a checkpoint."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (offsets, sizes)

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)

    def covered(self) -> bool:
        """Whether the chunks tile the whole tensor (no gaps; overlap-free is DCP's invariant)."""
        return sum(_numel(sizes) for _, sizes in self.chunks) == _numel(self.shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class CheckpointReader:
    """A ``torch_dist`` checkpoint directory opened for reading (nothing unpickled unsafely)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fmt = self.path / MEGATRON_METADATA
        if not fmt.is_file():
            raise CheckpointError(f"{self.path} is not a megatron dist_checkpointing checkpoint (no {MEGATRON_METADATA}): "
                                  f"point at an iter_N directory or a --save root")
        try:
            backend = json.loads(fmt.read_text()).get("sharded_backend")
        except ValueError:
            raise CheckpointError(f"{fmt} is damaged: restore the checkpoint from a good copy") from None
        if backend != "torch_dist":
            raise CheckpointError(f"{self.path} uses megatron's {backend!r} format; only 'torch_dist' (megatron's default) "
                                  f"is supported: re-save it with --ckpt-format torch_dist")
        self.metadata = safe_load.read_metadata(self.path)
        self._storage = self.metadata.storage_data or {}
        self._common: dict | None = None

    # ------------------------------------------------------------------ what is in it
    @property
    def common(self) -> dict:
        if self._common is None:
            self._common = safe_load.load_common(self.path)
        return self._common

    @property
    def meta(self) -> dict:
        return self.common.get("meta", {}) or {}

    def tensors(self) -> dict[str, TensorInfo]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        out = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                chunks = tuple((tuple(int(o) for o in c.offsets), tuple(int(s) for s in c.sizes)) for c in md.chunks)
                out[key] = TensorInfo(key, tuple(int(s) for s in md.size), md.properties.dtype, chunks)
        return out

    def object_keys(self) -> list[str]:
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        return [k for k, md in self.metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)]

    # ------------------------------------------------------------------ reading
    def _items(self, key: str) -> Iterator[tuple[Any, Any]]:
        for index, info in self._storage.items():
            if index.fqn == key:
                yield index, info

    def _read_bytes(self, info) -> bytes:
        path = self.path / info.relative_path
        if info.transform_descriptors:
            raise CheckpointError(f"{path} uses storage transforms {list(info.transform_descriptors)} this tool does not "
                                  f"read: re-save the checkpoint without them")
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (restore it)") from None
        if len(data) != info.length:
            raise CheckpointError(f"{path} is truncated (item at byte {info.offset} needs {info.length} bytes): "
                                  f"restore the checkpoint from a good copy")
        return data

    def decode(self, data: bytes, key: str) -> torch.Tensor:
        """A stored chunk's bytes (from :meth:`raw_items`) as a tensor, allow-listed."""
        chunk = safe_load.safe_torch_load(io.BytesIO(data), f"{key} ({self.path})")
        if not isinstance(chunk, torch.Tensor):
            raise CheckpointError(f"a chunk of {key} in {self.path} is not a tensor: the checkpoint is damaged")
        return chunk

    def _load_item(self, info, key: str) -> Any:
        """One stored item decoded straight from its byte range (no copy of its bytes in
        memory: torch reads the zip through a file view, as DCP's own reader does)."""
        from torch.distributed.checkpoint.utils import _create_file_view

        path = self.path / info.relative_path
        if info.transform_descriptors:
            raise CheckpointError(f"{path} uses storage transforms {list(info.transform_descriptors)} this tool does not "
                                  f"read: re-save the checkpoint without them")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (restore it)")
        if path.stat().st_size < info.offset + info.length:
            raise CheckpointError(f"{path} is truncated (item at byte {info.offset} needs {info.length} bytes): "
                                  f"restore the checkpoint from a good copy")
        where = f"{key} ({path})"
        with open(path, "rb") as f:
            try:
                return safe_load.safe_torch_load(_create_file_view(f, info.offset, info.length), where)
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"item {where} is damaged ({type(err).__name__}): restore the checkpoint") from None

    def read_chunks(self, key: str) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
        """(global offsets, tensor) of every stored chunk of ``key``."""
        for index, info in self._items(key):
            chunk = self._load_item(info, key)
            if not isinstance(chunk, torch.Tensor):
                raise CheckpointError(f"chunk of {key} ({self.path / info.relative_path}) is not a tensor: the checkpoint "
                                      f"is damaged")
            yield tuple(int(o) for o in (index.offset or ())), chunk

    def read(self, key: str, info: TensorInfo | None = None) -> torch.Tensor:
        """The whole global tensor ``key`` (memory: the tensor plus one chunk)."""
        info = info or self.tensors()[key]
        if len(info.chunks) == 1 and info.chunks[0][1] == info.shape:
            (_, chunk), = self.read_chunks(key)
            return chunk
        full = torch.empty(info.shape, dtype=info.dtype)
        for offsets, chunk in self.read_chunks(key):
            region = tuple(slice(o, o + n) for o, n in zip(offsets, chunk.shape))
            full[region].copy_(chunk)
        return full

    def read_object(self, key: str) -> Any:
        (index, info), = self._items(key)
        return self._load_item(info, key)

    def raw_items(self) -> Iterator[tuple[Any, Any, bytes]]:
        """(MetadataIndex, storage info, stored bytes) of every item, file by file in offset
        order (sequential reads), for copying a checkpoint without decoding it."""
        order = sorted(self._storage.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset))
        for index, info in order:
            yield index, info, self._read_bytes(info)


class _HashingFile:
    """A write-only file that hashes what goes through it (the manifest's SHA-256 without
    reading the file back). Large writes hash on a second thread while the bytes go to the
    file (both release the GIL), so hashing costs almost no time where a core is free."""

    _PARALLEL_BYTES = 1 << 20

    def __init__(self, path: Path):
        import hashlib

        self._f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0
        self._hasher = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.size += view.nbytes
        if view.nbytes < self._PARALLEL_BYTES:
            self.sha.update(view)
            return self._f.write(view)
        if self._hasher is None:
            from concurrent.futures import ThreadPoolExecutor

            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="modse-sha256")
        hashed = self._hasher.submit(self.sha.update, view)  # in order: one write at a time
        try:
            written = self._f.write(view)
        finally:
            hashed.result()  # the caller may reuse its buffer once write() returns
        return written

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None

    @property
    def closed(self) -> bool:
        return self._f.closed


@contextlib.contextmanager
def _fast_torch_save():
    """torch.save without its zip CRC32 (twice as fast here; the SHA-256 manifest covers the
    bytes), restored afterwards."""
    from torch.utils.serialization import config

    previous = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = previous


class CheckpointWriter:
    """Writes a ``torch_dist`` checkpoint chunk by chunk into ``path`` (created; must not exist).

    Call :meth:`add_chunk` / :meth:`add_raw` per item, then :meth:`finish` with the common state.
    """

    def __init__(self, path: str | os.PathLike, file_name: str = "__0_0.distcp"):
        from torch.distributed.checkpoint.metadata import Metadata

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=False)
        self.file_name = file_name
        self._stream = _HashingFile(self.path / file_name)
        self.metadata = Metadata(state_dict_metadata={}, storage_data={})
        self._index_counts: dict[str, int] = {}

    def _tensor_md(self, key: str, shape, dtype):
        from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

        md = self.metadata.state_dict_metadata.get(key)
        if md is None:
            md = self.metadata.state_dict_metadata[key] = TensorStorageMetadata(
                TensorProperties(dtype=dtype), torch.Size(shape), [])
        elif tuple(md.size) != tuple(shape) or md.properties.dtype != dtype:
            raise ValueError(f"{key}: chunks disagree on the global shape/dtype")
        return md

    def add_chunk(self, key: str, chunk: torch.Tensor, offsets: tuple[int, ...], global_shape: tuple[int, ...]) -> None:
        """Store ``chunk`` at ``offsets`` of the global tensor ``key`` of ``global_shape``."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

        chunk = chunk.detach().to("cpu")
        if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size() or not chunk.is_contiguous():
            chunk = chunk.contiguous().clone()  # torch.save writes whole storages: never a view's
        md = self._tensor_md(key, global_shape, chunk.dtype)
        md.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(chunk.shape)))
        start = self._stream.tell()
        with _fast_torch_save():
            torch.save(chunk, self._stream)
        index = MetadataIndex(key, torch.Size(offsets), self._index_counts.get(key, 0))
        self._index_counts[key] = index.index + 1
        self.metadata.storage_data[index] = _StorageInfo(self.file_name, start, self._stream.tell() - start)

    def add_raw(self, index, storage_md, data: bytes, chunk_md=None) -> None:
        """Copy one stored item as it is (bytes of a chunk or object), under ``index.fqn``."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

        key = index.fqn
        if isinstance(storage_md, BytesStorageMetadata):
            self.metadata.state_dict_metadata[key] = BytesStorageMetadata()
        else:
            md = self._tensor_md(key, storage_md.size, storage_md.properties.dtype)
            md.chunks.append(chunk_md)
        start = self._stream.tell()
        self._stream.write(data)
        new_index = MetadataIndex(key, index.offset, self._index_counts.get(key, 0))
        self._index_counts[key] = new_index.index + 1
        self.metadata.storage_data[new_index] = _StorageInfo(self.file_name, start, len(data))

    def finish(self, common: dict) -> None:
        """Write the index, common state, format tag and manifest (fsynced)."""
        from torch.distributed.checkpoint.metadata import StorageMeta

        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        self.metadata.storage_meta = StorageMeta()
        with open(self.path / ".metadata", "wb") as f:
            pickle.dump(self.metadata, f)
        torch.save(common, self.path / COMMON)
        (self.path / MEGATRON_METADATA).write_text(json.dumps(_FORMAT))
        digests = {name: manifest.file_digest(self.path / name) for name in manifest.checkpoint_files(self.path)
                   if name != self.file_name}
        digests[self.file_name] = {"size": self._stream.size, "sha256": self._stream.sha.hexdigest()}  # hashed while written
        manifest.write_manifest(self.path, digests)

    def abort(self) -> None:
        if not self._stream.closed:
            self._stream.close()


def chunk_metadata_of(reader: CheckpointReader, index) -> Any:
    """The ChunkStorageMetadata a stored tensor item (by its MetadataIndex) belongs to."""
    md = reader.metadata.state_dict_metadata[index.fqn]
    for chunk in md.chunks:
        if tuple(chunk.offsets) == tuple(index.offset):
            return chunk
    raise CheckpointError(f"{reader.path}/.metadata has no chunk of {index.fqn} at {tuple(index.offset)}: the index is damaged")
