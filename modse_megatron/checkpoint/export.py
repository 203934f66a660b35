"""``modse-convert export`` / ``import``: checkpoints <-> safetensors exports, streamed.

Export: every model tensor of a checkpoint, one global tensor at a time, split per layer under
the export names of :mod:`.names` (each logical expert its own tensors at its own width), into
``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` + an HF-style
``model.safetensors.index.json``; ``config.json`` describes the architecture (read by
:mod:`modse_megatron.inference`), the checkpoint's tokenizer is copied as ``tokenizer.json``.
Only the ``safetensors`` library writes tensor files.

Import: an export (ours) back into a ``dist_checkpointing`` checkpoint root that
``modse-pretrain --load`` starts from under any layout: model weights only, iteration 0, a fresh
optimizer (``meta["weights_only"]``). Tensors are read one at a time (``safe_open``) and written
as per-layer chunks of megatron's stacked keys.

Both write into a temporary sibling directory and rename it at the end: a failure leaves
nothing half-written at the destination, and an existing destination is never overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from modse_megatron.checkpoint import manifest
from modse_megatron.checkpoint.dcp_io import CheckpointReader, CheckpointWriter
from modse_megatron.checkpoint.describe import is_model_key, resolve, saved_args
from modse_megatron.checkpoint.errors import CheckpointError
from modse_megatron.checkpoint.names import checkpoint_key, export_name, is_stacked

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
DEFAULT_SHARD_BYTES = 2 << 30
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextmanager
def staged(dest: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory next to ``dest``, renamed to ``dest`` when the block succeeds."""
    dest = Path(dest)
    if dest.exists():
        raise CheckpointError(f"{dest} already exists: choose a new output path (nothing is overwritten)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ export
def model_tensors(reader: CheckpointReader, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(export name, tensor) of every model tensor, one checkpoint tensor read at a time."""
    infos = reader.tensors()
    for key in sorted(k for k in infos if is_model_key(k)):
        info = infos[key]
        names = split_names(key, info)
        if _one_chunk_per_layer(info, names):
            # What our own writers store (modse-convert import, a 1-way save): each layer of a
            # stacked key is one chunk, exported as it is read (no assembly, no copy).
            name_of_layer = {index[0]: name for name, index in names}
            for offsets, chunk in reader.read_chunks(key):
                yield name_of_layer[offsets[0]], chunk[0] if dtype is None else chunk[0].to(dtype)
            continue
        full = reader.read(key, info)
        if dtype is not None:
            full = full.to(dtype)
        for name, index in names:
            yield name, full[index].clone() if index else full
        del full


def _one_chunk_per_layer(info, names) -> bool:
    """Whether ``key`` is stacked per layer only (not megatron's [L, E, ...] experts) and every
    stored chunk is exactly one whole layer."""
    return (all(len(index) == 1 for _, index in names)  # (an unstacked key's one index is ())
            and len(info.chunks) == len(names)
            and all(sizes[0] == 1 and tuple(sizes[1:]) == tuple(info.shape[1:]) for _, sizes in info.chunks))


MEGATRON_STACKED_EXPERTS = "decoder.layers.mlp.experts.experts."


def split_names(key: str, info) -> list[tuple[str, tuple[int, ...]]]:
    """Export names of a checkpoint tensor and the index of each in it: per layer for stacked
    keys, and per expert for megatron's uniform experts stored stacked ``[L, E, ...]``
    (exported as ``expert{e}`` like MoDSE experts, so the uniform twin exports alike)."""
    if not is_stacked(key):
        return [(key, ())]
    layers = sorted({offsets[0] for offsets, _ in info.chunks})
    if key.startswith(MEGATRON_STACKED_EXPERTS) and key.count(".") == 6:  # ...experts.experts.linear_fcN.weight
        rest = key[len(MEGATRON_STACKED_EXPERTS):]
        return [(export_name(f"decoder.layers.mlp.experts.expert{e}.{rest}", layer), (layer, e))
                for layer in layers for e in range(info.shape[1])]
    return [(export_name(key, layer), (layer,)) for layer in layers]


def _save_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int,
                 progress: Callable[[int], None]) -> dict[str, Any]:
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(out / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += size
        total += size
        progress(size)
    flush()
    if len(shards) == 1:
        os.replace(out / "shard-00000.tmp", out / WEIGHTS)
        return {}
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / f"shard-{i:05d}.tmp", out / file)
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index


def export_config(reader: CheckpointReader, dtype: torch.dtype, tokenizer_name: str | None, eod: int | None) -> dict:
    """config.json of the checkpoint's model (architecture, logical expert widths, router)."""
    from modse_megatron.inference.from_megatron import export_config_from_megatron
    from modse_megatron.training.model import transformer_config

    args = saved_args(reader)
    infos = reader.tensors()
    emb = infos.get("embedding.word_embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{reader.path} has no embedding.word_embeddings.weight: not a GPT checkpoint of modse-megatron")
    m = args.model
    config = export_config_from_megatron(
        transformer_config(args), args.modse if m.num_experts and m.moe_layer_impl == "modse" else None,
        vocab_size=int(reader.meta.get("tokenizer_vocab_size") or emb.shape[0]), padded_vocab_size=emb.shape[0],
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        position_embedding_type=m.position_embedding_type, tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        tokenizer=tokenizer_name, eod_token_id=eod, expert_widths=args.expert_widths() or None,
    )
    data = config.to_dict()
    data["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, data["dtype"])
    return data


def export_checkpoint(ckpt: str | os.PathLike, out_dir: str | os.PathLike, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                      dtype: str | None = None, progress: Callable[[int], None] = lambda n: None) -> Path:
    """Export the checkpoint ``ckpt`` (root or iter dir) to ``out_dir``; returns ``out_dir``."""
    path = resolve(ckpt)
    reader = CheckpointReader(path)
    infos = reader.tensors()
    stored = {i.dtype for k, i in infos.items() if is_model_key(k)}
    target = _DTYPES[dtype] if dtype else (torch.bfloat16 if stored == {torch.bfloat16} else torch.float32)
    tokenizer = reader.meta.get("tokenizer_path")
    with staged(out_dir) as tmp:
        tokenizer_name = None
        if tokenizer and Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
            tokenizer_name = TOKENIZER
        config = export_config(reader, target, tokenizer_name, reader.meta.get("eod_token_id"))
        _save_shards(model_tensors(reader, target), tmp, shard_bytes, progress)
        (tmp / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return Path(out_dir)


# ------------------------------------------------------------------------------------ import
def read_export(export_dir: str | os.PathLike):
    """(ExportConfig, {name: (file, shape, dtype)}) of an export, checked against its config."""
    from safetensors import safe_open

    from modse_megatron.inference.config import ExportConfig, ExportError
    from modse_megatron.inference.model import ReferenceGPT
    from modse_megatron.inference.weights import check_tensors

    export_dir = Path(export_dir)
    try:
        config = ExportConfig.from_json(export_dir)
    except ExportError as err:
        raise CheckpointError(str(err)) from None
    if (export_dir / INDEX).is_file():
        files = sorted(set(json.loads((export_dir / INDEX).read_text())["weight_map"].values()))
    elif (export_dir / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise CheckpointError(f"{export_dir} has {CONFIG} but no {WEIGHTS} or {INDEX}: re-export it with modse-convert export")
    where: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        try:
            with safe_open(str(export_dir / file), framework="pt") as f:
                for name in f.keys():
                    where[name] = (file, tuple(f.get_slice(name).get_shape()))
        except (OSError, ValueError, RuntimeError) as err:  # safetensors' header errors
            raise CheckpointError(f"{export_dir / file} is damaged ({str(err).splitlines()[0][:120]}): "
                                  f"re-export it with modse-convert export") from None
    expected = {n: t.shape for n, t in ReferenceGPT(config, device="meta").export_tensors().items()}
    shapes = {n: torch.empty(s, device="meta") for n, (_, s) in where.items()}
    try:
        check_tensors(expected, shapes, str(export_dir), config.describe())
    except ExportError as err:
        raise CheckpointError(str(err)) from None
    return config, where


def import_export(export_dir: str | os.PathLike, out_root: str | os.PathLike, *, dtype: str | None = None,
                  progress: Callable[[int], None] = lambda n: None) -> Path:
    """Write a checkpoint root (iteration 0, weights only) from an export; returns its iter dir."""
    from safetensors import safe_open

    from modse_megatron.checkpoint.options import args_from_export_config

    export_dir = Path(export_dir)
    config, where = read_export(export_dir)
    args = args_from_export_config(config)
    target = _DTYPES[dtype] if dtype else None
    with staged(out_root) as tmp:
        if (export_dir / TOKENIZER).is_file():
            shutil.copyfile(export_dir / TOKENIZER, tmp / TOKENIZER)
            args.data.tokenizer = str(Path(out_root).resolve() / TOKENIZER)
        writer = CheckpointWriter(tmp / "iter_0000000")
        try:
            for file in sorted({f for f, _ in where.values()}):
                with safe_open(str(export_dir / file), framework="pt") as f:
                    for name in sorted(n for n, (fl, _) in where.items() if fl == file):
                        tensor = f.get_tensor(name)
                        if target is not None:
                            tensor = tensor.to(target)
                        write_export_tensor(writer, name, tensor, config.num_layers)
                        progress(tensor.numel() * tensor.element_size())
        except BaseException:
            writer.abort()
            raise
        meta = {"iteration": 0, "consumed_samples": 0, "weights_only": True, "args": args.to_dict(),
                "integrity": manifest.INTEGRITY, "source": f"modse-convert import {export_dir}",
                "tokenizer_path": args.data.tokenizer, "tokenizer_vocab_size": config.vocab_size,
                "eod_token_id": config.eod_token_id}
        writer.finish({"meta": meta})
        (tmp / TRACKER).write_text("0")
    return Path(out_root) / "iter_0000000"


TRACKER = "latest_checkpointed_iteration.txt"


def write_export_tensor(writer: CheckpointWriter, name: str, tensor: torch.Tensor, num_layers: int) -> None:
    """One export tensor as a chunk of its checkpoint key (a layer slice of a stacked key)."""
    key, layer = checkpoint_key(name)
    if layer is None:
        writer.add_chunk(key, tensor, (0,) * tensor.dim(), tuple(tensor.shape))
    else:
        writer.add_chunk(key, tensor.unsqueeze(0), (layer,) + (0,) * tensor.dim(), (num_layers, *tensor.shape))
