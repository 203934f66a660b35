"""One writer per ``--save`` directory.

Two jobs saving into one directory race (``iter_N already exists``) or interleave checkpoints;
the typical cause is a restarted job while the workers of the old one still run. The first job
creates ``SAVE/.modse.lock`` (host, pid, job id, start time) with ``O_EXCL``; rank 0 refreshes
its mtime while it runs (the heartbeat) and removes it at the end. Another job:

* fails at once naming the holder, if the holder is alive;
* takes the lock over, with a message, when it is stale: the holder's pid is dead on this
  host, the holder (on another host) is an earlier restart attempt of the same torchrun/SLURM
  job, or its heartbeat is older than ``--save-lock-timeout`` (a holder on another host). A live
  holder on this host is never taken over, even with the same job id.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from modse_megatron.checkpoint.errors import CheckpointError

LOCK_NAME = ".modse.lock"


class SaveDirLockedError(CheckpointError):
    """Another live job holds the save directory."""


def job_id() -> str:
    """The launcher's id of this job: torchrun's run id (same across elastic restarts),
    SLURM's job id, or empty."""
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            return f"{var}={value}"
    return ""


@dataclass
class Holder:
    host: str
    pid: int
    job: str
    started: float
    restarts: int = 0

    @staticmethod
    def me() -> "Holder":
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        return Holder(socket.gethostname(), os.getpid(), job_id(), time.time(), restarts)

    def describe(self) -> str:
        job = f" ({self.job})" if self.job else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}{job}, started {since}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class SaveLock:
    """The lock of one save directory, held by this process (global rank 0)."""

    def __init__(self, save_dir: str | os.PathLike, timeout_s: float):
        self.dir = Path(save_dir)
        self.path = self.dir / LOCK_NAME
        self.timeout_s = timeout_s
        self.me = Holder.me()
        self.held = False
        self.message: str | None = None  # what a takeover said, for the log

    # ------------------------------------------------------------------ taking
    def acquire(self) -> "SaveLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._create():
            return self
        holder, age = self._read()
        stale = self._stale_reason(holder, age)
        if stale is None:
            raise SaveDirLockedError(
                f"--save {self.dir} is in use by another job ({holder.describe()}, heartbeat {age:.0f} s ago): wait for it "
                f"or stop it, choose another --save, or remove {self.path} if you are sure it is dead")
        self._take_over()
        self.message = f"took over the stale lock of {self.dir} ({stale}: {holder.describe()})"
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.me), f)
        self.held = True
        return True

    def _read(self) -> tuple[Holder, float]:
        try:
            age = time.time() - self.path.stat().st_mtime
            data = json.loads(self.path.read_text())
            return Holder(**{k: data[k] for k in ("host", "pid", "job", "started")},
                          restarts=int(data.get("restarts", 0))), age
        except (OSError, ValueError, KeyError, TypeError):
            # unreadable (a half-written lock of a killed job): stale once old enough
            return Holder("?", -1, "", 0.0), self._age_or_zero()

    def _age_or_zero(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")

    def _stale_reason(self, holder: Holder, age: float) -> str | None:
        if holder.host == self.me.host and holder.pid > 0:
            return None if _pid_alive(holder.pid) else "its process is gone"
        if holder.job and holder.job == self.me.job and holder.restarts < self.me.restarts:
            # another host, same torchrun/SLURM job, an earlier attempt: torchrun only restarts
            # after stopping every worker of the previous attempt
            return "an earlier attempt of this job (elastic restart)"
        if age > self.timeout_s:
            return f"no heartbeat for {age:.0f} s (> --save-lock-timeout {self.timeout_s:.0f})"
        return None

    def _take_over(self) -> None:
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.me.host}.{self.me.pid}.tmp")
        tmp.write_text(json.dumps(asdict(self.me)))
        os.replace(tmp, self.path)
        time.sleep(0.05)  # two jobs taking over at once: the later rename wins, the other sees it
        holder, _ = self._read()
        if (holder.host, holder.pid) != (self.me.host, self.me.pid):
            raise SaveDirLockedError(f"--save {self.dir} was just taken by another job ({holder.describe()}): "
                                     f"choose another --save or stop that job")
        self.held = True

    # ------------------------------------------------------------------ holding
    def heartbeat(self) -> None:
        """Refresh the lock's mtime (cheap; call every step or so)."""
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder, _ = self._read()
        if (holder.host, holder.pid) == (self.me.host, self.me.pid):
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
