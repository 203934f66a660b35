"""Layer specs that make megatron's ``GPTModel`` build MoDSE MoE layers.

We take megatron's own GPT specs (local or TransformerEngine backend; its handling of
``moe_layer_freq``, pipeline stages and layouts included) and give the MoE layers MoDSE experts
and router (:func:`~modse_megatron.moe.layer.modse_moe_submodules`; the layer stays megatron's
``MoELayer``, built exactly like :class:`~modse_megatron.moe.layer.MoDSEMoELayer`), keeping
megatron's shared-expert spec so a shared ("generalist") expert combines with the MoDSE
experts. With ``num_moe_experts=None``
the same functions return megatron's dense spec (the dense baseline); uniform widths give a
uniform MoE through the same MoDSE path.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from ..config import MoDSEConfig, moe_layer_indices
from ..placement.layout import layer_specs
from ..platform.megatron_0_16.norm import norms_for_sequence_parallel
from .layer import modse_moe_submodules

BACKENDS = ("local", "te")


def _check_backend(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid: use one of {', '.join(BACKENDS)}")
    return backend == "te"


def modse_mlp_spec(moe_spec: ModuleSpec, modse_config: MoDSEConfig, transformer_config, moe_layer: int = 0) -> ModuleSpec:
    """Turn megatron's ``MoELayer`` spec into a MoDSE one: still megatron's ``MoELayer`` (so its
    ``TransformerLayer`` passes the model's process groups), with MoDSE experts and router
    (``modse_moe_submodules``; the placement of MoE layer ``moe_layer`` for
    ``expert_model_parallel_size`` ranks) and megatron's shared-expert spec kept."""
    shared = moe_spec.submodules.shared_experts if moe_spec.submodules is not None else None
    submodules, _, _ = modse_moe_submodules(
        transformer_config, modse_config, transformer_config.expert_model_parallel_size,
        MoESubmodules(shared_experts=shared), moe_layer=moe_layer,
    )
    return ModuleSpec(
        module=MoELayer,
        params=dict(moe_spec.params),
        submodules=submodules,
        metainfo=dict(moe_spec.metainfo),
    )


def modse_layer_spec(layer_spec: ModuleSpec, modse_config: MoDSEConfig, transformer_config,
                     moe_layer: int = 0) -> ModuleSpec:
    """A TransformerLayer spec with its MoE MLP (if any) turned into a MoDSE one (MoE layer
    ``moe_layer``, 0-based in model order, for a per-layer placement)."""
    mlp = layer_spec.submodules.mlp
    if not (isinstance(mlp, ModuleSpec) and mlp.module is MoELayer):
        return layer_spec  # dense layer: unchanged
    mlp = modse_mlp_spec(mlp, modse_config, transformer_config, moe_layer)
    submodules = dataclasses.replace(layer_spec.submodules, mlp=mlp)
    return dataclasses.replace(layer_spec, submodules=submodules)


def get_modse_gpt_layer_spec(
    modse_config: MoDSEConfig,
    transformer_config,
    backend: str = "local",
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
) -> ModuleSpec:
    """GPT TransformerLayer spec whose MLP is the MoDSE MoE layer (dense if no experts).

    ``normalization`` defaults to ``transformer_config.normalization``.
    """
    use_te = _check_backend(backend)
    modse_config.validate(transformer_config)
    if len(layer_specs(modse_config.moe_expert_placement)) > 1:
        raise ValueError("moe_expert_placement gives one placement per MoE layer but one layer spec serves every "
                         "layer: use get_modse_decoder_block_spec")
    tc = transformer_config
    common = dict(
        num_experts=tc.num_moe_experts,
        qk_layernorm=tc.qk_layernorm,
        multi_latent_attention=tc.multi_latent_attention,
        qk_l2_norm=qk_l2_norm,
    )
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(**common)
    else:
        spec = get_gpt_layer_local_spec(normalization=normalization or tc.normalization, **common)
    return norms_for_sequence_parallel(modse_layer_spec(spec, modse_config, tc), tc)


def get_modse_decoder_block_spec(
    modse_config: MoDSEConfig,
    transformer_config,
    backend: str = "local",
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Decoder block spec: megatron's dense/MoE layer pattern (``moe_layer_freq``) and pipeline
    slicing (only this stage's layers), with MoDSE MoE layers. Pass it to ``GPTModel`` as
    ``transformer_layer_spec``."""
    use_te = _check_backend(backend)
    modse_config.validate(transformer_config)
    block = get_gpt_decoder_block_spec(
        transformer_config,
        use_transformer_engine=use_te,
        normalization=normalization or transformer_config.normalization,
        qk_l2_norm=qk_l2_norm,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    moe_layers = moe_layer_indices(transformer_config)
    layer_ids = _global_layer_ids(transformer_config, vp_stage, pp_rank, len(block.layer_specs))
    specs = [modse_layer_spec(spec, modse_config, transformer_config,
                              moe_layers.index(layer_id) if layer_id in moe_layers else 0)
             for spec, layer_id in zip(block.layer_specs, layer_ids)]
    return norms_for_sequence_parallel(dataclasses.replace(block, layer_specs=specs), transformer_config)


def _global_layer_ids(config, vp_stage: Optional[int], pp_rank: Optional[int], count: int) -> list[int]:
    """0-based model-wide index of each layer this stage builds: the slicing of megatron's
    ``get_gpt_decoder_block_spec`` (gpt_layer_specs.py:627-639 in 0.16.1)."""
    layout = config.pipeline_model_parallel_layout
    if layout is not None:
        ids = list(layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank))
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        ids = list(range(offset, offset + count))
    assert len(ids) == count, (ids, count)
    return ids

__all__ = [
    "BACKENDS",
    "get_modse_decoder_block_spec",
    "get_modse_gpt_layer_spec",
    "modse_layer_spec",
    "modse_mlp_spec",
]
