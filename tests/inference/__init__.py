"""Helpers shared by the inference tests: tiny export configs, random reference models, and
writing exports to disk (single file or shards) exactly as the exporter lays them out."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from modse_megatron.inference import ExportConfig, MoEExportConfig, ReferenceGPT
from modse_megatron.inference.weights import INDEX_FILE, WEIGHTS_FILE

TINY_MOE = dict(
    num_experts=4, moe_layers=[0], expert_widths=[48, 16, 40, 24], router_topk=2,
)


def tiny_config(moe: dict[str, Any] | None = None, **overrides) -> ExportConfig:
    """A 2-layer, D=32 model; ``moe`` (MoEExportConfig fields) makes layer 0 (by default) MoE."""
    fields = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
        ffn_hidden_size=64, normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True,
        activation="silu", add_bias_linear=False, add_qkv_bias=False, position_embedding_type="rope",
        max_position_embeddings=64, padded_vocab_size=384, vocab_size=300, tie_word_embeddings=False,
        dtype="float32", moe=MoEExportConfig(**moe) if moe is not None else None,
    )
    fields.update(overrides)
    config = ExportConfig(**fields)
    config.validate()
    return config


@torch.no_grad()
def random_reference(config: ExportConfig, seed: int = 0, std: float = 0.1) -> ReferenceGPT:
    """A ReferenceGPT with random weights (norm weights near 1, everything else ~N(0, std))."""
    model = ReferenceGPT(config).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.export_tensors().items():
        noise = torch.randn(tensor.shape, generator=gen) * std
        if name.endswith("layer_norm_weight") or name == "decoder.final_layernorm.weight":
            noise += 1.0
        tensor.copy_(noise)
    return model


def write_export(path: str | os.PathLike, config: ExportConfig, tensors: dict[str, torch.Tensor], shards: int = 1) -> str:
    """Write config.json + weights like ``modse-convert export`` (``shards`` > 1: an index
    with a ``weight_map`` and ``model-0000i-of-0000n.safetensors`` files)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config.to_json(os.path.join(path, "config.json"))
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    if shards == 1:
        save_file(tensors, os.path.join(path, WEIGHTS_FILE))
        return path
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, os.path.join(path, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖a−e‖/‖e‖ in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
