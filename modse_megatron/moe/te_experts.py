"""TransformerEngine expert GEMMs: ``MoDSEExperts(impl='te')``, BF16 and FP8 on GPUs.

Design. Every local expert's ``linear_fc1`` / ``linear_fc2`` is a ``te.pytorch.Linear``
(``bias=False, parallel_mode=None, tp_size=1``) instead of the bare weight holder of the other
impls. Its only parameter is ``weight`` with the same shape (fc1 ``[G*W, D]``, fc2 ``[D, W]``)
and the same logical-id-seeded initial values (:class:`MoDSEExperts` computes them and
:func:`make_te_linear` copies them in), so parameter names, checkpoint keys (one
``ShardedTensor`` per logical expert) and all ETP/EP logic stay shared with ``loop`` and
``grouped``: a checkpoint saved with one impl loads with any other. TE does no
tensor-parallel communication here; megatron's dispatcher reduces the ETP partial sums as for
every impl.

Why not TE's ``GroupedLinear``: it runs ``num_gemms`` GEMMs of *one* ``[in, out]`` shape and
names its parameters ``weight0..weight{n-1}`` on one module. MoDSE experts have different
widths (with the paired placement every rank holds a big and a small expert, so width classes
of one are the norm), which rules out one module for all experts, and one module per width
class would rename the parameters (``local_experts.{i}.linear_fc1.weight``) that checkpoints,
DDP buckets and the optimizer are keyed by. Per-expert ``Linear`` keeps the names and still
gets TE's FP8 GEMMs; the cost is one kernel launch pair per expert, as in megatron's own
``SequentialMLP``.

FP8 (``config.fp8`` set; the FP8 autocast context is entered by megatron's
``TransformerBlock``): FP8 GEMMs need every token count divisible by the recipe's alignment
(``get_align_size_for_quantization``: 16, or 32 for MXFP8). As megatron's
``SequentialMLP._pad_tensor_for_quantization`` does, each expert's token block gets zero rows
appended (with zero probabilities) and its output rows are cut back after fc2
(:func:`pad_rows` / :func:`unpad_rows`, plain torch so they are tested on CPU). Widths must be
multiples of 16 per ETP shard under FP8 (checked by ``MoDSEConfig``).

Experts that receive no tokens skip TE and run the same math as plain (empty) matmuls: their
weights still get (zero) gradients, exactly as with ``loop`` / ``grouped``, and no zero-row
tensor reaches TE's FP8 casts.

TE's per-module FP8 metadata (``_extra_state``: delayed-scaling amax history) is not part of
the distributed checkpoint, which stays layout- and impl-free; after loading, delayed scaling
re-calibrates from the first step (current-scaling recipes keep no such state).

``transformer_engine`` is imported lazily (only when a ``te`` expert is built), so this module
imports on any machine.

Shape legend: T tokens, P padded tokens, D hidden size, W local width, G = 2 if gated else 1.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..config import EXPERTS_IMPLS_BUILT
from ..platform import transformer_engine_problem

TE_IMPL = EXPERTS_IMPLS_BUILT[-1]  # "te": the one spelling lives in config.py


# ---------------------------------------------------------------------------- availability
def te_unavailable_reason(import_te: bool = False) -> str | None:
    """``None`` if the ``te`` experts can run here, else the one-line error naming the fix
    (:func:`modse_megatron.platform.transformer_engine_problem`)."""
    return transformer_engine_problem("moe_experts_impl='te'",
                                      "use moe_experts_impl=grouped", import_te)


def check_te_available() -> None:
    """Raise ``ValueError`` (one line, naming the fix) unless the ``te`` experts can run here."""
    reason = te_unavailable_reason(import_te=True)
    if reason is not None:
        raise ValueError(reason)


# ---------------------------------------------------------------------------- modules
def make_te_linear(weight_NK: torch.Tensor) -> torch.nn.Module:
    """A ``te.pytorch.Linear`` computing ``x @ weight.T`` whose ``.weight`` is a copy of
    ``weight_NK`` (same shape and dtype) on the current CUDA device.

    TE's own initialisation is a no-op: the caller's weights are the logical-id-seeded ones,
    and no global RNG state is consumed (the rest of the model initialises as with other impls).
    """
    import transformer_engine.pytorch as te

    out_features, in_features = weight_NK.shape
    linear = te.Linear(
        in_features,
        out_features,
        bias=False,
        parallel_mode=None,  # no TE-side TP communication: megatron's dispatcher reduces ETP
        tp_size=1,
        init_method=_no_init,
        params_dtype=weight_NK.dtype,
        device=torch.cuda.current_device(),
    )
    with torch.no_grad():
        linear.weight.copy_(weight_NK)
    return linear


def _no_init(weight: torch.Tensor) -> None:
    """TE ``init_method`` that leaves the weight alone (it is overwritten right after)."""


# ---------------------------------------------------------------------------- FP8 padding
def quantization_alignment(config) -> int:
    """Rows each expert's token block is padded to: megatron's alignment under FP8/FP4, else 1."""
    if not (getattr(config, "fp8", None) or getattr(config, "fp4", None)):
        return 1
    from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization

    return int(get_align_size_for_quantization(config))


def padded_counts(counts: Sequence[int], align: int) -> list[int]:
    """Each count rounded up to a multiple of ``align`` (zero stays zero, as in megatron)."""
    return [-(-int(c) // align) * align for c in counts]


def _real_rows(counts: Sequence[int], padded: Sequence[int], device) -> torch.Tensor:
    """Index of every real row in the padded layout (expert blocks keep their order)."""
    counts_E = torch.tensor(list(counts), dtype=torch.long)
    shift_E = torch.tensor([0, *padded[:-1]], dtype=torch.long).cumsum(0) - torch.tensor(
        [0, *counts[:-1]], dtype=torch.long
    ).cumsum(0)
    rows_T = torch.arange(int(counts_E.sum())) + torch.repeat_interleave(shift_E, counts_E)
    return rows_T.to(device)


def pad_rows(x_TD: torch.Tensor, probs_T: torch.Tensor, counts: Sequence[int], align: int):
    """Append zero rows (and zero probabilities) to every expert's block of ``x_TD``.

    Returns ``(x_PD, probs_P, padded_counts)``; the inputs themselves when nothing needs
    padding. Differentiable: gradients of the padding rows are dropped.
    """
    padded = padded_counts(counts, align)
    if list(padded) == [int(c) for c in counts]:
        return x_TD, probs_T, padded
    rows_T = _real_rows(counts, padded, x_TD.device)
    total = sum(padded)
    x_PD = x_TD.new_zeros((total, *x_TD.shape[1:])).index_copy(0, rows_T, x_TD)
    probs_P = probs_T.new_zeros((total, *probs_T.shape[1:])).index_copy(0, rows_T, probs_T)
    return x_PD, probs_P, padded


def unpad_rows(y_PD: torch.Tensor, counts: Sequence[int], padded: Sequence[int]) -> torch.Tensor:
    """Drop the padding rows :func:`pad_rows` added (the inverse of its row layout)."""
    if list(padded) == [int(c) for c in counts]:
        return y_PD
    return y_PD.index_select(0, _real_rows(counts, padded, y_PD.device))


# ---------------------------------------------------------------------------- forward
def te_experts_forward(
    experts: Sequence[torch.nn.Module],
    x_TD: torch.Tensor,
    probs_T: torch.Tensor,
    counts: Sequence[int],
    activation: Callable[[torch.Tensor], torch.Tensor],
    align: int,
) -> torch.Tensor:
    """The loop oracle's math with each GEMM a TE ``Linear`` (FP8 inside megatron's FP8 context).

    ``activation`` is megatron MLP's activation (``experts._activation``); probabilities
    multiply its output as in every impl. ``align`` > 1 pads each expert's block for FP8.
    """
    x_PD, probs_P, padded = pad_rows(x_TD, probs_T, counts, align)
    outputs = []
    for expert, xe_PD, pe_P in zip(experts, x_PD.split(padded), probs_P.split(padded)):
        fc1, fc2 = expert.linear_fc1, expert.linear_fc2
        empty = xe_PD.shape[0] == 0
        h_PGW = _empty_fc(xe_PD, fc1.weight) if empty else fc1(xe_PD)
        z_PW = activation(h_PGW)
        z_PW = (z_PW * pe_P.unsqueeze(-1)).to(z_PW.dtype)
        outputs.append(_empty_fc(z_PW, fc2.weight) if empty else fc2(z_PW))
    return unpad_rows(torch.cat(outputs, dim=0), counts, padded)


def _empty_fc(x_0K: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for a zero-row ``x``: keeps ``w`` in the graph (zero gradient)."""
    return x_0K @ w_NK.t().to(x_0K.dtype)


__all__ = [
    "TE_IMPL",
    "check_te_available",
    "make_te_linear",
    "pad_rows",
    "padded_counts",
    "quantization_alignment",
    "te_experts_forward",
    "te_unavailable_reason",
    "unpad_rows",
]
