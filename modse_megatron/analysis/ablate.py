"""``modse-ablate GRID.yaml --out DIR [--resume] [--dry-run] [--jobs N]``: grids x seeds of
pretraining runs -> one table with confidence intervals.

A grid (YAML)::

    base: ../configs/tiny_cpu.yaml        # a modse-pretrain config (relative to the grid file)
    seeds: [1, 2, 3]
    overrides: {train_iters: 200}         # applied to every run
    runs:                                 # name -> option overrides; the first is the reference
      modse: {}
      uniform: {moe_expert_size_preset: uniform}
    launcher: {nproc: 2, args: []}        # torchrun processes per run, extra torchrun arguments

Every (run, seed) trains with ``torchrun -m modse_megatron.pretrain`` in ``DIR/<name>/seed<k>/``
(its merged ``config.yaml``, metrics, log, checkpoint), one after another or ``--jobs`` at a time.
A finished run leaves ``done.json``; ``--resume`` skips those and re-runs any other (a crashed run
is never half-counted). Then:

* ``DIR/results.json``: ``runs`` = one row per (run, seed) (``valid_loss`` = the run's last
  validation evaluation) and ``summary`` = per name: mean and 95% t-interval of the validation
  loss over seeds, and the difference to the first run paired by seed (mean, 95% t-interval,
  two-sided paired t-test p-value);
* ``DIR/results.md`` (the table) and ``DIR/results.png`` (validation-loss curves: mean and the
  band of the seeds; final loss per run with its interval).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from modse_megatron.analysis.stats import t_two_sided_p
from modse_megatron.cli_common import OneLineArgumentParser, fail

PROG = "modse-ablate"


class GridError(ValueError):
    """A grid file that cannot run; the message names the fix."""


# ------------------------------------------------------------------------------------- the grid
@dataclass
class Grid:
    path: Path
    base: dict[str, Any]
    seeds: list[int]
    overrides: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    nproc: int
    launcher_args: list[str]

    def config(self, name: str, seed: int, run_dir: Path) -> dict[str, Any]:
        """The merged modse-pretrain options of one (run, seed)."""
        merged = {**self.base, **self.overrides, **self.runs[name]}
        merged.update(seed=seed, log_dir=str(run_dir), progress=False)
        if merged.get("save"):
            merged["save"] = str(run_dir / "checkpoints")
        merged.pop("load", None)
        return merged


def load_grid(path: str | os.PathLike) -> Grid:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise GridError(f"grid file {path} is not valid YAML ({getattr(err, 'problem', err)}): fix the syntax") from None
    unknown = set(data) - {"base", "seeds", "overrides", "runs", "launcher"}
    if unknown:
        raise GridError(f"grid file {path} has unknown keys {sorted(unknown)}: use base, seeds, overrides, runs, launcher")
    if not data.get("base"):
        raise GridError(f"grid file {path} needs 'base': a modse-pretrain config file")
    base_path = (path.parent / data["base"]).resolve()
    if not base_path.is_file():
        raise GridError(f"base config {base_path} (from {path}) does not exist")
    from modse_megatron.training.arguments import ConfigError, load_config_file

    try:
        base = load_config_file(str(base_path))
    except ConfigError as err:
        raise GridError(f"base of {path}: {err}") from None
    seeds = data.get("seeds") or [1234]
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise GridError(f"grid file {path}: 'seeds' must be a list of distinct integers")
    runs = data.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise GridError(f"grid file {path} needs 'runs': a mapping of run name -> option overrides")
    for name, opts in runs.items():
        if not isinstance(opts, dict) and opts is not None:
            raise GridError(f"run {name!r} in {path} must map option names to values")
        if not str(name).replace("_", "").replace("-", "").isalnum():
            raise GridError(f"run name {name!r} in {path}: use letters, digits, - and _")
    launcher = data.get("launcher") or {}
    grid = Grid(path, base, seeds, data.get("overrides") or {}, {str(k): (v or {}) for k, v in runs.items()},
                int(launcher.get("nproc", 2)), [str(a) for a in launcher.get("args", [])])
    _check_options(grid)
    return grid


def _check_options(grid: Grid) -> None:
    """Every run's merged options parse (unknown/misspelt options fail before anything runs)."""
    import tempfile

    import yaml

    from modse_megatron.training.arguments import ConfigError, parse_args

    with tempfile.TemporaryDirectory() as tmp:
        for name in grid.runs:
            cfg = Path(tmp) / "c.yaml"
            cfg.write_text(yaml.safe_dump(grid.config(name, grid.seeds[0], Path(tmp) / "run")))
            try:
                parse_args(["--config", str(cfg)])
            except ConfigError as err:
                raise GridError(f"run {name!r} of {grid.path}: {err}") from None


# ------------------------------------------------------------------------------------- running
def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / name / f"seed{seed}"


def _command(grid: Grid, config: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(grid.nproc),
            *grid.launcher_args, "-m", "modse_megatron.pretrain", "--config", str(config)]


def run_one(grid: Grid, out: Path, name: str, seed: int) -> dict[str, Any]:
    """Train one (run, seed) from scratch into its directory; returns its results row."""
    import yaml

    directory = run_dir(out, name, seed)
    shutil.rmtree(directory, ignore_errors=True)  # a crashed attempt is never half-counted
    directory.mkdir(parents=True)
    config = grid.config(name, seed, directory)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    with open(directory / "log.txt", "w") as log:
        proc = subprocess.run(_command(grid, directory / "config.yaml"), stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        lines = (directory / "log.txt").read_text().strip().splitlines()
        # our one-line error if a rank printed one, else the last line naming an error
        errors = ([line for line in lines if "modse-pretrain: error:" in line]
                  or [line for line in lines[-40:] if "error" in line.lower() and "elastic/errors.html" not in line])
        tail = lines[-1:]
        raise GridError(f"run {name} seed {seed} failed (exit {proc.returncode}): {(errors or tail or ['?'])[-1][:200]} "
                        f"(log: {directory / 'log.txt'})")
    row = _row(name, seed, directory, config, wall)
    (directory / "done.json").write_text(json.dumps(row))
    return row


def _row(name: str, seed: int, directory: Path, config: dict, wall: float) -> dict[str, Any]:
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    valid = [r["lm_loss"] for r in rows if r.get("split") == "valid"]
    test = [r["lm_loss"] for r in rows if r.get("split") == "test"]
    train = {r["iteration"]: r for r in rows if "split" not in r and "event" not in r}
    total, active = param_counts(config)
    gbs = config.get("global_batch_size") or config.get("micro_batch_size", 4)
    return {"name": name, "seed": seed, "metrics_path": str(directory / "metrics.jsonl"),
            "valid_loss": valid[-1] if valid else None, "test_loss": test[-1] if test else None,
            "tokens": max(train, default=0) * gbs * config.get("seq_length", 128),
            "params_total": total, "params_active": active, "wall_s": round(wall, 1)}


def param_counts(config: dict) -> tuple[int, int]:
    """(total, active) parameters of a run's model. Active = everything but the experts, plus
    top-k experts of the mean expert width per MoE layer (the FLOPs of one token under balanced
    routing: MoDSE's diverse widths and its uniform twin then count the same)."""
    import tempfile

    import yaml

    from modse_megatron.training.arguments import parse_args

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(yaml.safe_dump({k: v for k, v in config.items() if k not in ("save", "log_dir")}))
        args = parse_args(["--config", str(cfg)])
    m = args.model
    d, layers = m.hidden_size, m.num_layers
    vocab = int(config.get("vocab_size") or args.data.vocab_size)
    g = 2 if m.swiglu else 1
    heads_kv = m.num_query_groups or m.num_attention_heads
    head_dim = d // m.num_attention_heads
    attention = d * (m.num_attention_heads + 2 * heads_kv) * head_dim + m.num_attention_heads * head_dim * d
    norms = 2 * d * (1 if m.normalization == "RMSNorm" else 2)
    embed = vocab * d * (1 if not m.untie_embeddings_and_output_weights else 2)
    if m.position_embedding_type == "learned_absolute":
        embed += (m.max_position_embeddings or m.seq_length) * d
    widths = args.expert_widths()
    moe_layers = [i for i in range(layers) if widths and i % m.moe_layer_freq == 0]
    dense_ffn = (g + 1) * d * (m.ffn_hidden_size or 4 * d)
    shared = (g + 1) * d * (m.moe_shared_expert_intermediate_size or 0)
    experts = sum((g + 1) * d * w for w in widths)
    router = d * len(widths)
    total = active = embed + layers * (attention + norms) + d * (1 if m.normalization == "RMSNorm" else 2)
    for i in range(layers):
        if i in moe_layers:
            total += experts + router + shared
            active += router + shared + m.moe_router_topk * (g + 1) * d * (sum(widths) / len(widths))
        else:
            total += dense_ffn
            active += dense_ffn
    return int(total), int(active)


def run_grid(grid: Grid, out: Path, resume: bool, jobs: int, log=print) -> list[dict[str, Any]]:
    pending, rows = [], []
    for name in grid.runs:
        for seed in grid.seeds:
            done = run_dir(out, name, seed) / "done.json"
            if resume and done.is_file():
                rows.append(json.loads(done.read_text()))
                log(f"{PROG}: {name} seed {seed}: done already (--resume)")
            else:
                pending.append((name, seed))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [(name, seed, pool.submit(run_one, grid, out, name, seed)) for name, seed in pending]
        for name, seed, future in futures:
            row = future.result()
            rows.append(row)
            log(f"{PROG}: {name} seed {seed}: valid loss {row['valid_loss']:.4f} ({row['wall_s']:.0f} s)")
    order = {name: i for i, name in enumerate(grid.runs)}
    return sorted(rows, key=lambda r: (order[r["name"]], r["seed"]))


# ------------------------------------------------------------------------------------- statistics
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t, by bisection on :func:`t_sf2`."""
    target = 2 * (1 - p)
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided_p(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95% t-interval; None with fewer than 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(0.975, n - 1) * sd / math.sqrt(n)


def paired(deltas: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean difference, 95% half-width, two-sided paired t-test p-value)."""
    mean, half = mean_ci95(deltas)
    n = len(deltas)
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1))
    if sd == 0:
        return mean, 0.0, 0.0 if mean != 0 else 1.0
    return mean, half, t_two_sided_p(mean / (sd / math.sqrt(n)), n - 1)


def summarize(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    by = {name: {r["seed"]: r["valid_loss"] for r in rows if r["name"] == name and r["valid_loss"] is not None}
          for name in names}
    first = names[0]
    out = []
    for name in names:
        values = [by[name][s] for s in sorted(by[name])]
        mean, half = mean_ci95(values) if values else (None, None)
        common = sorted(set(by[name]) & set(by[first]))
        delta, delta_half, p = paired([by[name][s] - by[first][s] for s in common]) if common else (None, None, None)
        out.append({"name": name, "n": len(values), "valid_loss_mean": mean, "valid_loss_ci95": half,
                    "delta_vs_first": delta, "delta_ci95": delta_half, "p_value": p if name != first else None})
    return out


# ------------------------------------------------------------------------------------- outputs
def write_results(grid: Grid, out: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(grid.runs)
    results = {"grid": str(grid.path), "seeds": grid.seeds, "runs": rows, "summary": summarize(rows, names)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(render_markdown(results))
    plot_results(results, out / "results.png")
    return results


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(results: dict[str, Any]) -> str:
    first = results["summary"][0]["name"]
    lines = [f"| run | n | valid loss (mean ± 95% CI) | Δ vs {first} (paired by seed, ± 95% CI) | p | params total / active |",
             "|---|---|---|---|---|---|"]
    params = {r["name"]: (r["params_total"], r["params_active"]) for r in results["runs"]}
    for s in results["summary"]:
        ci = f" ± {_fmt(s['valid_loss_ci95'])}" if s["valid_loss_ci95"] is not None else ""
        delta = "-" if s["name"] == first or s["delta_vs_first"] is None else \
            f"{s['delta_vs_first']:+.4f}" + (f" ± {_fmt(s['delta_ci95'])}" if s["delta_ci95"] is not None else "")
        p = "-" if s["p_value"] is None else f"{s['p_value']:.3g}"
        total, active = params.get(s["name"], (0, 0))
        lines.append(f"| {s['name']} | {s['n']} | {_fmt(s['valid_loss_mean'])}{ci} | {delta} | {p} | "
                     f"{total / 1e6:.2f}M / {active / 1e6:.2f}M |")
    return "\n".join(lines) + f"\n\nSeeds {results['seeds']}; grid {results['grid']}.\n"


def plot_results(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, finals) = plt.subplots(1, 2, figsize=(11, 4))
    for s in results["summary"]:
        per_seed = []
        for r in (r for r in results["runs"] if r["name"] == s["name"]):
            rows = [json.loads(line) for line in Path(r["metrics_path"]).read_text().splitlines()]
            per_seed.append({x["iteration"]: x["lm_loss"] for x in rows if x.get("split") == "valid"})
        its = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
        if its:
            values = [[p[i] for p in per_seed] for i in its]
            mean = [sum(v) / len(v) for v in values]
            curves.plot(its, mean, marker="o", label=s["name"])
            curves.fill_between(its, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    curves.set_xlabel("iteration")
    curves.set_ylabel("validation loss (mean, band = seeds)")
    curves.legend()
    names = [s["name"] for s in results["summary"]]
    means = [s["valid_loss_mean"] or 0.0 for s in results["summary"]]
    errors = [s["valid_loss_ci95"] or 0.0 for s in results["summary"]]
    finals.bar(names, means, yerr=errors, capsize=4)
    low = min(m - e for m, e in zip(means, errors)) if means else 0
    finals.set_ylim(bottom=max(0.0, low - 0.05 * abs(low)))
    finals.set_ylabel("final validation loss (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog=PROG, description="Run a grid of MoDSE pretraining runs x seeds and "
                                                          "summarise them with confidence intervals.")
    parser.add_argument("grid", help="grid YAML (base, seeds, overrides, runs, launcher)")
    parser.add_argument("--out", required=True, help="output directory (one sub-directory per run and seed)")
    parser.add_argument("--resume", action="store_true", help="skip finished (run, seed) pairs; re-run the others")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        out = Path(args.out)
        if args.dry_run:
            for name in grid.runs:
                for seed in grid.seeds:
                    d = run_dir(out, name, seed)
                    print(f"{name} seed {seed}: {' '.join(_command(grid, d / 'config.yaml'))}  # in {d}")
            return 0
        if out.exists() and any(out.iterdir()) and not args.resume:
            raise GridError(f"--out {out} is not empty: add --resume to continue it, or choose a new directory")
        out.mkdir(parents=True, exist_ok=True)
        rows = run_grid(grid, out, args.resume, args.jobs)
        results = write_results(grid, out, rows)
    except GridError as err:
        fail(PROG, str(err))
    print(render_markdown(results))
    print(f"{PROG}: wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
