"""The MoDSE MoE layer: megatron's ``MoELayer`` with variable-width experts and a placement.

Nothing of ``MoELayer``'s forward, dispatchers or aux-loss plumbing is forked. The subclass
only decides, before megatron builds anything, *what* it builds:

* the expert widths (``MoDSEConfig.expert_widths``) and a placement (``placement.layout``),
  realised as the physical slot order ``slot_to_logical`` (slots ``[r*L, (r+1)*L)`` live on
  EP rank r, exactly as megatron's dispatchers expect);
* the router: ``MoDSERouter`` (rows in slot order, checkpointed in logical order,
  learned/frozen/random, token/sequence routing) through ``MoESubmodules.router``;
* the experts: :class:`~modse_megatron.moe.experts.MoDSEExperts` built with this rank's
  widths and logical ids through ``MoESubmodules.experts``.

Checkpoints come out layout-free: experts are keyed by logical id and the router writes
logical rows, so a layer saved at one EP/ETP size or placement loads at any other.
Re-planning (later) = a new ``slot_to_logical``: permute router rows, move expert weights.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import ModuleSpec

from ..config import MoDSEConfig, moe_layer_indices
from ..placement.layout import check_slot_order, layer_specs, resolve_ranks, slot_order
from . import te_experts
from .experts import MoDSEExperts
from .router import MoDSERouter


def resolve_experts_impl(requested: str, config=None) -> str:
    """Map ``MoDSEConfig.moe_experts_impl`` to an implementation of :class:`MoDSEExperts`.

    ``auto`` is ``te`` when ``config`` (the TransformerConfig) asks for FP8 and TransformerEngine
    and CUDA are available: FP8 GEMMs need TE. Otherwise it is the grouped fast path: in
    ``benchmarks/moe_layer.py`` (CPU, fp32, paper ratios) it runs as fast as the loop or
    slightly faster (1.0-1.07x) and keeps ~4x less activation memory for backward (it stores
    only fc1 outputs). FP8 without TE is refused earlier, by the training entry point.
    ``te`` on a machine without TE or CUDA raises a one-line ``ValueError`` naming the fix.
    """
    if requested == "auto":
        fp8 = bool(getattr(config, "fp8", None))
        if fp8 and te_experts.te_unavailable_reason(import_te=True) is None:
            return te_experts.TE_IMPL
        return "grouped"
    if requested == te_experts.TE_IMPL:
        te_experts.check_te_available()
    return requested


def modse_moe_submodules(
    config,
    modse_config: MoDSEConfig,
    ep_size: int,
    submodules: Optional[MoESubmodules] = None,
    *,
    expert_widths: Optional[Sequence[int]] = None,
    slot_to_logical: Optional[Sequence[int]] = None,
    moe_layer: int = 0,
) -> tuple[MoESubmodules, list[int], list[int]]:
    """What megatron's ``MoELayer`` must build for a MoDSE layer: ``(submodules, widths, slots)``.

    ``submodules`` (e.g. megatron's, carrying the shared-expert spec) gets MoDSE experts (built
    with the placement; each EP rank takes its slots from ``pg_collection.ep``) and the MoDSE
    router. ``widths``: every logical expert's width; ``slots``: logical expert per physical
    slot (from ``modse_config``'s placement of MoE layer ``moe_layer`` (0-based, in model order)
    for ``ep_size`` ranks unless given).
    """
    num_experts = config.num_moe_experts
    widths = list(expert_widths) if expert_widths is not None else modse_config.expert_widths(config)
    if len(widths) != num_experts:
        raise ValueError(f"{len(widths)} expert widths for num_moe_experts={num_experts}: give one per expert")
    if slot_to_logical is None:
        ranks = resolve_ranks(modse_config.moe_expert_placement, widths, ep_size, moe_layer)
        slot_to_logical = slot_order(ranks, ep_size)
    slots = check_slot_order(slot_to_logical, num_experts)
    experts = ModuleSpec(
        module=MoDSEExperts,
        params=dict(
            slot_to_logical=slots,
            all_expert_widths=widths,
            impl=resolve_experts_impl(modse_config.moe_experts_impl, config),
        ),
    )
    router = functools.partial(
        MoDSERouter,
        router_type=modse_config.moe_router_type,
        granularity=modse_config.moe_routing_granularity,
        slot_to_logical=slots,
    )
    submodules = dataclasses.replace(submodules or MoESubmodules(), experts=experts, router=router)
    return submodules, widths, slots


class MoDSEMoELayer(MoELayer):
    """``MoELayer`` whose experts have individual widths and live where a placement says.

    For building one layer directly; model specs (``moe.specs``) use megatron's own
    ``MoELayer`` with :func:`modse_moe_submodules`, which builds exactly the same modules (so
    megatron's ``TransformerLayer`` recognises the layer and hands it its process groups).

    Args (beyond ``MoELayer``'s):
        modse_config: MoDSE options (widths, placement, router variant, experts impl).
        expert_widths: override the widths resolved from ``modse_config`` (logical order).
        slot_to_logical: override the placement: logical expert in each physical slot.

    With a per-layer ``moe_expert_placement`` the layer takes the list of its MoE layer
    (``layer_number`` is 1-based over all layers, as megatron counts).
    """

    def __init__(
        self,
        config,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        *,
        modse_config: Optional[MoDSEConfig] = None,
        expert_widths: Optional[Sequence[int]] = None,
        slot_to_logical: Optional[Sequence[int]] = None,
    ):
        modse_config = modse_config if modse_config is not None else MoDSEConfig()
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        moe_layer = 0
        if layer_number is not None and len(layer_specs(modse_config.moe_expert_placement)) > 1:
            moe_layer = moe_layer_indices(config).index(layer_number - 1)
        submodules, widths, slots = modse_moe_submodules(
            config, modse_config, pg_collection.ep.size(), submodules,
            expert_widths=expert_widths, slot_to_logical=slot_to_logical, moe_layer=moe_layer,
        )
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)
        self.modse_config = modse_config
        self.expert_widths = widths
        """Full width of every logical expert."""
        self.slot_to_logical = slots
        """Logical expert held by each physical slot (router column / dispatcher index)."""

    @property
    def local_logical_ids(self) -> list[int]:
        """Logical ids of this rank's experts, in local (slot) order."""
        return list(self.experts.logical_ids)

    @property
    def routing_stats(self) -> torch.Tensor:
        """Tokens this rank routed to each logical expert since the last reset (router's)."""
        return self.router.routing_stats

    def reset_routing_stats(self) -> None:
        """Start a new routing-statistics window."""
        self.router.reset_routing_stats()


__all__ = ["MoDSEMoELayer", "modse_moe_submodules", "resolve_experts_impl"]
