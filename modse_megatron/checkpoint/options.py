"""``modse-pretrain`` options of an export's architecture (what ``import`` stores in a checkpoint
so that ``inspect``/``export`` know the model and ``modse-pretrain --load`` can check it)."""
from __future__ import annotations

from modse_megatron.checkpoint.errors import CheckpointError


def args_from_export_config(config):
    """:class:`PretrainArgs` whose model is the export's; one-line error for what
    ``modse-pretrain`` cannot build (the reference model may still run it)."""
    from modse_megatron.training.arguments import PretrainArgs

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"the export's {what} cannot be trained by modse-pretrain: run it with the reference "
                               f"model (modse-generate) instead, or re-export a model built by modse-pretrain")

    c = config
    if c.gated_linear_unit and c.activation != "silu":
        raise refuse(f"gated {c.activation} FFN")
    if not c.gated_linear_unit and c.activation != "gelu":
        raise refuse(f"{c.activation} FFN")
    if c.add_bias_linear != c.add_qkv_bias:
        raise refuse("QKV bias setting (different from the other linear layers)")
    if c.position_embedding_type == "rope" and (c.rotary_base != 10000 or c.rotary_percent != 1.0 or c.rotary_interleaved):
        raise refuse(f"RoPE variant (base {c.rotary_base}, percent {c.rotary_percent}, interleaved {c.rotary_interleaved})")
    if c.kv_channels * c.num_attention_heads != c.hidden_size:
        raise refuse(f"kv_channels {c.kv_channels}")
    model = {
        "num_layers": c.num_layers, "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_query_groups if c.num_query_groups != c.num_attention_heads else None,
        "ffn_hidden_size": c.ffn_hidden_size, "seq_length": c.max_position_embeddings,
        "max_position_embeddings": c.max_position_embeddings, "position_embedding_type": c.position_embedding_type,
        "normalization": c.normalization, "swiglu": c.gated_linear_unit, "disable_bias_linear": not c.add_bias_linear,
        "untie_embeddings_and_output_weights": not c.tie_word_embeddings, "bf16": c.dtype == "bfloat16",
    }
    modse = {}
    moe = c.moe
    if moe is not None:
        layers = list(moe.moe_layers)
        freq = layers[1] - layers[0] if len(layers) > 1 else c.num_layers
        if layers != list(range(0, c.num_layers, freq)):
            raise refuse(f"MoE layer pattern {layers} (modse-pretrain places MoE layers every n-th layer from 0)")
        widths = list(moe.expert_widths)
        if moe.topk_scaling_factor not in (None, 1.0):
            raise refuse("router top-k scaling factor")
        model.update({
            "num_experts": moe.num_experts, "moe_router_topk": moe.router_topk, "moe_layer_freq": freq,
            "moe_ffn_hidden_size": sum(widths) // len(widths), "moe_router_score_function": moe.score_function,
            "moe_router_enable_expert_bias": moe.expert_bias, "moe_router_pre_softmax": moe.pre_softmax,
            "moe_shared_expert_intermediate_size": moe.shared_expert_intermediate_size,
            "moe_expert_capacity_factor": moe.capacity_factor,
        })
        modse = {"moe_expert_widths": widths, "moe_router_type": moe.router_type,
                 "moe_routing_granularity": moe.routing_granularity}
    return PretrainArgs.from_dict({"model": model, "modse": modse})
