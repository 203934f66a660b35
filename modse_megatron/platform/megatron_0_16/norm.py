"""A torch LayerNorm/RMSNorm that works under sequence parallelism (local, non-TE specs).

megatron's local specs build norms with ``WrappedTorchNorm``, which refuses
``sequence_parallel`` (torch_norm.py:32) because its weights would not be marked for the
tensor-parallel gradient all-reduce; apex's ``FusedLayerNorm`` and TE's norms do that marking.
Without apex/TE, MoE layers with TP > 1 (which megatron only trains with sequence parallelism)
had no usable norm. :class:`SequenceParallelTorchNorm` is the same torch module with its
weights marked ``sequence_parallel`` so ``finalize_model_grads`` all-reduces their gradients
over the TP group (distributed/finalize_model_grads.py:354).
"""
from __future__ import annotations

import copy
import dataclasses

import torch


class SequenceParallelTorchNorm:
    """Builder with ``WrappedTorchNorm``'s signature; returns ``torch.nn.LayerNorm``/``RMSNorm``."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma needs TransformerEngine or apex norms: use the te backend")
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization {config.normalization!r} is not supported: use LayerNorm or RMSNorm")
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(spec):
    """A deep copy of a layer/block spec with every ``WrappedTorchNorm`` replaced."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def swap(obj):
        if obj is WrappedTorchNorm:
            return SequenceParallelTorchNorm
        if isinstance(obj, ModuleSpec):
            obj.module = swap(obj.module)
            obj.submodules = swap(obj.submodules)
            return obj
        if isinstance(obj, list):
            return [swap(o) for o in obj]
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                setattr(obj, f.name, swap(getattr(obj, f.name)))
        return obj

    return swap(copy.deepcopy(spec))


def norms_for_sequence_parallel(spec, config):
    """``spec`` with norms that support sequence parallelism when ``config`` asks for it (only
    megatron's local ``WrappedTorchNorm`` is swapped; TE's norms support it already), else
    ``spec`` itself."""
    return with_sequence_parallel_norms(spec) if config.sequence_parallel else spec
