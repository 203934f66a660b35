"""Realise an expert placement (expert -> EP rank) as megatron's physical slot order.

Megatron's dispatchers hard-wire experts ``[r*L, (r+1)*L)`` to EP rank r. Instead of forking
them, a MoDSE layer lists its experts *rank by rank*: physical slot ``s`` holds logical expert
``slot_to_logical[s]``; the router's rows and the expert modules are built in that order, and
every expert keeps its logical id (checkpoints, statistics and re-planning use logical ids).

Placement policies (``MoDSEConfig.moe_expert_placement``):

* ``contiguous`` - megatron's default (slot = logical id);
* ``pairs`` - sort by width, pair the largest with the smallest (MoDSE's complementary pairs
  sum to a constant), deal whole pairs to ranks: every rank holds equal parameters;
* ``auto`` - the C++ placement planner (``plan_placement`` with uniform loads: equal memory,
  then compute).  If it is not built, planning stops with one line naming the fix (``pip
  install -e .``), never silently falls back to another policy;
* an explicit list of ranks, one per logical expert;
* one such list per MoE layer, separated by ``;`` (``"0,1,1,0;1,0,0,1"``: MoE layers in model
  order; re-planning writes these, since each layer's routing is its own).  A named mode or a
  single list applies to every MoE layer.

Pure Python (the planner is imported only for ``auto``): ``MoDSEConfig`` validates with it.
"""
from __future__ import annotations

from typing import Sequence

PLACEMENT_MODES = ("auto", "pairs", "contiguous")


def layer_specs(spec: str, num_moe_layers: int | None = None) -> list[str]:
    """The placement spec of every MoE layer: ``[spec]`` when one applies to all, else one per
    layer (``;``-separated); with ``num_moe_layers`` the count must be 1 or that."""
    parts = [p.strip() for p in spec.split(";")] if ";" in spec else [spec]
    if any(p in PLACEMENT_MODES for p in parts) and len(parts) > 1:
        raise ValueError(f"moe_expert_placement={spec!r} mixes a named mode with per-layer lists: give "
                         f"{', '.join(PLACEMENT_MODES)} alone, or one list of ranks per MoE layer")
    if num_moe_layers is not None and len(parts) not in (1, num_moe_layers):
        raise ValueError(f"moe_expert_placement gives {len(parts)} per-layer placements but the model has "
                         f"{num_moe_layers} MoE layers: give one list per MoE layer (';'-separated) or one for all")
    return parts


def layer_spec(spec: str, layer: int) -> str:
    """The placement spec of MoE layer ``layer`` (0-based, in model order)."""
    parts = layer_specs(spec)
    if len(parts) == 1:
        return parts[0]
    if not 0 <= layer < len(parts):
        raise ValueError(f"moe_expert_placement has {len(parts)} per-layer placements, none for MoE layer "
                         f"{layer}: give one list per MoE layer")
    return parts[layer]


def format_layer_ranks(ranks_per_layer: Sequence[Sequence[int]]) -> str:
    """A ``moe_expert_placement`` value for these per-layer placements (one list when all agree)."""
    lists = [",".join(str(int(r)) for r in ranks) for ranks in ranks_per_layer]
    return lists[0] if len(set(lists)) == 1 else ";".join(lists)


def placement_ranks(spec: str, num_experts: int, ep_size: int) -> list[int] | None:
    """Parse an explicit placement (``"0,1,1,0"``: rank of each expert); None for named modes.
    A per-layer spec (``;``) is checked layer by layer; the first layer's list is returned.

    Megatron's dispatchers need exactly ``num_experts / ep_size`` experts per rank.
    """
    parts = layer_specs(spec)
    if len(parts) > 1:
        return [placement_ranks(p, num_experts, ep_size) for p in parts][0]
    if spec in PLACEMENT_MODES:
        return None
    try:
        ranks = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"moe_expert_placement={spec!r} is not valid: use auto, pairs, contiguous or a comma "
            "list with the EP rank of every expert"
        ) from None
    if len(ranks) != num_experts:
        raise ValueError(
            f"moe_expert_placement lists {len(ranks)} ranks but there are {num_experts} experts: "
            "give one EP rank per expert"
        )
    if num_experts % ep_size:
        raise ValueError(
            f"num_moe_experts={num_experts} is not divisible by expert_model_parallel_size="
            f"{ep_size}: choose an EP size that divides the expert count"
        )
    if any(not 0 <= r < ep_size for r in ranks):
        raise ValueError(
            f"moe_expert_placement has a rank outside 0..{ep_size - 1}: use EP ranks only"
        )
    per_rank = num_experts // ep_size
    for r in range(ep_size):
        if ranks.count(r) != per_rank:
            raise ValueError(
                f"moe_expert_placement puts {ranks.count(r)} experts on EP rank {r}, not "
                f"{per_rank}: every rank of {ep_size} must hold {per_rank} experts"
            )
    return ranks


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


def planned_ranks(widths: Sequence[int], ep_size: int) -> list[int]:
    """The C++ planner's plan with uniform loads (equal memory, then compute).

    Raises ImportError (one line: why, and ``pip install -e .``) when the planner is not built.
    """
    from .plan import plan_placement

    return list(plan_placement(list(widths), num_ranks=ep_size).rank_of_expert)


def resolve_ranks(spec: str, widths: Sequence[int], ep_size: int, layer: int = 0) -> list[int]:
    """EP rank of every logical expert of MoE layer ``layer`` (0-based) under a
    ``moe_expert_placement`` spec."""
    n = len(widths)
    spec = layer_spec(spec, layer)
    explicit = placement_ranks(spec, n, ep_size)
    if explicit is not None:
        return explicit
    assert spec in PLACEMENT_MODES
    if spec == "contiguous" or ep_size == 1:
        return contiguous_ranks(n, ep_size)
    if spec == "auto":
        return planned_ranks(widths, ep_size)
    return paired_ranks(widths, ep_size)


def resolve_layer_ranks(spec: str, widths: Sequence[int], ep_size: int, num_moe_layers: int) -> list[list[int]]:
    """EP rank of every logical expert, for each of the ``num_moe_layers`` MoE layers."""
    parts = layer_specs(spec, num_moe_layers)
    if len(parts) == 1:
        return [resolve_ranks(parts[0], widths, ep_size)] * num_moe_layers
    return [resolve_ranks(p, widths, ep_size) for p in parts]


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
    "PLACEMENT_MODES",
    "check_slot_order",
    "contiguous_ranks",
    "format_layer_ranks",
    "layer_spec",
    "layer_specs",
    "paired_ranks",
    "placement_ranks",
    "planned_ranks",
    "resolve_layer_ranks",
    "resolve_ranks",
    "slot_order",
]
