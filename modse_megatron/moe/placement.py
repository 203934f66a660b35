"""Realise an expert placement (expert -> EP rank) as megatron's physical slot order.

Megatron's dispatchers hard-wire experts ``[r*L, (r+1)*L)`` to EP rank r. Instead of forking
them, a MoDSE layer lists its experts *rank by rank*: physical slot ``s`` holds logical expert
``slot_to_logical[s]``; the router's rows and the expert modules are built in that order, and
every expert keeps its logical id (checkpoints, statistics and re-planning use logical ids).

Placement policies (``MoDSEConfig.moe_expert_placement``):

* ``contiguous`` - megatron's default (slot = logical id);
* ``pairs`` - sort by width, pair the largest with the smallest (MoDSE's complementary pairs
  sum to a constant), deal whole pairs to ranks: every rank holds equal parameters;
* ``auto`` - the placement planner (``modse_megatron.placement``) when it is importable,
  else ``pairs``;
* an explicit list of ranks, one per logical expert.
"""
from __future__ import annotations

from typing import Sequence

from ..config import PLACEMENT_MODES, placement_ranks


def contiguous_ranks(num_experts: int, ep_size: int) -> list[int]:
    """Megatron's layout: expert e on rank ``e // (num_experts / ep_size)``."""
    per_rank = _experts_per_rank(num_experts, ep_size)
    return [e // per_rank for e in range(num_experts)]


def paired_ranks(widths: Sequence[int], ep_size: int) -> list[int]:
    """Pairs-by-sorting: equal parameters per rank for complementary widths.

    With an even number of experts per rank, experts sorted by width (ties by id) are paired
    largest-with-smallest and the pairs dealt round-robin to ranks; with an odd number
    (e.g. one expert per rank) a greedy largest-first fill of the lightest rank is used.
    """
    n = len(widths)
    per_rank = _experts_per_rank(n, ep_size)
    if per_rank == 1:
        return contiguous_ranks(n, ep_size)  # nothing to pair: every rank holds one expert
    order = sorted(range(n), key=lambda e: (-widths[e], e))
    rank_of = [0] * n
    if per_rank % 2 == 0:
        pairs = [(order[i], order[n - 1 - i]) for i in range(n // 2)]
        for j, pair in enumerate(pairs):
            for e in pair:
                rank_of[e] = j % ep_size
        return rank_of
    load, count = [0] * ep_size, [0] * ep_size
    for e in order:
        r = min((r for r in range(ep_size) if count[r] < per_rank), key=lambda r: (load[r], r))
        rank_of[e] = r
        load[r] += widths[e]
        count[r] += 1
    return rank_of


def planned_ranks(widths: Sequence[int], ep_size: int) -> list[int] | None:
    """The placement planner's plan (equal memory, then compute), or None if not importable."""
    try:
        from ..placement import plan_placement
    except ImportError:
        return None
    return list(plan_placement(list(widths), num_ranks=ep_size).rank_of_expert)


def resolve_ranks(spec: str, widths: Sequence[int], ep_size: int) -> list[int]:
    """EP rank of every logical expert under a ``moe_expert_placement`` spec."""
    n = len(widths)
    explicit = placement_ranks(spec, n, ep_size)
    if explicit is not None:
        return explicit
    assert spec in PLACEMENT_MODES
    if spec == "contiguous" or ep_size == 1:
        return contiguous_ranks(n, ep_size)
    if spec == "auto":
        planned = planned_ranks(widths, ep_size)
        if planned is not None:
            return planned
    return paired_ranks(widths, ep_size)


def slot_order(rank_of_expert: Sequence[int], ep_size: int) -> list[int]:
    """Physical slot order: logical ids rank by rank, ascending within a rank."""
    per_rank = _experts_per_rank(len(rank_of_expert), ep_size)
    slots = [e for r in range(ep_size) for e, re in enumerate(rank_of_expert) if re == r]
    counts = [list(rank_of_expert).count(r) for r in range(ep_size)]
    if any(c != per_rank for c in counts):
        raise ValueError(
            f"placement puts {counts} experts on the EP ranks: every rank needs {per_rank}"
        )
    return slots


def check_slot_order(slot_to_logical: Sequence[int], num_experts: int) -> list[int]:
    """Validate a slot order (a permutation of the logical ids) and return it as a list."""
    slots = [int(s) for s in slot_to_logical]
    if sorted(slots) != list(range(num_experts)):
        raise ValueError(
            f"slot_to_logical={slots} is not a permutation of 0..{num_experts - 1}: every "
            "logical expert must live in exactly one slot"
        )
    return slots


def _experts_per_rank(num_experts: int, ep_size: int) -> int:
    if ep_size <= 0 or num_experts % ep_size:
        raise ValueError(
            f"{num_experts} experts cannot be split evenly over {ep_size} EP ranks: choose an "
            "expert_model_parallel_size that divides num_moe_experts"
        )
    return num_experts // ep_size


__all__ = [
    "check_slot_order",
    "contiguous_ranks",
    "paired_ranks",
    "planned_ranks",
    "resolve_ranks",
    "slot_order",
]
