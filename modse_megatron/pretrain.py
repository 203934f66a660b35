"""``python -m modse_megatron.pretrain`` / ``modse-pretrain``: MoDSE GPT pretraining with megatron-core.

Launch with torchrun, on one machine or many::

    torchrun --nproc-per-node 2 -m modse_megatron.pretrain --config examples/configs/tiny_cpu.yaml

Without ``--data-path`` the built-in corpus (the Python standard library, tokenized with a BPE
trained on it, cached on first use) is used, so the command works on a fresh machine.
Every configuration error stops every rank with one line ``modse-pretrain: error: ...``.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

from modse_megatron.training.arguments import ConfigError, PretrainArgs, parse_args, world_layout
from modse_megatron.platform.megatron_0_16.messages import quiet_megatron_warnings
from modse_megatron.training.supervision import write_error_line

# Set once the process group exists: the side group that names ranks that stop answering.
_WATCH = None


def _init_distributed(args: PretrainArgs) -> dict[str, int]:
    import torch
    import torch.distributed as dist

    import modse_megatron  # noqa: F401  (CPU layer on machines without CUDA)
    from megatron.core import parallel_state, tensor_parallel
    from modse_megatron.platform import distributed_backend, resolve_device
    from modse_megatron.training.supervision import attempt_store

    device = resolve_device(args.parallel.device)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    layout = world_layout(args, world)  # before any collective: a bad layout fails on every rank alike
    _check_save_dir(args)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = timedelta(minutes=args.parallel.distributed_timeout_minutes)
        store = attempt_store(timeout)  # torchrun: one namespace per restart attempt
        dist.init_process_group(distributed_backend(device), rank=rank, world_size=world, timeout=timeout,
                                **({"store": store} if store is not None else {}))
    global _WATCH
    from modse_megatron.training.supervision import CollectiveWatch

    # Probe as long as the collective timeout (10-30 s): healthy ranks reach the probe within
    # about one timeout of each other.
    probe = min(30.0, max(10.0, 60 * args.parallel.distributed_timeout_minutes))
    _WATCH = CollectiveWatch(args.parallel.distributed_timeout_minutes, probe_seconds=probe)
    p = args.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        distributed_timeout_minutes=p.distributed_timeout_minutes,  # megatron's groups default to 30
    )
    # Megatron-LM's seeding: every PP stage its own stream, TP/EP streams via the tracker.
    seed = args.optim.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return {**layout, "rank": rank, "world_size": world, "device": device}


def _check_save_dir(args: PretrainArgs) -> None:
    """Refuse, before training, a --save directory that already holds a run we would not
    continue: finding out only at the first save would waste the run."""
    from pathlib import Path

    from modse_megatron.training.checkpointing import latest_iteration

    save, load = args.run.save, args.run.load
    if not save or latest_iteration(save) is None:
        return
    if load and Path(load).resolve() == Path(save).resolve() and not args.run.finetune:
        return
    raise ConfigError(f"--save {save} already holds checkpoints (latest iteration {latest_iteration(save)}): "
                      f"add --load {save} to continue that run, or choose another --save directory")


def _lock_save_dir(args: PretrainArgs):
    """Rank 0 takes the --save lock; every rank gets the same outcome (one error line each).
    Then the orphan watchdog starts (it releases the lock if the torchrun agent dies), and
    partial ``iter_*.tmp`` directories of killed saves are removed: nobody else writes here."""
    import shutil

    import torch.distributed as dist

    from modse_megatron.checkpoint.lock import SaveDirLockedError, SaveLock
    from modse_megatron.training import checkpointing
    from modse_megatron.training.supervision import start_orphan_watchdog

    lock, outcome = None, [None, None]
    if args.run.save and dist.get_rank() == 0:
        try:
            lock = SaveLock(args.run.save, args.run.save_lock_timeout).acquire()
            for leftover in Path(args.run.save).glob("iter_*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)
            moved = checkpointing.commit_interrupted_save(args.run.save)
            outcome = [None, "; ".join(m for m in (lock.message, moved) if m) or None]
        except SaveDirLockedError as err:
            outcome = [str(err), None]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise SaveDirLockedError(outcome[0])
    start_orphan_watchdog(on_orphan=lock.release if lock else (lambda: None))
    return lock, outcome[1]


def _datasets(args: PretrainArgs, layout: dict[str, int]):
    """Train/valid/test datasets and the tokenizer (built-in corpus unless --data-path)."""
    from modse_megatron.training.data import build_gpt_datasets, builtin_corpus, load_tokenizer

    d = args.data
    if d.data_path:
        if not d.tokenizer:
            raise ConfigError("--data-path needs --tokenizer PATH/tokenizer.json (the tokenizer the data was made with)")
        prefix, tokenizer_path = d.data_path, d.tokenizer
    else:
        # Every rank asks: the first builds the cache under a file lock, the others wait for it
        # and reuse it (one build per machine on multi-node runs without a shared home).
        prefix, tokenizer_path = builtin_corpus(vocab_size=d.vocab_size)
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.path = str(Path(tokenizer_path).resolve())  # recorded in checkpoints (exports copy it)
    gbs = layout["global_batch_size"]
    o, r = args.optim, args.run
    evals = o.train_iters // r.eval_interval + 1
    num_samples = (o.train_iters * gbs, evals * r.eval_iters * gbs, r.eval_iters * gbs)
    kwargs = dict(split=d.split, num_samples=num_samples, seed=o.seed, cache_dir=d.data_cache_dir)
    # Collective: megatron builds the sample-index caches on rank 0, then the others load them.
    # Validation runs on every rank alike, so bad data fails everywhere at once.
    return build_gpt_datasets(prefix, tokenizer, args.model.seq_length, **kwargs), tokenizer


def run(args: PretrainArgs) -> dict[str, object]:
    """Train as configured; returns a summary (paths, final losses) on every rank."""
    layout = _init_distributed(args)
    lock, lock_message = _lock_save_dir(args)
    try:
        return _train(args, layout, lock, lock_message)
    finally:
        if lock is not None:
            lock.release()


def _train(args: PretrainArgs, layout: dict[str, int], lock, lock_message: str | None) -> dict[str, object]:
    import torch.distributed as dist

    from modse_megatron.training import checkpointing
    from modse_megatron.training.loop import Trainer, TrainState
    from modse_megatron.training.metrics import MetricsWriter
    from modse_megatron.training.model import build_model, padded_vocab_size, transformer_config, wrap_and_optimize

    datasets, tokenizer = _datasets(args, layout)
    config = transformer_config(args)
    vocab_rows = padded_vocab_size(tokenizer.vocab_size, args.parallel.tensor_model_parallel_size)
    loads, replan_message = _replan_at_load(args)  # may change args' placement before the model exists
    model = build_model(args, config, vocab_rows)
    ddp, optimizer, scheduler = wrap_and_optimize(args, config, model)
    state = TrainState()
    if args.run.load and (args.run.finetune or checkpointing.is_weights_only(args.run.load)):
        # --finetune, or an imported checkpoint (weights only): iteration 0, fresh optimizer
        checkpointing.load_model_weights(args.run.load, ddp, verify=args.run.verify_checkpoint)
    elif args.run.load and checkpointing.latest_iteration(args.run.load) is not None:
        meta = checkpointing.load_checkpoint(args.run.load, ddp, optimizer, scheduler, verify=args.run.verify_checkpoint)
        state = TrainState(iteration=meta["iteration"], consumed_samples=meta["consumed_samples"],
                           skipped_nonfinite=meta.get("skipped_nonfinite", 0))
    elif args.run.load and not _same_dir(args.run.load, args.run.save):
        raise checkpointing.CheckpointError(f"--load {args.run.load} holds no checkpoint: check the path or drop --load")
    # (--load = --save without a checkpoint yet: a first start or an elastic restart before the first save)
    is_logger = dist.get_rank() == 0
    metrics = MetricsWriter(args.run.log_dir, is_logger, args.optim.train_iters, state.iteration,
                            progress=args.run.progress, tensorboard=args.run.tensorboard,
                            plot=args.run.loss_plot)
    trainer = Trainer(args, layout, config, ddp, optimizer, scheduler, datasets, metrics, state,
                      heartbeat=lock.heartbeat if lock else None, watch=_WATCH)
    if loads is not None:  # loads and imbalance logged; re-planning with --moe-replan-interval
        trainer.replanner = _replanner(args, config, vocab_rows, trainer, metrics, loads, tokenizer)
    for message in (lock_message, replan_message):
        if message:
            metrics.message(f"modse-pretrain: {message}")
    nparams = sum(p.numel() for p in model.parameters())
    metrics.message(
        f"modse-pretrain: world {layout['world_size']} ({layout['device']}), TP {args.parallel.tensor_model_parallel_size} "
        f"PP {args.parallel.pipeline_model_parallel_size} EP {args.parallel.expert_model_parallel_size} DP {layout['dp']}, "
        f"{nparams / 1e6:.2f}M params on rank 0, global batch {layout['global_batch_size']} x {args.model.seq_length} tokens, "
        f"starting at iteration {state.iteration}"
    )
    saved, saved_iteration = None, state.iteration  # a loaded checkpoint counts as saved
    if args.run.load and not args.run.finetune and checkpointing.latest_iteration(args.run.load) is not None \
            and not checkpointing.is_weights_only(args.run.load):
        trainer.last_checkpoint = str(checkpointing.iteration_dir(args.run.load, state.iteration))

    def die_during_save() -> None:  # --debug-die-during-save: a rank killed mid-save, for the tests
        if args.run.debug_die_during_save == trainer.state.iteration and dist.get_rank() == dist.get_world_size() - 1:
            os._exit(9)

    def save(t: Trainer) -> None:
        nonlocal saved, saved_iteration
        t.check_finite_parameters()  # never write a checkpoint of NaN/Inf weights
        _WATCH.where = f"the save of iteration {t.state.iteration}"
        saved = checkpointing.save_checkpoint(args.run.save, t.state.iteration, t.ddp, t.optimizer, t.scheduler,
                                              _save_meta(args, t, tokenizer),
                                              after_write=die_during_save if args.run.debug_die_during_save is not None else None)
        saved_iteration = t.state.iteration
        t.last_checkpoint = str(saved)
        metrics.message(f"saved checkpoint {saved}")

    reason = trainer.train(save)
    if args.run.save and saved_iteration != state.iteration:
        save(trainer)
    final = {"iteration": state.iteration, "stopped": reason}
    if reason == "finished":
        final["valid_loss"] = trainer.evaluate("valid")
        final["test_loss"] = trainer.evaluate("test")
    plot = metrics.close()
    if is_logger:
        print(f"modse-pretrain: {reason} at iteration {state.iteration}; metrics {metrics.dir / 'metrics.jsonl'}"
              + (f", plot {plot}" if plot else "") + (f", checkpoint {saved}" if saved else ""), flush=True)
    return {**final, "metrics": str(metrics.dir / "metrics.jsonl"), "plot": str(plot) if plot else None,
            "checkpoint": str(saved) if saved else None}


def _save_meta(args: PretrainArgs, trainer, tokenizer) -> dict:
    """What a checkpoint records beside the tensors."""
    meta = {"consumed_samples": trainer.state.consumed_samples, "skipped_nonfinite": trainer.state.skipped_nonfinite,
            "args": args.to_dict(), "tokenizer_path": tokenizer.path, "tokenizer_vocab_size": tokenizer.vocab_size,
            "eod_token_id": tokenizer.eod}
    if trainer.replanner is not None:
        meta["replan_loads"] = trainer.replanner.loads.state()
    return meta


def _replan_at_load(args: PretrainArgs):
    """The per-layer load statistics a resumed checkpoint recorded; with --moe-replan-interval,
    resume with placements planned for them (the checkpoint itself is placement-free).
    Returns (loads, message); loads is None for runs without placement tracking."""
    from modse_megatron.moe.replan import LoadStats, propose_layers
    from modse_megatron.placement.layout import format_layer_ranks, resolve_layer_ranks
    from modse_megatron.training import checkpointing

    r = args.run
    if not args.places_experts():
        return None, None
    loads = LoadStats(args.model.num_experts, r.moe_replan_ema_decay)
    if not r.load or r.finetune or checkpointing.latest_iteration(r.load) is None:
        return loads, None
    from modse_megatron.checkpoint import safe_load

    meta = safe_load.load_common(checkpointing.iteration_dir(r.load, checkpointing.latest_iteration(r.load))).get("meta", {})
    loads = LoadStats.from_state(meta.get("replan_loads"), args.model.num_experts, r.moe_replan_ema_decay)
    if not loads.layers or not r.moe_replan_interval:
        return loads, None
    widths, ep, layers = args.expert_widths(), args.parallel.expert_model_parallel_size, args.moe_layer_numbers()
    current = resolve_layer_ranks(args.modse.moe_expert_placement, widths, ep, len(layers))
    proposals = propose_layers(widths, [loads.layers.get(str(n)) for n in layers], ep, current, policy="planner",
                               min_gain=r.moe_replan_min_gain, move_slack=r.moe_replan_move_slack,
                               max_move_fraction=r.moe_replan_max_move)
    if not proposals.migrate:
        return loads, None
    args.modse.moe_expert_placement = format_layer_ranks(proposals.ranks)
    moved = sum(p.moved_experts for p in proposals.changed.values())
    return loads, (f"placement re-planned from the checkpoint's loads ({len(proposals.changed)} MoE layer(s), {moved} "
                   f"experts moved)")


def _replanner(args: PretrainArgs, config, vocab_rows: int, trainer, metrics, loads, tokenizer):
    """The Replanner with its migration: save the whole state, rebuild with the new placement,
    load it back (see modse_megatron.training.replanning)."""
    from modse_megatron.placement.layout import resolve_layer_ranks
    from modse_megatron.training import replanning

    def migrate(ranks: list[list[int]]) -> None:
        trainer.swap(*replanning.migrate(args, config, vocab_rows, ranks, trainer.state.iteration, trainer.ddp,
                                         trainer.optimizer, trainer.scheduler, _save_meta(args, trainer, tokenizer)))

    widths, ep, layers = args.expert_widths(), args.parallel.expert_model_parallel_size, args.moe_layer_numbers()
    ranks = resolve_layer_ranks(args.modse.moe_expert_placement, widths, ep, len(layers))
    bytes_per_param = (2 if args.model.bf16 else 4) + 8 + (4 if args.model.bf16 else 0)  # weight, 2 moments, fp32 main
    return replanning.Replanner(args, widths, ep, ranks, layers, loads, migrate, metrics, bytes_per_param)


def _same_dir(a: str | None, b: str | None) -> bool:
    return bool(a and b) and Path(a).resolve() == Path(b).resolve()


def _user_errors() -> tuple[type, ...]:
    from modse_megatron.platform import PlatformError
    from modse_megatron.training.checkpointing import CheckpointError

    from modse_megatron.training.data import DataError
    from modse_megatron.training.loop import NonFiniteError

    return (ConfigError, PlatformError, CheckpointError, DataError, NonFiniteError)


def main(argv: list[str] | None = None) -> int:
    from modse_megatron.training.supervision import is_collective_failure

    quiet_megatron_warnings()
    try:
        args = parse_args(argv)
        run(args)
    except _user_errors() as err:
        write_error_line(f"modse-pretrain: error: {err}")
        _error_rendezvous()
        return 2
    except Exception as err:
        if _WATCH is None or not is_collective_failure(err):
            raise
        # A rank stopped answering: name it (every healthy rank prints the same line).
        write_error_line(f"modse-pretrain: error: {_WATCH.explain(err)}")
        return 2
    finally:
        _shutdown()
    return 0


def _error_rendezvous(seconds: float = 10.0) -> None:
    """Give the other ranks a moment to report the same error before this one exits.

    User errors are raised on every rank alike, but torchrun kills the remaining ranks as soon
    as one exits, which could cut off their one-line messages. A barrier with a timeout lets
    all ranks that hit the error print it; a rank that did not is simply not waited for long.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        # Option errors come before any process group exists: meet the other ranks in
        # torchrun's agent store instead (every rank has printed once all have checked in).
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _store_rendezvous("modse/error", seconds)
        return
    from datetime import timedelta

    try:
        dist.barrier(async_op=True).wait(timeout=timedelta(seconds=seconds))
    except Exception:  # timed out or the group is already broken: exit anyway
        pass


def _store_rendezvous(name: str, seconds: float) -> None:
    """Before any process group exists: set ``<name>/<rank>`` in torchrun's agent store and
    wait (at most ``seconds``) until all WORLD_SIZE ranks have set theirs.

    The agent store outlives the workers, so ranks that arrive late still find the keys of
    those that arrived first. Without torchrun's store (another launcher) there is nothing to
    meet in: wait briefly (at most 3 s) instead.
    """
    import time
    from datetime import timedelta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        time.sleep(min(seconds, 3.0))
        return
    from modse_megatron.training.supervision import attempt_store

    deadline = time.monotonic() + seconds
    try:
        store = attempt_store(timedelta(seconds=seconds))  # a namespace per restart attempt
        store.set(f"{name}/{os.environ.get('RANK', '0')}", "1")
        remaining = max(deadline - time.monotonic(), 0.01)
        store.wait([f"{name}/{r}" for r in range(world)], timedelta(seconds=remaining))
    except Exception:  # timed out (a rank did not fail) or the agent is gone: exit anyway
        pass


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
