"""``modse-convert verify``: a checkpoint's own completeness and integrity, or two models
(checkpoints or exports, any layouts) holding exactly the same tensors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from modse_megatron.checkpoint import manifest
from modse_megatron.checkpoint.dcp_io import CheckpointReader
from modse_megatron.checkpoint.describe import is_model_key, resolve
from modse_megatron.checkpoint.errors import CheckpointError
from modse_megatron.checkpoint.export import CONFIG, split_names
from modse_megatron.checkpoint.names import checkpoint_key


def verify_complete(path: str | os.PathLike) -> dict:
    """Manifest, chunk coverage, every chunk and object decodable, and every tensor the
    architecture needs present; raises a one-line CheckpointError at the first problem."""
    ckpt = resolve(path)
    expected = manifest.read_manifest(ckpt)
    reader = CheckpointReader(ckpt)
    if expected is None:
        if reader.meta.get("integrity") == manifest.INTEGRITY:
            raise manifest.IntegrityError(f"{ckpt / manifest.MANIFEST} is missing but this checkpoint was saved with one "
                                          f"(deleted or damaged): restore the checkpoint from a good copy")
    else:
        problem = manifest.check_files(ckpt, expected, sorted(expected))
        if problem:
            raise manifest.IntegrityError(f"{problem}: restore the checkpoint from a good copy")
    total = 0
    infos = reader.tensors()
    for key, info in infos.items():
        if not info.covered():
            stored = sum(torch.Size(s).numel() for _, s in info.chunks)
            raise CheckpointError(f"{key} is incomplete: its chunks hold {stored} of {torch.Size(info.shape).numel()} "
                                  f"elements (a rank's part is missing): restore the checkpoint")
        sizes = {tuple(s) for _, s in info.chunks}
        for _, chunk in reader.read_chunks(key):
            if tuple(chunk.shape) not in sizes or chunk.dtype != info.dtype:
                raise CheckpointError(f"a chunk of {key} has shape {list(chunk.shape)} / {chunk.dtype}, not what the index "
                                      f"says: the checkpoint is damaged")
            total += chunk.numel() * chunk.element_size()
    for key in reader.object_keys():
        reader.read_object(key)
    _check_architecture(reader)
    return {"path": str(ckpt), "tensors": len(infos), "bytes": total, "manifest": expected is not None}


def _check_architecture(reader: CheckpointReader) -> None:
    """Every tensor the recorded model needs is there (e.g. no logical expert is missing)."""
    if not isinstance(reader.meta.get("args"), dict):
        return
    from modse_megatron.checkpoint.export import export_config
    from modse_megatron.inference.config import ExportConfig
    from modse_megatron.inference.model import ReferenceGPT

    config = ExportConfig.from_dict(export_config(reader, torch.float32, None, None))
    needed = {n: tuple(t.shape) for n, t in ReferenceGPT(config, device="meta").export_tensors().items()}
    have = dict(CheckpointSource(reader.path).entries())
    for name, shape in needed.items():
        if name not in have:
            raise CheckpointError(f"{reader.path} lacks {name} {list(shape)}, which its model needs: the checkpoint is "
                                  f"incomplete (restore it)")
        if have[name][0] != shape:
            raise CheckpointError(f"{reader.path}: {name} has shape {list(have[name][0])}, its model needs {list(shape)}")


# ------------------------------------------------------------------------------ tensor sources
class CheckpointSource:
    """Export-named model tensors of a checkpoint (any layout), read one global tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self.reader = CheckpointReader(resolve(path))
        self.infos = {k: i for k, i in self.reader.tensors().items() if is_model_key(k)}
        self._names = {name: (key, index) for key, info in self.infos.items() for name, index in split_names(key, info)}
        self._cached: tuple[str, torch.Tensor] | None = None

    def entries(self) -> Iterator[tuple[str, tuple[tuple[int, ...], torch.dtype]]]:
        for name, (key, index) in self._names.items():
            shape = self.infos[key].shape
            yield name, (tuple(shape[len(index):]), self.infos[key].dtype)

    def get(self, name: str) -> torch.Tensor:
        key, index = self._names[name]
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self.reader.read(key, self.infos[key]))
        full = self._cached[1]
        return full[index] if index else full


class ExportSource:
    """Tensors of an export directory (safetensors), read one at a time."""

    def __init__(self, path: str | os.PathLike):
        from modse_megatron.checkpoint.export import read_export

        self.path = Path(path)
        _, self.where = read_export(self.path)
        self._handles: dict[str, object] = {}

    def entries(self) -> Iterator[tuple[str, tuple[tuple[int, ...], torch.dtype]]]:
        from safetensors import safe_open

        for name, (file, shape) in self.where.items():
            with safe_open(str(self.path / file), framework="pt") as f:
                dtype = f.get_slice(name).get_dtype()
            yield name, (shape, _SAFETENSORS_DTYPES.get(dtype, dtype))

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file, _ = self.where[name]
        with safe_open(str(self.path / file), framework="pt") as f:
            return f.get_tensor(name)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def open_source(path: str | os.PathLike):
    return ExportSource(path) if (Path(path) / CONFIG).is_file() else CheckpointSource(path)


def _order(name: str) -> tuple:
    key, layer = checkpoint_key(name)
    return key, -1 if layer is None else layer


def compare(a: str | os.PathLike, b: str | os.PathLike) -> tuple[list[str], int]:
    """(differences as lines, tensors compared) between two models' tensors: names (logical
    experts), dtypes, shapes and values (``torch.equal``)."""
    sa, sb = open_source(a), open_source(b)
    ea, eb = dict(sa.entries()), dict(sb.entries())
    differences = [f"{n}: only in {a}" for n in sorted(set(ea) - set(eb), key=_order)]
    differences += [f"{n}: only in {b}" for n in sorted(set(eb) - set(ea), key=_order)]
    checked = 0
    for name in sorted(set(ea) & set(eb), key=_order):
        (shape_a, dtype_a), (shape_b, dtype_b) = ea[name], eb[name]
        if shape_a != shape_b:
            differences.append(f"{name}: shape {list(shape_a)} vs {list(shape_b)}")
            continue
        if dtype_a != dtype_b:
            differences.append(f"{name}: dtype {dtype_a} vs {dtype_b}")
            continue
        ta, tb = sa.get(name), sb.get(name)
        checked += 1
        if not torch.equal(ta, tb):
            diff = (ta.double() - tb.double()).abs()
            where = torch.nonzero(diff == diff.max())[0].tolist()
            differences.append(f"{name}: {int((diff != 0).sum())} of {ta.numel()} values differ (largest "
                               f"{float(diff.max()):.3g} at {where})")
    return differences, checked
