"""End-to-end pretraining throughput: MoDSE tiny model vs its uniform-MoE twin built by
megatron-core's own MoE layer, measured in one run.

Protocol: both models come from ``examples/configs/tiny_cpu.yaml`` (same layers, hidden size,
expert count, top-k, total expert parameters, EP=2 on 2 gloo ranks, built-in corpus); the twin
adds ``--moe-expert-size-preset uniform --moe-layer-impl megatron`` (megatron's MoELayer with
SequentialMLP experts). Each is launched with torchrun for ``--iters`` steps, alternating
``--rounds`` times; the figure is the median ``tokens_per_sec`` over steps after the first
``--warmup`` of every launch. Target: MoDSE / megatron-uniform >= 0.95. Prints one JSON object.
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
CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"


def launch(extra: list[str], iters: int, log_dir: Path) -> list[float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "modse_megatron.pretrain", "--config", str(CONFIG), "--train-iters", str(iters),
           "--lr-warmup-iters", "1", "--eval-interval", str(iters + 1), "--eval-iters", "1", "--no-progress",
           "--log-dir", str(log_dir), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"pretrain run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_sec"] for r in rows if "split" not in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    variants = {
        "modse": ["--moe-expert-size-preset", "paper8"],
        "megatron_uniform": ["--moe-expert-size-preset", "uniform", "--moe-layer-impl", "megatron"],
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, extra in variants.items():
                out = Path(tmp) / f"{name}{r}"
                # --save inside the temporary run directory: the config's own save path is left alone.
                tps = launch([*extra, "--save", str(out / "ckpt")], args.iters, out)
                samples[name].extend(tps[args.warmup:])
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = med["modse"] / med["megatron_uniform"]
    print(json.dumps({
        "benchmark": "pretrain_throughput",
        "config": str(CONFIG.relative_to(ROOT)),
        "ranks": 2,
        "iters_per_launch": args.iters,
        "rounds": args.rounds,
        "tokens_per_sec_median": med,
        "modse_over_megatron_uniform": ratio,
        "target_ratio_at_least": 0.95,
        "meets_target": ratio >= 0.95,
    }))


if __name__ == "__main__":
    main()
