"""Checkpoint keys <-> export names: the one naming rule shared by ``modse-convert`` and the
reference model.

A megatron ``dist_checkpointing`` checkpoint stores *global* tensors: TP shards are pieces of
one tensor, and the decoder layers of every pipeline stage are stacked along a prepended
layer axis under one key, e.g. ``decoder.layers.mlp.experts.expert3.linear_fc1.weight`` of
global shape ``[num_layers, G*W_3, D]``. An export (safetensors) names one tensor per layer::

    decoder.layers.{i}.mlp.experts.expert{logical_id}.linear_fc1.weight   [G*W, D]  ([gate; up] when gated)
    decoder.layers.{i}.mlp.experts.expert{logical_id}.linear_fc2.weight   [D, W]
    decoder.layers.{i}.mlp.router.weight                                  [E, D]  (logical expert order)

``i`` is the global 0-based layer index; every other key (embeddings, final norm, output layer)
keeps its checkpoint name. Names are megatron's, so a Megatron user recognises every tensor.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

import torch

LAYER_STACK = "decoder.layers."
_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
#: Checkpoint entries that are not model tensors (TE FP8 metadata, RNG, optimizer, ...).
_NOT_WEIGHTS = ("_extra_state",)


def is_stacked(key: str) -> bool:
    """Whether a checkpoint key holds all decoder layers along a prepended axis."""
    return key.startswith(LAYER_STACK) and not _PER_LAYER.match(key)


def export_name(key: str, layer: int | None = None) -> str:
    """The export name of checkpoint ``key`` (``layer``: index along the stacked axis)."""
    if is_stacked(key):
        if layer is None:
            raise ValueError(f"{key} is stacked over layers: give the layer index")
        return f"{LAYER_STACK}{layer}.{key[len(LAYER_STACK):]}"
    return key


def checkpoint_key(name: str) -> tuple[str, int | None]:
    """Inverse of :func:`export_name`: (checkpoint key, layer index or None)."""
    match = _PER_LAYER.match(name)
    if match:
        return LAYER_STACK + match.group(2), int(match.group(1))
    return name, None


def is_model_weight(key: str) -> bool:
    return not any(part in key for part in _NOT_WEIGHTS)


def _sharded_tensors(sharded_state_dict: Any) -> Iterator[Any]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedTensor):
            yield value


def model_export_state(model) -> dict[str, torch.Tensor]:
    """Export-named full tensors of a model that lives in ONE process (TP = PP = EP = 1).

    Built from the model's own ``sharded_state_dict()`` (so factories such as the router's
    logical row order and the SwiGLU gate/up split apply exactly as when saving): every
    ShardedTensor is placed at its global offset, then the stacked layer axis is split.
    An independent path from reading a checkpoint back, used to test exports.
    """
    full: dict[str, torch.Tensor] = {}
    layers: dict[str, set[int]] = {}  # stacked key -> layers present (MoE every n-th layer)
    for sh in _sharded_tensors(model.sharded_state_dict()):
        if not is_model_weight(sh.key) or sh.flattened_range is not None:
            continue
        target = full.get(sh.key)
        if target is None:
            target = full[sh.key] = torch.zeros(sh.global_shape, dtype=sh.data.dtype)
        local_shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        region = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, local_shape))
        view = target[region]
        view.copy_(sh.data.detach().to("cpu").reshape(view.shape))
        if is_stacked(sh.key):
            layers.setdefault(sh.key, set()).add(sh.global_offset[0])
    out: dict[str, torch.Tensor] = {}
    for key, tensor in full.items():
        if is_stacked(key):
            for layer in sorted(layers[key]):
                out[export_name(key, layer)] = tensor[layer].clone()
        else:
            out[key] = tensor
    return out
