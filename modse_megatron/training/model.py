"""Build what a training run needs from :class:`PretrainArgs`: megatron's TransformerConfig, the
GPT model for this pipeline stage (MoDSE, megatron-uniform-MoE or dense: one code path),
megatron's DDP wrapper, the distributed (ZeRO) optimizer and the LR/WD scheduler."""
from __future__ import annotations

import math

import torch

from modse_megatron.training.arguments import ConfigError, PretrainArgs


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron-LM's vocab padding: a multiple of 128 x TP so every TP shard is GEMM-friendly."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def transformer_config(args: PretrainArgs):
    """The megatron TransformerConfig of the run (MoDSE options stay in ``args.modse``)."""
    from megatron.core.transformer import TransformerConfig

    m, p = args.model, args.parallel
    moe = bool(m.num_experts)
    dtype = torch.bfloat16 if m.bf16 else torch.float32
    if m.fp8_format:
        from modse_megatron.platform import transformer_engine_problem

        problem = transformer_engine_problem("--fp8-format", "drop --fp8-format", import_te=True)
        if problem:
            raise ConfigError(problem)
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        normalization=m.normalization,
        gated_linear_unit=m.swiglu,
        add_bias_linear=not m.disable_bias_linear,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=m.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        variable_seq_lengths=False,
        fp8=m.fp8_format,
    )
    if m.swiglu:
        import torch.nn.functional as F

        kwargs["activation_func"] = F.silu
        kwargs["bias_activation_fusion"] = False
    if moe:
        kwargs.update(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or kwargs["ffn_hidden_size"],
            moe_router_topk=m.moe_router_topk,
            moe_layer_freq=m.moe_layer_freq,
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_z_loss_coeff=m.moe_z_loss_coeff,
            moe_router_load_balancing_type=m.moe_router_load_balancing_type,
            moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_pre_softmax=m.moe_router_pre_softmax,
            moe_expert_capacity_factor=m.moe_expert_capacity_factor,
            moe_token_drop_policy=m.moe_token_drop_policy,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_router_dtype="fp32",
        )
    try:
        return TransformerConfig(**kwargs)
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"megatron rejected the model options: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def build_model(args: PretrainArgs, config, vocab_size: int):
    """GPTModel for this pipeline stage with MoDSE (or megatron's uniform / dense) layers."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    backend = "te" if args.model.fp8_format else "local"
    if config.num_moe_experts and args.model.moe_layer_impl == "modse":
        from modse_megatron.moe.specs import get_modse_decoder_block_spec

        try:
            spec = get_modse_decoder_block_spec(args.modse, config, backend=backend)  # validates
        except ValueError as err:
            raise ConfigError(str(err)) from None
    else:  # megatron's own specs (uniform MoE twin, dense)
        if config.num_moe_experts:
            spec = get_gpt_decoder_block_spec(config, use_transformer_engine=backend == "te",
                                              normalization=config.normalization)
        else:
            spec = get_gpt_layer_local_spec(normalization=config.normalization)
        from modse_megatron.platform.megatron_0_16.norm import norms_for_sequence_parallel

        spec = norms_for_sequence_parallel(spec, config)  # (the MoDSE specs do this themselves)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=args.model.max_position_embeddings or args.model.seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.model.untie_embeddings_and_output_weights,
        position_embedding_type=args.model.position_embedding_type,
    )
    if args.run.debug_router_logit_bias is not None:
        for module in model.modules():
            if hasattr(module, "set_logit_bias"):
                module.set_logit_bias(args.run.debug_router_logit_bias)
    return model


def wrap_and_optimize(args: PretrainArgs, config, model):
    """megatron DDP (grad buckets, expert-DP reduction) + optimizer + scheduler."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, p = args.optim, args.parallel
    if args.model.bf16:
        from megatron.core.transformer.module import Float16Module

        # As Megatron-LM: bf16 parameters, fp32 inputs cast on entry and outputs cast back.
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=p.use_distributed_optimizer,
        # NaN/Inf is checked by the training loop after the reduction, on every rank alike
        # (megatron's check raises on the offending rank only and leaves the others waiting).
        check_for_nan_in_grad=False,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=args.model.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=p.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=o.lr_decay_iters or o.train_iters,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=o.train_iters,
        wd_incr_style="constant",
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer, scheduler
