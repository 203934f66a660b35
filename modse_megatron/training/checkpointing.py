"""Training checkpoints with megatron ``dist_checkpointing``: model, optimizer (model-space
sharded, so it reshards to another layout), LR scheduler, RNG states and the data position.

Layout on disk::

    SAVE/iter_0000040/            one dist_checkpointing directory per saved iteration
    SAVE/iter_0000040/modse_manifest.json   SHA-256 and size of every file (written last)
    SAVE/latest_checkpointed_iteration.txt

A checkpoint is written to ``iter_N.tmp`` and renamed once every rank has finished, and the
tracker file is replaced atomically afterwards, so an interrupted save never hides or damages
an earlier checkpoint. An existing ``iter_N`` is never overwritten. Loading verifies the
manifest first and unpickles nothing outside an allow-list
(:mod:`modse_megatron.checkpoint.safe_load`), so a damaged file or a crafted checkpoint stops
with one line instead of loading wrong weights or running code.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from torch.distributed.checkpoint.api import CheckpointException

from modse_megatron.checkpoint import manifest, reshard, safe_load
from modse_megatron.checkpoint.errors import CheckpointError
from modse_megatron.platform.megatron_0_16.fixes import materialize_optimizer_state, unwrap_float16_module

TRACKER = "latest_checkpointed_iteration.txt"
# Optimizer state in canonical per-parameter form without chained-optimizer key prefixes, so a
# checkpoint loads under another TP/PP/EP/ETP/DP layout (see modse_megatron.checkpoint.reshard).
_OPTIM_META = reshard.OPTIMIZER_METADATA


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


def current_layout() -> dict[str, int]:
    """This run's parallel layout (stored in every checkpoint's meta)."""
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(), "etp": ps.get_expert_tensor_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(), "world_size": dist.get_world_size(),
    }


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


def save_checkpoint(root: str, iteration: int, ddp, optimizer, scheduler, meta: dict[str, Any],
                    after_write: Callable[[], None] | None = None) -> Path:
    """Save everything needed to resume at ``iteration``; returns the checkpoint directory.

    Written into ``iter_N.tmp`` with an integrity manifest, then renamed; a failure (disk full,
    I/O error) removes the partial directory and leaves every earlier checkpoint as it was."""
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
    meta = {**meta, "iteration": iteration, "world_size": dist.get_world_size(), "layout": current_layout(),
            "integrity": manifest.INTEGRITY}
    failure = None
    try:
        dist_checkpointing.save(_state_dict(ddp, optimizer, scheduler, False, True, meta), str(tmp))
        if after_write is not None:
            after_write()
        dist.barrier()
        _write_manifest(tmp)
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
        failure = err
    # Every rank learns what failed where, so all of them stop (or go on) together with the
    # same line: the most specific description (an OS error) any rank saw.
    reports: list[str | None] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(reports, None if failure is None else _describe(failure))
    except BaseException:  # a rank is gone (killed mid-save): the caller names it; drop the partial files
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if any(reports):
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        cause = next((r for r in reports if r and "Errno" in r), next(r for r in reports if r))
        latest = latest_iteration(root)
        kept = f"earlier checkpoints are intact (latest: {iteration_dir(root, latest)})" if latest is not None else "no earlier checkpoint"
        raise CheckpointError(f"could not write checkpoint {final.name}: {cause}; the partial checkpoint "
                              f"was removed and {kept}: {_save_fix(cause)}")
    if dist.get_rank() == 0:
        os.replace(tmp, final)
        tracker_tmp = Path(root) / (TRACKER + ".tmp")
        tracker_tmp.write_text(str(iteration))
        os.replace(tracker_tmp, Path(root) / TRACKER)
    dist.barrier()
    return final


def _save_fix(cause: str) -> str:
    if "No space" in cause or "quota" in cause.lower():
        return "free disk space or choose another --save directory"
    if "No such file" in cause:
        return "the checkpoint directory disappeared while writing (is another job or a clean-up using --save?)"
    if "Permission" in cause or "Read-only" in cause:
        return "make --save writable or choose another directory"
    return "check the file system of --save (or choose another directory) and resume with --load"


def _describe(failure: BaseException | None) -> str:
    """One line for a save failure: the underlying OS error when there is one (DCP wraps every
    rank's exception into one ``CheckpointException``)."""
    if failure is None:
        return "another rank failed to write its part"
    inner = [f[0] if isinstance(f, tuple) else f for f in getattr(failure, "failures", {}).values()]
    candidates = [failure, *inner, failure.__cause__, failure.__context__]
    for exc in candidates:
        if isinstance(exc, OSError):
            return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    for exc in candidates:
        match = exc is not None and re.search(r"\[Errno \d+\][^\n]*", str(exc))
        if match:
            return match.group(0)
    exc = inner[0] if inner else failure
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _write_manifest(directory: Path) -> None:
    """Every rank hashes the files it wrote, rank 0 writes the manifest (see
    :mod:`modse_megatron.checkpoint.manifest`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    names = [manifest.checkpoint_files(directory) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    mine = {name: manifest.file_digest(directory / name) for name in manifest.files_of_rank(names[0], rank, world)}
    gathered: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        manifest.write_manifest(directory, {k: v for part in gathered for k, v in part.items()})
    dist.barrier()


def verify_checkpoint(path: Path, enabled: bool = True) -> None:
    """Check every file against the manifest before anything is read, split over the ranks;
    every rank raises the same one-line :class:`IntegrityError` naming the first bad file."""
    if not enabled:
        return
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    expected = manifest.read_manifest(path)
    if expected is None:
        if safe_load.load_common(path).get("meta", {}).get("integrity") == manifest.INTEGRITY:
            raise manifest.IntegrityError(f"{path / manifest.MANIFEST} is missing but this checkpoint was saved with one "
                                          f"(deleted or damaged): {manifest.problem_hint()}")
        if rank == 0:
            print(f"modse-pretrain: warning: {path} has no integrity manifest (saved before manifests existed): "
                  f"loading it unverified", file=sys.stderr, flush=True)
        return
    problem = manifest.check_files(path, expected, sorted(expected)[rank::world])
    problems = [problem]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise manifest.IntegrityError(f"{first}: {manifest.problem_hint()}")


def commit_interrupted_save(root: str) -> str | None:
    """Finish a save killed between renaming ``iter_N`` into place and updating the tracker:
    the directory is complete (it is renamed only after every rank wrote it and the manifest
    is in), so the tracker moves forward to it. Without this every resume would stop at
    iteration N with "iter_N already exists". Returns what was done, or None. Call under the
    --save lock."""
    tracked = latest_iteration(root)
    done = [int(p.name[5:]) for p in Path(root).glob("iter_*")
            if p.is_dir() and p.name[5:].isdigit() and (p / manifest.MANIFEST).is_file()]
    newest = max(done, default=None)
    if newest is None or (tracked is not None and newest <= tracked):
        return None
    tracker_tmp = Path(root) / (TRACKER + ".tmp")
    tracker_tmp.write_text(str(newest))
    os.replace(tracker_tmp, Path(root) / TRACKER)
    return (f"{iteration_dir(root, newest).name} is complete but the tracker named iteration {tracked} (a save was "
            f"interrupted after its rename): continuing from iteration {newest}")


def _latest_path(root: str) -> Path:
    iteration = latest_iteration(root)
    if iteration is None:
        raise CheckpointError(f"no checkpoint in {root} (missing {TRACKER}): check --load or start without it")
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise CheckpointError(f"{TRACKER} names iteration {iteration} but {path} is missing: restore it or fix the tracker")
    return path


def _load(template: dict, path: Path, common_transform=None) -> dict:
    try:
        return safe_load.load(template, path, common_transform)
    except CheckpointError:
        raise
    except Exception as err:  # megatron raises assorted types for a damaged or mismatched checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load {path}: {first[:300]} (is it a modse-megatron checkpoint of this model?)") from None


def is_weights_only(root: str) -> bool:
    """Whether the latest checkpoint under ``root`` holds model weights only (``modse-convert
    import``): it starts a run at iteration 0 with a fresh optimizer."""
    if latest_iteration(root) is None:
        return False
    return bool(safe_load.load_common(_latest_path(root)).get("meta", {}).get("weights_only"))


def load_model_weights(root: str, ddp, verify: bool = True) -> Path:
    """Load only the model weights of the latest checkpoint under ``root`` (``--finetune``).
    Model tensors are sharded per logical tensor, so this works from any TP/PP/EP layout."""
    path = _latest_path(root)
    verify_checkpoint(path, verify)
    stored = set(safe_load.read_metadata(path).state_dict_metadata)
    state = _load({"model": _without_absent_extra_state(ddp.module.sharded_state_dict(), stored)}, path)
    _load_model_state(ddp.module, state["model"])
    return path


def _without_absent_extra_state(model_sd: dict, stored: set[str]) -> dict:
    """The model's sharded state dict minus ``_extra_state`` objects the checkpoint lacks.

    megatron's linear layers describe an ``_extra_state`` object per layer (TransformerEngine's
    FP8 scaling state; None for local layers). Checkpoints written by ``modse-convert import``
    carry none (an export has no FP8 state): such layers keep their fresh extra state."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {k: v for k, v in model_sd.items()
            if not (isinstance(v, ShardedObject) and "_extra_state" in v.key and v.unique_key not in stored)}


def _load_model_state(module, state: dict) -> None:
    """``load_state_dict`` that tolerates exactly the absent ``_extra_state`` entries."""
    missing, unexpected = unwrap_float16_module(module).load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"the checkpoint does not fit this model ({what}): check the model options")


def load_checkpoint(root: str, ddp, optimizer, scheduler, verify: bool = True) -> dict[str, Any]:
    """Restore the latest checkpoint under ``root`` into the given objects; returns its meta
    (iteration, consumed samples, ...). Works under any TP/PP/EP/ETP/DP layout: model and
    optimizer tensors are global, the optimizer's common part is rebuilt for this layout's
    optimizers. RNG states are restored when the layout is the one saved (each rank's streams
    belong to its place in the layout); otherwise the streams seeded at start-up are kept."""
    path = _latest_path(root)
    verify_checkpoint(path, verify)
    common = safe_load.load_common(path)
    meta = common.get("meta", {})
    saved_layout = meta.get("layout")
    same_layout = saved_layout == current_layout() if saved_layout else meta.get("world_size") == dist.get_world_size()
    stored = safe_load.read_metadata(path).state_dict_metadata
    # RNG streams belong to a rank's place in the layout; resharded checkpoints carry none
    same_layout = same_layout and any(k.startswith("rng_state") for k in stored)
    materialize_optimizer_state(optimizer)
    template = _state_dict(ddp, optimizer, scheduler, True, same_layout)
    template["model"] = _without_absent_extra_state(template["model"], set(stored))
    with_optimizer = not meta.get("optimizer_dropped")  # modse-convert reshard --drop-optimizer
    if with_optimizer:
        reshard.match_optimizer_keys(template["optimizer"], set(stored))
    else:
        del template["optimizer"]

    def for_this_layout(saved: dict) -> dict:
        if not with_optimizer:
            return saved
        return {**saved, "optimizer": reshard.adapt_optimizer_common(saved["optimizer"], optimizer)}

    state = _load(template, path, for_this_layout)
    _load_model_state(ddp.module, state["model"])
    if with_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        _set_rng_state(state["rng"])
    return meta
