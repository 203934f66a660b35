"""Fixes for megatron-core 0.16.1 bugs (not CPU-specific).

The optimizer fixes apply whenever megatron falls back to ``torch.optim`` (no apex, no TE),
which is always the case on CPU and possible on GPUs; the checkpoint-queue fix applies
everywhere. Each fix names the line it answers.
"""
from __future__ import annotations

import torch

_installed = False


def _fix_fully_reshardable_optimizer_load() -> None:
    """``DistributedOptimizer.load_state_dict`` (distrib_optimizer.py:817-825) gives every torch
    Adam state a ``step`` entry, then ``load_parameter_state_from_fully_reshardable`` skips
    ``step`` in the loaded tensors (:2101) and ``_set_main_param_and_optimizer_states`` copies
    every destination key from them (:940) -> ``KeyError: 'step'``. Keep the state's own step."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    original = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state.get(main_param, {}).get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


def _fix_shared_adam_step_after_load() -> None:
    """``DistributedOptimizer.load_state_dict`` stores ONE ``step`` tensor object in every
    parameter's torch Adam state (distrib_optimizer.py:825 ``s["step"] = step``). torch Adam
    increments ``state["step"]`` in place per parameter, so after a resume the shared counter
    advances once per parameter per iteration and Adam's bias correction drifts: a resumed run
    no longer reproduces the uninterrupted one. Give every state its own copy."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    original = dopt.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()
        return result

    dopt.DistributedOptimizer.load_state_dict = load_state_dict


def _exit_with_parent(parent_pid: int) -> None:
    """Initializer of the checkpoint queue's manager process: end it when its parent is gone."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _fix_orphaned_checkpoint_queue() -> None:
    """``filesystem_async._get_write_results_queue`` (dist_checkpointing/strategies/
    filesystem_async.py:51-56) starts a ``multiprocessing`` Manager server (spawn) on the first
    save. When the training process is SIGKILLed (OOM killer, scheduler, a dead torchrun agent)
    that server and its resource tracker live on forever, holding the job's stdout/stderr open.
    Same queue, but its manager exits within a second of its parent."""
    import multiprocessing as mp
    import os
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def _get_write_results_queue():
        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=mp.get_context("spawn"))
            manager.start(initializer=_exit_with_parent, initargs=(os.getpid(),))
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = _get_write_results_queue


def _fix_orphaned_checkpoint_writers() -> None:
    """``FileSystemWriterAsync.write_preloaded_data`` runs in processes forked per save
    (filesystem_async.py:291); when the training process is SIGKILLed mid-write, the last writer
    blocks forever in ``count_queue.task_done()`` (:412) with its memory and the job's stdout held.
    Each writer now ends within a second of its parent."""
    import functools
    import os

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.write_preloaded_data

    @functools.wraps(original)
    def write_preloaded_data(*args, **kwargs):
        _exit_with_parent(os.getppid())
        return original(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(write_preloaded_data)


def materialize_optimizer_state(optimizer) -> None:
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


def unwrap_float16_module(module):
    """The module a ``Float16Module`` (bf16/fp16) wraps, else ``module``: its
    ``load_state_dict`` (transformer/module.py:511-514) returns None instead of the missing and
    unexpected keys of ``strict=False``."""
    from megatron.core.transformer.module import Float16Module

    return module.module if isinstance(module, Float16Module) else module


def install() -> None:
    """Apply the fixes once; the optimizer ones only where megatron runs without apex/TE."""
    global _installed
    if _installed:
        return
    from megatron.core.optimizer import distrib_optimizer as dopt

    if not dopt.HAVE_APEX_OR_TE:
        _fix_fully_reshardable_optimizer_load()
        _fix_shared_adam_step_after_load()
    _fix_orphaned_checkpoint_queue()
    _fix_orphaned_checkpoint_writers()
    _installed = True
