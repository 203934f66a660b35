"""A readable, pure-PyTorch MoDSE GPT that runs an export and reproduces megatron's logits.

No megatron import anywhere: this file plus ``config.py`` and ``weights.py`` are everything a
user needs to run an exported model (and the oracle the megatron model is tested against).
Each piece states which megatron-core 0.16.1 code it reproduces; in fp32 the logits match
megatron's ``GPTModel`` to ~1e-6 relative (tests/inference).

The model (pre-norm decoder, as megatron's ``TransformerLayer``)::

    x = word_embeddings[tokens] (+ position_embeddings[positions])
    per layer:  x = x + attention(norm(x))        (causal, GQA, optional RoPE)
                x = x + mlp(norm(x))              (dense FFN, or MoE: router -> top-k experts
                                                   of individual widths, + optional shared expert)
    logits = final_norm(x) @ output_weight.T      (tied: word_embeddings)

MoE layers are a plain loop over experts (gpt-fast style): each expert e has its own width W_e;
no capacity, no token dropping (dropless), experts in LOGICAL order (the export's order; the
physical slot order of a placement is a training-time layout and does not exist here).

Sequence-level routing (``routing_granularity = "sequence"``) averages the router logits over
a sequence before top-k, so one token's experts depend on the other tokens. Two definitions:

* ``sequence_routing="full"`` (megatron's, the default): every token of the given sequence
  routes by the mean over ALL its tokens, future ones included. Exact, but a new token changes
  every token's routing, so generation must recompute the whole sequence each step.
* ``sequence_routing="causal"``: token t routes by the mean over tokens 0..t. Causal, so a KV
  cache is exact for it (cached and recomputed logits agree), but it is NOT what training
  did: even the first generated token's logits differ from megatron's full-sequence pooling.
  Sums are kept in float64 so the cached running sum and a recomputed cumulative sum agree.

Shape legend (suffixes): B batch, S tokens in this call, L keys (cached + this call),
T = B*S flattened tokens, D hidden size, H query heads, N key/value heads (query groups),
K head dim (kv_channels), C per-group QKV channels ((H/N + 2) * K), R rotated channels,
F FFN width (dense, shared, or one expert's W_e), I fc1 rows (2F gated, else F), E experts,
X top-k choices per token, V padded vocabulary.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExportConfig
from .weights import check_tensors, read_export_tensors

SEQUENCE_ROUTING = ("full", "causal")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _empty(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    """An uninitialised inference weight (filled by :meth:`ReferenceGPT.load_tensors`)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


# ----------------------------------------------------------------------------- small layers
class Norm(nn.Module):
    """torch LayerNorm / RMSNorm, as megatron's local spec builds them (``WrappedTorchNorm``)."""

    def __init__(self, cfg: ExportConfig, dtype, device):
        super().__init__()
        self.kind, self.eps = cfg.normalization, cfg.layernorm_epsilon
        self.weight = _empty(cfg.hidden_size, dtype=dtype, device=device)
        self.bias = _empty(cfg.hidden_size, dtype=dtype, device=device) if self.kind == "LayerNorm" else None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.kind == "LayerNorm":
            return F.layer_norm(x_BSD, self.weight.shape, self.weight, self.bias, self.eps)
        return F.rms_norm(x_BSD, self.weight.shape, self.weight, self.eps)


class Linear(nn.Module):
    """``y = x @ weight.T (+ bias)``; weight ``[out, in]`` as stored by megatron."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype, device):
        super().__init__()
        self.weight = _empty(d_out, d_in, dtype=dtype, device=device)
        self.bias = _empty(d_out, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _activation(name: str):
    return {
        "gelu": F.gelu,
        # megatron's fused bias_gelu / bias_geglu kernels (fusions/fused_bias_gelu.py)
        "gelu_tanh": lambda x: x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))),
        "silu": F.silu,
        "relu": F.relu,
    }[name]


class FFN(nn.Module):
    """megatron's ``MLP``: fc1 -> activation (gated: ``act(gate) * up`` over fc1's two halves)
    -> fc2. Used for dense layers, the shared expert and (without biases) each routed expert.

    ``probs_T`` (routed experts) scales the activation *before* fc2, where megatron's MoDSE
    experts apply the routing probability (experts.py ``_forward_loop``)."""

    def __init__(self, cfg: ExportConfig, width: int, bias: bool, dtype, device):
        super().__init__()
        gated = cfg.gated_linear_unit
        self.act, self.gated = _activation(cfg.activation), gated
        self.linear_fc1 = Linear(cfg.hidden_size, (2 if gated else 1) * width, bias, dtype, device)
        self.linear_fc2 = Linear(width, cfg.hidden_size, bias, dtype, device)

    def forward(self, x_TD: torch.Tensor, probs_T: Optional[torch.Tensor] = None) -> torch.Tensor:
        h_TI = self.linear_fc1(x_TD)
        if self.gated:
            gate_TF, up_TF = torch.chunk(h_TI, 2, dim=-1)
            z_TF = self.act(gate_TF) * up_TF
        else:
            z_TF = self.act(h_TI)
        if probs_T is not None:
            z_TF = (z_TF * probs_T.unsqueeze(-1)).to(z_TF.dtype)
        return self.linear_fc2(z_TF)


# ----------------------------------------------------------------------------- attention
class Rotary(nn.Module):
    """megatron's ``RotaryEmbedding`` + ``_apply_rotary_pos_emb_bshd`` (no scaling/interpolation)."""

    def __init__(self, cfg: ExportConfig, device):
        super().__init__()
        dim = cfg.rotary_dim
        inv_freq_R = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        self.register_buffer("inv_freq_R", inv_freq_R, persistent=False)
        self.interleaved = cfg.rotary_interleaved

    def angles(self, positions_S: torch.Tensor) -> torch.Tensor:
        """Angle of every rotated channel: ``[f0, f1, .., f0, f1, ..]`` (halves) or
        ``[f0, f0, f1, f1, ..]`` (interleaved), shape [S, 2R]."""
        freqs_SR = torch.outer(positions_S.to(torch.float32), self.inv_freq_R)
        if self.interleaved:
            return freqs_SR.repeat_interleave(2, dim=-1)
        return torch.cat((freqs_SR, freqs_SR), dim=-1)

    def forward(self, x_BSHK: torch.Tensor, angles_S2R: torch.Tensor) -> torch.Tensor:
        dim = angles_S2R.shape[-1]
        rot, passthrough = x_BSHK[..., :dim], x_BSHK[..., dim:]
        cos = torch.cos(angles_S2R).to(x_BSHK.dtype)[None, :, None, :]
        sin = torch.sin(angles_S2R).to(x_BSHK.dtype)[None, :, None, :]
        if self.interleaved:  # pairs (x0, x1) -> (-x1, x0)
            rotated = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        else:  # halves (a, b) -> (-b, a)
            a, b = torch.chunk(rot, 2, dim=-1)
            rotated = torch.cat((-b, a), dim=-1)
        return torch.cat((rot * cos + rotated * sin, passthrough), dim=-1)


@dataclass
class LayerCache:
    """One layer's cached keys/values [B, max_len, N, K]; for sequence-routed MoE layers also
    the running float64 sum of router logits [B, E] over the tokens seen so far."""

    k_BLNK: torch.Tensor
    v_BLNK: torch.Tensor
    router_sum_BE: Optional[torch.Tensor] = None


@dataclass
class KVCache:
    """Generation state: per-layer caches and how many positions they hold."""

    layers: list[LayerCache]
    max_len: int
    length: int = 0


class Attention(nn.Module):
    """megatron's ``SelfAttention`` + ``DotProductAttention`` (local spec), causal.

    QKV rows are megatron's per-query-group layout: for each of the N groups, its H/N query
    heads, then its key head, then its value head (``get_query_key_value_tensors``).
    Each key/value head serves the H/N consecutive query heads of its group
    (``repeat_interleave``). Softmax in fp32 as megatron (``attention_softmax_in_fp32``).
    """

    def __init__(self, cfg: ExportConfig, dtype, device):
        super().__init__()
        H, N, K, D = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.hidden_size
        self.H, self.N, self.K = H, N, K
        self.scale = cfg.softmax_scale if cfg.softmax_scale is not None else 1.0 / math.sqrt(K)
        self.linear_qkv = Linear(D, N * (H // N + 2) * K, cfg.add_bias_linear or cfg.add_qkv_bias, dtype, device)
        self.linear_proj = Linear(H * K, D, cfg.add_bias_linear, dtype, device)

    def forward(self, x_BSD, rotary: Optional[Rotary], angles, cache: Optional[LayerCache], start: int):
        B, S, _ = x_BSD.shape
        H, N, K = self.H, self.N, self.K
        qkv_BSNC = self.linear_qkv(x_BSD).view(B, S, N, (H // N + 2) * K)
        q_BSNX, k_BSNK, v_BSNK = torch.split(qkv_BSNC, [(H // N) * K, K, K], dim=-1)
        q_BSHK = q_BSNX.reshape(B, S, H, K)
        if rotary is not None:
            q_BSHK, k_BSNK = rotary(q_BSHK, angles), rotary(k_BSNK, angles)
        if cache is not None:
            cache.k_BLNK[:, start : start + S] = k_BSNK
            cache.v_BLNK[:, start : start + S] = v_BSNK
            k_BLNK, v_BLNK = cache.k_BLNK[:, : start + S], cache.v_BLNK[:, : start + S]
        else:
            k_BLNK, v_BLNK = k_BSNK, v_BSNK
        k_BLHK = k_BLNK.repeat_interleave(H // N, dim=2)
        v_BLHK = v_BLNK.repeat_interleave(H // N, dim=2)
        scores_BHSL = torch.einsum("bshk,blhk->bhsl", q_BSHK, k_BLHK) * self.scale
        L = k_BLHK.shape[1]
        future_SL = torch.arange(L, device=x_BSD.device)[None, :] > (start + torch.arange(S, device=x_BSD.device))[:, None]
        scores_BHSL = scores_BHSL.float().masked_fill(future_SL, float("-inf"))
        probs_BHSL = torch.softmax(scores_BHSL, dim=-1).to(x_BSD.dtype)
        ctx_BSHK = torch.einsum("bhsl,blhk->bshk", probs_BHSL, v_BLHK)
        return self.linear_proj(ctx_BSHK.reshape(B, S, H * K))


# ----------------------------------------------------------------------------- MoE
def topk_routing(logits_TE: torch.Tensor, moe, expert_bias_E: Optional[torch.Tensor]):
    """megatron's ``topk_routing_with_score_function`` (moe_utils.py, unfused, no groups):
    ``(probs_TX, experts_TX)`` - each token's k chosen experts and their weights.

    softmax: top-k of the logits, then a softmax over the k chosen (``pre_softmax``: softmax
    over all experts, then top-k). sigmoid: sigmoid scores; the expert bias, if any, is added
    only to choose; the chosen (unbiased) scores are renormalised to sum to 1 when k > 1.
    """
    k = moe.router_topk
    if moe.score_function == "softmax":
        if moe.pre_softmax:
            scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32).type_as(logits_TE)
            probs_TX, experts_TX = torch.topk(scores_TE, k=k, dim=1)
        else:
            top_TX, experts_TX = torch.topk(logits_TE, k=k, dim=1)
            probs_TX = torch.softmax(top_TX, dim=-1, dtype=torch.float32).type_as(logits_TE)
    else:
        scores_TE = torch.sigmoid(logits_TE.float()).type_as(logits_TE)
        if expert_bias_E is not None:
            _, experts_TX = torch.topk(scores_TE + expert_bias_E, k=k, dim=1)
            probs_TX = torch.gather(scores_TE, dim=1, index=experts_TX)
        else:
            probs_TX, experts_TX = torch.topk(scores_TE, k=k, dim=1)
        if k > 1:
            probs_TX = probs_TX / (probs_TX.sum(dim=-1, keepdim=True) + 1e-20)
    if moe.topk_scaling_factor:
        probs_TX = probs_TX * moe.topk_scaling_factor
    return probs_TX, experts_TX


def pool_sequence_logits(logits_BSE, mode: str, cache: Optional[LayerCache], start: int) -> torch.Tensor:
    """Sequence-level routing logits (see the module docstring for ``full`` vs ``causal``).

    ``full`` is ``MoDSERouter.sequence_logits`` (fp32 mean over the sequence, broadcast).
    ``causal`` continues ``cache.router_sum_BE`` (the sum over the ``start`` cached tokens)."""
    B, S, E = logits_BSE.shape
    if mode == "full":
        if start:
            raise ValueError("full-sequence routing cannot continue a cached sequence: "
                             "use sequence_routing='causal' with a KV cache")
        mean_BE = logits_BSE.float().sum(dim=1) / S
        return mean_BE.unsqueeze(1).expand(B, S, E).to(logits_BSE.dtype)
    prior_BE = cache.router_sum_BE if cache is not None else None
    if prior_BE is None:
        prior_BE = logits_BSE.new_zeros(B, E, dtype=torch.float64)
    sums_BSE = prior_BE.unsqueeze(1) + torch.cumsum(logits_BSE.double(), dim=1)
    if cache is not None:
        cache.router_sum_BE = sums_BSE[:, -1].clone()
    counts_S1 = torch.arange(start + 1, start + S + 1, device=logits_BSE.device, dtype=torch.float64).unsqueeze(-1)
    return (sums_BSE / counts_S1).to(logits_BSE.dtype)


@dataclass
class Routing:
    """One MoE layer's routing in one forward pass, recorded by :meth:`ReferenceGPT.record_routing`
    (for analysis: which experts, hence which widths, each token went to, and how surely).

    ``logits_TE`` are the logits top-k was taken over (sequence-pooled for sequence routing),
    ``probs_TX``/``experts_TX`` what :func:`topk_routing` returned (T = B*S, row-major)."""

    layer: int
    logits_TE: torch.Tensor
    probs_TX: torch.Tensor
    experts_TX: torch.Tensor


class MoE(nn.Module):
    """MoDSE MoE layer: router -> top-k -> each expert at its own width (dropless loop over
    experts in logical order) -> probability-weighted sum, + optional (gated) shared expert.

    The router's logits are computed in ``moe.router_dtype`` (megatron ``router_gating_linear``);
    the expert bias is kept in float32 like megatron's. ``on_routing`` (None unless
    :meth:`ReferenceGPT.record_routing` is active) sees every routing decision; it never
    changes the output."""

    on_routing: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]] = None

    def __init__(self, cfg: ExportConfig, dtype, device):
        super().__init__()
        moe = self.cfg = cfg.moe
        D, E = cfg.hidden_size, moe.num_experts
        self.router_weight = _empty(E, D, dtype=dtype, device=device)
        self.expert_bias = _empty(E, dtype=torch.float32, device=device) if moe.expert_bias else None
        self.router_dtype = _DTYPES[moe.router_dtype] if moe.router_dtype else dtype
        self.experts = nn.ModuleList(FFN(cfg, w, False, dtype, device) for w in moe.expert_widths)
        self.shared = None
        if moe.shared_expert_intermediate_size is not None:
            self.shared = FFN(cfg, moe.shared_expert_intermediate_size, False, dtype, device)
        self.shared_gate = _empty(1, D, dtype=dtype, device=device) if moe.shared_expert_gate else None

    def router_logits(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BSD.to(self.router_dtype), self.router_weight.to(self.router_dtype))

    def forward(self, x_BSD, cache: Optional[LayerCache], start: int, sequence_routing: str):
        B, S, D = x_BSD.shape
        logits_BSE = self.router_logits(x_BSD)
        if self.cfg.routing_granularity == "sequence":
            logits_BSE = pool_sequence_logits(logits_BSE, sequence_routing, cache, start)
        x_TD = x_BSD.reshape(B * S, D)
        probs_TX, experts_TX = topk_routing(logits_BSE.reshape(B * S, -1), self.cfg, self.expert_bias)
        if self.on_routing is not None:
            self.on_routing(logits_BSE.reshape(B * S, -1), probs_TX, experts_TX)
        y_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            tokens, choice = torch.nonzero(experts_TX == e, as_tuple=True)
            if tokens.numel():
                y_TD.index_add_(0, tokens, expert(x_TD[tokens], probs_TX[tokens, choice]).to(y_TD.dtype))
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(F.linear(x_TD, self.shared_gate))
            y_TD = y_TD + shared_TD
        return y_TD.view(B, S, D)


# ----------------------------------------------------------------------------- model
class Layer(nn.Module):
    """megatron's ``TransformerLayer`` (pre-norm, residual around attention and MLP)."""

    def __init__(self, cfg: ExportConfig, index: int, dtype, device):
        super().__init__()
        self.input_norm = Norm(cfg, dtype, device)
        self.attention = Attention(cfg, dtype, device)
        self.mlp_norm = Norm(cfg, dtype, device)
        self.is_moe = cfg.is_moe_layer(index)
        if self.is_moe:
            self.mlp = MoE(cfg, dtype, device)
        else:
            self.mlp = FFN(cfg, cfg.ffn_hidden_size, cfg.add_bias_linear, dtype, device)

    def forward(self, x_BSD, rotary, angles, cache: Optional[LayerCache], start: int, sequence_routing: str):
        x_BSD = x_BSD + self.attention(self.input_norm(x_BSD), rotary, angles, cache, start)
        h_BSD = self.mlp_norm(x_BSD)
        if self.is_moe:
            return x_BSD + self.mlp(h_BSD, cache, start, sequence_routing)
        return x_BSD + self.mlp(h_BSD)


class ReferenceGPT(nn.Module):
    """The exported GPT in plain PyTorch (inference only; weights are not trainable).

    ``forward(tokens_BS)`` returns float32 logits ``[B, S, padded_vocab_size]`` - the same
    tensor megatron's ``GPTModel`` returns, padding columns included (they are trained to never
    win but are not masked by megatron either); generation masks ids >= ``vocab_size``.
    """

    def __init__(self, config: ExportConfig, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
        super().__init__()
        cfg = self.config = config
        dtype = dtype or _DTYPES[cfg.dtype]
        D = cfg.hidden_size
        self.word_embeddings = _empty(cfg.padded_vocab_size, D, dtype=dtype, device=device)
        self.position_embeddings = None
        self.rotary = None
        if cfg.position_embedding_type == "learned_absolute":
            self.position_embeddings = _empty(cfg.max_position_embeddings, D, dtype=dtype, device=device)
        else:
            self.rotary = Rotary(cfg, device)
        self.layers = nn.ModuleList(Layer(cfg, i, dtype, device) for i in range(cfg.num_layers))
        self.final_norm = Norm(cfg, dtype, device)
        self.output_weight = None if cfg.tie_word_embeddings else _empty(cfg.padded_vocab_size, D, dtype=dtype, device=device)

    # ------------------------------------------------------------------ export names
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Export name -> this model's tensor (the inverse of loading; megatron's names)."""
        out = {"embedding.word_embeddings.weight": self.word_embeddings}
        if self.position_embeddings is not None:
            out["embedding.position_embeddings.weight"] = self.position_embeddings
        for i, layer in enumerate(self.layers):
            p = f"decoder.layers.{i}."
            _norm_names(out, p + "self_attention.linear_qkv.layer_norm_", layer.input_norm)
            _linear_names(out, p + "self_attention.linear_qkv.", layer.attention.linear_qkv)
            _linear_names(out, p + "self_attention.linear_proj.", layer.attention.linear_proj)
            _norm_names(out, p + "mlp.linear_fc1.layer_norm_", layer.mlp_norm)
            if not layer.is_moe:
                _ffn_names(out, p + "mlp.", layer.mlp)
                continue
            moe: MoE = layer.mlp
            out[p + "mlp.router.weight"] = moe.router_weight
            if moe.expert_bias is not None:
                out[p + "mlp.router.expert_bias"] = moe.expert_bias
            for e, expert in enumerate(moe.experts):
                _ffn_names(out, p + f"mlp.experts.expert{e}.", expert)
            if moe.shared is not None:
                _ffn_names(out, p + "mlp.shared_experts.", moe.shared)
            if moe.shared_gate is not None:
                out[p + "mlp.shared_experts.gate_weight"] = moe.shared_gate
        _norm_names(out, "decoder.final_layernorm.", self.final_norm)
        if self.output_weight is not None:
            out["output_layer.weight"] = self.output_weight
        return out

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies under export names (e.g. for ``safetensors.torch.save_file``)."""
        return {name: t.detach().to("cpu").clone().contiguous() for name, t in self.export_tensors().items()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "<tensors>") -> None:
        """Copy export-named tensors in, strictly (see :func:`weights.check_tensors`)."""
        own = self.export_tensors()
        check_tensors({n: t.shape for n, t in own.items()}, tensors, source, self.config.describe())
        for name, param in own.items():
            param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))

    def load_export(self, path: str | os.PathLike) -> None:
        """Load an export directory's tensors (``model.safetensors`` or an index + shards)."""
        self.load_tensors(read_export_tensors(path), source=os.fspath(path))

    @classmethod
    def from_export(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None) -> "ReferenceGPT":
        """Read ``config.json``, build the model and load its tensors (in eval mode)."""
        model = cls(ExportConfig.from_json(path), device=device, dtype=dtype)
        model.load_export(path)
        return model.eval()

    @contextlib.contextmanager
    def record_routing(self) -> Iterator[list[Routing]]:
        """``with model.record_routing() as routing:`` - every forward inside the block appends
        one detached :class:`Routing` per MoE layer (in layer order) to the list ``routing``.
        Outputs are unchanged; outside the block nothing is recorded."""
        records: list[Routing] = []
        moes = [(i, layer.mlp) for i, layer in enumerate(self.layers) if layer.is_moe]

        def recorder(index: int):
            def record(logits_TE, probs_TX, experts_TX) -> None:
                records.append(Routing(index, logits_TE.detach().clone(), probs_TX.detach().clone(),
                                       experts_TX.detach().clone()))
            return record

        for index, moe in moes:
            moe.on_routing = recorder(index)
        try:
            yield records
        finally:
            for _, moe in moes:
                moe.on_routing = None

    # ------------------------------------------------------------------ running
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions."""
        cfg, param = self.config, self.word_embeddings
        shape = (batch, max_len, cfg.num_query_groups, cfg.kv_channels)
        layers = [LayerCache(param.new_zeros(shape), param.new_zeros(shape)) for _ in self.layers]
        return KVCache(layers, max_len)

    def forward(self, tokens_BS: torch.Tensor, cache: Optional[KVCache] = None,
                sequence_routing: str = "full") -> torch.Tensor:
        """Logits [B, S, V] (float32) of ``tokens_BS``, which continue ``cache`` if given
        (positions ``cache.length ..``; the cache then holds them too).

        ``sequence_routing`` matters only for sequence-routed MoE layers (module docstring);
        with a cache it must be ``causal``.
        """
        if sequence_routing not in SEQUENCE_ROUTING:
            raise ValueError(f"sequence_routing={sequence_routing!r} is not valid: use one of {', '.join(SEQUENCE_ROUTING)}")
        moe = self.config.moe
        if cache is not None and sequence_routing == "full" and moe is not None and moe.routing_granularity == "sequence":
            raise ValueError("a KV cache cannot reproduce full-sequence routing (new tokens change every token's "
                             "experts): use sequence_routing='causal' or run without a cache")
        B, S = tokens_BS.shape
        if tokens_BS.numel() == 0:
            raise ValueError("tokens is empty: give at least one token per sequence")
        start = cache.length if cache is not None else 0
        if cache is not None and start + S > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, {start + S} needed: allocate a longer cache")
        if self.position_embeddings is not None and start + S > self.config.max_position_embeddings:
            raise ValueError(
                f"position {start + S - 1} is beyond the model's max_position_embeddings="
                f"{self.config.max_position_embeddings}: use a shorter prompt or fewer new tokens"
            )
        if int(tokens_BS.max()) >= self.config.padded_vocab_size or int(tokens_BS.min()) < 0:
            raise ValueError(f"token ids must be in 0..{self.config.padded_vocab_size - 1}")
        positions_S = torch.arange(start, start + S, device=tokens_BS.device)
        x_BSD = F.embedding(tokens_BS, self.word_embeddings)
        if self.position_embeddings is not None:
            x_BSD = x_BSD + F.embedding(positions_S, self.position_embeddings)[None]
        angles = self.rotary.angles(positions_S) if self.rotary is not None else None
        for i, layer in enumerate(self.layers):
            x_BSD = layer(x_BSD, self.rotary, angles, cache.layers[i] if cache is not None else None, start, sequence_routing)
        x_BSD = self.final_norm(x_BSD)
        output_weight = self.output_weight if self.output_weight is not None else self.word_embeddings
        if cache is not None:
            cache.length = start + S
        return F.linear(x_BSD, output_weight).float()


def _norm_names(out: dict, prefix: str, norm: Norm) -> None:
    out[prefix + "weight"] = norm.weight
    if norm.bias is not None:
        out[prefix + "bias"] = norm.bias


def _linear_names(out: dict, prefix: str, linear: Linear) -> None:
    out[prefix + "weight"] = linear.weight
    if linear.bias is not None:
        out[prefix + "bias"] = linear.bias


def _ffn_names(out: dict, prefix: str, ffn: FFN) -> None:
    _linear_names(out, prefix + "linear_fc1.", ffn.linear_fc1)
    _linear_names(out, prefix + "linear_fc2.", ffn.linear_fc2)


__all__ = ["FFN", "KVCache", "LayerCache", "MoE", "ReferenceGPT", "Routing", "SEQUENCE_ROUTING", "pool_sequence_logits", "topk_routing"]
