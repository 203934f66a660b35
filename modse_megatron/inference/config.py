"""``config.json`` of an export: everything the reference model needs besides the tensors.

An *export* is a directory with ``config.json``, the weights (``model.safetensors``, or shards
listed in ``model.safetensors.index.json``) and optionally the tokenizer file. This module is
the reading side of ``config.json``: :class:`ExportConfig` (one field per architectural choice,
each with a docstring), :meth:`ExportConfig.from_json` and :meth:`ExportConfig.validate`, whose
errors are one line naming the field and the fix.

It is pure Python (no torch, no megatron). The writing side, from a megatron
``TransformerConfig`` + :class:`~modse_megatron.config.MoDSEConfig`, is
:func:`modse_megatron.inference.from_megatron.export_config_from_megatron`.

Why these fields and no more: the reference model reproduces megatron's GPT forward, so every
megatron option that changes the math of a forward pass in eval mode is a field here (or is
refused by the exporter); options that only matter for training (dropout, aux losses, z-loss,
load-balancing bias *updates*, parallel layout, init) are left out.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Any

from ..config import ROUTER_TYPES, ROUTING_GRANULARITIES  # the training side's, so both accept the same

FORMAT = "modse-megatron-export"
FORMAT_VERSION = 1
ARCHITECTURE = "gpt"
CONFIG_FILE = "config.json"

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
#: ``gelu`` = exact (erf) GELU, megatron's default ``F.gelu``; ``gelu_tanh`` = the tanh
#: approximation megatron's fused bias-GELU/GEGLU kernels compute (``bias_activation_fusion``);
#: ``silu`` (SwiGLU when gated); ``relu``.
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
DTYPES = ("float32", "bfloat16")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
ROUTER_DTYPES = ("float32", "float64")


class ExportError(ValueError):
    """An export cannot be used; the message (one line) names the problem and the fix."""


class ExportConfigError(ExportError):
    """``config.json`` is unusable; the message (one line) names the field and the fix."""


@dataclass
class MoEExportConfig:
    """The MoE part of an export (``config.json``'s ``moe`` object; ``null`` = dense model).

    Every MoE layer has the same experts; dense layers (those not in ``moe_layers``) use the
    model's ``ffn_hidden_size``.
    """

    num_experts: int
    """Routed experts per MoE layer."""
    moe_layers: list[int]
    """0-based indices of the MoE layers (megatron's ``moe_layer_freq`` pattern, resolved)."""
    expert_widths: list[int]
    """FFN width of every expert in LOGICAL order (the router's row order and the ``expert{e}``
    tensor names); a MoDSE model has different widths, a uniform MoE equal ones."""
    router_topk: int
    """Experts each token is sent to."""
    score_function: str = "softmax"
    """``softmax``: probabilities from a softmax (over the top-k logits unless ``pre_softmax``);
    ``sigmoid``: per-expert sigmoid scores, the chosen ones renormalised when top-k > 1."""
    pre_softmax: bool = False
    """Softmax over all experts before top-k (megatron ``moe_router_pre_softmax``)."""
    topk_scaling_factor: float | None = None
    """Multiplies the top-k probabilities (megatron ``moe_router_topk_scaling_factor``)."""
    expert_bias: bool = False
    """Loss-free balancing: ``mlp.router.expert_bias`` [E] is added to the sigmoid scores for
    *selecting* experts only (probabilities stay unbiased), as megatron does."""
    router_type: str = "learned"
    """``learned`` | ``frozen`` | ``random``: how the router was trained. At inference all three
    are just the stored ``mlp.router.weight`` (recorded for analysis)."""
    routing_granularity: str = "token"
    """``token``: every token chooses its experts. ``sequence``: the router logits are averaged
    over the sequence's tokens first, so the whole sequence goes to the same experts."""
    shared_expert_intermediate_size: int | None = None
    """Width of the shared ("generalist") expert every token passes through; None = none."""
    shared_expert_gate: bool = False
    """The shared expert's output is scaled by ``sigmoid(x @ gate_weight.T)``
    (megatron ``moe_shared_expert_gate``; tensor ``mlp.shared_experts.gate_weight`` [1, D])."""
    capacity_factor: float | None = None
    """Training-time expert capacity factor (None = dropless). Recorded only: the reference
    model always runs dropless (token dropping depends on how a batch was split over ranks)."""
    router_dtype: str | None = "float32"
    """dtype of the router logits and routing math (megatron ``moe_router_dtype``:
    ``float32`` | ``float64``; None = the model's dtype)."""


@dataclass
class ExportConfig:
    """Architecture of an exported MoDSE (or dense / uniform-MoE) GPT model."""

    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width D."""
    num_attention_heads: int
    """Query heads H."""
    num_query_groups: int
    """Key/value heads G (G = H: multi-head attention; G < H: grouped-query attention)."""
    kv_channels: int
    """Per-head width d (megatron ``kv_channels``, usually D / H)."""
    ffn_hidden_size: int
    """Width of the dense layers' FFN (dense models, and the dense layers of MoE models)."""
    normalization: str
    """``LayerNorm`` (weight + bias) or ``RMSNorm`` (weight only)."""
    layernorm_epsilon: float
    """Epsilon of every norm."""
    gated_linear_unit: bool
    """FFNs are gated: fc1 stacks ``[gate; up]`` and the hidden is ``act(gate) * up``."""
    activation: str
    """FFN activation, one of :data:`ACTIVATIONS` (``silu`` + gated = SwiGLU)."""
    add_bias_linear: bool
    """Linear layers (QKV, attention output, dense FFN) have biases."""
    add_qkv_bias: bool
    """The QKV projection has a bias even without ``add_bias_linear``."""
    position_embedding_type: str
    """``learned_absolute`` (``embedding.position_embeddings.weight``) or ``rope``."""
    max_position_embeddings: int
    """Positions the model was built for (size of the learned table; informative for RoPE)."""
    padded_vocab_size: int
    """Rows of the embedding / output layer (megatron pads the vocabulary for TP)."""
    vocab_size: int
    """The tokenizer's vocabulary; ids >= this are padding and never generated."""
    tie_word_embeddings: bool
    """The output layer reuses ``embedding.word_embeddings.weight`` (no ``output_layer.weight``)."""
    dtype: str
    """dtype of the stored tensors: ``float32`` or ``bfloat16``."""
    moe: MoEExportConfig | None
    """MoE layers (None = dense model)."""
    tokenizer: str | None = None
    """Tokenizer file name inside the export directory (a HF ``tokenizer.json``), or None."""
    eod_token_id: int | None = None
    """End-of-document token id (generation stops there); None = look it up in the tokenizer
    by the usual names (``<|endoftext|>``, ...)."""
    rotary_base: float = 10000.0
    """RoPE base period."""
    rotary_percent: float = 1.0
    """Fraction of each head's channels that are rotated (the rest pass through)."""
    rotary_interleaved: bool = False
    """RoPE rotates adjacent channel pairs (GPT-J style) instead of the two halves."""
    softmax_scale: float | None = None
    """Attention score scale; None = 1 / sqrt(kv_channels)."""
    format: str = FORMAT
    """Always ``modse-megatron-export``."""
    format_version: int = FORMAT_VERSION
    """Version of this layout (readers refuse versions they do not know)."""
    architecture: str = ARCHITECTURE
    """Always ``gpt`` (decoder-only, pre-norm, causal)."""

    # ------------------------------------------------------------------ reading / writing
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_FILE) -> "ExportConfig":
        """Build and validate from a parsed ``config.json``; errors name ``source``."""
        if not isinstance(data, dict):
            raise ExportConfigError(f"{source} is not a JSON object: re-export the model with `modse-convert export`")
        _check_identity(data, source)
        values = _take_fields(cls, data, source, "")
        moe = values.get("moe")
        if moe is not None:
            if not isinstance(moe, dict):
                raise ExportConfigError(f"{source}: field 'moe' must be an object or null: re-export the model")
            values["moe"] = MoEExportConfig(**_take_fields(MoEExportConfig, moe, source, "moe."))
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ExportConfig":
        """Read ``config.json`` (``path`` may also be the export directory)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(path):
            raise ExportConfigError(
                f"{path} does not exist: point at an export directory written by `modse-convert export`"
            )
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ExportConfigError(
                f"{path} is not valid JSON ({err}): re-export the model with `modse-convert export`"
            ) from None
        return cls.from_dict(data, source=path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, identity fields first (what the exporter writes)."""
        data = dataclasses.asdict(self)
        head = {k: data.pop(k) for k in ("format", "format_version", "architecture")}
        return {**head, **data}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    # ------------------------------------------------------------------ queries
    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.moe_layers

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head (megatron: ``int(kv_channels * rotary_percent)``)."""
        if self.rotary_percent < 1.0:
            return int(self.kv_channels * self.rotary_percent)
        return self.kv_channels

    def describe(self) -> str:
        """Short description for messages, e.g. ``2-layer GPT, 4 experts (widths 96,32,80,48)``."""
        text = f"{self.num_layers}-layer GPT"
        if self.moe is not None:
            widths = ",".join(str(w) for w in self.moe.expert_widths)
            text += f", {self.moe.num_experts} experts (widths {widths})"
        return text

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = CONFIG_FILE) -> None:
        """Check values and their consistency; ``ExportConfigError`` (one line) on the first problem."""

        def fail(what: str, fix: str) -> None:
            raise ExportConfigError(f"{source}: {what}: {fix}")

        _check_identity(dataclasses.asdict(self), source)
        _check_types(self, source, "")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "ffn_hidden_size", "max_position_embeddings", "padded_vocab_size", "vocab_size"):
            if getattr(self, name) <= 0:
                fail(f"{name}={getattr(self, name)} is not positive", "re-export the model")
        _check_choice(source, "normalization", self.normalization, NORMALIZATIONS)
        _check_choice(source, "activation", self.activation, ACTIVATIONS)
        _check_choice(source, "position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS)
        _check_choice(source, "dtype", self.dtype, DTYPES)
        if self.num_attention_heads % self.num_query_groups:
            fail(f"num_attention_heads={self.num_attention_heads} is not a multiple of num_query_groups={self.num_query_groups}",
                 "every query group needs the same number of heads")
        if self.vocab_size > self.padded_vocab_size:
            fail(f"vocab_size={self.vocab_size} exceeds padded_vocab_size={self.padded_vocab_size}",
                 "padded_vocab_size is the embedding's row count and must cover the tokenizer")
        if self.layernorm_epsilon <= 0:
            fail(f"layernorm_epsilon={self.layernorm_epsilon} is not positive", "use the training value (e.g. 1e-5)")
        if not 0 < self.rotary_percent <= 1:
            fail(f"rotary_percent={self.rotary_percent} is outside (0, 1]", "use the training value (1.0 = all channels)")
        if self.position_embedding_type == "rope" and (self.rotary_dim == 0 or self.rotary_dim % 2):
            fail(f"rotary_percent={self.rotary_percent} gives {self.rotary_dim} rotated channels",
                 "RoPE needs a positive even number of rotated channels")
        if self.rotary_base <= 0:
            fail(f"rotary_base={self.rotary_base} is not positive", "use the training value (e.g. 10000)")
        if self.softmax_scale is not None and self.softmax_scale <= 0:
            fail(f"softmax_scale={self.softmax_scale} is not positive", "use null for 1/sqrt(kv_channels)")
        tokenizer = self.tokenizer
        if tokenizer is not None and (os.path.isabs(tokenizer) or ".." in tokenizer.replace("\\", "/").split("/")):
            fail(f"tokenizer={tokenizer!r} is not a file inside the export",
                 "give a file name relative to the export directory")
        if self.eod_token_id is not None and not 0 <= self.eod_token_id < self.vocab_size:
            fail(f"eod_token_id={self.eod_token_id} is outside the vocabulary 0..{self.vocab_size - 1}",
                 "use the tokenizer's end-of-document id or null")
        if self.moe is not None:
            self._validate_moe(self.moe, fail, source)

    def _validate_moe(self, moe: MoEExportConfig, fail, source: str) -> None:
        _check_types(moe, source, "moe.")
        if moe.num_experts <= 0:
            fail(f"moe.num_experts={moe.num_experts} is not positive", "use null for a dense model")
        if len(moe.expert_widths) != moe.num_experts:
            fail(f"moe.expert_widths has {len(moe.expert_widths)} widths for {moe.num_experts} experts",
                 "give one width per expert in logical order")
        if any(w <= 0 for w in moe.expert_widths):
            fail(f"moe.expert_widths={moe.expert_widths} has a non-positive width", "every expert needs a width >= 1")
        if not moe.moe_layers:
            fail("moe.moe_layers is empty", "list the MoE layers or set moe to null for a dense model")
        if sorted(set(moe.moe_layers)) != list(moe.moe_layers) or not all(0 <= i < self.num_layers for i in moe.moe_layers):
            fail(f"moe.moe_layers={moe.moe_layers} is not an ascending list of distinct layers in 0..{self.num_layers - 1}",
                 "list each MoE layer's 0-based index once")
        if not 1 <= moe.router_topk <= moe.num_experts:
            fail(f"moe.router_topk={moe.router_topk} is outside 1..{moe.num_experts}", "use the training top-k")
        _check_choice(source, "moe.score_function", moe.score_function, SCORE_FUNCTIONS)
        _check_choice(source, "moe.router_type", moe.router_type, ROUTER_TYPES)
        _check_choice(source, "moe.routing_granularity", moe.routing_granularity, ROUTING_GRANULARITIES)
        if moe.router_dtype is not None:
            _check_choice(source, "moe.router_dtype", moe.router_dtype, ROUTER_DTYPES)
        if moe.expert_bias and moe.score_function != "sigmoid":
            fail("moe.expert_bias needs moe.score_function='sigmoid'",
                 "megatron applies the expert bias only to sigmoid scores; re-export the model")
        if moe.topk_scaling_factor is not None and moe.topk_scaling_factor <= 0:
            fail(f"moe.topk_scaling_factor={moe.topk_scaling_factor} is not positive", "use null for no scaling")
        if moe.shared_expert_intermediate_size is not None and moe.shared_expert_intermediate_size <= 0:
            fail(f"moe.shared_expert_intermediate_size={moe.shared_expert_intermediate_size} is not positive",
                 "use null for no shared expert")
        if moe.shared_expert_gate and moe.shared_expert_intermediate_size is None:
            fail("moe.shared_expert_gate is set without a shared expert", "set shared_expert_intermediate_size or drop the gate")
        if moe.capacity_factor is not None and moe.capacity_factor <= 0:
            fail(f"moe.capacity_factor={moe.capacity_factor} is not positive", "use null for dropless")
        if self.add_bias_linear:
            fail("add_bias_linear with MoE layers",
                 "MoDSE experts have no linear biases; re-export a --disable-bias-linear model")


# ----------------------------------------------------------------------------- helpers
def _check_identity(data: dict[str, Any], source: str) -> None:
    """format / format_version / architecture first: another file's other fields are noise."""
    fmt = data.get("format")
    if fmt != FORMAT:
        raise ExportConfigError(
            f"{source}: format={fmt!r} is not {FORMAT!r}: this is not a modse-megatron export; "
            "write one with `modse-convert export`"
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        if newer:
            fix = "upgrade modse-megatron to read it"
        else:
            fix = f"re-export with `modse-convert export` (version {FORMAT_VERSION})"
        raise ExportConfigError(
            f"{source}: format_version={version!r} is not supported (this reader knows {FORMAT_VERSION}): {fix}"
        )
    arch = data.get("architecture")
    if arch != ARCHITECTURE:
        raise ExportConfigError(
            f"{source}: architecture={arch!r} is not supported: the reference model runs "
            f"{ARCHITECTURE!r} (decoder-only MoDSE GPT) exports only"
        )


def _take_fields(cls, data: dict[str, Any], source: str, prefix: str) -> dict[str, Any]:
    """The dataclass's fields from ``data``: unknown keys and missing required keys refused."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ExportConfigError(
            f"{source}: unknown field '{prefix}{unknown[0]}': remove it, or upgrade modse-megatron "
            "if a newer exporter wrote it"
        )
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise ExportConfigError(f"{source}: missing field '{prefix}{name}': re-export the model with `modse-convert export`")
    return dict(data)


def _check_choice(source: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ExportConfigError(f"{source}: {name}={value!r} is not supported: use one of {', '.join(choices)}")


def _check_types(obj: Any, source: str, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name == "moe":
            continue  # nested, checked by _validate_moe
        value = getattr(obj, f.name)
        if not _has_type(value, hints[f.name]):
            want = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ExportConfigError(f"{source}: field {prefix}{f.name}={value!r} is not of type {want}: re-export the model")


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURE",
    "CONFIG_FILE",
    "DTYPES",
    "ExportConfig",
    "ExportConfigError",
    "ExportError",
    "FORMAT",
    "FORMAT_VERSION",
    "MoEExportConfig",
]
