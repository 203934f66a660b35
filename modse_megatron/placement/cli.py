"""``modse-plan``: plan which rank holds which MoDSE expert, from the command line.

Examples::

    modse-plan --ratios 4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5 --unit 256 --ranks 4
    modse-plan --widths 1152,128,1024,256 --loads 10,3,7,9 --ranks 2 --json
    modse-plan --ratios 4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5 --unit 256 --repeat 8 \\
        --loads-from routing.json --ranks 16 --ranks-per-node 8
    modse-plan --widths 1152,128,1024,256 --loads 40,3,7,9 --ranks 3 --replicas 2

Prints a readable table by default (rank -> experts, memory, compute, gap) and JSON with
``--json``.  Bad input exits with status 2 and one line ``modse-plan: error: ...``.
Torch-free: only numpy and the C++ planner are imported.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np

from modse_megatron.cli_common import OneLineArgumentParser, fail

from .options import BALANCE_MODES, PlanOptions
from .plan import BatchPlacementPlan, PlacementPlan, plan_placement_batch
from .sizes import widths_from_ratios

PROG = "modse-plan"
DEFAULTS = PlanOptions()  # the flags' defaults are the API's
# With replicas these methods place the chosen copies optimally; `optimal` asks more (every
# choice of copy counts), so the table says which of the two is proven.
EXACT_FOR_COPIES = ("one-expert-per-rank", "branch-and-bound")

LOADS_FROM_HELP = (
    "JSON file with measured tokens per expert: a list of numbers (one layer), "
    '{"loads": [...]} (one layer) or {"layers": [[...], ...]} (one row per MoE layer, planned '
    "in one batched call)"
)


def _fail(message: str) -> NoReturn:
    fail(PROG, message)


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


DESCRIPTION = """\
Place MoDSE experts (different FFN widths) on expert-parallel ranks, per MoE layer:
equal memory per rank where the sizes allow it (complementary pairs share a rank), then
minimal max compute (sum of load x width per rank), then balanced token inflow per node,
then the fewest bytes moved from --previous.  With --replicas N, N extra slots hold copies
of busy experts (their tokens split evenly between copies, copies on distinct ranks unless
--stack-copies), how many of each chosen together with the placement.
Every plan reports its proven lower bound, the gap to it, and whether it is optimal."""

EPILOG = """\
examples:
  modse-plan --ratios 4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5 --unit 256 --ranks 4
  modse-plan --widths 1152,128,1024,256 --loads 10,3,7,9 --ranks 2 --json
  modse-plan --ratios 4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5 --unit 256 --repeat 8 \\
      --loads-from routing.json --ranks 16 --ranks-per-node 8
  modse-plan --widths 1152,128,1024,256 --loads 40,3,7,9 --ranks 3 --replicas 2"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sizes = p.add_mutually_exclusive_group(required=True)
    sizes.add_argument("--widths", metavar="W,W,...",
                       help="expert FFN widths (or parameter counts), e.g. 1152,128")
    sizes.add_argument(
        "--ratios", metavar="A:B,...",
        help="MoDSE pairs a:b of a unit width, e.g. 4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5 (needs --unit)",
    )
    p.add_argument("--unit", type=int, metavar="U", help="width of one ratio unit, e.g. 256")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="repeat the ratio list N times (default 1)")
    loads = p.add_mutually_exclusive_group()
    loads.add_argument("--loads", metavar="T,T,...",
                       help="tokens per expert, comma-separated (default: uniform)")
    loads.add_argument("--loads-from", metavar="FILE", help=LOADS_FROM_HELP)
    p.add_argument("--ranks", type=int, required=True, metavar="R",
                   help="expert-parallel ranks; must divide the number of experts")
    p.add_argument("--ranks-per-node", type=int, metavar="G",
                   help="GPUs per node; must divide R (enables node inflow balancing)")
    p.add_argument(
        "--replicas", type=int, default=DEFAULTS.num_replicas, metavar="N",
        help="extra expert slots holding copies of the busiest experts (DeepSeek EPLB's "
        "redundant experts); experts + N must be a multiple of R, N even when complementary "
        f"pairs are kept together (default {DEFAULTS.num_replicas})",
    )
    p.add_argument(
        "--joint-counts", action=argparse.BooleanOptionalAction, default=DEFAULTS.joint_counts,
        help="with --replicas: choose copies per expert together with the placement (never "
        "worse); --no-joint-counts keeps EPLB's greedy counts, which minimise the heaviest copy, "
        f"not the heaviest rank (default {'on' if DEFAULTS.joint_counts else 'off'})",
    )
    p.add_argument(
        "--stack-copies", action="store_true", default=DEFAULTS.stack_copies,
        help="with --replicas: copies of one expert may share a rank (EPLB's behaviour); "
        "default: every copy on a distinct rank",
    )
    p.add_argument(
        "--groups", type=int, default=DEFAULTS.num_groups, metavar="G",
        help="node-limited placement (DeepSeek EPLB): G groups of consecutive experts, each with "
        "all its copies on one node of --ranks-per-node ranks (default 0: off)",
    )
    p.add_argument("--previous", metavar="r,r,...",
                   help="current rank of every expert (plans that move less win ties)")
    p.add_argument("--balance", choices=BALANCE_MODES, default=DEFAULTS.balance,
                   help="memory_then_compute: keep complementary pairs together when possible; "
                   f"compute: ignore memory, minimise max compute (default {DEFAULTS.balance})")
    p.add_argument("--bytes-per-param", type=float, default=DEFAULTS.bytes_per_param,
                   metavar="B", help="bytes per unit of size, for moved bytes "
                   f"(default {DEFAULTS.bytes_per_param:g})")
    p.add_argument(
        "--move-slack", type=float, default=DEFAULTS.move_slack, metavar="X",
        help="accept up to this fraction more max compute to move fewer bytes "
        f"(default {DEFAULTS.move_slack:g})",
    )
    p.add_argument(
        "--max-move-fraction", type=float, default=DEFAULTS.max_move_fraction, metavar="F",
        help="with --previous: move at most this share of each layer's expert bytes "
        f"(default {DEFAULTS.max_move_fraction:g}: no limit)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--details", action="store_true", help="rank tables for every layer")
    return p


def _load_file(path: str) -> np.ndarray:
    """Loads as [L, n] from the JSON formats in LOADS_FROM_HELP."""
    try:
        data: Any = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read --loads-from {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"--loads-from {path} is not valid JSON: {exc.msg} (line {exc.lineno})"
        ) from None
    if isinstance(data, dict):
        if "layers" in data:
            rows = data["layers"]
        elif "loads" in data:
            rows = [data["loads"]]
        else:
            raise ValueError(f'--loads-from {path}: expected a "loads" or "layers" key')
    elif isinstance(data, list):
        rows = [data]
    else:
        raise ValueError(f"--loads-from {path}: expected a list or an object")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError(f'--loads-from {path}: "layers" must be a non-empty list of lists')
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"--loads-from {path}: all layers must have the same number of experts")
    try:
        return np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"--loads-from {path}: loads must be numbers") from None


def _plan(args: argparse.Namespace) -> tuple[list[float], BatchPlacementPlan]:
    if args.ratios is not None:
        if args.unit is None:
            raise ValueError("--ratios needs --unit (the width of one ratio unit, e.g. --unit 256)")
        sizes = [float(x) for x in widths_from_ratios(args.ratios, args.unit, args.repeat)]
    else:
        if args.unit is not None or args.repeat != 1:
            raise ValueError("--unit/--repeat only apply to --ratios")
        sizes = _numbers(args.widths, "--widths")
    if args.loads_from is not None:
        loads = _load_file(args.loads_from)
    elif args.loads is not None:
        loads = np.asarray([_numbers(args.loads, "--loads")])
    else:
        loads = None
    previous = None if args.previous is None else _ints(args.previous, "--previous")
    options = PlanOptions(balance=args.balance, bytes_per_param=args.bytes_per_param,
                          move_slack=args.move_slack, max_move_fraction=args.max_move_fraction,
                          num_replicas=args.replicas,
                          joint_counts=args.joint_counts, stack_copies=args.stack_copies,
                          num_groups=args.groups)
    batch = plan_placement_batch(sizes, loads, args.ranks, args.ranks_per_node, previous,
                                 options=options)
    return sizes, batch


def _g(x: float) -> str:
    return f"{x:.6g}"


def format_plan(plan: PlacementPlan, title: str = "") -> str:
    """Readable table: rank -> experts, memory, compute; then the quality line."""
    k, g = plan.experts_per_rank, plan.ranks_per_node
    lines = [title] if title else []
    experts = [", ".join(map(str, e)) for e in plan.experts_of_rank]
    width = max(7, *(len(e) for e in experts))
    lines.append(f"{'rank':>4}  {'node':>4}  {'experts':<{width}}  {'memory':>10}  {'compute':>12}")
    for r in range(plan.num_ranks):
        lines.append(
            f"{r:>4}  {r // g:>4}  {experts[r]:<{width}}  {_g(plan.memory_per_rank[r]):>10}  "
            f"{_g(plan.compute_per_rank[r]):>12}"
        )
    status = f"optimal ({plan.method})" if plan.optimal else f"not proven optimal ({plan.method})"
    if plan.num_replicas and not plan.optimal and plan.method in EXACT_FOR_COPIES:
        status = f"exact for these copies ({plan.method}), not proven over all copy counts"
    memory = "memory equal" if plan.memory_balanced else (
        f"memory {_g(min(plan.memory_per_rank))}..{_g(max(plan.memory_per_rank))}")
    if plan.paired:
        memory += " (complementary pairs kept together)"
    per_rank = f"{k} experts/rank"
    if plan.num_replicas:
        n = len(plan.copies_per_expert)
        per_rank = f"{k} slots/rank ({n} experts + {plan.num_replicas} replicas)"
        copies = [f"{e} x{c} on ranks {','.join(map(str, plan.ranks_of_expert[e]))}"
                  for e, c in enumerate(plan.copies_per_expert) if c > 1]
        lines.append(f"copies: {' | '.join(copies)}")
    lines.append(
        f"max compute {_g(plan.max_compute)} | lower bound {_g(plan.lower_bound)} | "
        f"gap {plan.gap:.3f}% | {status} | {memory} | {per_rank} | "
        f"moved {_g(plan.moved_bytes)} bytes"
    )
    if len(plan.node_inflow) > 1:
        lines.append(
            f"node inflow: {', '.join(_g(x) for x in plan.node_inflow)} "
            f"(max {_g(max(plan.node_inflow))}, lower bound {_g(plan.node_inflow_bound)})"
        )
    return "\n".join(lines)


def format_batch(batch: BatchPlacementPlan, details: bool) -> str:
    """One summary row per layer (and every rank table with ``details``)."""
    if len(batch) == 1:
        return format_plan(batch[0])
    lines = [f"{'layer':>5}  {'max_compute':>12}  {'lower_bound':>12}  {'gap%':>7}  "
             f"{'optimal':>7}  {'moved_bytes':>12}  method"]
    for i in range(len(batch)):
        p = batch[i]
        lines.append(
            f"{i:>5}  {_g(p.max_compute):>12}  {_g(p.lower_bound):>12}  {p.gap:>7.3f}  "
            f"{str(p.optimal):>7}  {_g(p.moved_bytes):>12}  {p.method}"
        )
    lines.append(
        f"{len(batch)} layers: mean gap {batch.gap.mean():.3f}%, max gap {batch.gap.max():.3f}%, "
        f"{int(batch.optimal.sum())} proven optimal"
    )
    if details:
        for i in range(len(batch)):
            lines += ["", format_plan(batch[i], title=f"layer {i}")]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes, batch = _plan(args)
    except (ValueError, ImportError) as exc:  # bad input, or the C++ planner is not built
        _fail(str(exc))
    if args.json:
        # One layer: the plan itself; many: {"sizes", "layers": [plan, ...]}.
        layers = [batch[i].to_dict() for i in range(len(batch))]
        if len(layers) == 1:
            out = {**layers[0], "sizes": sizes}
        else:
            out = {"sizes": sizes, "layers": layers}
        print(json.dumps(out, indent=2))
    else:
        print(format_batch(batch, args.details))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
