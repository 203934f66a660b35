"""Small megatron-core builders and tensor-parallel gather helpers shared by tests and benchmarks.

Numerical claims (TP/EP equivalence, checkpoint resharding) are checked by gathering sharded
parameters/gradients back to their logical, unsharded form and comparing with a 1-way run.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist


def tiny_transformer_config(**overrides):
    """A TransformerConfig for 2-layer toy models: CPU init (TP-invariant weights), no dropout."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def tiny_gpt(config, vocab_size: int = 128, max_sequence_length: int = 32):
    """megatron GPTModel with the local (non-TE) layer spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config,
        get_gpt_layer_local_spec(num_experts=config.num_moe_experts),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
    )


def token_batch(batch: int, seq: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (tokens, position_ids) for a test step."""
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    return tokens, positions


def gather_tp(tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """Concatenate a tensor-parallel shard (``param``'s layout) across the TP group."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return tensor.detach().clone()
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def gathered_named(model: torch.nn.Module, grads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter (or its gradient), gathered over TP."""
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param.data
        if grads and tensor is None:
            tensor = getattr(param, "main_grad", None)
        if tensor is None:
            continue
        yield name, gather_tp(tensor, param)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Relative error of the whole tensor (‖a−e‖/‖e‖) — the right measure for sums of floats
    reduced in a different order across ranks."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    denom = expected.norm().clamp_min(1e-30)
    rel = float((actual - expected).norm() / denom)
    assert rel <= rtol, f"{what}: relative error {rel:.3e} > {rtol:.1e}"
