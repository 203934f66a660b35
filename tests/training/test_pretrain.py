"""End-to-end pretraining through real ``torchrun`` launches (2 gloo ranks, tiny MoDSE GPT).

One 1-way run saves a checkpoint; every layout then starts from its weights (``--finetune``)
and must reproduce the 1-way per-iteration losses. Resume, two-"node" launches and bad input
are covered the same way: by running the real entry point.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modse_megatron.testing.ports import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5

TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--num-experts", "4", "--moe-expert-widths", "96,32,80,48", "--moe-ffn-hidden-size", "64",
    "--swiglu", "--disable-bias-linear", "--micro-batch-size", "4", "--global-batch-size", "8",
    "--lr-warmup-iters", "1", "--eval-interval", "100", "--eval-iters", "1", "--no-progress",
    "--split", "80,10,10", "--no-loss-plot",  # the plot (a second of matplotlib per launch): base_run only
]


# A port for launches that must name one up front (racy: such launches retry on
# ``address_in_use``). Single-node launches use ``--standalone`` instead: torchrun binds port 0.
_port = free_port


def pretrain_cmd(args, *, data, nproc=2, launcher=("--standalone",)) -> list[str]:
    """The torchrun command line of ``modse_megatron.pretrain`` on ``data``."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc-per-node", str(nproc),
            "-m", "modse_megatron.pretrain",
            "--data-path", data["prefix"], "--tokenizer", data["tokenizer"], "--data-cache-dir", data["cache"], *args]


def torchrun(args, *, data, nproc=2, timeout=300, extra_launcher=(), env=None):
    """Launch ``modse_megatron.pretrain`` under torchrun; returns the CompletedProcess.

    Single-node (``--standalone``: torchrun picks a free port itself) unless ``extra_launcher``
    gives the rendezvous options."""
    cmd = pretrain_cmd(args, data=data, nproc=nproc, launcher=tuple(extra_launcher) or ("--standalone",))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)


def losses(log_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in rows if "split" not in r}


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory):
    """1-way layout (DP=2): 4 iterations, checkpoint after every one."""
    out = tmp_path_factory.mktemp("base")
    with_plot = [a for a in TINY if a != "--no-loss-plot"]
    ok(torchrun([*with_plot, "--train-iters", "4", "--log-dir", str(out), "--save", str(out / "ckpt"),
                 "--save-interval", "1"], data=data))
    return out


def _checkpoint_at(base_run, iteration, dest):
    """A checkpoint directory holding only ``iteration`` of the base run."""
    dest.mkdir(parents=True)
    os.symlink(base_run / "ckpt" / f"iter_{iteration:07d}", dest / f"iter_{iteration:07d}")
    (dest / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return dest


def test_base_run_trains_and_reports(base_run):
    rows = [json.loads(line) for line in (base_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]
    for r in train:
        assert r["tokens_per_sec"] > 0 and r["lr"] > 0 and "load_balancing_loss" in r
        counts = r["tokens_per_expert"]
        assert set(counts) == {"1", "2"}
        # 8 sequences x 32 tokens x top-2 routed per layer, summed over both DP ranks.
        assert all(sum(c) == 8 * 32 * 2 for c in counts.values())
    assert {r["split"] for r in rows if "split" in r} == {"valid", "test"}
    assert (base_run / "loss.png").stat().st_size > 0
    assert sorted(p.name for p in (base_run / "ckpt").iterdir()) == [
        "iter_0000001", "iter_0000002", "iter_0000003", "iter_0000004", "latest_checkpointed_iteration.txt"]


def _from_start(base_run):
    """Every layout starts from the weights of the base run's first checkpoint."""
    ckpt = base_run / "start"
    if not ckpt.exists():
        _checkpoint_at(base_run, 1, ckpt)
    return [*TINY, "--train-iters", "3", "--load", str(ckpt), "--finetune"]


@pytest.fixture(scope="module")
def one_way(data, base_run):
    out = base_run / "one_way"
    ok(torchrun([*_from_start(base_run), "--log-dir", str(out)], data=data))
    return out


@pytest.mark.parametrize(
    "layout",
    [
        ["--expert-model-parallel-size", "2"],
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        ["--pipeline-model-parallel-size", "2"],
        ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather"],
    ],
    ids=["ep2", "tp2", "pp2", "ep2-allgather"],
)
def test_layouts_match_one_way(data, base_run, one_way, tmp_path, layout):
    other = tmp_path / "other"
    ok(torchrun([*_from_start(base_run), *layout, "--log-dir", str(other)], data=data))
    a, b = losses(one_way), losses(other)
    assert list(a) == list(b) == [1, 2, 3]
    for it in a:
        assert abs(a[it] - b[it]) <= RTOL * abs(a[it]), (it, a[it], b[it])


def test_resume_reproduces_uninterrupted_run(data, base_run, tmp_path):
    ckpt = _checkpoint_at(base_run, 2, tmp_path / "resume")
    out = tmp_path / "resumed"
    ok(torchrun([*TINY, "--train-iters", "4", "--load", str(ckpt), "--log-dir", str(out)], data=data))
    resumed, full = losses(out), losses(base_run)
    assert list(resumed) == [3, 4]
    assert all(resumed[i] == full[i] for i in resumed), (resumed, full)  # bit-exact


def _two_node_attempt(data, args, out_dir, timeout=300, stop_on_failure=True):
    """Both torchrun agents on one port; (returncodes, [(stdout, stderr)]) once both exit.

    A failed agent stops the other (it would wait for its peer until torchrun's timeout) unless
    ``stop_on_failure`` is false (the survivor's own handling is what is tested)."""
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        launcher = ("--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port))
        cmd = pretrain_cmd([*args, "--log-dir", str(out_dir / f"node{rank}")], data=data, nproc=1, launcher=launcher)
        logs.append((out_dir / f"agent{rank}.out", out_dir / f"agent{rank}.err"))
        with open(logs[-1][0], "w") as out, open(logs[-1][1], "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"}))
    deadline = time.monotonic() + timeout
    try:
        while (any(p.poll() is None for p in procs) and time.monotonic() < deadline
               and not (stop_on_failure and any(p.returncode not in (None, 0) for p in procs))):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [p.returncode for p in procs], [(out.read_text(), err.read_text()) for out, err in logs]


# Two torchrun agents on localhost (--nnodes 2): tests/training/test_reliability.py
# test_rank_killed_during_a_save (it trains, saves and names a rank that dies mid-save).


def _error_lines(proc) -> list[str]:
    return [line for line in (proc.stderr + proc.stdout).splitlines() if "modse-pretrain: error:" in line]


@pytest.mark.parametrize(
    "case, expected",
    [
        # one data error and one checkpoint error through torchrun; every other bad input's
        # message is checked in-process (tests/training/test_data.py, test_arguments.py)
        ("missing_data", "does not exist"),
        ("save_holds_run", "already holds checkpoints (latest iteration 7): add --load"),
    ],
)
def test_bad_input_fails_fast_on_every_rank(data, tmp_path, case, expected):
    d = dict(data)
    args = [*TINY, "--train-iters", "2", "--log-dir", str(tmp_path / "log")]
    if case == "missing_data":
        d["prefix"] = str(tmp_path / "nope")
    elif case == "save_holds_run":
        (tmp_path / "save").mkdir()
        (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("7")
        args += ["--save", str(tmp_path / "save")]
    proc = torchrun(args, data=d, timeout=240)
    assert proc.returncode != 0
    lines = _error_lines(proc)
    assert len(lines) == 2, proc.stderr[-3000:]  # one line from each rank, no hang
    assert all(expected in line for line in lines), lines


def test_existing_checkpoint_is_never_overwritten(data, base_run, tmp_path):
    """Saving into a directory that already holds the iteration refuses, leaving it intact."""
    save = tmp_path / "save"
    save.mkdir()
    (save / "iter_0000002").mkdir()
    marker = save / "iter_0000002" / "keep.txt"
    marker.write_text("precious")
    proc = torchrun([*TINY, "--train-iters", "2", "--save", str(save), "--log-dir", str(tmp_path / "l")], data=data)
    assert proc.returncode != 0
    lines = _error_lines(proc)
    assert len(lines) == 2 and all("iter_0000002 already exists" in line for line in lines), proc.stderr[-3000:]
    assert marker.read_text() == "precious"


def test_sigterm_saves_and_stops_cleanly(data, tmp_path):
    """SIGTERM to torchrun reaches every rank; they agree, save a checkpoint and exit."""
    import signal

    log, save = tmp_path / "log", tmp_path / "save"
    cmd = pretrain_cmd([*TINY, "--train-iters", "100000", "--lr-warmup-iters", "1", "--log-dir", str(log),
                        "--save", str(save)], data=data)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    metrics = log / "metrics.jsonl"
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "modse-pretrain: SIGTERM at iteration" in out, err[-3000:]
    saved = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved < 100000
    assert (save / f"iter_{saved:07d}").is_dir()
    assert not list(save.glob("*.tmp"))


def test_bf16_trains_saves_and_resumes_exactly(data, tmp_path):
    """bf16 parameters (fp32 main weights in the distributed optimizer), EP=2, save, resume."""
    args = [*TINY, "--bf16", "--expert-model-parallel-size", "2", "--train-iters", "4"]
    full = tmp_path / "full"
    ok(torchrun([*args, "--log-dir", str(full), "--save", str(full / "ckpt"), "--save-interval", "2"], data=data))
    start = tmp_path / "start"
    start.mkdir()
    os.symlink(full / "ckpt" / "iter_0000002", start / "iter_0000002")
    (start / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = tmp_path / "resumed"
    ok(torchrun([*args, "--log-dir", str(resumed), "--load", str(start)], data=data))
    a, b = losses(full), losses(resumed)
    assert a[4] < a[1]
    assert b == {3: a[3], 4: a[4]}
