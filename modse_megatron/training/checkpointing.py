"""Training checkpoints with megatron ``dist_checkpointing``: model, optimizer (model-space
sharded, so it reshards to another layout), LR scheduler, RNG states and the data position.

Layout on disk::

    SAVE/iter_0000040/            one dist_checkpointing directory per saved iteration
    SAVE/latest_checkpointed_iteration.txt

A checkpoint is written to ``iter_N.tmp`` and renamed once every rank has finished, and the
tracker file is replaced atomically afterwards, so an interrupted save never hides or damages
an earlier checkpoint. An existing ``iter_N`` is never overwritten.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
# fully_reshardable: optimizer state in canonical per-parameter form, so a checkpoint loads under
# another TP/PP/EP/DP layout (megatron 0.16 no longer saves the flattened model-space format).
_OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the fix."""


def iteration_dir(root: str, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str) -> int | None:
    """The iteration the tracker file names, or None when ``root`` holds no checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} is corrupt ({text[:40]!r}): restore it or point --load at another directory")
    return int(text)


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer zero Adam state so it can describe what it will load.

    Without apex/TE, megatron 0.16.1's ``DistributedOptimizer.state_dict()`` reads every
    parameter's ``step`` (distrib_optimizer.py:640-642) and asserts they agree, which fails on an
    optimizer that has not stepped yet. Loading overwrites these placeholders.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state.setdefault("exp_avg", torch.zeros_like(param.data))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param.data))


def _state_dict(ddp, optimizer, scheduler, is_loading: bool, with_rng: bool, meta: dict | None = None) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = ddp.module.sharded_state_dict()
    state: dict[str, Any] = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPTIM_META),
        "scheduler": scheduler.state_dict(),
        "meta": meta or {},
    }
    if with_rng:
        # One object per global rank: RNG streams differ on every rank (TP/EP forks, dropout).
        rank, world = dist.get_rank(), dist.get_world_size()
        state["rng"] = ShardedObject("rng_state", _rng_state() if not is_loading else None, (world,), (rank,), replica_id=0)
    return state


def save_checkpoint(root: str, iteration: int, ddp, optimizer, scheduler, meta: dict[str, Any]) -> Path:
    """Save everything needed to resume at ``iteration``; returns the checkpoint directory."""
    from megatron.core import dist_checkpointing

    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    # Every rank checks (the save directory is shared by all ranks), so all stop together.
    if final.exists():
        raise CheckpointError(f"{final} already exists: choose another --save directory or remove it yourself")
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save, never a finished one
        tmp.mkdir(parents=True)
    dist.barrier()
    meta = {**meta, "iteration": iteration, "world_size": dist.get_world_size()}
    dist_checkpointing.save(_state_dict(ddp, optimizer, scheduler, False, True, meta), str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        os.replace(tmp, final)
        tracker_tmp = Path(root) / (TRACKER + ".tmp")
        tracker_tmp.write_text(str(iteration))
        os.replace(tracker_tmp, Path(root) / TRACKER)
    dist.barrier()
    return final


def _latest_path(root: str) -> Path:
    iteration = latest_iteration(root)
    if iteration is None:
        raise CheckpointError(f"no checkpoint in {root} (missing {TRACKER}): check --load or start without it")
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise CheckpointError(f"{TRACKER} names iteration {iteration} but {path} is missing: restore it or fix the tracker")
    return path


def _load(template: dict, path: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(template, str(path))
    except Exception as err:  # megatron raises assorted types for a damaged or mismatched checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load {path}: {first[:300]} (is it a modse-megatron checkpoint of this model?)") from None


def load_model_weights(root: str, ddp) -> Path:
    """Load only the model weights of the latest checkpoint under ``root`` (``--finetune``).
    Model tensors are sharded per logical tensor, so this works from any TP/PP/EP layout."""
    path = _latest_path(root)
    state = _load({"model": ddp.module.sharded_state_dict()}, path)
    ddp.module.load_state_dict(state["model"])
    return path


def load_checkpoint(root: str, ddp, optimizer, scheduler) -> dict[str, Any]:
    """Restore the latest checkpoint under ``root`` into the given objects; returns its meta
    (iteration, consumed samples, ...). RNG states are restored when the world size matches."""
    from megatron.core import dist_checkpointing

    path = _latest_path(root)
    common = dist_checkpointing.load_common_state_dict(str(path))
    meta = common.get("meta", {})
    same_world = meta.get("world_size") == dist.get_world_size()
    _materialize_optimizer_state(optimizer)
    state = _load(_state_dict(ddp, optimizer, scheduler, True, same_world), path)
    ddp.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if same_world:
        _set_rng_state(state["rng"])
    return meta
