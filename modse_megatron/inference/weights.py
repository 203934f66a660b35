"""Reading an export's tensors (safetensors, one file or HuggingFace-style shards) and matching
them strictly against the tensors a config implies.

Layouts (the same as HuggingFace's, so standard tools read our exports):

* ``model.safetensors`` - every tensor in one file;
* ``model.safetensors.index.json`` - ``{"weight_map": {tensor name: shard file}}`` plus the shard
  files it names (e.g. ``model-00001-of-00002.safetensors``).

Strict means: a missing tensor, an extra tensor or a tensor of another shape is an error (one
line naming the tensor), never silently skipped or left at random values - a half-loaded model
produces fluent-looking garbage, which is much harder to notice than an error.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch

from .config import ExportError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_REEXPORT = "re-export the checkpoint with `modse-convert export`"


def read_export_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the export directory ``path`` (CPU, stored dtype)."""
    path = os.fspath(path)
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        return _read_sharded(path, index)
    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(single):
        return _load_file(single)
    raise ExportError(f"export {path} has neither {WEIGHTS_FILE} nor {INDEX_FILE}: {_REEXPORT}")


def _load_file(file: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(f"{file} is not a readable safetensors file ({reason}): {_REEXPORT}") from None


def _read_sharded(path: str, index: str) -> dict[str, torch.Tensor]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ExportError(f"{index} is not a valid shard index ({err}): {_REEXPORT}") from None
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(path, shard)
        if os.path.basename(shard) != shard or not os.path.isfile(file):
            raise ExportError(f"export {path}: shard {shard!r} named in {INDEX_FILE} does not exist: {_REEXPORT}")
        for name, tensor in _load_file(file).items():
            if name in tensors:
                raise ExportError(f"export {path}: tensor {name} is in both {origin[name]} and {shard}: {_REEXPORT}")
            tensors[name], origin[name] = tensor, shard
    for name, shard in weight_map.items():
        if origin.get(name) != shard:
            where = f"is in {origin[name]}" if name in origin else "is in no shard"
            raise ExportError(f"export {path}: {INDEX_FILE} puts {name} in {shard} but it {where}: {_REEXPORT}")
    return tensors


def check_tensors(
    expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], source: str, model: str
) -> None:
    """Raise ``ExportError`` unless ``found`` has exactly the ``expected`` names and shapes.

    ``model`` describes what config.json says (e.g. "2-layer GPT, 4 experts ...") so the message
    says which side the mismatch is on.
    """
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        shape = list(expected[missing[0]])
        raise ExportError(
            f"export {source} lacks tensor {missing[0]} {shape}{more} that its config.json "
            f"({model}) needs: {_REEXPORT}"
        )
    extra = sorted(n for n in found if n not in expected)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ExportError(
            f"export {source} has tensor {extra[0]}{more} that its config.json ({model}) does not "
            f"use: config.json and the weights disagree; {_REEXPORT}"
        )
    for name, shape in expected.items():
        tensor = found[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ExportError(
                f"export {source}: tensor {name} has shape {list(tensor.shape)} but config.json "
                f"({model}) implies {list(shape)}: config.json and the weights disagree; {_REEXPORT}"
            )
        if not tensor.is_floating_point():
            raise ExportError(f"export {source}: tensor {name} has dtype {tensor.dtype}, not a float type: {_REEXPORT}")


__all__ = ["INDEX_FILE", "WEIGHTS_FILE", "check_tensors", "read_export_tensors"]
