"""Keeping a multi-process run honest: no orphan workers, no silent hangs.

* :func:`start_orphan_watchdog` — torchrun starts workers in sessions of their own, so when the
  agent is SIGKILLed (OOM killer, scheduler) they are reparented and keep training and saving,
  racing the next job on the same ``--save``. A daemon thread notices the parent change within
  a second, releases the save lock and ends the worker.
* :class:`CollectiveWatch` — a rank that stops arriving (stuck, stopped, killed) makes the
  others fail in a collective after ``--distributed-timeout-minutes`` with gloo's
  "Timed out waiting ... for recv" or "Connection closed by peer", which names nobody.
  :meth:`CollectiveWatch.diagnose` has every healthy rank check in at the rendezvous store
  (no collective: it works after the process groups failed, on NCCL runs too), so every healthy
  rank prints one line naming the ranks that never checked in.
* :func:`attempt_store` — a clean store namespace per torchrun restart attempt (elastic
  restarts hang in gloo's connection setup without it).
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

_COLLECTIVE_FAILURE = re.compile(
    r"Timed out|timed out|Timeout|Connection closed by peer|Connection reset by peer|Broken pipe|"
    r"NCCL communicator was aborted|Socket Timeout|failed to recv|failed to send", re.S)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


def start_orphan_watchdog(on_orphan: Callable[[], None] = lambda: None, interval_s: float = 1.0) -> threading.Thread | None:
    """End this worker when its launcher (the torchrun agent) is gone. ``on_orphan`` runs first
    (release the save lock). Only under torchrun: a plain ``python -m`` run has no agent."""
    if not launched_by_torchrun():
        return None
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                try:
                    on_orphan()
                finally:
                    line = (f"modse-pretrain: error: the torchrun agent (pid {parent}) is gone: stopping this worker "
                            f"(pid {os.getpid()}) so that it cannot keep writing to --save\n")
                    try:
                        os.write(2, line.encode())
                    finally:
                        os._exit(3)

    thread = threading.Thread(target=watch, name="modse-orphan-watchdog", daemon=True)
    thread.start()
    return thread


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` looks like a collective that timed out or lost a peer."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())) and not isinstance(err, getattr(dist, "DistStoreError", ())):
        return True
    return isinstance(err, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(err)))


class CollectiveWatch:
    """Finds out which ranks stopped answering after a collective failed, through the
    rendezvous store (torchrun's agent hosts it, so it outlives dead workers): every healthy rank
    checks in, waits up to ``probe_seconds`` for the others, and reports who never came."""

    def __init__(self, timeout_minutes: float, probe_seconds: float = 30.0):
        self.timeout_minutes = timeout_minutes
        self.where = "start-up"  # what the run is doing, for the error line (set by the driver)
        self.probe_seconds = probe_seconds
        self.cancelled = False  # set on SIGTERM: the launcher is tearing the job down, do not wait
        self._round = 0

    def diagnose(self) -> list[int] | None:
        """Ranks that did not check in within the probe time (None = cannot tell: no store)."""
        import torch.distributed as dist

        store = _default_store()
        if store is None:
            return None
        rank, world = dist.get_rank(), dist.get_world_size()
        self._round += 1
        key = lambda r: f"modse/checkin/{self._round}/{r}"  # noqa: E731
        try:
            store.set(key(rank), "1")
        except Exception:  # the store itself is gone: it lived in rank 0 (launch without torchrun)
            return [0] if rank != 0 else None
        deadline = time.monotonic() + self.probe_seconds
        missing = [r for r in range(world) if r != rank]
        while missing and time.monotonic() < deadline and not self.cancelled:
            try:
                missing = [r for r in missing if not store.check([key(r)])]
            except Exception:
                return [0] if rank != 0 else None
            if missing:
                time.sleep(0.25)
        return None if self.cancelled else missing

    def explain(self, err: BaseException) -> str:
        """The one-line error for a collective failure ``err`` (during :attr:`where`)."""
        where = self.where
        try:
            missing = self.diagnose()
        except Exception:  # the diagnosis itself must never hide the original problem
            missing = None
        if missing:
            who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
            return (f"{who} stopped responding during {where} (no answer within --distributed-timeout-minutes "
                    f"{self.timeout_minutes:g} + {self.probe_seconds:g} s): check {'their' if len(missing) > 1 else 'its'} "
                    f"log and host (killed, out of memory, stuck); restart from the last checkpoint with --load")
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        answered = "every rank answered the check afterwards" if missing == [] else "the other ranks could not be asked"
        return (f"a collective failed during {where} ({first}); {answered}: restart from the last checkpoint with "
                f"--load, and raise --distributed-timeout-minutes if steps are slow")


def attempt_store(timeout: timedelta):
    """Under torchrun, the agent's store with a prefix per restart attempt (None otherwise).

    torchrun keeps one store for all attempts of a job; gloo's connection setup then finds the
    addresses of the previous attempt's dead workers and the restarted job hangs in
    ``init_process_group`` ("Connect timeout"). A prefix per ``TORCHELASTIC_RESTART_COUNT``
    gives every attempt a clean namespace."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                           is_master=False, timeout=timeout)
    return dist.PrefixStore(f"modse/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def _default_store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


def write_error_line(text: str) -> None:
    """One ``write(2)`` of one line (ranks sharing torchrun's stderr never interleave)."""
    line = text.replace("\n", " ") + "\n"
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an in-memory stream
        sys.stderr.write(line)
        sys.stderr.flush()
        return
    os.write(fd, line.encode("utf-8", "replace"))
