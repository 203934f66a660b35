"""Load checkpoint bytes without ever running code from them.

A megatron ``dist_checkpointing`` checkpoint (torch DCP ``torch_dist`` format) holds pickles in
three places, and megatron-core 0.16.1 / torch 2.13 unpickle two of them with no restriction:

* ``.metadata`` — DCP's index, read with plain ``pickle.load``
  (torch/distributed/checkpoint/filesystem.py ``FileSystemReader.read_metadata``);
* non-tensor items (RNG states, TE ``_extra_state``) — ``torch.load(..., weights_only=False)``
  (torch/distributed/checkpoint/default_planner.py ``DefaultLoadPlanner.load_bytes``);
* ``common.pt`` — ``torch.load`` with torch's default (``weights_only=True`` unless the
  environment overrides it).

A crafted checkpoint (an object with a ``__reduce__``) therefore runs code on ``--load``.
Here every one of them goes through an allow-list: ``.metadata`` through
:class:`RestrictedUnpickler` (DCP's own metadata classes, torch sizes/dtypes and nothing else),
the torch-serialized items and ``common.pt`` through ``torch.load(weights_only=True)`` with the
few extra globals our checkpoints contain (numpy's RNG state). Anything else raises
:class:`UnsafeCheckpointError` naming the offending global and the file; nothing is executed.

:func:`load` is ``dist_checkpointing.load`` with these strategies; :func:`load_common` replaces
``dist_checkpointing.load_common_state_dict``. Everything that reads a checkpoint in this package
(``--load``, ``--finetune``, ``modse-convert``) uses them.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch

from modse_megatron.checkpoint.errors import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds an object outside the allow-list; it was not loaded."""


# ------------------------------------------------------------------------------------ allow-lists
_DCP_METADATA = ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
_DCP_PLANNER = ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
                "LoadItemType")


def _metadata_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for everything DCP writes into ``.metadata``."""
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    import torch.distributed.checkpoint.planner as planner

    allowed: dict[tuple[str, str], Any] = {}
    for module, names in ((md, _DCP_METADATA), (planner, _DCP_PLANNER)):
        for name in names:
            if hasattr(module, name):
                allowed[(module.__name__, name)] = getattr(module, name)
    allowed[(fs.__name__, "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for name in dir(torch):  # dtypes are pickled as the global torch.<name>
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    try:  # placeholder classes megatron pickles into metadata of older checkpoints
        from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

        for name in ("MCoreMetadata", "MCoreSavePlan"):
            if hasattr(mcore_torch, name):
                allowed[(mcore_torch.__name__, name)] = getattr(mcore_torch, name)
    except ImportError:  # pragma: no cover - megatron is a dependency
        pass
    return allowed


def _torch_load_extra_globals() -> list[Any]:
    """Globals beyond torch's ``weights_only`` set that our checkpoints hold: numpy's RNG state
    (``np.random.get_state()`` is a tuple with a uint32 ndarray)."""
    import numpy as np

    extra: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            extra.append(__import__(module, fromlist=["_reconstruct"])._reconstruct)
        except (ImportError, AttributeError):
            continue
    for name in ("UInt32DType", "UInt8DType", "Int64DType", "Float64DType", "Float32DType"):
        dtype_class = getattr(getattr(np, "dtypes", None), name, None)
        if dtype_class is not None:
            extra.append(dtype_class)
    return extra


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals (the Python docs'
    "restricting globals" recipe). ``where`` names the file in the error."""

    def __init__(self, file, where: str, allowed: dict[tuple[str, str], Any]):
        super().__init__(file)
        self.where, self.allowed = where, allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(_refusal(self.where, f"{module}.{name}")) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(_refusal(self.where, f"persistent id {str(pid)[:40]!r}"))


def _refusal(where: str, what: str) -> str:
    return (f"refusing to load {where}: it holds {what}, which is not a type modse-megatron checkpoints "
            f"contain (unpickling it could run code); do not use this checkpoint unless you trust and "
            f"re-create it")


_UNSUPPORTED = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")  # torch names the refused global so


def safe_torch_load(source: Any, where: str) -> Any:
    """``torch.load(weights_only=True)`` with our few extra globals; a refused global becomes
    one :class:`UnsafeCheckpointError` line naming it."""
    try:
        with torch.serialization.safe_globals(_torch_load_extra_globals()):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        match = _UNSUPPORTED.search(text)
        what = match.group(1) if match else "an object torch's safe loader refuses"
        raise UnsafeCheckpointError(_refusal(where, what)) from None


def read_metadata_file(path: str | os.PathLike) -> Any:
    """DCP's ``.metadata`` through :class:`RestrictedUnpickler`."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, str(path), _metadata_globals()).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # truncated or garbage bytes
            raise CheckpointError(f"{path} is damaged ({type(err).__name__}: {str(err)[:120]}): "
                                  f"restore the checkpoint from a good copy") from None


# ------------------------------------------------------------------------- DCP reader and planner
def _safe_reader_class():
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(CachedMetadataFileSystemReader):
        """megatron's caching DCP reader whose ``.metadata`` is unpickled with the allow-list
        (same post-processing as ``FileSystemReader.read_metadata``)."""

        def read_metadata(self, *args, **kwargs):
            if self._cached_metadata is None:
                metadata = read_metadata_file(Path(self.path) / ".metadata")
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                self._cached_metadata = metadata
            return self._cached_metadata

    return SafeFileSystemReader


def _safe_planner_class():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(MCoreLoadPlanner):
        """megatron's load planner whose non-tensor items go through :func:`safe_torch_load`
        (``DefaultLoadPlanner.load_bytes`` uses ``weights_only=False``)."""

        def __init__(self, *args, checkpoint_dir: str = "", **kwargs):
            super().__init__(*args, **kwargs)
            self.checkpoint_dir = checkpoint_dir

        def _where(self, read_item) -> str:
            info = self.metadata.storage_data.get(read_item.storage_index) if self.metadata else None
            file = getattr(info, "relative_path", "?")
            return f"{read_item.dest_index.fqn} ({os.path.join(self.checkpoint_dir, file)})"

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = safe_torch_load(value, self._where(read_item))
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner


def sharded_strategy():
    """megatron's ``TorchDistLoadShardedStrategy`` reading through the safe reader/planner."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed import checkpoint as dcp

    reader_class, planner_class = _safe_reader_class(), _safe_planner_class()

    class SafeTorchDistLoadShardedStrategy(mcore_torch.TorchDistLoadShardedStrategy):
        """``TorchDistLoadShardedStrategy.load`` (megatron-core 0.16.1,
        dist_checkpointing/strategies/torch.py:770-821) step for step, with the reader and the
        planner swapped for the allow-listed ones; metadata queries use the safe reader too."""

        def load(self, sharded_state_dict, checkpoint_dir):
            tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
            flexible = [t for t in tensors if not t.allow_shape_mismatch]
            mismatch_ok = {t.key: t for t in tensors if t.allow_shape_mismatch}
            original = sharded_state_dict
            sharded_state_dict, flat_mapping, rename_mapping = mcore_torch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict)
            pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, True)
            reader = reader_class(checkpoint_dir)
            reader.read_metadata()  # refuse a bad .metadata here, before DCP logs tracebacks around it
            dcp.load(
                pyt_state_dict, storage_reader=reader,
                planner=planner_class(shapes_validation_sharded_tensors=flexible,
                                      allow_shape_mismatch_sharded_tensors=mismatch_ok,
                                      checkpoint_dir=str(checkpoint_dir)),
            )
            self.cached_global_metadata = reader.read_metadata()
            state = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
            state = mcore_torch._replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
            mcore_torch._restore_dict_types(state, original)
            return state

        def load_tensors_metadata(self, checkpoint_dir, metadata=None):
            if metadata is None:
                metadata = reader_class(checkpoint_dir).read_metadata()
            return super().load_tensors_metadata(checkpoint_dir, metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            from megatron.core.dist_checkpointing.mapping import ShardedObject
            from torch.distributed.checkpoint.metadata import BytesStorageMetadata

            metadata = reader_class(checkpoint_dir).read_metadata()
            out = {}
            for key, storage in metadata.state_dict_metadata.items():
                if isinstance(storage, BytesStorageMetadata):
                    obj = ShardedObject.empty_from_unique_key(key)
                    out[obj.unique_key] = obj
            out.update(self.load_tensors_metadata(checkpoint_dir, metadata))
            return out

    return SafeTorchDistLoadShardedStrategy()


def common_strategy(transform: Callable[[dict], dict] | None = None):
    """megatron's ``TorchCommonLoadStrategy`` with ``common.pt`` (and separately stored
    objects of other formats) read by :func:`safe_torch_load`; ``transform`` rewrites the
    common state before megatron merges it (e.g. optimizer state for another layout)."""
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy

    class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            path = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path} is missing: this is not a complete checkpoint (restore it or "
                                      f"point at another one)")
            common = _load_file(path)
            return transform(common) if transform is not None else common

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
            from megatron.core.dist_checkpointing.mapping import ShardedObject

            def load_one(obj):
                if not isinstance(obj, ShardedObject):
                    return obj
                path = os.path.join(checkpoint_dir, f"{obj.unique_key}.pt")
                if not os.path.isfile(path):
                    raise CheckpointError(f"object shard {path} is missing: restore the checkpoint")
                return _load_file(path)

            return dict_list_map_inplace(load_one, sharded_objects_state_dict)

    return SafeCommonLoadStrategy()


def _load_file(path: str) -> Any:
    try:
        return safe_torch_load(path, path)
    except CheckpointError:
        raise
    except Exception as err:  # truncated zip, garbage bytes
        raise CheckpointError(f"{path} is damaged ({type(err).__name__}: {str(err)[:120]}): "
                              f"restore the checkpoint from a good copy") from None


def load(sharded_state_dict: Any, checkpoint_dir: str | os.PathLike,
         common_transform: Callable[[dict], dict] | None = None, **kwargs: Any) -> Any:
    """``megatron.core.dist_checkpointing.load`` through the allow-listed strategies."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir), sharded_strategy=sharded_strategy(),
                                       common_strategy=common_strategy(common_transform), **kwargs)
    except CheckpointException as err:  # a BaseException: DCP gathers every rank's failure into one
        raise _first_failure(err, checkpoint_dir) from None


def _first_failure(err: BaseException, checkpoint_dir: Any) -> CheckpointError:
    """One CheckpointError line from DCP's gathered ``{rank: (exception, trace)}``: ours as it
    is, anything else (a damaged file) with its first line."""
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(err, "failures", {}).values()]
    for inner in failures:
        if isinstance(inner, CheckpointError):
            return type(inner)(str(inner))
    inner = failures[0] if failures else err
    first = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    return CheckpointError(f"cannot read {checkpoint_dir}: {type(inner).__name__}: {first[:200]}")


def load_common(checkpoint_dir: str | os.PathLike) -> Any:
    """The checkpoint's common (non-sharded) state dict, allow-listed."""
    return common_strategy().load_common(str(checkpoint_dir))


def read_metadata(checkpoint_dir: str | os.PathLike) -> Any:
    """DCP metadata (global tensor shapes, chunks, storage) of a checkpoint, allow-listed."""
    path = Path(checkpoint_dir) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {checkpoint_dir} is not a complete torch_dist checkpoint")
    return read_metadata_file(path)
