"""Re-planning expert placement during training, replayed on recorded routing traces.

A trace (``benchmarks/data/*.json``, written by ``record``) holds the tokens routed to every
logical expert of every MoE layer at every iteration of a real run, the expert widths, the EP
size, the run's initial placement and the command that produced it.  Two are recorded from the
project's tiny CPU pretraining (2 ranks, EP 2, 4 MoE layers, top-2, aux loss):
``tiny_cpu_trace.json`` (``examples/configs/tiny_cpu.yaml`` as is: the paper's 8 experts, 300
iterations) and ``tiny_cpu_32experts_trace.json`` (32 experts of the 4.5:0.5 ... 2.5:2.5 pairs,
200 iterations), each recorded in under 5 minutes.  Synthetic drifts (``zipf_drift_trace``, 4 MoE
layers, 200 steps, the paper's pair widths): Zipf skew rising from 0 to 1.2 at EP 8 (64 experts)
and EP 64 (256 experts) with 16k tokens per step, and a milder one (0 to 0.6, 1M tokens per step)
at EP 8, where a memory-equal placement can still balance each layer.  Each policy is replayed
over a trace with the training loop's own rules (``modse_megatron.moe.replan``,
``modse_megatron.training.replanning``): at iteration i the step runs on the placement in force,
its tokens update the moving average (``LoadStats``, ``--ema-decay`` as
``--moe-replan-ema-decay``), then every K iterations the policy may migrate (the new placement
serves iteration i + 1 on).  Routing does not depend on placement (placement is
math-invariant), so replaying the recorded tokens under another placement is exact.  Every
MoE layer has its own placement, as in training, and waits for its slowest EP rank, so a step's
imbalance is the sum over layers of the slowest rank's tokens x width over the sum of the mean
rank's (``rank_sum_imbalance_mean`` also reports max / mean of each rank's compute summed over
layers, the training rows' ``compute_max_over_mean``).

Policies:

* ``static``: the run's initial placement (``moe_expert_placement=auto``: the planner with
  uniform loads, equal memory per rank) for the whole run;
* ``planner_every_K``: ``propose_layers(policy="planner")`` on each layer's moving average every
  K iterations, migrating a layer when its predicted max-rank compute improves by more than
  ``--min-gain`` (the training defaults: min gain 0.02, move slack 0.01), with no move limit;
* ``planner_every_K_max_move_F``: the same with ``--moe-replan-max-move F`` (a re-plan moves at
  most that share of a layer's expert bytes; the training default is 0.1; ``--max-move`` lists
  the values compared);
* ``shared_planner_every_K``: one placement for every layer, planned on the loads summed over
  layers (what training did before placements were per layer);
* ``random_every_K``: a random equal-memory placement every K iterations (the migration test
  policy of ``--moe-replan-policy random``);
* ``window_oracle_K`` (a reference, not realisable): every window of K steps on the planner's
  plan for that window's own tokens, i.e. the best a placement held for K steps can do with
  perfect foresight; the gap to it is what better load prediction could still win;
* ``per_step_oracle`` (a reference, not realisable): the planner on each step's own tokens,
  i.e. the best equal-memory placement in hindsight, step by step.

Reported per trace, EP size and policy: the per-step compute imbalance (max rank / mean rank of
sum tokens x width, as above) mean, p50, p95, max and mean over the second half of the run
(routing settles as training goes on); migrations, moved experts and bytes moved (expert
parameters x bytes per parameter of weights and Adam state, as the training loop counts them),
and per migrated layer the share of its expert bytes moved (mean, max);
planner calls and planning time per call (mean, max).  EP sizes: every power of two leaving at
least 4 experts per rank (``--ep`` to choose; the planner only needs loads, and the initial
placement at an EP size other than the recorded one is the planner's uniform-load plan).
Prints one JSON object.

``python benchmarks/replan.py record --metrics RUN/metrics.jsonl --out FILE -- ARGS`` turns the
metrics of a run ``torchrun --nproc-per-node 2 -m modse_megatron.pretrain ARGS`` (``--config
... --log-dir RUN``) into a trace.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from modse_megatron.moe.replan import LoadStats, layer_imbalance, propose, propose_layers, summed_imbalance
from modse_megatron.placement import plan_placement

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_TRACES = ("tiny_cpu_trace.json", "tiny_cpu_32experts_trace.json")


# ----------------------------------------------------------------------------- traces


def record(metrics: str, pretrain_args: list[str], out: str) -> dict:
    """A trace from a run's metrics.jsonl and the modse-pretrain arguments of the run (widths,
    EP, placement, model)."""
    from modse_megatron.placement.layout import resolve_ranks
    from modse_megatron.training.arguments import parse_args

    args = parse_args(pretrain_args)
    widths = args.expert_widths()
    ep = args.parallel.expert_model_parallel_size
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    steps = sorted((r["iteration"], r["tokens_per_expert"]) for r in rows
                   if "tokens_per_expert" in r and "event" not in r)
    if not steps:
        raise SystemExit(f"replan: error: {metrics} has no tokens_per_expert rows: record a "
                         "MoDSE run with MoE layers")
    layers = sorted(steps[0][1], key=int)
    m = args.model
    trace = {
        "source": "torchrun --nproc-per-node 2 -m modse_megatron.pretrain "
                  + shlex.join(pretrain_args),
        "widths": widths,
        "ep": ep,
        "placement": resolve_ranks(args.modse.moe_expert_placement, widths, ep),
        "hidden_size": m.hidden_size,
        "swiglu": bool(m.swiglu),
        "layers": layers,
        # As the training loop counts a migration: weight, two Adam moments (+ fp32 main).
        "bytes_per_param": (2 if m.bf16 else 4) + 8 + (4 if m.bf16 else 0),
        "seed": args.optim.seed,
        "iterations": [it for it, _ in steps],
        "tokens": [[[int(x) for x in tokens[layer]] for layer in layers] for _, tokens in steps],
    }
    # One key per line, one iteration's tokens ([layer][expert]) per line: small, diffable.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in trace.items() if k != "tokens"]
    lines += [' "tokens": [', ",\n".join(f"  {json.dumps(step)}" for step in trace["tokens"]), " ]"]
    Path(out).write_text("{\n" + "\n".join(lines) + "\n}\n")
    return trace


def zipf_drift_trace(experts: int, ep: int, steps: int = 200, layers: int = 4, tokens_per_step: int = 16384,
                     topk: int = 2, zipf_max: float = 1.2, swaps_per_step: int = 1, seed: int = 0) -> dict:
    """A synthetic trace: routing skew rising from uniform to Zipf(``zipf_max``) over the run,
    while the popularity order drifts slowly (``swaps_per_step`` swaps of two experts adjacent
    in popularity, per layer and step). Widths: the paper's pairs 4.5:0.5, 4:1, 3:2, 2.5:2.5
    (x16) repeated; one hidden size and byte count as a 700M-class MoDSE layer."""
    from modse_megatron.placement.layout import resolve_ranks

    rng = np.random.default_rng(seed)
    pairs = [(72, 8), (64, 16), (48, 32), (40, 40)]
    widths = [w for i in range(experts // 2) for w in pairs[i % len(pairs)]]
    order = [list(rng.permutation(experts)) for _ in range(layers)]  # popularity order per layer
    tokens = []
    for t in range(steps):
        s = zipf_max * t / max(steps - 1, 1)
        step = []
        for layer in range(layers):
            for _ in range(swaps_per_step):
                i = int(rng.integers(0, experts - 1))
                order[layer][i], order[layer][i + 1] = order[layer][i + 1], order[layer][i]
            p = np.empty(experts)
            p[order[layer]] = 1.0 / np.arange(1, experts + 1) ** s
            step.append(rng.multinomial(tokens_per_step * topk, p / p.sum()).tolist())
        tokens.append(step)
    return {"source": f"synthetic: Zipf 0 -> {zipf_max} over {steps} steps, {swaps_per_step} popularity swap(s) "
                      f"per layer and step, {tokens_per_step} tokens x top-{topk} per layer, seed {seed}",
            "widths": widths, "ep": ep, "placement": resolve_ranks("auto", widths, ep), "hidden_size": 2048,
            "swiglu": True, "layers": [str(i + 1) for i in range(layers)], "bytes_per_param": 14, "seed": seed,
            "iterations": list(range(1, steps + 1)), "tokens": tokens,
            "tokens_np": np.asarray(tokens, dtype=np.float64)}


# name -> zipf_drift_trace arguments.  The mild drift has a realistic token count per step (1M:
# little sampling noise) and skew a memory-equal placement can still balance to ~1.02.
SYNTHETIC = {"zipf_drift_64experts": dict(experts=64, ep=8), "zipf_drift_256experts": dict(experts=256, ep=64),
             "zipf_mild_64experts": dict(experts=64, ep=8, zipf_max=0.6, tokens_per_step=1 << 20)}


def load_trace(path: Path) -> dict:
    trace = json.loads(path.read_text())
    trace["tokens_np"] = np.asarray(trace["tokens"], dtype=np.float64)  # [steps, layers, n]
    return trace


# ----------------------------------------------------------------------------- replay


def step_imbalance(widths: Sequence[int], tokens: np.ndarray, ranks: Sequence[Sequence[int]], ep: int) -> float:
    """The step's imbalance as every MoE layer waits for its slowest EP rank ([layers, n] tokens,
    one placement per layer): the training rows' ``compute_layer_max_over_mean``."""
    return layer_imbalance(widths, tokens.tolist(), ranks, ep)


def rank_sum_imbalance(widths: Sequence[int], tokens: np.ndarray, ranks: Sequence[Sequence[int]], ep: int) -> float:
    """Each rank's compute summed over layers, max / mean: the training rows' ``compute_max_over_mean``."""
    return summed_imbalance(widths, tokens.tolist(), ranks, ep)


def moved_bytes(trace: dict, widths: Sequence[int], old: Sequence[int], new: Sequence[int]) -> int:
    """Parameters (and their optimizer state) of one layer's experts that change rank, in bytes."""
    gated = 2 if trace["swiglu"] else 1
    per_width = (gated + 1) * trace["hidden_size"] * trace["bytes_per_param"]
    return sum(w * per_width for w, a, b in zip(widths, old, new) if a != b)


# decide(iteration, per-layer ranks, loads) -> (new per-layer ranks or None, seconds spent planning)
Decide = Callable[[int, list[list[int]], LoadStats], tuple[list[list[int]] | None, float]]


def replay(trace: dict, ep: int, start: list[int], decide: Decide | None,
           interval: int, decay: float) -> dict:
    """Per-step imbalance, migrations and planning time of one policy over the trace."""
    widths = trace["widths"]
    tokens = trace["tokens_np"]
    names = [str(layer) for layer in trace["layers"]]
    loads = LoadStats(len(widths), decay)
    ranks = [list(start) for _ in names]
    imb, summed, plan_s, moved_fractions = [], [], [], []
    migrations = moved_experts = moved = 0
    layer_bytes = moved_bytes(trace, widths, [0] * len(widths), [1] * len(widths))  # one layer, every expert
    for i, it in enumerate(trace["iterations"]):
        imb.append(step_imbalance(widths, tokens[i], ranks, ep))
        summed.append(rank_sum_imbalance(widths, tokens[i], ranks, ep))
        loads.update({name: tokens[i, layer] for layer, name in enumerate(names)})
        if decide is None or it % interval or i == len(trace["iterations"]) - 1:
            continue
        new, seconds = decide(it, ranks, loads)
        plan_s.append(seconds)
        if new is not None:
            migrations += 1
            for old_layer, new_layer in zip(ranks, new):
                if old_layer != new_layer:
                    moved_experts += sum(a != b for a, b in zip(old_layer, new_layer))
                    layer_moved = moved_bytes(trace, widths, old_layer, new_layer)
                    moved += layer_moved
                    moved_fractions.append(layer_moved / layer_bytes)
            ranks = new
    return summary(imb) | {
        "rank_sum_imbalance_mean": float(np.mean(summed)),
        "migrations": migrations, "moved_experts": moved_experts, "moved_bytes": moved,
        # per migrated layer: the share of that layer's expert bytes the migration moved
        "moved_fraction_of_layer_bytes_mean": float(np.mean(moved_fractions)) if moved_fractions else 0.0,
        "moved_fraction_of_layer_bytes_max": float(np.max(moved_fractions)) if moved_fractions else 0.0,
        "moved_fraction_of_expert_bytes_per_migration":
            moved / migrations / (layer_bytes * len(names)) if migrations else 0.0,
        "planner_calls": len(plan_s),
        "planning_ms_per_call_mean": 1e3 * float(np.mean(plan_s)) if plan_s else 0.0,
        "planning_ms_per_call_max": 1e3 * float(np.max(plan_s)) if plan_s else 0.0,
    }


def summary(imbalance: Sequence[float]) -> dict:
    a = np.asarray(imbalance)
    return {"steps": len(a), "imbalance_mean": float(a.mean()),
            "imbalance_p50": float(np.percentile(a, 50)),
            "imbalance_p95": float(np.percentile(a, 95)), "imbalance_max": float(a.max()),
            # Routing settles as training goes on: the second half alone.
            "imbalance_mean_second_half": float(a[len(a) // 2:].mean())}


def _layer_loads(loads: LoadStats, ranks: list[list[int]]) -> list:
    return [loads.layers.get(name) for name in sorted(loads.layers, key=int)][:len(ranks)]


def planner_policy(widths: list[int], ep: int, min_gain: float, move_slack: float,
                   max_move: float = 1.0) -> Decide:
    """Each layer planned on its own loads (the training loop's rule)."""
    def decide(it: int, ranks: list[list[int]], loads: LoadStats):
        start = time.perf_counter()
        p = propose_layers(widths, _layer_loads(loads, ranks), ep, ranks, policy="planner", min_gain=min_gain,
                           move_slack=move_slack, max_move_fraction=max_move)
        return (p.ranks if p.migrate else None), time.perf_counter() - start
    return decide


def shared_planner_policy(widths: list[int], ep: int, min_gain: float, move_slack: float) -> Decide:
    """One placement for every layer, planned on the loads summed over layers (for comparison:
    what training did before placements were per layer)."""
    def decide(it: int, ranks: list[list[int]], loads: LoadStats):
        start = time.perf_counter()
        total = np.sum([v for v in loads.layers.values()], axis=0).tolist()
        p = propose(widths, total, ep, ranks[0], policy="planner", min_gain=min_gain, move_slack=move_slack)
        return ([list(p.ranks)] * len(ranks) if p.migrate else None), time.perf_counter() - start
    return decide


def random_policy(widths: list[int], ep: int, seed: int) -> Decide:
    rng = random.Random(seed)

    def decide(it: int, ranks: list[list[int]], loads: LoadStats):
        start = time.perf_counter()
        p = propose_layers(widths, _layer_loads(loads, ranks), ep, ranks, policy="random", rng=rng)
        return (p.ranks if p.migrate else None), time.perf_counter() - start
    return decide


def _hindsight(trace: dict, ep: int, window: np.ndarray) -> list[list[int]]:
    """Every layer's plan for these steps' own tokens ([steps, layers, n])."""
    return [list(plan_placement(trace["widths"], np.maximum(window[:, layer].sum(0), 1e-9), ep).rank_of_expert)
            for layer in range(window.shape[1])]


def oracle(trace: dict, ep: int) -> dict:
    """Each step on the planner's per-layer plans for that step's own tokens (hindsight)."""
    imb, plan_s = [], []
    for step in trace["tokens_np"]:
        start = time.perf_counter()
        ranks = _hindsight(trace, ep, step[None])
        plan_s.append(time.perf_counter() - start)
        imb.append(step_imbalance(trace["widths"], step, ranks, ep))
    return summary(imb) | {"planner_calls": len(plan_s),
                           "planning_ms_per_call_mean": 1e3 * float(np.mean(plan_s))}


def window_oracle(trace: dict, ep: int, interval: int) -> dict:
    """Each window of ``interval`` steps on the planner's per-layer plans for that window's own
    tokens (hindsight): the best any placement held fixed for ``interval`` steps can do, so what
    re-planning every ``interval`` steps could reach with perfect load prediction."""
    tokens = trace["tokens_np"]
    imb = []
    for first in range(0, len(tokens), interval):
        window = tokens[first:first + interval]
        ranks = _hindsight(trace, ep, window)
        imb += [step_imbalance(trace["widths"], step, ranks, ep) for step in window]
    return summary(imb)


def run(trace: dict, ep: int, intervals: Sequence[int], min_gain: float, move_slack: float,
        decay: float, max_moves: Sequence[float] = (1.0,)) -> dict:
    from modse_megatron.placement.layout import resolve_ranks

    widths = trace["widths"]
    start = trace["placement"] if ep == trace["ep"] else resolve_ranks("auto", widths, ep)
    out: dict[str, Any] = {"ep": ep, "experts_per_rank": len(widths) // ep,
                           "initial_placement": list(start)}
    policies = {"static": replay(trace, ep, start, None, 1, decay)}
    for k in intervals:
        for f in max_moves:
            name = f"planner_every_{k}" + ("" if f >= 1 else f"_max_move_{f:g}")
            policies[name] = replay(trace, ep, start, planner_policy(widths, ep, min_gain, move_slack, f),
                                    k, decay)
        policies[f"shared_planner_every_{k}"] = replay(
            trace, ep, start, shared_planner_policy(widths, ep, min_gain, move_slack), k, decay)
        policies[f"random_every_{k}"] = replay(
            trace, ep, start, random_policy(widths, ep, trace["seed"]), k, decay)
        policies[f"window_oracle_{k}"] = window_oracle(trace, ep, k)
    policies["per_step_oracle"] = oracle(trace, ep)
    out["policies"] = policies
    static = policies["static"]["imbalance_mean"]
    out["imbalance_mean_over_static"] = {name: p["imbalance_mean"] / static
                                         for name, p in policies.items()}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="turn a run's metrics.jsonl into a trace")
    rec.add_argument("--metrics", required=True, help="the run's metrics.jsonl")
    rec.add_argument("--out", required=True, help="trace file to write")
    rec.add_argument("pretrain_args", nargs=argparse.REMAINDER,
                     help="-- then the run's modse-pretrain arguments (--config ... overrides)")
    parser.add_argument("--traces", default=",".join(str(DATA / t) for t in DEFAULT_TRACES),
                        help="comma-separated trace files")
    parser.add_argument("--intervals", default="10,50", help="re-plan every K iterations")
    parser.add_argument("--ep", default="", help="EP sizes to replay at (default: every power "
                        "of two >= 2 leaving >= 4 experts per rank)")
    parser.add_argument("--min-gain", type=float, default=0.02, help="as --moe-replan-min-gain (its default)")
    parser.add_argument("--move-slack", type=float, default=0.01)
    parser.add_argument("--max-move", default="1,0.1",
                        help="comma-separated --moe-replan-max-move values to compare (1 = no limit)")
    parser.add_argument("--ema-decay", type=float, default=0.5, help="as --moe-replan-ema-decay (its default)")
    parser.add_argument("--synthetic", default=",".join(SYNTHETIC),
                        help=f"synthetic Zipf-drift scenarios to add (of {', '.join(SYNTHETIC)}; '' for none)")
    args = parser.parse_args(argv)
    if args.command == "record":
        pretrain_args = [a for a in args.pretrain_args if a != "--"]
        trace = record(args.metrics, pretrain_args, args.out)
        print(json.dumps({"trace": args.out, "steps": len(trace["tokens"]),
                          "experts": len(trace["widths"]), "layers": len(trace["layers"])}))
        return
    begin = time.perf_counter()
    intervals = [int(x) for x in args.intervals.split(",") if x.strip()]
    max_moves = [float(x) for x in args.max_move.split(",") if x.strip()]
    result: dict[str, Any] = {
        "benchmark": "expert re-planning replayed on recorded routing traces",
        "settings": {"intervals": intervals, "min_gain": args.min_gain,
                     "move_slack": args.move_slack, "ema_decay": args.ema_decay,
                     "max_move": max_moves},
        "traces": {},
    }
    traces = [(Path(p).name, lambda p=p: load_trace(Path(p))) for p in args.traces.split(",") if p.strip()]
    traces += [(name, lambda kw=kw: zipf_drift_trace(**kw)) for name, kw in SYNTHETIC.items()
               if name in args.synthetic.split(",")]
    for name, make in traces:
        trace = make()
        n = len(trace["widths"])
        eps = [int(x) for x in args.ep.split(",") if x.strip()] or (
            [trace["ep"]] if name in SYNTHETIC else
            [ep for ep in (2, 4, 8, 16, 32, 64) if n % ep == 0 and n // ep >= 4])
        result["traces"][name] = {
            "source": trace["source"], "steps": len(trace["iterations"]), "experts": n,
            "moe_layers": len(trace["layers"]), "widths": trace["widths"],
            "recorded_ep": trace["ep"],
            "by_ep": {str(ep): run(trace, ep, intervals, args.min_gain, args.move_slack,
                                   args.ema_decay, max_moves) for ep in eps},
        }
    result["wall_s"] = time.perf_counter() - begin
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
