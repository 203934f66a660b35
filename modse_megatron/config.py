"""MoDSE options: expert sizes, placement and router variants, kept out of TransformerConfig.

Megatron's ``TransformerConfig`` knows one ``moe_ffn_hidden_size`` for every expert. MoDSE
needs a width per expert, a placement of experts on EP ranks and a few router switches; they
live here, in one small dataclass, and are *adapted* to a ``TransformerConfig`` (which still
holds everything megatron itself reads: expert count, top-k, dispatcher, parallel sizes).

Every field carries ``metadata={"help": ...}``: the pretraining CLI generates its flags from
them (``moe_expert_size_ratios`` -> ``--moe-expert-size-ratios``), so a new option is one field.

This module is pure Python (no torch, no megatron): the CLI imports it to build its parser.
It is also the one definition of the option choices (router types, routing granularities,
expert implementations) that ``moe/router.py`` and ``moe/experts.py`` import; placement
parsing and policies live in ``modse_megatron.placement`` (torch-free too).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .placement.layout import layer_specs, placement_ranks
from .placement.sizes import parse_ratio_pairs

#: Named expert-size layouts. "paper8" is the 8-expert layout of MoDSE (arXiv 2409.12210):
#: four complementary pairs, so every pair (and every EP rank holding whole pairs) has the
#: same parameter count.
PRESETS: dict[str, str | None] = {
    "paper8": "4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5",
    "uniform": None,
}
#: ``moe_router_type`` (``MoDSERouter``'s ``router_type``).
ROUTER_TYPES = ("learned", "frozen", "random")
#: ``moe_routing_granularity`` (``MoDSERouter``'s ``granularity``).
ROUTING_GRANULARITIES = ("token", "sequence")
#: Expert implementations that run on any device, CPU included (``MoDSEExperts``' ``impl``).
EXPERTS_IMPLS_ANY_DEVICE = ("loop", "grouped")
#: Every implementation ``MoDSEExperts`` builds: ``te`` needs a GPU and TransformerEngine.
EXPERTS_IMPLS_BUILT = (*EXPERTS_IMPLS_ANY_DEVICE, "te")
#: ``moe_experts_impl``: ``auto`` picks one of the others (``moe/layer.py``).
EXPERTS_IMPLS = ("auto", *EXPERTS_IMPLS_BUILT)

#: FP8 GEMMs (TransformerEngine) need every GEMM dimension divisible by 16.
FP8_WIDTH_ALIGNMENT = 16


@dataclass
class MoDSEConfig:
    """Options of a Mixture-of-Diverse-Size-Experts model (one set for every MoE layer)."""

    moe_expert_widths: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit FFN width of every expert, e.g. 72,8,64,16 (overrides ratios)."},
    )
    """Explicit per-expert FFN widths (logical expert order). Exclusive with ratios/preset."""

    moe_expert_size_ratios: str | None = field(
        default=None,
        metadata={"help": "MoDSE pair ratios, e.g. 4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5 (scaled to the uniform parameter count)."},
    )
    """Pairs ``a:b``; each is two experts with widths proportional to a and b. Widths are
    scaled so that their sum equals ``num_moe_experts * moe_ffn_hidden_size`` (same total
    expert parameters as the uniform MoE). The pair list repeats when there are more experts."""

    moe_expert_size_preset: str | None = field(
        default=None,
        metadata={"help": "Named expert-size layout: paper8 (MoDSE 8-expert pairs) or uniform."},
    )
    """A name from ``PRESETS``; ``uniform`` is megatron's equal widths."""

    moe_expert_placement: str = field(
        default="auto",
        metadata={"help": "Expert->EP-rank placement: auto (planner), pairs, contiguous, a comma list of ranks per expert, "
                          "or one such list per MoE layer separated by ';'."},
    )
    """``auto`` = the C++ placement planner (``modse_megatron.placement``; validation stops with
    one line naming the fix when it is not built); ``pairs`` = sort by width and pair largest
    with smallest so every rank holds equal parameters; ``contiguous`` = megatron's default
    blocks; ``"0,1,1,0"`` = the rank of every expert; ``"0,1,1,0;1,0,1,0"`` = one list per MoE
    layer, in model order (re-planning writes these) (``placement.layout``)."""

    moe_router_type: str = field(
        default="learned",
        metadata={"help": "Router variant: learned, frozen (initial weights never updated) or random (fixed random routing)."},
    )
    """Router weights: trained (``learned``), kept at their initial values (``frozen``) or a
    fixed random assignment (``random``)."""

    moe_routing_granularity: str = field(
        default="token",
        metadata={"help": "Routing granularity: token (every token chooses) or sequence (one choice per sequence)."},
    )
    """``sequence`` routes all tokens of a sequence to the experts chosen for the sequence."""

    moe_experts_impl: str = field(
        default="auto",
        metadata={"help": "Expert compute: auto (te under FP8 when TransformerEngine and a GPU are present, else grouped), loop (reference), grouped (fast CPU/GPU path) or te (TransformerEngine BF16/FP8 GEMMs, GPU only)."},
    )
    """``auto`` = ``te`` when the model uses FP8 and TransformerEngine and CUDA are available,
    else ``grouped`` (as fast as the loop on CPU, ~4x less activation memory; uses
    ``torch._grouped_mm`` for equal-width experts on CUDA). ``te`` runs each expert's GEMMs
    through TransformerEngine (BF16, or FP8 with per-expert token padding) with the same
    parameters and checkpoint keys as the other impls; it needs a GPU and TE."""

    # ------------------------------------------------------------------ validation / adapter
    def validate(self, transformer_config: Any) -> None:
        """Check these options against a megatron ``TransformerConfig``.

        Raises ``ValueError`` with one line naming the problem and the fix; returns None.
        """
        _check_choice("moe_router_type", self.moe_router_type, ROUTER_TYPES)
        _check_choice("moe_routing_granularity", self.moe_routing_granularity, ROUTING_GRANULARITIES)
        _check_choice("moe_experts_impl", self.moe_experts_impl, EXPERTS_IMPLS)
        if self.moe_experts_impl == "te":
            # Imports torch: only when te is asked for (this module stays torch-free).
            from .moe.te_experts import te_unavailable_reason

            reason = te_unavailable_reason()
            if reason is not None:
                raise ValueError(reason)
        if transformer_config.num_moe_experts is None:
            if self.moe_expert_widths or self.moe_expert_size_ratios or self.moe_expert_size_preset not in (None, "uniform"):
                raise ValueError(
                    "expert sizes are set but num_moe_experts is None: set num_moe_experts "
                    "(or drop the expert size options for a dense model)"
                )
            return
        if getattr(transformer_config, "add_bias_linear", False):
            raise ValueError(
                "MoDSE experts have no linear biases: set add_bias_linear=False "
                "(--disable-bias-linear)"
            )
        if transformer_config.moe_token_dispatcher_type not in ("alltoall", "allgather"):
            raise ValueError(
                f"moe_token_dispatcher_type={transformer_config.moe_token_dispatcher_type!r} is "
                "not supported by MoDSE layers: use alltoall or allgather"
            )
        widths = self.expert_widths(transformer_config)
        ep = transformer_config.expert_model_parallel_size
        layer_specs(self.moe_expert_placement, len(moe_layer_indices(transformer_config)))  # one, or one per layer
        placement_ranks(self.moe_expert_placement, len(widths), ep)  # raises on a bad list
        if self.moe_expert_placement == "auto" and ep > 1:  # the planner places the experts
            from .placement import planner_unavailable_reason

            reason = planner_unavailable_reason()
            if reason is not None:
                raise ValueError(f"moe_expert_placement=auto: {reason} (or choose pairs)")

    def expert_widths(self, transformer_config: Any) -> list[int]:
        """Resolve the size spec to one FFN width per logical expert.

        Ratios (and presets) are scaled so that ``sum(widths) == num_moe_experts *
        moe_ffn_hidden_size``; explicit widths are taken as given. Every width must be a
        positive integer divisible by the expert-TP size (each ETP rank holds ``w / etp``
        hidden units of every expert), and by 16 per ETP shard under FP8.
        """
        n = transformer_config.num_moe_experts
        if n is None:
            raise ValueError("expert widths need an MoE model: set num_moe_experts")
        ffn = transformer_config.moe_ffn_hidden_size
        given = [
            name
            for name in ("moe_expert_widths", "moe_expert_size_ratios", "moe_expert_size_preset")
            if getattr(self, name) not in (None, [], "")
        ]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are both set: give only one expert size spec")
        ratios = self.moe_expert_size_ratios
        if self.moe_expert_size_preset is not None:
            _check_choice("moe_expert_size_preset", self.moe_expert_size_preset, tuple(PRESETS))
            ratios = PRESETS[self.moe_expert_size_preset]
        if self.moe_expert_widths:
            widths = [_as_width(i, w) for i, w in enumerate(self.moe_expert_widths)]
            if len(widths) != n:
                raise ValueError(
                    f"moe_expert_widths has {len(widths)} widths but num_moe_experts={n}: "
                    "give one width per expert"
                )
        elif ratios:
            widths = _scaled_ratio_widths(ratios, n, ffn)
        else:
            widths = [ffn] * n
        _check_divisible(widths, transformer_config)
        return widths


# ----------------------------------------------------------------------------- helpers
def moe_layer_indices(transformer_config: Any) -> list[int]:
    """0-based indices of the MoE layers from ``moe_layer_freq`` (as megatron's
    ``get_gpt_decoder_layer_specs``: int n = every n-th layer from 0; list = 1/0 per layer)."""
    tc = transformer_config
    freq = getattr(tc, "moe_layer_freq", 1)
    if isinstance(freq, int) and not isinstance(freq, bool) and freq > 0:
        return [i for i in range(tc.num_layers) if i % freq == 0]
    if isinstance(freq, (list, tuple)) and len(freq) == tc.num_layers:
        return [i for i, is_moe in enumerate(freq) if is_moe]
    raise ValueError(f"moe_layer_freq={freq!r} is not a positive int or a 0/1 list of num_layers={tc.num_layers} entries")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid: use one of {', '.join(choices)}")


def _as_width(index: int, width: Any) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ValueError(
            f"moe_expert_widths[{index}]={width!r} is not a positive integer: every expert "
            "needs a width >= 1"
        )
    return width


def _scaled_ratio_widths(ratios: str, num_experts: int, ffn: int) -> list[int]:
    pairs = parse_ratio_pairs(ratios)
    per_pattern = 2 * len(pairs)
    if num_experts % per_pattern:
        raise ValueError(
            f"{len(pairs)} ratio pairs describe {per_pattern} experts but num_moe_experts="
            f"{num_experts}: use a multiple of {per_pattern} experts or give {num_experts // 2} pairs"
        )
    shares = [r for pair in pairs for r in pair] * (num_experts // per_pattern)
    scale = Fraction(num_experts * ffn) / sum(shares)
    exact = [share * scale for share in shares]
    if any(w.denominator != 1 for w in exact):
        step = math.lcm(*(Fraction(w / ffn).denominator for w in exact))
        raise ValueError(
            f"ratios {ratios} scaled to moe_ffn_hidden_size={ffn} give non-integer widths "
            f"({', '.join(f'{float(w):g}' for w in exact[:per_pattern])}): make "
            f"moe_ffn_hidden_size a multiple of {step} or give moe_expert_widths explicitly"
        )
    return [int(w) for w in exact]


def _check_divisible(widths: list[int], transformer_config: Any) -> None:
    etp = transformer_config.expert_tensor_parallel_size or 1
    fp8 = bool(getattr(transformer_config, "fp8", None))
    align = etp * (FP8_WIDTH_ALIGNMENT if fp8 else 1)
    for i, w in enumerate(widths):
        if w % align:
            why = f"expert_tensor_parallel_size={etp}" + (" x 16 (FP8 alignment)" if fp8 else "")
            raise ValueError(
                f"expert {i} has width {w}, not divisible by {align} ({why}): choose widths "
                f"(or moe_ffn_hidden_size) that are multiples of {align}"
            )


def config_fields() -> list[dataclasses.Field]:
    """The option fields (for CLI generation): name, type, default and ``metadata['help']``."""
    return list(dataclasses.fields(MoDSEConfig))


__all__ = [
    "EXPERTS_IMPLS",
    "EXPERTS_IMPLS_ANY_DEVICE",
    "EXPERTS_IMPLS_BUILT",
    "MoDSEConfig",
    "PRESETS",
    "ROUTER_TYPES",
    "ROUTING_GRANULARITIES",
    "config_fields",
]
