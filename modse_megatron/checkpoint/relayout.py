"""``modse-convert reshard``: a checkpoint for another TP/PP/EP/ETP layout or placement.

Our checkpoints store global tensors (one per logical tensor; experts by logical id), so the
bytes do not change with the layout: what changes is what a job of the target shape will ask
for. :func:`reshard` first proves every target rank's request is there
(:mod:`.layout_check`), then copies the stored items byte for byte (decoding only for
``--dtype``), dropping what cannot carry over (per-rank RNG streams; the optimizer with
``--drop-optimizer``), normalising optimizer keys, and records the target layout, options and
placement in the checkpoint's meta.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from modse_megatron.checkpoint import manifest
from modse_megatron.checkpoint.dcp_io import CheckpointReader, CheckpointWriter, chunk_metadata_of
from modse_megatron.checkpoint.describe import is_model_key, is_optimizer_key, resolve, saved_args
from modse_megatron.checkpoint.errors import CheckpointError
from modse_megatron.checkpoint.export import TRACKER, staged
from modse_megatron.checkpoint.reshard import unprefixed_key

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _target_args(args, tp: int, pp: int, ep: int, etp: int | None, placement: str | None, dtype: str | None):
    from modse_megatron.placement.layout import PLACEMENT_MODES
    from modse_megatron.training.arguments import ConfigError, validate

    target = copy.deepcopy(args)
    p = target.parallel
    if not placement and ep != p.expert_model_parallel_size and target.modse.moe_expert_placement not in PLACEMENT_MODES:
        placement = "auto"  # explicit (e.g. re-planned) ranks belong to the old EP size: plan for the new one
    p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
    p.expert_model_parallel_size, p.expert_tensor_parallel_size = ep, etp
    p.sequence_parallel = tp > 1 and (bool(target.model.num_experts) or p.sequence_parallel)
    if placement:
        target.modse.moe_expert_placement = placement
    if dtype:
        target.model.bf16 = dtype == "bf16"
    try:
        validate(target)
    except ConfigError as err:
        raise CheckpointError(f"target layout: {err}") from None
    return target


def _world(target, requested: int | None) -> tuple[int, dict]:
    from modse_megatron.training.arguments import ConfigError, world_layout

    p = target.parallel
    base = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    candidates = [requested] if requested else [base * dp for dp in range(1, 65)]
    last = None
    for world in candidates:
        try:
            return world, world_layout(target, world)
        except ConfigError as err:
            last = err
    raise CheckpointError(f"target layout: {last}")


def reshard(ckpt, out_root, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, world: int | None = None,
            placement: str | None = None, drop_optimizer: bool = False, dtype: str | None = None) -> dict:
    from modse_megatron.checkpoint.layout_check import check_layout
    from modse_megatron.training.model import padded_vocab_size

    path = resolve(ckpt)
    reader = CheckpointReader(path)
    problem = manifest.check_files(path, manifest.read_manifest(path) or {}, sorted(manifest.read_manifest(path) or {}))
    if problem:
        raise manifest.IntegrityError(f"{problem}: restore the checkpoint before resharding it")
    args = saved_args(reader)
    has_optimizer = any(is_optimizer_key(k) for k in reader.tensors())
    if has_optimizer and not drop_optimizer:
        formats = _optimizer_formats(reader.common.get("optimizer"))
        if formats - {"fully_reshardable"}:
            raise CheckpointError(f"the optimizer state is saved as {sorted(formats)}, which cannot be resharded: "
                                  f"add --drop-optimizer (weights, scheduler and data position carry over)")
    target = _target_args(args, tp, pp, ep, etp, placement, dtype)
    world, layout = _world(target, world)
    emb = reader.tensors().get("embedding.word_embeddings.weight")
    tokenizer_vocab = reader.meta.get("tokenizer_vocab_size")
    rows = padded_vocab_size(tokenizer_vocab, tp) if tokenizer_vocab else (emb.shape[0] if emb else 128)
    checked = check_layout(reader, target, world, has_optimizer and not drop_optimizer, rows)
    target_layout = {"tp": tp, "pp": pp, "ep": ep, "etp": etp or tp, "dp": layout["dp"], "world_size": world}
    with staged(out_root) as tmp:
        iteration = int(reader.meta.get("iteration") or 0)
        name = f"iter_{iteration:07d}"
        _copy_items(reader, CheckpointWriter(tmp / name), target, target_layout, drop_optimizer, dtype)
        (tmp / TRACKER).write_text(str(iteration))
    return {**checked, "layout": target_layout, "path": str(Path(out_root) / name)}


def _optimizer_formats(common_optimizer) -> set[str]:
    if not isinstance(common_optimizer, dict):
        return set()
    subs = [common_optimizer[k] for k in common_optimizer] if all(isinstance(k, int) for k in common_optimizer) \
        else [common_optimizer]
    return {str(s.get("param_state_sharding_type", "unknown")) for s in subs if isinstance(s, dict)}


def _copy_items(reader: CheckpointReader, writer: CheckpointWriter, target, layout: dict, drop_optimizer: bool,
                dtype: str | None) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    convert = _DTYPES[dtype] if dtype else None
    try:
        for index, _, data in reader.raw_items():
            key = index.fqn
            storage_md = reader.metadata.state_dict_metadata[key]
            if isinstance(storage_md, BytesStorageMetadata):
                if key.startswith("rng_state"):
                    continue  # per-rank streams of the old layout: re-derived from --seed
                writer.add_raw(index, storage_md, data)
                continue
            if is_optimizer_key(key):
                if drop_optimizer:
                    continue
                index = type(index)(unprefixed_key(key), index.offset, index.index)
            chunk_md = chunk_metadata_of(reader, type(index)(key, index.offset, index.index))
            if convert is not None and is_model_key(key) and storage_md.properties.dtype != convert:
                chunk = reader.decode(data, key).to(convert)
                writer.add_chunk(key, chunk, tuple(chunk_md.offsets), tuple(storage_md.size))
            else:
                writer.add_raw(index, storage_md, data, chunk_md)
    except BaseException:
        writer.abort()
        raise
    common = copy.deepcopy(reader.common)
    meta = dict(common.get("meta") or {})
    meta.update({"layout": layout, "world_size": layout["world_size"], "args": target.to_dict(),
                 "integrity": manifest.INTEGRITY, "resharded_from": reader.meta.get("layout")})
    if drop_optimizer:
        meta["optimizer_dropped"] = True
        common.pop("optimizer", None)
    common["meta"] = meta
    writer.finish(common)
