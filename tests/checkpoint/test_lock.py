"""One writer per --save directory: a live holder refuses, a stale one is taken over."""
import json
import os
import subprocess
import time

import pytest

from modse_megatron.checkpoint.lock import LOCK_NAME, SaveDirLockedError, SaveLock


def _write_lock(d, **holder):
    body = {"host": os.uname().nodename, "pid": os.getpid(), "job": "", "started": time.time(), **holder}
    (d / LOCK_NAME).write_text(json.dumps(body))
    return d / LOCK_NAME


def test_acquire_release(tmp_path):
    lock = SaveLock(tmp_path / "save", 600).acquire()
    held = json.loads((tmp_path / "save" / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and lock.message is None
    lock.heartbeat()
    lock.release()
    assert not (tmp_path / "save" / LOCK_NAME).exists()


def test_live_holder_refuses(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        path = _write_lock(tmp_path, pid=holder.pid, job="TORCHELASTIC_RUN_ID=other")
        with pytest.raises(SaveDirLockedError, match=rf"in use by another job \(pid {holder.pid} on .*TORCHELASTIC_RUN_ID=other"):
            SaveLock(tmp_path, 600).acquire()
        assert json.loads(path.read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_dead_pid_is_taken_over(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    _write_lock(tmp_path, pid=gone.pid)
    lock = SaveLock(tmp_path, 600).acquire()
    assert "its process is gone" in lock.message
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_other_host_needs_timeout(tmp_path):
    path = _write_lock(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(SaveDirLockedError, match="on elsewhere"):
        SaveLock(tmp_path, 600).acquire()
    old = time.time() - 700
    os.utime(path, (old, old))
    lock = SaveLock(tmp_path, 600).acquire()
    assert "no heartbeat for 70" in lock.message
    lock.release()


def test_same_job_restart_takes_over(tmp_path, monkeypatch):
    """An elastic restart: the lock of an earlier attempt of the same torchrun job on another
    host (fresh heartbeat) is taken over."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    _write_lock(tmp_path, host="elsewhere", pid=1, job="TORCHELASTIC_RUN_ID=job42", restarts=0)
    lock = SaveLock(tmp_path, 600).acquire()
    assert "elastic restart" in lock.message
    lock.release()


def test_same_job_id_never_takes_a_live_lock(tmp_path, monkeypatch):
    """Two jobs launched with the same rendezvous id: the second must not steal the lock."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "modse")
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(tmp_path, pid=holder.pid, job="TORCHELASTIC_RUN_ID=modse")
        with pytest.raises(SaveDirLockedError):
            SaveLock(tmp_path, 600).acquire()
        _write_lock(tmp_path, host="elsewhere", pid=1, job="TORCHELASTIC_RUN_ID=modse", restarts=0)
        with pytest.raises(SaveDirLockedError):  # same attempt number on another host: a live job
            SaveLock(tmp_path, 600).acquire()
    finally:
        holder.kill()
        holder.wait()
