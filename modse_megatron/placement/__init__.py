"""Expert placement for MoDSE: which rank holds which (variable-width) expert.

``plan_placement`` plans one MoE layer, ``plan_placement_batch`` many layers in one C++ call,
both with ``PlanOptions`` (or its fields as keywords); ``widths_from_ratios`` turns MoDSE pair
ratios into expert widths; ``num_replicas`` adds redundant copies of busy experts
(EPLB-style).  The ``modse-plan`` CLI (``modse_megatron.placement.cli``) wraps them.
``layout`` realises a placement as megatron's physical slot order (the MoE layer's
``moe_expert_placement`` policies).

Modules: ``plan`` (API over the C++ core, ``_planner``), ``options`` (``PlanOptions``),
``sizes`` (ratio parsing), ``layout`` (policies -> slot order), ``cli``.
Torch-free: safe to import anywhere; the C++ core is imported on first use.
"""
from .options import BALANCE_MODES, PlanOptions
from .plan import (
    METHODS,
    BatchPlacementPlan,
    PlacementPlan,
    plan_placement,
    plan_placement_batch,
    planner_unavailable_reason,
)
from .sizes import parse_ratio_pairs, parse_ratios, widths_from_ratios

__all__ = [
    "BALANCE_MODES",
    "METHODS",
    "BatchPlacementPlan",
    "PlacementPlan",
    "PlanOptions",
    "parse_ratio_pairs",
    "parse_ratios",
    "plan_placement",
    "plan_placement_batch",
    "planner_unavailable_reason",
    "widths_from_ratios",
]
