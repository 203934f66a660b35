"""Run a function on N real gloo processes with megatron's parallel_state set up around it.

Distributed behaviour is tested by launching real processes, never by mocking collectives.
Starting a process costs ~4 s here (megatron-core imports torch inductor), so a
:class:`DistributedPool` keeps N workers alive across tests: each task initialises
``parallel_state`` with its own TP/PP/EP/ETP layout, runs, and tears it down again. A task that
raises fails fast (the other ranks get a short grace period, then the pool is killed and
restarted); a task that hangs fails at its timeout instead of hanging CI.

Task functions must be importable module-level functions (they are pickled by name).
Workers are not daemonic (megatron's checkpoint writer starts processes of its own); they exit
when the pool closes, or by themselves when the process that started them is gone. The pool's
parent serves the workers' rendezvous store on a port the OS picks (no free-port race with
other processes on the machine).

:func:`single_rank` runs the same task functions in this process as a 1-rank world (no workers,
no port): the fast test tier's single-process oracles.

Example::

    pool = DistributedPool(world_size=2)
    results = pool.run(my_check, tp=2, timeout=60)   # list with one result per rank
"""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import time
import traceback
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Iterator

from modse_megatron.testing.ports import free_port as _free_port  # noqa: F401  (benchmarks/moe_layer.py)
from modse_megatron.testing.ports import master_store

_GRACE_AFTER_FAILURE_S = 10.0
_HOST = "127.0.0.1"


class DistributedTaskError(AssertionError):
    """A rank raised; the message carries that rank's traceback."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Megatron parallel sizes for one task (DP is whatever remains of the world size)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    seed: int = 1234


def init_parallel_state(layout: Layout) -> None:
    """Initialise megatron's model-parallel groups and RNG for one task."""
    import torch
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    torch.manual_seed(layout.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(layout.seed)


def clear_moe_trackers() -> None:
    """Empty megatron's process-global MoE loss trackers (sized to one model's layers)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    clear_aux_losses_tracker()
    get_moe_layer_wise_logging_tracker().clear()


def destroy_parallel_state() -> None:
    """Tear down everything :func:`init_parallel_state` and a task may have left behind."""
    from megatron.core import parallel_state

    clear_moe_trackers()
    parallel_state.destroy_model_parallel()
    # destroy_model_parallel only forgets megatron's groups; each gloo group keeps its worker
    # threads alive, so a long-lived pool would accumulate hundreds of them. Destroy them.
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    for group in list(_world.pg_map):
        if group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)


@contextlib.contextmanager
def single_rank(layout: Layout = Layout()) -> Iterator[Callable[[], None]]:
    """This process as a 1-rank gloo world with megatron's ``parallel_state`` set up.

    For single-process tests (the fast tier) of code that needs process groups: no worker
    processes and no port (an in-memory store). Yields ``fresh()``, which gives the next task
    what a new pool task gets (seeded RNGs, empty MoE trackers) without rebuilding the ~20
    process groups; everything is torn down on exit.
    """
    import torch.distributed as dist

    import modse_megatron  # noqa: F401  (activates the CPU layer when megatron-core imports)

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("single_rank(): this process already belongs to a multi-rank group")
    init_parallel_state(layout)

    def fresh() -> None:
        import torch
        from megatron.core import tensor_parallel

        clear_moe_trackers()
        torch.manual_seed(layout.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(layout.seed)

    try:
        yield fresh
    finally:
        destroy_parallel_state()
        if created:
            dist.destroy_process_group()


def _worker(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    os.environ.update(
        MASTER_ADDR=_HOST,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    import torch

    import modse_megatron  # noqa: F401  (activates the CPU layer when megatron-core imports)
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    timeout = timedelta(seconds=120)
    # The pool's parent serves the store (on a port the OS picked): every rank is a client.
    store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    results.put((rank, "ready", None))
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned: the test process died without closing us
                os._exit(1)
            continue
        if task is None:
            break
        fn, args, kwargs, layout = task
        try:
            init_parallel_state(layout)
            try:
                out = fn(*args, **kwargs)
                # Pickle as the queue will (torch's reducers): a failure must be reported here,
                # not lost in the queue's feeder thread while the parent waits for a timeout.
                ForkingPickler.dumps(out)
            finally:
                destroy_parallel_state()
            results.put((rank, "ok", out))
        except BaseException:  # report everything, including assertion failures
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class DistributedPool:
    """N long-lived gloo worker processes that run tasks under a megatron layout."""

    def __init__(self, world_size: int, start_timeout: float = 180.0):
        self.world_size = world_size
        self._start_timeout = start_timeout
        self._procs: list[mp.Process] = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        # A fresh store per (re)start: a restarted pool never meets the old workers' keys.
        self._store = master_store(_HOST)
        port = self._store.port
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results))
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        try:
            self._collect(self._start_timeout, restart=False)
        except BaseException:
            self.close(kill=True)
            raise

    def _collect(self, timeout: float, restart: bool = True) -> list[Any]:
        deadline = time.monotonic() + timeout
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(out) + len(errors) < self.world_size:
            remaining = deadline - time.monotonic()
            if errors:
                remaining = min(remaining, _GRACE_AFTER_FAILURE_S)
            try:
                rank, status, payload = self._results.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if restart:
                    self._restart()
                if errors:
                    rank = min(errors)
                    raise DistributedTaskError(f"rank {rank} failed:\n{errors[rank]}") from None
                missing = sorted(set(range(self.world_size)) - set(out))
                why = f"ranks {dead} died" if dead else f"ranks {missing} hung past {timeout:.0f}s"
                raise TimeoutError(f"distributed task did not finish: {why}") from None
            if status == "error":
                errors[rank] = payload
            else:
                out[rank] = payload
        if errors:
            rank = min(errors)
            raise DistributedTaskError(f"rank {rank} failed:\n{errors[rank]}")
        return [out[r] for r in range(self.world_size)]

    def run(self, fn: Callable, *args: Any, timeout: float = 120.0, tp: int = 1, pp: int = 1,
            ep: int = 1, etp: int | None = None, seed: int = 1234, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank under the given layout; return per-rank results."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self._restart()
        layout = Layout(tp=tp, pp=pp, ep=ep, etp=etp, seed=seed)
        for q in self._tasks:
            q.put((fn, args, kwargs, layout))
        return self._collect(timeout)

    def _restart(self) -> None:
        self.close(kill=True)
        self._start()

    def close(self, kill: bool = False) -> None:
        """Stop the workers (politely unless ``kill``)."""
        for p, q in zip(self._procs, getattr(self, "_tasks", [])):
            if p.is_alive() and not kill:
                q.put(None)
        for p in self._procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
        self._store = None

