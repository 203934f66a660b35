"""Prove, in one process, that a checkpoint loads under a target parallel layout.

For every rank of the target world, megatron's parallel state is initialised on torch's
``fake`` process-group backend (collectives are no-ops; ranks and group sizes are real), the
model, DDP wrapper and distributed optimizer of that rank are built exactly as
``modse-pretrain`` builds them, and the sharded state dict it would ask ``--load`` for is
recorded. Then, as megatron's own load does: every requested key must exist in the checkpoint
with the same global shape, and the ranks' main replicas must cover every tensor exactly once
(``validate_sharding_integrity``). What passes here loads there.
"""
from __future__ import annotations

from typing import Any

from modse_megatron.checkpoint.dcp_io import CheckpointReader
from modse_megatron.checkpoint.errors import CheckpointError


def _fake_world(rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())


def _teardown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


_ADAM_STATES = ("param", "exp_avg", "exp_avg_sq")


def _rank_requests(args, vocab_rows: int, rank: int, world: int) -> tuple[list[Any], set[str]]:
    """The ShardedTensors (metadata only) rank ``rank`` would load, and the keys of its
    trainable ones (which have optimizer state)."""
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor, apply_factories

    from modse_megatron.training.model import build_model, transformer_config

    p = args.parallel
    _fake_world(rank, world)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
            create_gloo_process_groups=False,  # gloo cannot run on the fake backend
        )
        torch.manual_seed(args.optim.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(args.optim.seed)
        model = build_model(args, transformer_config(args), vocab_rows)
        trainable = {id(q) for q in model.parameters() if q.requires_grad}
        state = model.sharded_state_dict()
        apply_factories(state)
        requests, with_grad = [], set()
        for item in nested_values(state):
            if isinstance(item, ShardedTensor):
                if item.data is not None and (id(item.data) in trainable or getattr(item.data, "_base", None) is not None
                                              and id(item.data._base) in trainable):
                    with_grad.add(item.key)
                requests.append(item.without_data())
            elif isinstance(item, ShardedBase):
                requests.append(item)
        return requests, with_grad
    finally:
        _teardown()


def _optimizer_requests(requests: list[Any], with_grad: set[str]) -> list[Any]:
    """megatron's fully reshardable optimizer state mirrors the model's sharded tensors: per
    trainable tensor, ``optimizer.state.{param,exp_avg,exp_avg_sq}.<key>`` of the same sharding
    (distrib_optimizer.py ``sharded_param_state_fully_reshardable``)."""
    import dataclasses

    out = []
    for r in requests:
        if r.key in with_grad:
            out += [dataclasses.replace(r, key=f"optimizer.state.{s}.{r.key}") for s in _ADAM_STATES]
    return out


def check_layout(reader: CheckpointReader, target_args, world: int, with_optimizer: bool, vocab_rows: int) -> dict:
    """Raise a one-line CheckpointError unless every target rank can load the checkpoint;
    returns what was checked."""
    from megatron.core.dist_checkpointing.validation import validate_sharding_integrity

    from modse_megatron.checkpoint import reshard

    # optimizer keys with or without megatron's chained_N. prefix
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    stored = {reshard.unprefixed_key(k): v for k, v in reader.tensors().items()}
    objects = set(reader.object_keys())
    per_rank = []
    for rank in range(world):
        requests, with_grad = _rank_requests(target_args, vocab_rows, rank, world)
        optimizer = _optimizer_requests(requests, with_grad) if with_optimizer else []
        requests += optimizer
        for r in requests:
            if isinstance(r, ShardedObject):
                if r.unique_key not in objects and "_extra_state" not in r.key:  # absent extra state: kept fresh
                    raise CheckpointError(f"target rank {rank} needs object {r.unique_key}, which the checkpoint does not "
                                          f"hold: the checkpoint is of another model")
                continue
            info = stored.get(r.key)
            if info is None:
                kind = "optimizer state" if r in optimizer else "tensor"
                raise CheckpointError(f"target rank {rank} needs {kind} {r.key}, which the checkpoint does not hold: "
                                      f"the checkpoint is of another model or lacks it (use --drop-optimizer for "
                                      f"optimizer state)")
            if tuple(info.shape) != tuple(r.global_shape):
                raise CheckpointError(f"target rank {rank} needs {r.key} of shape {list(r.global_shape)} but the checkpoint "
                                      f"holds {list(info.shape)}: {_shape_hint(r.key)}")
        per_rank.append(requests)
    _fake_world(0, world)
    try:
        validate_sharding_integrity(per_rank)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"the target layout does not cover the checkpoint exactly once: {first}") from None
    finally:
        _teardown()
    return {"ranks_checked": world, "tensors_requested": sum(len(r) for r in per_rank)}


def _shape_hint(key: str) -> str:
    if "word_embeddings" in key or "output_layer" in key:
        return ("the padded vocabulary differs under this tensor-parallel size (megatron pads to a multiple of "
                "128 x TP): choose a TP size that keeps the padding")
    return "the model options differ from the checkpoint's"
