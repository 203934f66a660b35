"""Re-planning in a real run: per-rank expert busy time before and after a migration, under
routing skewed on purpose.

Protocol: ``modse-pretrain`` on 2 gloo ranks (EP 2, the built-in corpus), a tiny MoDSE model
whose experts dominate the step (hidden 256, the paper's 8 widths x 128 = 1152 ... 64, top-2,
no aux loss), every MoE layer starting from megatron's contiguous placement (logical experts
0-3 on rank 0, 4-7 on rank 1: equal memory, the pairs 4.5+0.5 and 4+1 on rank 0).
``--debug-router-logit-bias`` adds ``--bias`` to the router logits of the two largest experts
(0 and 2, both on rank 0), so rank 0 does most of the expert work. Two launches of ``--iters``
steps, alternating ``--rounds`` times:

* ``static``: no re-planning;
* ``replan``: ``--moe-replan-interval --interval`` (``--moe-replan-max-move 1``: with 8 experts
  at EP 2 the smallest equal-memory move is half of them), so the planner migrates at step
  ``--interval`` (and later only if it pays).

Per run and phase (steps 2..interval = before, interval+2..end = after; the first step of
each phase warms up): every rank's mean expert forward seconds per step
(``expert_seconds_per_rank``, :mod:`modse_megatron.training.expert_time`), their max / mean, the
logged per-layer compute imbalance (``compute_layer_max_over_mean``, Σ tokens x width) and the
median tokens per second. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128",
         "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm", "--num-experts", "8",
         "--moe-ffn-hidden-size", "640", "--moe-expert-size-preset", "paper8", "--moe-router-topk", "2",
         "--moe-aux-loss-coeff", "0", "--expert-model-parallel-size", "2", "--moe-expert-placement", "contiguous",
         "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "1e-3", "--lr-warmup-iters", "1"]


def launch(extra: list[str], iters: int, bias: float, log_dir: Path) -> list[dict]:
    skew = ",".join(str(bias if e in (0, 2) else 0.0) for e in range(8))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "modse_megatron.pretrain", *MODEL, "--train-iters", str(iters), "--eval-interval", str(iters + 1),
           "--eval-iters", "1", "--no-progress", "--no-loss-plot", "--log-dir", str(log_dir),
           "--debug-router-logit-bias", skew, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"pretrain run failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def phase(rows: list[dict], first: int, last: int) -> dict:
    steps = [r for r in rows if "event" not in r and "split" not in r and first <= r["iteration"] <= last]
    busy = [statistics.fmean(r["expert_seconds_per_rank"][k] for r in steps) for k in range(2)]
    return {"iterations": [first, last], "expert_seconds_per_rank": busy,
            "busy_max_over_mean": max(busy) / statistics.fmean(busy),
            "compute_layer_max_over_mean": statistics.fmean(r["compute_layer_max_over_mean"] for r in steps)
            if all("compute_layer_max_over_mean" in r for r in steps) else None,
            "tokens_per_sec_median": statistics.median(r["tokens_per_sec"] for r in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--bias", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    variants = {"static": [], "replan": ["--moe-replan-interval", str(args.interval), "--moe-replan-max-move", "1"]}
    runs: dict[str, list] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, extra in variants.items():
                rows = launch(extra, args.iters, args.bias, Path(tmp) / f"{name}{r}")
                runs[name].append({
                    "before": phase(rows, 2, args.interval),
                    "after": phase(rows, args.interval + 2, args.iters),
                    "replans": [{k: e[k] for k in ("iteration", "layer", "moved_experts", "placement", "seconds",
                                                   "max_over_mean_compute_before", "max_over_mean_compute_after")}
                                for e in rows if e.get("event") == "replan"],
                })
    summary = {name: {p: statistics.fmean(run[p]["busy_max_over_mean"] for run in rs) for p in ("before", "after")}
               for name, rs in runs.items()}
    print(json.dumps({"benchmark": "per-rank expert busy time before/after re-planning, forced skew",
                      "settings": vars(args) | {"model": MODEL}, "busy_max_over_mean": summary, "runs": runs},
                     indent=2))


if __name__ == "__main__":
    main()
