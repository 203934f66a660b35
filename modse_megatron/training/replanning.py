"""Re-planning expert placement during training (``--moe-replan-interval``) and live migration.

Every step adds the tokens routed to each logical expert (all EP ranks agree on them) to a
moving average and reports the EP ranks' compute imbalance (max / mean of Σ tokens x width)
for the current placement. Every ``--moe-replan-interval`` iterations the planner proposes a
placement for the averaged loads (:func:`modse_megatron.moe.replan.propose`); when it is better
by more than ``--moe-replan-min-gain`` the run migrates at that iteration boundary, without a
restart:

1. the full training state (model, fp32 main params and Adam moments of the distributed
   optimizer, scheduler, RNG streams, data position) is saved as a dist_checkpointing
   checkpoint, whose tensors are layout- and placement-free (experts by logical id, router rows
   in logical order);
2. model, DDP (gradient buffers and buckets) and optimizer are rebuilt with the new placement:
   router rows, expert bias and the slot -> logical map in the new physical slot order, each
   expert's weights on its new EP rank;
3. the state is loaded back (the same layout, so RNG streams are restored too) and the
   temporary checkpoint removed.

So every moved expert carries its weights and optimizer state, and placement being
math-invariant, a run that migrates trains to the losses of one that never does (tested).
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from modse_megatron.moe.replan import LoadStats, imbalance, propose


class Replanner:
    """Load statistics, the re-planning decision and the metrics rows of one run."""

    def __init__(self, args, widths: list[int], ep: int, ranks: list[int], loads: LoadStats,
                 migrate: Callable[[list[int]], None], metrics, num_moe_layers: int, bytes_per_param: int):
        self.args, self.widths, self.ep, self.ranks = args, widths, ep, list(ranks)
        self.loads, self.migrate, self.metrics = loads, migrate, metrics
        self.num_moe_layers, self.bytes_per_param = num_moe_layers, bytes_per_param
        self.rng = random.Random(args.optim.seed)

    def observe(self, record: dict[str, Any]) -> None:
        """Fold this step's routed tokens into the averages; add the compute imbalance."""
        tokens = record.get("tokens_per_expert")
        if not tokens:
            return
        self.loads.update(tokens)
        step = [sum(float(counts[e]) for counts in tokens.values()) for e in range(len(self.widths))]
        record["compute_max_over_mean"] = imbalance(self.widths, step, self.ranks, self.ep)

    def maybe_replan(self, iteration: int) -> None:
        r = self.args.run
        if not r.moe_replan_interval or iteration % r.moe_replan_interval or not self.loads.ema:
            return
        proposal = propose(self.widths, self.loads.ema, self.ep, self.ranks, policy=r.moe_replan_policy,
                           min_gain=r.moe_replan_min_gain, move_slack=r.moe_replan_move_slack, rng=self.rng)
        if not proposal.migrate:
            return
        start = time.perf_counter()
        moved = [e for e, (a, b) in enumerate(zip(self.ranks, proposal.ranks)) if a != b]
        self.migrate(proposal.ranks)
        self.ranks = list(proposal.ranks)
        gated = 2 if self.args.model.swiglu else 1
        params = sum((gated + 1) * self.args.model.hidden_size * self.widths[e] for e in moved) * self.num_moe_layers
        self.metrics.event({
            "iteration": iteration, "event": "replan", "layer": "all", "policy": r.moe_replan_policy,
            "moved_experts": len(moved), "moved_bytes": params * self.bytes_per_param,
            "max_over_mean_compute_before": round(proposal.before, 6),
            "max_over_mean_compute_after": round(proposal.after, 6),
            "placement": proposal.ranks, "seconds": round(time.perf_counter() - start, 3),
        })
        self.metrics.message(f"iteration {iteration}: re-planned placement ({len(moved)} experts moved, compute "
                             f"max/mean {proposal.before:.3f} -> {proposal.after:.3f})")


def migration_dir(args) -> Path:
    """Where the migration checkpoint goes: a directory every rank can reach (under --save, else
    under --log-dir)."""
    return Path(args.run.save or args.run.log_dir) / ".replan"


def clear_migration_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
