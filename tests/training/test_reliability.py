"""Reliability through the real entry point (torchrun, 2 gloo ranks): checkpoints that cannot run
code, integrity errors, one writer per --save, orphaned workers, NaN blow-ups, hangs, disk-full
saves and elastic restarts."""
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.training.test_pretrain import ROOT, TINY, _error_lines, _port, losses, ok, torchrun  # noqa: F401

pytestmark = pytest.mark.slow

EP2 = [*TINY, "--expert-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """EP=2, 3 iterations, a checkpoint after each (with manifests)."""
    out = tmp_path_factory.mktemp("saved")
    ok(torchrun([*EP2, "--train-iters", "3", "--log-dir", str(out), "--save", str(out / "ckpt"),
                 "--save-interval", "1"], data=data))
    return out


def _copy_latest(saved, dest: Path) -> Path:
    """A private copy of the base run's latest checkpoint (iteration 3) as a --load root."""
    dest.mkdir(parents=True)
    shutil.copytree(saved / "ckpt" / "iter_0000003", dest / "iter_0000003")
    (dest / "latest_checkpointed_iteration.txt").write_text("3")
    return dest / "iter_0000003"


class CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _craft(ckpt: Path, where: str, marker: Path) -> None:
    """Plant an object whose unpickling creates ``marker``, as an attacker editing files would."""
    meta_path = ckpt / ".metadata"
    if where == "rng":  # the RNG ShardedObject inside a .distcp file (DCP BYTE_IO item)
        md = pickle.loads(meta_path.read_bytes())
        for index, info in md.storage_data.items():
            if index.fqn.startswith("rng_state"):
                buf = io.BytesIO()
                torch.save({"random": CreatesFile(marker)}, buf)
                path = ckpt / info.relative_path
                info.offset, info.length = path.stat().st_size, len(buf.getvalue())
                with open(path, "ab") as f:
                    f.write(buf.getvalue())
        meta_path.write_bytes(pickle.dumps(md))
    elif where == "metadata":
        md = pickle.loads(meta_path.read_bytes())
        md.planner_data = CreatesFile(marker)
        meta_path.write_bytes(pickle.dumps(md))
    else:
        common = torch.load(ckpt / "common.pt", weights_only=False)
        common["meta"]["note"] = CreatesFile(marker)
        torch.save(common, ckpt / "common.pt")


# Every place a pickle can hide, through the real --load / --finetune paths (the unpicklers
# themselves: tests/checkpoint/test_safe_load.py).
@pytest.mark.parametrize("where, finetune", [("rng", False), ("common", False), ("metadata", True)],
                         ids=["rng-load", "common-load", "metadata-finetune"])
def test_crafted_checkpoint_is_refused(data, saved, tmp_path, where, finetune):
    ckpt = _copy_latest(saved, tmp_path / "evil")
    marker = tmp_path / "pwned"
    _craft(ckpt, where, marker)
    args = [*EP2, "--train-iters", "4", "--load", str(tmp_path / "evil"), "--no-verify-checkpoint",
            "--log-dir", str(tmp_path / "log"), *(["--finetune"] if finetune else [])]
    proc = torchrun(args, data=data)
    lines = _error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 2, proc.stderr[-3000:]
    assert all("refusing to load" in line and "io.open" in line for line in lines), lines
    assert not marker.exists()


def test_flipped_byte_stops_load(data, saved, tmp_path):
    ckpt = _copy_latest(saved, tmp_path / "ckpt")
    target = max(ckpt.glob("__*.distcp"), key=lambda p: p.stat().st_size)
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    target.write_bytes(bytes(blob))
    proc = torchrun([*EP2, "--train-iters", "4", "--load", str(tmp_path / "ckpt"), "--log-dir", str(tmp_path / "l")],
                    data=data)
    lines = _error_lines(proc)
    assert len(lines) == 2 and all(f"{target.name} does not match its SHA-256" in line for line in lines), lines


def test_second_job_on_locked_save_fails_fast(data, tmp_path):
    holder = subprocess.Popen(["sleep", "120"])
    save = tmp_path / "save"
    save.mkdir()
    (save / ".modse.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "job": "",
                                                  "started": time.time()}))
    try:
        proc = torchrun([*EP2, "--train-iters", "2", "--save", str(save), "--log-dir", str(tmp_path / "l")], data=data)
    finally:
        holder.kill()
        holder.wait()
    lines = _error_lines(proc)
    assert len(lines) == 2 and all(f"is in use by another job (pid {holder.pid}" in line for line in lines), lines
    assert not list(save.glob("iter_*"))


def _launch(data, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
           "-m", "modse_megatron.pretrain", "--data-path", data["prefix"], "--tokenizer", data["tokenizer"],
           "--data-cache-dir", data["cache"], *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _wait_for_rows(proc, metrics: Path, rows: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.3)
    raise AssertionError("training did not start")


def _workers(agent_pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(agent_pid).children()]  # the workers, not their helpers


def test_orphaned_workers_exit_and_release_the_lock(data, tmp_path):
    import psutil

    save, log = tmp_path / "save", tmp_path / "log"
    proc = _launch(data, [*EP2, "--train-iters", "100000", "--save", str(save), "--log-dir", str(log)])
    _wait_for_rows(proc, log / "metrics.jsonl", 2)
    workers = _workers(proc.pid)
    assert len(workers) == 2 and (save / ".modse.lock").exists()
    os.kill(proc.pid, signal.SIGKILL)  # the agent dies (OOM killer, scheduler)
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                              for p in workers):
        time.sleep(0.2)
    alive = [p for p in workers if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "orphaned workers kept running"
    assert not (save / ".modse.lock").exists()


def test_nan_stops_with_one_line_and_no_later_checkpoint(data, tmp_path):
    save = tmp_path / "save"
    proc = torchrun([*EP2, "--train-iters", "5", "--save", str(save), "--save-interval", "1",
                     "--debug-nonfinite-at", "3", "--log-dir", str(tmp_path / "l")], data=data)
    lines = _error_lines(proc)
    assert len(lines) == 2, proc.stderr[-3000:]
    assert all("non-finite loss or gradients at iteration 3" in line and "iter_0000002" in line for line in lines)
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001", "iter_0000002"]


def test_skip_nonfinite_steps_skips_and_continues(data, tmp_path):
    log = tmp_path / "l"
    ok(torchrun([*EP2, "--train-iters", "4", "--debug-nonfinite-at", "2", "--skip-nonfinite-steps", "1",
                 "--log-dir", str(log)], data=data))
    rows = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    train = {r["iteration"]: r for r in rows if "split" not in r and "lm_loss" in r}
    assert train[2]["lm_loss"] is None and train[2]["skipped"] and train[2]["skipped_nonfinite"] == 1
    assert train[3]["skipped"] is False and train[4]["lm_loss"] is not None


def test_hang_is_named_within_timeout(data, tmp_path):
    """Rank 1 stops (SIGSTOP: stuck in a collective as far as rank 0 can tell); rank 0 names it
    within the timeout + 60 s."""
    log, err_path = tmp_path / "l", tmp_path / "err.txt"
    with open(err_path, "w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
             "-m", "modse_megatron.pretrain", "--data-path", data["prefix"], "--tokenizer", data["tokenizer"],
             "--data-cache-dir", data["cache"], *EP2, "--train-iters", "100000", "--distributed-timeout-minutes", "0.1",
             "--log-dir", str(log)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_f, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            _wait_for_rows(proc, log / "metrics.jsonl", 2)
            workers = sorted(_workers(proc.pid))
            os.kill(workers[1], signal.SIGSTOP)  # global rank 1 starts second
            start = time.monotonic()
            lines: list[str] = []
            while not lines and time.monotonic() - start < 6 + 60:
                time.sleep(0.5)
                lines = [line for line in err_path.read_text().splitlines() if "modse-pretrain: error:" in line]
        finally:
            for pid in _workers(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    assert lines and all("rank 1 stopped responding during iteration" in line for line in lines), err_path.read_text()[-3000:]


def test_rank_killed_during_a_save_is_named(data, tmp_path):
    """Two torchrun agents (two "nodes" on localhost, one rank each) rendezvous and train;
    rank 1 dies in the middle of the save of iteration 2. Its agent ends; the other node's rank
    names it within the timeout + 60 s instead of waiting, removes the partial checkpoint and
    leaves iteration 1 intact."""
    from modse_megatron.testing.ports import address_in_use
    from modse_megatron.training.checkpointing import verify_checkpoint
    from tests.training.test_pretrain import _two_node_attempt

    for attempt in range(3):  # the two agents are told one port up front: retry if it was taken
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        save = out / "save"
        args = [*EP2, "--train-iters", "4", "--save-interval", "1", "--save", str(save),
                "--distributed-timeout-minutes", "0.1", "--debug-die-during-save", "2"]  # the last rank: 1
        start = time.monotonic()
        codes, outs = _two_node_attempt(data, args, out, timeout=240, stop_on_failure=False)
        elapsed = time.monotonic() - start
        if not any(address_in_use(o + e) for o, e in outs):
            break
    (out0, err0), (_, err1) = outs
    assert "world 2 (cpu), TP 1 PP 1 EP 2 DP 2" in out0, out0[-2000:] + err0[-3000:]
    assert list(losses(out / "node0")) == [1, 2]  # global rank 0 (node 0) writes the metrics
    lines = [line for line in err0.splitlines() if "modse-pretrain: error:" in line]
    assert codes[0] != 0 and codes[1] != 0, (codes, err0[-3000:], err1[-3000:])
    assert len(lines) == 1 and "rank 1 stopped responding during the save of iteration 2" in lines[0], err0[-3000:]
    assert elapsed < 6 + 60 + 60, elapsed  # the timeout + 60 s, plus start-up
    # no partial iter_0000002(.tmp), and the lock was released
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"], list(save.iterdir())
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"
    verify_checkpoint(save / "iter_0000001")  # the last complete checkpoint is intact


def test_elastic_restart_reproduces_uninterrupted_run(data, tmp_path):
    """torchrun --max-restarts 1, --load = --save: a worker is SIGKILLed after the first save;
    the job restarts from the last checkpoint by itself and ends with the uninterrupted losses."""
    args = [*EP2, "--train-iters", "24", "--save-interval", "8"]
    ref = tmp_path / "ref"
    ok(torchrun([*args, "--log-dir", str(ref), "--save", str(ref / "ckpt")], data=data))
    save, log = tmp_path / "save", tmp_path / "log"
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:  # files: no pipe for a straggler to hold
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
             "--master-port", str(_port()), "-m", "modse_megatron.pretrain", "--data-path", data["prefix"],
             "--tokenizer", data["tokenizer"], "--data-cache-dir", data["cache"], *args, "--save", str(save),
             "--load", str(save), "--log-dir", str(log)],
            cwd=ROOT, stdout=out_f, stderr=err_f, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (save / "iter_0000008").exists():
            assert proc.poll() is None, err_path.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(sorted(_workers(proc.pid))[1], signal.SIGKILL)
        try:
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                for pid in _workers(proc.pid):
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "starting at iteration 8" in out or "starting at iteration 16" in out, out[-2000:]
    resumed, full = losses(log), losses(ref)
    assert resumed == full, (resumed, full)  # bit-exact: data position and RNG restored


# ---------------------------------------------------------------------------- disk full
def _save_with_full_disk(root):
    """Save iteration 1, then iteration 2 with every write failing with ENOSPC on rank 1."""
    import errno

    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from modse_megatron.checkpoint.errors import CheckpointError
    from modse_megatron.platform.megatron_0_16.fixes import materialize_optimizer_state
    from modse_megatron.training import checkpointing
    from modse_megatron.training.arguments import parse_args
    from modse_megatron.training.model import build_model, transformer_config, wrap_and_optimize

    args = parse_args([*EP2, "--train-iters", "2"])
    config = transformer_config(args)
    ddp, optimizer, scheduler = wrap_and_optimize(args, config, build_model(args, config, 256))
    materialize_optimizer_state(optimizer)  # as after a first step (megatron asserts on steps)
    checkpointing.save_checkpoint(root, 1, ddp, optimizer, scheduler, {"consumed_samples": 8})
    import functools

    original = filesystem_async._write_item

    @functools.wraps(original)  # megatron inspects its signature
    def full_disk(*a, **k):
        if dist.get_rank() == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*a, **k)

    filesystem_async._write_item = full_disk
    try:
        checkpointing.save_checkpoint(root, 2, ddp, optimizer, scheduler, {"consumed_samples": 16})
    except CheckpointError as err:
        return str(err)
    finally:
        filesystem_async._write_item = original
    return None


def test_disk_full_during_save_keeps_earlier_checkpoints(dist2, tmp_path):
    root = tmp_path / "save"
    messages = dist2.run(_save_with_full_disk, str(root), ep=2, timeout=180)
    for message in messages:
        assert message and "No space left on device" in message and "\n" not in message, messages
        assert "the partial checkpoint was removed" in message and "iter_0000001" in message
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "1"
    from modse_megatron.training.checkpointing import verify_checkpoint

    verify_checkpoint(root / "iter_0000001")  # still complete and intact
