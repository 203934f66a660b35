"""Kill soak: SIGKILL of the whole pretraining job at random moments, each followed by a resume.

The resumed runs must end exactly like an uninterrupted one, with nothing left behind.

Protocol: a tiny MoDSE GPT (2 layers, 4 experts of widths 96,32,80,48, EP=2 on 2 gloo ranks, the
test suite's TINY model) on a small corpus made here with ``modse_megatron.training.preprocess``
(60 stdlib modules, BPE 512), ``--iters`` iterations with a checkpoint every ``--save-interval``.

1. Uninterrupted reference runs (``--load = --save``, same flags; ``--jobs`` of them side by side,
   whose losses must agree). Their timelines give the kill window: from the moment the first
   checkpoint is complete (tracker file written) to the moment the final one is.
2. ``--trials`` times (``--jobs`` at a time): launch the same run in a fresh directory; once its
   first checkpoint is complete, wait ``u * window`` (``u`` uniform in [0, 1) from
   ``random.Random(--seed)``), then SIGKILL the torchrun agent (its process group) and every
   worker (workers run in sessions of their own, so they are listed with psutil and killed by
   pid), all at once. Then resume with the same command (``--load = --save``) and let it run to
   the end.
3. Per trial: resumed (exit code 0 and "finished at iteration N"); lost iterations (the last
   iteration logged before the kill minus the iteration the resume started from; at most the save
   interval); losses (metrics.jsonl, the last row per iteration since a resumed run appends: every
   train loss from the resume point on and the final valid/test losses equal the reference's,
   bit for bit); leftovers (no ``iter_*.tmp`` and no ``.modse.lock`` after the resume, and no
   process of the trial's launches alive afterwards: every launch carries an environment tag, the
   survivors found by it are killed and counted).

Targets: every trial resumed, nothing lost beyond the save interval, final losses equal,
no leftovers. Prints one JSON object (progress lines go to stderr). Almost all the time is start-up
of the 42 launches (10-20 s each: imports, rendezvous, teardown), which is why two trials run at
once by default; the default (20 trials, 15 iterations) takes about 10 minutes on 2 idle cores
(15-17 minutes measured with other jobs loading the machine), ``--quick`` (3 trials of 10
iterations) about 3.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TAG_VAR = "MODSE_KILL_SOAK_TAG"
TRACKER = "latest_checkpointed_iteration.txt"
LOCK = ".modse.lock"
# How long the processes of a killed (or finished) launch may take to go away before they count
# as strays (workers' orphan watchdogs poll every second; helpers end when their pipes close).
STRAY_GRACE_S = 10.0

# tests/training/test_pretrain.py's TINY model, expert parallel over both ranks.
TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--num-experts", "4", "--moe-expert-widths", "96,32,80,48", "--moe-ffn-hidden-size", "64",
    "--swiglu", "--disable-bias-linear", "--micro-batch-size", "4", "--global-batch-size", "8",
    "--lr-warmup-iters", "1", "--eval-iters", "1", "--no-progress", "--split", "80,10,10",
    "--expert-model-parallel-size", "2",
]


_PORTS: set[int] = set()
_PORTS_LOCK = threading.Lock()


def _port() -> int:
    """A free port, never the same twice in this process (concurrent trials)."""
    with _PORTS_LOCK:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _PORTS:
                _PORTS.add(port)
                return port


def make_corpus(root: Path) -> dict[str, str]:
    """A small real corpus (stdlib sources, BPE 512), as the tests' ``data`` fixture makes it."""
    from modse_megatron.testing.corpus import small_stdlib_corpus

    return small_stdlib_corpus(root)


# ---------------------------------------------------------------------------- processes
def launch(run_args: list[str], out_dir: Path, name: str, tag: str) -> subprocess.Popen:
    """torchrun (2 ranks) of the pretraining driver in a new session; output to files (no pipe
    that a straggler could hold open)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
           "-m", "modse_megatron.pretrain", *run_args]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.out", "w") as out, open(out_dir / f"{name}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", TAG_VAR: tag})


def tagged(prefix: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries a tag starting with ``prefix``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TAG_VAR, "").startswith(prefix):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def reap_strays(prefix: str, grace_s: float) -> list[dict]:
    """Wait up to ``grace_s`` for every tagged process to end; SIGKILL and describe survivors."""
    deadline = time.monotonic() + grace_s
    alive = tagged(prefix)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = tagged(prefix)
    strays = []
    for proc in alive:
        try:
            strays.append({"pid": proc.pid, "cmdline": " ".join(proc.cmdline())[:200]})
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return strays


def kill_job(proc: subprocess.Popen) -> dict:
    """SIGKILL the torchrun agent and all its workers at once (an OOM killer or a scheduler)."""
    try:
        agent = psutil.Process(proc.pid)
        workers = agent.children()
        tree = agent.children(recursive=True)
    except psutil.NoSuchProcess:
        workers, tree = [], []
    for kill in [lambda: os.killpg(proc.pid, signal.SIGKILL),  # the agent (session leader) and its group
                 *[(lambda w=w: os.kill(w.pid, signal.SIGKILL)) for w in workers]]:
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    return {"workers": len(workers), "tree": len(tree) + 1}


def stop(proc: subprocess.Popen) -> None:
    """Kill a launch that is still running (timeouts, errors); survivors are counted later."""
    if proc.poll() is None:
        kill_job(proc)


# ---------------------------------------------------------------------------- files
def tracker(save: Path) -> int | None:
    try:
        text = (save / TRACKER).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def read_metrics(log_dir: Path) -> tuple[dict[int, float], dict[tuple[str, int], float], int]:
    """Train losses (last row per iteration: a resumed run appends), eval losses per
    (split, iteration) (last row), and the number of unreadable lines."""
    train, evals, bad = {}, {}, 0
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return train, evals, bad
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if "split" in row:
            evals[(row["split"], row["iteration"])] = row["lm_loss"]
        else:
            train[row["iteration"]] = row["lm_loss"]
    return train, evals, bad


def tail(path: Path, chars: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------------------- runs
def reference_runs(args_of, work: Path, iters: int, tag: str, timeout: float, count: int) -> dict:
    """``count`` uninterrupted runs side by side (as many as trials run at once, so the kill
    window is measured under the same load); their timelines give the kill window and their
    losses, which must agree with each other, are the reference."""
    dirs = [work / f"ref{j}" for j in range(count)]
    start = time.monotonic()
    procs = [launch(args_of(d / "save", d / "log"), d, "run", f"{tag}{j}") for j, d in enumerate(dirs)]
    first: list[float | None] = [None] * count
    final: list[float | None] = [None] * count
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() - start < timeout:
            now = time.monotonic()
            for j, d in enumerate(dirs):
                it = tracker(d / "save")
                if it is not None and first[j] is None:
                    first[j] = now
                if it == iters and final[j] is None:
                    final[j] = now
            time.sleep(0.01)
    finally:
        for j, p in enumerate(procs):
            stop(p)
    wall = time.monotonic() - start
    for j, (p, d) in enumerate(zip(procs, dirs)):
        if p.returncode != 0 or first[j] is None or final[j] is None:
            raise SystemExit(f"kill_soak: reference run {j} failed (exit {p.returncode}):\n{tail(d / 'run.err')}")
    runs = [read_metrics(d / "log")[:2] for d in dirs]
    train, evals = runs[0]
    if len(train) != iters or not all(r == runs[0] for r in runs):
        raise SystemExit(f"kill_soak: the uninterrupted reference runs disagree or are incomplete: {runs}")
    windows = [b - a for a, b in zip(first, final)]
    return {"train": train, "evals": evals, "window_s": statistics.mean(windows), "wall_s": wall,
            "first_save_s": statistics.mean(a - start for a in first), "strays": reap_strays(tag, STRAY_GRACE_S)}


def trial(index: int, u: float, ref: dict, args_of, work: Path, iters: int, tag: str,
          timeout: float) -> dict:
    tdir = work / f"trial{index:02d}"
    save, log = tdir / "save", tdir / "log"
    run_args = args_of(save, log)
    rec: dict = {"trial": index, "kill_delay_s": round(u * ref["window_s"], 3)}
    t0 = time.monotonic()

    # -- the run that is killed
    proc = launch(run_args, tdir, "killed", f"{tag}a")
    try:
        deadline = time.monotonic() + timeout
        while tracker(save) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if tracker(save) is None:
            rec["error"] = f"no first checkpoint (exit {proc.poll()}): {tail(tdir / 'killed.err', 1500)}"
        kill_at = time.monotonic() + u * ref["window_s"]
        while proc.poll() is None and time.monotonic() < kill_at:
            time.sleep(0.005)
        rec["ended_before_kill"] = proc.poll() is not None
        rec["killed_during_save"] = bool(list(save.glob("iter_*.tmp")))  # a save was in flight
        if not rec["ended_before_kill"]:
            rec.update(kill_job(proc))
    finally:
        stop(proc)
    train_before, _, _ = read_metrics(log)
    rec["done_before_kill"] = max(train_before, default=0)
    rec["checkpoint_at_kill"] = tracker(save)
    rec["tmp_left_by_kill"] = len(list(save.glob("iter_*.tmp")))
    rec["lock_left_by_kill"] = (save / LOCK).exists()
    t_kill = time.monotonic()
    strays_kill = reap_strays(f"{tag}a", STRAY_GRACE_S)
    rec["tree_gone_after_s"] = round(time.monotonic() - t_kill, 2)  # every process of the killed launch ended

    # -- the resume, to the end
    proc = launch(run_args, tdir, "resumed", f"{tag}b")
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rec["error"] = f"resume did not finish within {timeout:.0f} s"
    finally:
        stop(proc)
    strays_resume = reap_strays(f"{tag}b", STRAY_GRACE_S)
    out = (tdir / "resumed.out").read_text(errors="replace")
    start = re.search(r"starting at iteration (\d+)", out)
    rec["resume_exit_code"] = proc.returncode
    rec["resumed_from"] = int(start.group(1)) if start else None
    rec["resumed"] = proc.returncode == 0 and f"finished at iteration {iters}" in out
    rec["lost_iterations"] = rec["done_before_kill"] - rec["resumed_from"] if start else None
    rec["resumed_from_latest_checkpoint"] = rec["resumed_from"] == (rec["checkpoint_at_kill"] or 0)

    train, evals, bad = read_metrics(log)
    k = rec["resumed_from"] if start else 0
    train_equal = all(train.get(i) == ref["train"][i] for i in range(k + 1, iters + 1))
    finals = [(s, iters) for s in ("valid", "test")]
    evals_equal = all(key in ref["evals"] and evals.get(key) == ref["evals"][key] for key in finals)
    rec["final_losses_equal"] = bool(rec["resumed"] and train_equal and evals_equal)
    rec["all_iterations_equal"] = all(train.get(i) == ref["train"][i] for i in range(1, iters + 1))
    if bad:
        rec["unreadable_metric_lines"] = bad
    if not rec["final_losses_equal"] and rec["resumed"]:
        rec["loss_diffs"] = {i: [train.get(i), ref["train"][i]] for i in range(k + 1, iters + 1)
                             if train.get(i) != ref["train"][i]}
        rec["final_evals"] = {s: [evals.get((s, iters)), ref["evals"].get((s, iters))] for s, _ in finals}

    rec["tmp_after_resume"] = len(list(save.glob("iter_*.tmp")))
    rec["lock_after_resume"] = (save / LOCK).exists()
    rec["strays_after_kill"] = len(strays_kill)
    rec["strays_after_resume"] = len(strays_resume)
    if strays_kill or strays_resume:
        rec["strays"] = strays_kill + strays_resume
    rec["leftovers"] = bool(rec["tmp_after_resume"] or rec["lock_after_resume"] or strays_kill or strays_resume)
    rec["wall_s"] = round(time.monotonic() - t0, 2)
    if not (rec["resumed"] and rec["final_losses_equal"]) or rec.get("error"):
        rec["resumed_err_tail"] = tail(tdir / "resumed.err")
        rec["resumed_out_tail"] = tail(tdir / "resumed.out", 1000)
        rec["killed_err_tail"] = tail(tdir / "killed.err", 1500)
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=None, help="kill/resume trials (default 20, --quick 3)")
    parser.add_argument("--iters", type=int, default=None, help="training iterations (default 15, --quick 10)")
    parser.add_argument("--save-interval", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    parser.add_argument("--quick", action="store_true", help="3 trials of 10 iterations")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per launch before it counts as hung")
    parser.add_argument("--jobs", type=int, default=2, help="trials run side by side (default 2: a launch is "
                        "mostly start-up, 2 at a time use 2 cores better)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (runs, logs, checkpoints)")
    args = parser.parse_args()
    trials = args.trials if args.trials is not None else (3 if args.quick else 20)
    iters = args.iters if args.iters is not None else (10 if args.quick else 15)
    if iters <= args.save_interval:
        parser.error("--iters must exceed --save-interval (the kill window starts at the first save)")

    started = time.monotonic()
    tag = f"kill-soak-{uuid.uuid4().hex[:12]}-"
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="modse_kill_soak_"))
    work.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    try:
        data = make_corpus(work / "data")

        def args_of(save: Path, log: Path) -> list[str]:
            return ["--data-path", data["prefix"], "--tokenizer", data["tokenizer"], "--data-cache-dir", data["cache"],
                    *TINY, "--train-iters", str(iters), "--eval-interval", str(iters + 1),
                    "--save-interval", str(args.save_interval), "--save", str(save), "--load", str(save),
                    "--log-dir", str(log)]

        ref = reference_runs(args_of, work, iters, f"{tag}ref", args.timeout, args.jobs)
        rng = random.Random(args.seed)
        moments = [rng.random() for _ in range(trials)]  # drawn up front: the same for any --jobs

        def one(i: int) -> dict:
            try:
                rec = trial(i, moments[i], ref, args_of, work, iters, f"{tag}{i:02d}", args.timeout)
            except Exception as err:  # a bug here must not hide the other trials' results
                rec = {"trial": i, "error": f"{type(err).__name__}: {err}", "resumed": False, "final_losses_equal": False,
                       "all_iterations_equal": False, "resumed_from_latest_checkpoint": False, "lost_iterations": None,
                       "done_before_kill": None, "checkpoint_at_kill": None, "resumed_from": None,
                       "killed_during_save": False, "ended_before_kill": False, "tmp_after_resume": 0,
                       "lock_after_resume": False, "strays_after_kill": 0, "strays_after_resume": 0,
                       "leftovers": True, "wall_s": 0.0}
            print(f"kill_soak: trial {i}: killed after {rec['done_before_kill']} (checkpoint {rec['checkpoint_at_kill']}"
                  f"{', mid-save' if rec['killed_during_save'] else ''}), resumed from {rec['resumed_from']}: "
                  f"{'ok' if rec['resumed'] else 'FAILED'}, losses {'equal' if rec['final_losses_equal'] else 'DIFFER'}"
                  f"{', leftovers' if rec['leftovers'] else ''} ({rec['wall_s']} s)", file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(work / f"trial{i:02d}" / "save", ignore_errors=True)
            return rec

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            records.extend(pool.map(one, range(trials)))
    finally:
        strays_at_exit = reap_strays(tag, 0)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    resumed = sum(r["resumed"] for r in records)
    lost = [r["lost_iterations"] for r in records]
    known_lost = [x for x in lost if x is not None]
    equal = sum(r["final_losses_equal"] for r in records)
    leftovers = {
        "tmp_dirs_after_resume": sum(r["tmp_after_resume"] for r in records),
        "lock_files_after_resume": sum(r["lock_after_resume"] for r in records),
        "stray_processes_after_kill": sum(r["strays_after_kill"] for r in records),
        "stray_processes_after_resume": sum(r["strays_after_resume"] for r in records),
        "stray_processes_after_reference": len(ref["strays"]),
        "stray_processes_at_exit": len(strays_at_exit),
        "trials_with_leftovers": sum(r["leftovers"] for r in records),
    }
    targets = {
        f"resumed_{trials}_of_{trials}": resumed == trials,
        "nothing_lost_beyond_save_interval": len(known_lost) == trials and max(known_lost, default=0) <= args.save_interval,
        "final_losses_equal": equal == trials,
        "no_leftovers": leftovers["trials_with_leftovers"] == 0 and not strays_at_exit and not ref["strays"],
    }
    keep_keys = ("trial", "kill_delay_s", "workers", "tree", "tree_gone_after_s", "done_before_kill", "checkpoint_at_kill",
                 "killed_during_save", "ended_before_kill", "resumed_from", "lost_iterations", "resumed", "final_losses_equal", "wall_s")
    print(json.dumps({
        "benchmark": "kill_soak",
        "targets": targets,
        "meets_targets": all(targets.values()),
        "trials": trials,
        "trials_resumed": resumed,
        "lost_iterations": lost,
        "max_lost_iterations": max(known_lost, default=None),
        "trials_resumed_from_latest_checkpoint": sum(r["resumed_from_latest_checkpoint"] for r in records),
        "final_losses_equal": equal == trials,
        "trials_final_losses_equal": equal,
        "trials_all_iterations_equal": sum(r["all_iterations_equal"] for r in records),
        "leftovers": leftovers,
        "kills": {
            "killed_at_iteration": [r["done_before_kill"] for r in records],
            "resumed_from": [r["resumed_from"] for r in records],
            "during_save": sum(r["killed_during_save"] for r in records),
            "after_run_ended": sum(r["ended_before_kill"] for r in records),
            "window_s": round(ref["window_s"], 3),
            "reference_first_save_s": round(ref["first_save_s"], 2),
        },
        "wall_time_s": round(time.monotonic() - started, 1),
        "trial_wall_s_median": round(statistics.median(r["wall_s"] for r in records), 2) if records else None,
        "reference_wall_s": round(ref["wall_s"], 2),
        "config": {
            "model": "TINY (tests/training/test_pretrain.py), EP 2, 2 gloo ranks (torchrun)",
            "train_iters": iters, "save_interval": args.save_interval, "seed": args.seed,
            "corpus": "60 stdlib modules, BPE 512 (modse_megatron.training.preprocess)",
            "kill": "SIGKILL agent process group + every worker pid, uniform in [first save, final save] of the reference",
            "jobs": args.jobs,
        },
        "trial_details": [{k: r.get(k) for k in keep_keys} for r in records],
        "failures": [r for r in records if not r["resumed"] or not r["final_losses_equal"] or r["leftovers"]
                     or (r["lost_iterations"] or 0) > args.save_interval or r.get("error")],
    }))


if __name__ == "__main__":
    main()
