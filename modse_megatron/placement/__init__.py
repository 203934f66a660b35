"""Expert placement for MoDSE: which rank holds which (variable-width) expert.

``plan_placement`` plans one MoE layer, ``plan_placement_batch`` many layers in one C++ call;
``widths_from_ratios`` turns MoDSE pair ratios into expert widths; ``num_replicas`` adds
redundant copies of busy experts (EPLB-style).  The ``modse-plan`` CLI
(``modse_megatron.placement.cli``) wraps them.  Torch-free: safe to import anywhere.
"""
from .plan import (
    BALANCE_MODES,
    METHODS,
    BatchPlacementPlan,
    PlacementPlan,
    parse_ratios,
    plan_placement,
    plan_placement_batch,
    widths_from_ratios,
)

__all__ = [
    "BALANCE_MODES",
    "METHODS",
    "BatchPlacementPlan",
    "PlacementPlan",
    "parse_ratios",
    "plan_placement",
    "plan_placement_batch",
    "widths_from_ratios",
]
