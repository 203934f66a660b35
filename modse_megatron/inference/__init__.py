"""Inference on exports: a pure-PyTorch reference MoDSE GPT and ``modse-generate``.

An export (``modse-convert export``) is a directory with ``config.json``
(:class:`ExportConfig`), safetensors weights named like megatron's checkpoint keys (one tensor
per layer and per logical expert) and optionally a tokenizer. :class:`ReferenceGPT` runs it
without megatron and reproduces megatron's logits; ``modse-generate`` generates text with it.

Nothing here imports megatron-core except :func:`export_config_from_megatron` /
:func:`export_config_from_gpt_model`, which only read the megatron objects they are given.
"""
from .config import ExportConfig, ExportConfigError, ExportError, MoEExportConfig
from .from_megatron import export_config_from_gpt_model, export_config_from_megatron
from .model import KVCache, ReferenceGPT
from .weights import INDEX_FILE, WEIGHTS_FILE, read_export_tensors

__all__ = [
    "ExportConfig",
    "ExportConfigError",
    "ExportError",
    "INDEX_FILE",
    "KVCache",
    "MoEExportConfig",
    "ReferenceGPT",
    "WEIGHTS_FILE",
    "export_config_from_gpt_model",
    "export_config_from_megatron",
    "read_export_tensors",
]
