"""The writing side of ``config.json``: an :class:`ExportConfig` from megatron's configuration.

``modse-convert export`` calls :func:`export_config_from_megatron` with the run's
``TransformerConfig`` and :class:`~modse_megatron.config.MoDSEConfig` (plus what lives on the
``GPTModel`` rather than in the config: vocabulary, positions, tying). Tests and in-memory
exports can use :func:`export_config_from_gpt_model`, which reads those from a built model.

Every megatron option that changes the forward math is either carried into the config or
refused here with one line - an export whose reference model silently computes something
else than megatron would be worse than no export. Two training-time behaviours are deliberately
not carried over: router input jitter (``moe_input_jitter_eps``, random noise) and token dropping
(``moe_expert_capacity_factor`` is recorded, but the reference model runs dropless).

megatron is only touched through the objects passed in (no import at module load), so
``modse_megatron.inference`` stays megatron-free.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from .config import ExportConfig, ExportError, MoEExportConfig

_DTYPE_NAMES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16"}
_ROUTER_DTYPES = {None: None, "fp32": "float32", "fp64": "float64"}


def export_config_from_megatron(
    transformer_config: Any,
    modse_config: Any = None,
    *,
    vocab_size: int,
    padded_vocab_size: int,
    max_position_embeddings: int,
    position_embedding_type: str = "learned_absolute",
    tie_word_embeddings: bool = True,
    rotary_base: float = 10000.0,
    rotary_percent: float = 1.0,
    tokenizer: Optional[str] = None,
    eod_token_id: Optional[int] = None,
    expert_widths: Optional[Sequence[int]] = None,
) -> ExportConfig:
    """Build (and validate) the export config of a megatron GPT model.

    Args:
        transformer_config: megatron ``TransformerConfig`` of the model.
        modse_config: ``MoDSEConfig`` (expert widths, router type, routing granularity); None for
            a dense model or megatron's uniform MoE (equal widths ``moe_ffn_hidden_size``).
        vocab_size / padded_vocab_size: the tokenizer's vocabulary / the embedding's rows.
        max_position_embeddings, position_embedding_type, tie_word_embeddings, rotary_base,
            rotary_percent: the ``GPTModel`` constructor arguments of the run.
        tokenizer: tokenizer file name inside the export directory (or None).
        eod_token_id: the tokenizer's end-of-document id (generation stops there).
        expert_widths: override the widths resolved from ``modse_config`` (logical order).

    Raises ``ExportError`` (one line) for megatron options the reference model does not run.
    """
    tc = transformer_config
    _refuse_unsupported(tc)
    dtype = _DTYPE_NAMES.get(str(tc.params_dtype))
    if dtype is None:
        raise ExportError(f"params_dtype={tc.params_dtype} cannot be exported: train in fp32 or bf16")
    config = ExportConfig(
        num_layers=tc.num_layers,
        hidden_size=tc.hidden_size,
        num_attention_heads=tc.num_attention_heads,
        num_query_groups=tc.num_query_groups or tc.num_attention_heads,
        kv_channels=tc.kv_channels,
        ffn_hidden_size=tc.ffn_hidden_size,
        normalization=tc.normalization,
        layernorm_epsilon=float(tc.layernorm_epsilon),
        gated_linear_unit=bool(tc.gated_linear_unit),
        activation=_activation_name(tc),
        add_bias_linear=bool(tc.add_bias_linear),
        add_qkv_bias=bool(tc.add_qkv_bias),
        position_embedding_type=position_embedding_type,
        max_position_embeddings=int(max_position_embeddings),
        padded_vocab_size=int(padded_vocab_size),
        vocab_size=int(vocab_size),
        tie_word_embeddings=bool(tie_word_embeddings),
        dtype=dtype,
        moe=_moe_config(tc, modse_config, expert_widths),
        tokenizer=tokenizer,
        eod_token_id=eod_token_id,
        rotary_base=float(rotary_base),
        rotary_percent=float(rotary_percent),
        rotary_interleaved=bool(tc.rotary_interleaved),
        softmax_scale=None if tc.softmax_scale is None else float(tc.softmax_scale),
    )
    config.validate("exported config")
    return config


def export_config_from_gpt_model(
    model: Any,
    modse_config: Any = None,
    *,
    vocab_size: int,
    tokenizer: Optional[str] = None,
    eod_token_id: Optional[int] = None,
) -> ExportConfig:
    """:func:`export_config_from_megatron` for a built ``GPTModel`` (DDP/Float16Module wrappers
    are unwrapped): vocabulary rows, positions, tying and RoPE are read from the model, and -
    without ``modse_config`` - the expert widths, router type and granularity from its MoDSE
    layers (all experts must be local, i.e. EP = 1)."""
    while hasattr(model, "module"):
        model = model.module
    rotary_base, rotary_percent = 10000.0, float(getattr(model, "rotary_percent", 1.0))
    if model.position_embedding_type == "rope":
        rotary_base = float(model.rotary_base)
        _check_plain_rope(model, rotary_base, rotary_percent)
    widths = None
    if modse_config is None:
        modse_config, widths = _modse_from_model(model)
    return export_config_from_megatron(
        model.config,
        modse_config,
        vocab_size=vocab_size,
        padded_vocab_size=model.vocab_size,
        max_position_embeddings=model.max_sequence_length,
        position_embedding_type=model.position_embedding_type,
        tie_word_embeddings=model.share_embeddings_and_output_weights,
        rotary_base=rotary_base,
        rotary_percent=rotary_percent,
        tokenizer=tokenizer,
        eod_token_id=eod_token_id,
        expert_widths=widths,
    )


# ----------------------------------------------------------------------------- pieces
def moe_layer_pattern(transformer_config: Any) -> list[int]:
    """0-based MoE layer indices from ``moe_layer_freq`` (:func:`modse_megatron.config.moe_layer_indices`)."""
    from modse_megatron.config import moe_layer_indices

    try:
        return moe_layer_indices(transformer_config)
    except ValueError as err:
        raise ExportError(str(err)) from None


def _moe_config(tc: Any, modse_config: Any, expert_widths: Optional[Sequence[int]]) -> Optional[MoEExportConfig]:
    if not tc.num_moe_experts:
        return None
    if expert_widths is None:
        if modse_config is not None:
            expert_widths = modse_config.expert_widths(tc)
        else:
            expert_widths = [tc.moe_ffn_hidden_size] * tc.num_moe_experts
    if tc.moe_router_dtype not in _ROUTER_DTYPES:
        raise ExportError(f"moe_router_dtype={tc.moe_router_dtype!r} is not supported: use fp32, fp64 or None")
    return MoEExportConfig(
        num_experts=tc.num_moe_experts,
        moe_layers=moe_layer_pattern(tc),
        expert_widths=[int(w) for w in expert_widths],
        router_topk=tc.moe_router_topk,
        score_function=tc.moe_router_score_function,
        pre_softmax=bool(tc.moe_router_pre_softmax),
        topk_scaling_factor=None if tc.moe_router_topk_scaling_factor is None else float(tc.moe_router_topk_scaling_factor),
        expert_bias=bool(tc.moe_router_enable_expert_bias),
        router_type=getattr(modse_config, "moe_router_type", "learned"),
        routing_granularity=getattr(modse_config, "moe_routing_granularity", "token"),
        shared_expert_intermediate_size=tc.moe_shared_expert_intermediate_size,
        shared_expert_gate=bool(tc.moe_shared_expert_gate) if tc.moe_shared_expert_intermediate_size else False,
        capacity_factor=None if tc.moe_expert_capacity_factor is None else float(tc.moe_expert_capacity_factor),
        router_dtype=_ROUTER_DTYPES[tc.moe_router_dtype],
    )


def _activation_name(tc: Any) -> str:
    import torch.nn.functional as F

    if getattr(tc, "use_te_activation_func", False):
        raise ExportError("use_te_activation_func is not supported by the reference model: train without it")
    act = tc.activation_func
    if act is F.gelu:
        # megatron's fused bias-GELU/GEGLU kernels compute the tanh approximation.
        return "gelu_tanh" if tc.bias_activation_fusion else "gelu"
    if act is F.silu:
        return "silu"
    if act is F.relu:
        return "relu"
    name = getattr(act, "__name__", repr(act))
    raise ExportError(f"activation {name} is not supported by the reference model: use gelu, silu (swiglu) or relu")


#: (attribute, value that the reference model runs, what the attribute is)
_MUST_BE = (
    ("multi_latent_attention", False, "multi-latent attention"),
    ("qk_layernorm", False, "query/key layernorm"),
    ("attention_output_gate", False, "gated attention output"),
    ("softmax_type", "vanilla", "non-vanilla attention softmax"),
    ("window_size", None, "sliding-window attention"),
    ("no_rope_freq", None, "layers without RoPE (no_rope_freq)"),
    ("apply_residual_connection_post_layernorm", False, "post-layernorm residuals"),
    ("layernorm_zero_centered_gamma", False, "zero-centered layernorm gamma"),
    ("glu_linear_offset", 0.0, "a GLU linear offset"),
    ("activation_func_clamp_value", None, "activation clamping"),
    ("mtp_num_layers", None, "multi-token prediction layers"),
    ("experimental_attention_variant", None, "an experimental attention variant"),
    ("heterogeneous_block_specs", False, "heterogeneous block specs"),
    ("moe_router_num_groups", None, "group-limited routing"),
    ("moe_apply_probs_on_input", False, "routing probabilities applied on the expert input"),
    ("moe_latent_size", None, "MoE latent projections"),
    ("moe_router_force_load_balancing", False, "forced load balancing (random router logits)"),
)


def _refuse_unsupported(tc: Any) -> None:
    for attr, supported, what in _MUST_BE:
        value = getattr(tc, attr, supported)
        if value != supported and not (supported is False and not value):
            raise ExportError(f"{what} ({attr}={value!r}) is not supported by the reference model: export a model without it")
    balancing = tc.moe_router_load_balancing_type if tc.num_moe_experts else None
    if balancing is not None and "sinkhorn" in ([balancing] if isinstance(balancing, str) else list(balancing)):
        raise ExportError("sinkhorn routing is not supported by the reference model: use aux_loss/seq_aux_loss/none balancing")
    if tc.normalization not in ("LayerNorm", "RMSNorm"):
        raise ExportError(f"normalization={tc.normalization!r} is not supported: use LayerNorm or RMSNorm")


def _check_plain_rope(model: Any, base: float, percent: float) -> None:
    """The model's RoPE must be plain (no llama-3 scaling, no interpolation) with this base."""
    import torch

    rope = model.rotary_pos_emb
    if getattr(model, "rotary_scaling", False) or getattr(rope, "seq_len_interpolation_factor", None) is not None:
        raise ExportError("RoPE scaling / sequence-length interpolation is not supported by the reference model")
    dim = model.config.kv_channels
    if percent < 1.0:
        dim = int(dim * percent)
    expected = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not torch.allclose(rope.inv_freq.detach().cpu().float(), expected, rtol=1e-6, atol=0):
        ratio = float(rope.inv_freq[1]) if rope.inv_freq.numel() > 1 else math.nan
        raise ExportError(
            f"the model's RoPE frequencies do not match rotary_base={base:g} (second inverse frequency "
            f"{ratio:.6g}): call export_config_from_megatron with the run's rotary_base"
        )


def _modse_from_model(model: Any):
    """(MoDSEConfig, widths in logical order) from the first MoDSE layer; (None, None) if none."""
    from modse_megatron.config import MoDSEConfig

    for layer in model.decoder.layers:
        experts, router = getattr(layer.mlp, "experts", None), getattr(layer.mlp, "router", None)
        if experts is None or not hasattr(experts, "logical_ids"):
            continue
        n = model.config.num_moe_experts
        if sorted(experts.logical_ids) != list(range(n)):
            raise ExportError("not all experts are in this process (EP > 1): pass modse_config to export_config_from_gpt_model")
        widths = [0] * n
        for lid, width in zip(experts.logical_ids, experts.expert_widths):
            widths[lid] = width
        cfg = MoDSEConfig(moe_router_type=router.router_type, moe_routing_granularity=router.granularity)
        return cfg, widths
    return None, None


__all__ = ["export_config_from_gpt_model", "export_config_from_megatron", "moe_layer_pattern"]
