"""Re-planning expert placement during training (``--moe-replan-interval``) and live migration.

Every step adds the tokens routed to each logical expert of each MoE layer (all EP ranks agree
on them) to a per-layer moving average and reports the EP ranks' compute imbalance (max / mean of
Σ tokens x width) for the current placements. Every ``--moe-replan-interval`` iterations the
planner proposes, for every MoE layer, a placement for its averaged loads
(:func:`modse_megatron.moe.replan.propose_layers`) that moves at most ``--moe-replan-max-move``
of the layer's expert bytes; when some layer's is better by more than ``--moe-replan-min-gain``
the run migrates those layers at that iteration boundary, without a restart:

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

from modse_megatron.moe.replan import LoadStats, layer_imbalance, propose_layers, summed_imbalance


class Replanner:
    """Load statistics, the re-planning decision and the metrics rows of one run.

    ``ranks``: the current placement of every MoE layer (0-based, model order);
    ``layer_numbers``: their 1-based layer numbers (the keys of ``tokens_per_expert``);
    ``migrate(ranks)`` moves the run to new per-layer placements."""

    def __init__(self, args, widths: list[int], ep: int, ranks: list[list[int]], layer_numbers: list[int],
                 loads: LoadStats, migrate: Callable[[list[list[int]]], None], metrics, bytes_per_param: int):
        self.args, self.widths, self.ep = args, widths, ep
        self.ranks = [list(r) for r in ranks]
        self.layer_numbers = [str(n) for n in layer_numbers]
        self.loads, self.migrate, self.metrics = loads, migrate, metrics
        self.bytes_per_param = bytes_per_param
        self.rng = random.Random(args.optim.seed)
        self.budget_said = False

    def observe(self, record: dict[str, Any]) -> None:
        """Fold this step's routed tokens into the averages; add the compute imbalance: over the
        step (``compute_max_over_mean``: each rank's compute summed over layers) and as the step
        waits for it (``compute_layer_max_over_mean``: every layer waits for its slowest rank)."""
        tokens = record.get("tokens_per_expert")
        if not tokens:
            return
        self.loads.update(tokens)
        zero = [0.0] * len(self.widths)
        per_layer = [[float(c) for c in tokens.get(n, zero)] for n in self.layer_numbers]
        record["compute_max_over_mean"] = summed_imbalance(self.widths, per_layer, self.ranks, self.ep)
        record["compute_layer_max_over_mean"] = layer_imbalance(self.widths, per_layer, self.ranks, self.ep)

    def _proposals(self, max_move: float, kw: dict):
        loads = [self.loads.layers.get(n) for n in self.layer_numbers]
        return propose_layers(self.widths, loads, self.ep, self.ranks, max_move_fraction=max_move, rng=self.rng, **kw)

    def maybe_replan(self, iteration: int) -> None:
        r = self.args.run
        if not r.moe_replan_interval or iteration % r.moe_replan_interval or not self.loads.layers:
            return
        kw = dict(policy=r.moe_replan_policy, min_gain=r.moe_replan_min_gain, move_slack=r.moe_replan_move_slack)
        proposals = self._proposals(r.moe_replan_max_move, kw)
        if not proposals.migrate:
            self._say_if_budget_blocks(kw)
            return
        start = time.perf_counter()
        self.migrate(proposals.ranks)
        seconds = round(time.perf_counter() - start, 3)
        gated = 2 if self.args.model.swiglu else 1
        moved_total = 0
        for i, p in sorted(proposals.changed.items()):
            moved = [e for e, (a, b) in enumerate(zip(self.ranks[i], p.ranks)) if a != b]
            moved_total += len(moved)
            params = sum((gated + 1) * self.args.model.hidden_size * self.widths[e] for e in moved)
            self.metrics.event({
                "iteration": iteration, "event": "replan", "layer": self.layer_numbers[i],
                "policy": r.moe_replan_policy, "moved_experts": len(moved), "moved_bytes": params * self.bytes_per_param,
                "max_over_mean_compute_before": round(p.before, 6), "max_over_mean_compute_after": round(p.after, 6),
                "placement": p.ranks, "seconds": seconds,
            })
        self.ranks = [list(x) for x in proposals.ranks]
        worst = max(proposals.changed.values(), key=lambda p: p.before)
        self.metrics.message(f"iteration {iteration}: re-planned {len(proposals.changed)} MoE layer(s) ({moved_total} "
                             f"experts moved; the worst layer's compute max/mean {worst.before:.3f} -> {worst.after:.3f})")

    def _say_if_budget_blocks(self, kw: dict) -> None:
        """Once per run: say when --moe-replan-max-move is what stops a worthwhile migration."""
        if self.budget_said or self.args.run.moe_replan_max_move >= 1 or kw["policy"] != "planner":
            return
        free = self._proposals(1.0, kw)
        if free.migrate:
            self.budget_said = True
            best = max(free.changed.values(), key=lambda p: p.before - p.after)
            self.metrics.message(
                f"re-planning: a placement with compute max/mean {best.before:.3f} -> {best.after:.3f} exists but no "
                f"exchange of experts fits --moe-replan-max-move {self.args.run.moe_replan_max_move:g}; raise it to "
                f"let re-planning move more per migration")


def migrate(args, config, vocab_rows: int, ranks: list[list[int]], iteration: int, ddp, optimizer, scheduler,
            meta: dict[str, Any]):
    """Move a run to the per-layer placements ``ranks`` at an iteration boundary (steps 1-3 of the
    module docstring); returns the new ``(ddp, optimizer, scheduler)``. Collective: every rank
    calls it with the same arguments."""
    import torch.distributed as dist

    from modse_megatron.placement.layout import format_layer_ranks
    from modse_megatron.training import checkpointing
    from modse_megatron.training.model import build_model, wrap_and_optimize

    root = migration_dir(args)
    if dist.get_rank() == 0:
        clear_migration_dir(root)
    dist.barrier()
    checkpointing.save_checkpoint(str(root), iteration, ddp, optimizer, scheduler, meta)
    args.modse.moe_expert_placement = format_layer_ranks(ranks)
    ddp, optimizer, scheduler = wrap_and_optimize(args, config, build_model(args, config, vocab_rows))
    checkpointing.load_checkpoint(str(root), ddp, optimizer, scheduler, verify=False)
    dist.barrier()
    if dist.get_rank() == 0:
        clear_migration_dir(root)
    return ddp, optimizer, scheduler


def migration_dir(args) -> Path:
    """Where the migration checkpoint goes: a directory every rank can reach (under --save, else
    under --log-dir)."""
    return Path(args.run.save or args.run.log_dir) / ".replan"


def clear_migration_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
