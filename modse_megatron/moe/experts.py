"""Variable-width experts: megatron's experts interface for experts of different FFN widths.

Megatron's expert modules (``SequentialMLP``, ``GroupedMLP``, ``TEGroupedMLP``) give every
expert ``moe_ffn_hidden_size``. :class:`MoDSEExperts` holds one weight pair per local expert,
each with its own width, and satisfies the same interface as ``SequentialMLP``
(``forward(x, tokens_per_expert, probs) -> (y, None)``, ``backward_dw``, ``sharded_state_dict``),
so ``MoELayer`` and megatron's token dispatchers use it unchanged.

Expert tensor parallelism (ETP): each expert's width is split over the expert-TP ranks
(fc1 by rows, fc2 by columns), so every ETP rank computes a partial output that the
dispatcher's reduce-scatter sums, exactly as for megatron's experts.

Implementations (``impl``):

* ``loop`` - the reference oracle: a plain loop over experts with autograd (gpt-fast style).
* ``grouped`` - the fast path: one autograd node for all local experts
  (:class:`_GroupedExpertsFn`); adjacent experts of equal width run as one
  ``torch._grouped_mm`` (on CUDA by default), activations are recomputed in backward instead
  of stored, and outputs are written into one preallocated buffer.

* ``te`` - GPUs only: each expert's fc1/fc2 is a TransformerEngine ``Linear`` (BF16 GEMMs, or
  FP8 inside megatron's FP8 autocast with each expert's tokens padded to the FP8 alignment);
  same parameters, initialisation and checkpoint entries as the other impls
  (:mod:`modse_megatron.moe.te_experts`).

Checkpoints: one ``ShardedTensor`` per *logical* expert and weight
(``...experts.expert{id}.linear_fc1.weight``), sharded along the width by ETP and replicated
over the expert-data-parallel group, so a checkpoint loads under any EP/ETP size or placement.

Shape legend (suffixes): T tokens routed to this rank's experts (permuted), D hidden size,
W one expert's local width (width / ETP), G = 2 for gated units (SwiGLU/GeGLU) else 1,
E local experts.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import EXPERTS_IMPLS_ANY_DEVICE as IMPLS, EXPERTS_IMPLS_BUILT as ALL_IMPLS
from . import te_experts


class _Linear(nn.Module):
    """A bare weight holder, so parameter names read ``linear_fc1.weight`` like megatron's MLP."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class Expert(nn.Module):
    """One expert's (local shard of its) weights: fc1 ``[G*W, D]``, fc2 ``[D, W]``.

    For gated units fc1 stacks ``[gate_W; up_W]`` like megatron's MLP with stride 2, so an ETP
    shard holds the same hidden units of the gate and the up projection.
    """

    def __init__(self, w1_GWD: torch.Tensor, w2_DW: torch.Tensor, logical_id: int, linear=_Linear):
        super().__init__()
        self.linear_fc1 = linear(w1_GWD)  # ``linear(weight)``: a module whose ``.weight`` it is
        self.linear_fc2 = linear(w2_DW)
        self.logical_id = logical_id


def mlp_activation(config: TransformerConfig):
    """megatron MLP's activation as a function of the fc1 outputs (gated or not, with clamp and
    linear offset): ``[T, G*W] -> [T, W]``, differentiated by autograd (the loop/te experts)."""
    act = config.activation_func
    if not config.gated_linear_unit:
        return act
    clamp, offset = config.activation_func_clamp_value, config.glu_linear_offset

    def glu(h):
        gate, up = torch.chunk(h, 2, dim=-1)
        if clamp is not None:
            gate = gate.clamp(min=None, max=clamp)
            up = up.clamp(min=-clamp, max=clamp)
        return act(gate) * (up + offset)

    return glu


class MoDSEExperts(MegatronModule):
    """The local experts of one MoDSE layer, each with its own width.

    Args:
        num_local_experts: experts on this EP rank (megatron passes it positionally).
        config: the layer's TransformerConfig.
        submodules: ignored (accepted so megatron's ``build_module`` can pass a spec's).
        pg_collection: megatron process groups (``ep``, ``expt_tp``, ``expt_dp`` are used).
        expert_widths: full FFN width of each local expert, in physical slot order.
        logical_ids: logical id of each local expert (checkpoint keys, statistics).
        slot_to_logical, all_expert_widths: instead of the two above, the whole layer's
            placement (logical expert of every physical slot) and every logical expert's
            width; this rank's experts are then the slots of its EP rank (from
            ``pg_collection.ep``). This is how layer specs build the experts, since a spec is
            written before the process groups exist.
        impl: ``loop``, ``grouped`` or ``te`` (see module docstring).
        use_grouped_mm: run equal-width experts through ``torch._grouped_mm``; default: on CUDA.
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        submodules=None,
        pg_collection=None,
        *,
        expert_widths: Optional[Sequence[int]] = None,
        logical_ids: Optional[Sequence[int]] = None,
        slot_to_logical: Optional[Sequence[int]] = None,
        all_expert_widths: Optional[Sequence[int]] = None,
        impl: str = "grouped",
        use_grouped_mm: Optional[bool] = None,
    ):
        super().__init__(config=config)
        if impl not in ALL_IMPLS:
            raise ValueError(f"impl={impl!r} is not valid: use one of {', '.join(ALL_IMPLS)}")
        if impl == te_experts.TE_IMPL:
            te_experts.check_te_available()
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        if slot_to_logical is not None:
            if expert_widths is not None or logical_ids is not None or all_expert_widths is None:
                raise ValueError(
                    "give either expert_widths + logical_ids (this rank's experts) or "
                    "slot_to_logical + all_expert_widths (the whole layer), not a mix"
                )
            first = pg_collection.ep.rank() * num_local_experts
            logical_ids = [int(e) for e in slot_to_logical[first : first + num_local_experts]]
            expert_widths = [all_expert_widths[e] for e in logical_ids]
        if expert_widths is None or logical_ids is None:
            raise ValueError("MoDSEExperts needs expert_widths and logical_ids (or slot_to_logical + all_expert_widths)")
        if len(expert_widths) != num_local_experts or len(logical_ids) != num_local_experts:
            raise ValueError(
                f"{num_local_experts} local experts but {len(expert_widths)} widths and "
                f"{len(logical_ids)} logical ids: give one of each per local expert"
            )
        if config.add_bias_linear:
            raise ValueError("MoDSE experts have no linear biases: set add_bias_linear=False")
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.impl = impl
        self.use_grouped_mm = use_grouped_mm
        etp, etp_rank = self.tp_group.size(), self.tp_group.rank()
        for w in expert_widths:
            if w <= 0 or w % etp:
                raise ValueError(
                    f"expert width {w} is not a positive multiple of the expert-TP size {etp}: "
                    "choose widths divisible by expert_tensor_parallel_size"
                )
        self.expert_widths = [int(w) for w in expert_widths]
        self.logical_ids = [int(i) for i in logical_ids]
        self.local_widths = [w // etp for w in self.expert_widths]
        self.mlp_activation = mlp_activation(config)
        self.scaled_activation = scaled_activation(config)
        self.gated = bool(config.gated_linear_unit)
        self.quantization_align = te_experts.quantization_alignment(config) if impl == te_experts.TE_IMPL else 1
        """Rows each expert's token block is padded to (``te`` under FP8; else 1)."""

        # One base seed drawn from the (layout-independent) RNG stream, then a generator per
        # logical expert: initial weights depend on the logical id only, not on EP/ETP size
        # or placement, and experts on different EP ranks never share an initialisation.
        base_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        expert_parallel = config.expert_model_parallel_size > 1
        linear = te_experts.make_te_linear if impl == te_experts.TE_IMPL else _Linear
        self.local_experts = nn.ModuleList()
        for width, lid in zip(self.expert_widths, self.logical_ids):
            w1, w2 = self._init_expert(width, base_seed + lid, etp, etp_rank)
            expert = Expert(w1, w2, lid, linear=linear)
            for param, dim in ((expert.linear_fc1.weight, 0), (expert.linear_fc2.weight, 1)):
                # Attributes megatron's DDP, optimizer and grad clipping read: expert params
                # are reduced over the expert-data-parallel group, not the data-parallel one.
                param.allreduce = not expert_parallel
                param.tensor_model_parallel = etp > 1
                param.partition_dim = dim
                param.partition_stride = 1
            self.local_experts.append(expert)
        # TE linears add ``_extra_state`` (FP8 metadata) to state dicts; the other impls have
        # none. Neither side needs the other's, so state dicts load across impls.
        self.register_load_state_dict_post_hook(_ignore_expert_extra_state)

    def _init_expert(self, width: int, seed: int, etp: int, etp_rank: int):
        """Full (master) weights from the expert's own generator, then this ETP rank's shard."""
        cfg, d = self.config, self.config.hidden_size
        g = 2 if self.gated else 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            w1_full = torch.empty(g * width, d, dtype=torch.float32)
            w2_full = torch.empty(d, width, dtype=torch.float32)
            if cfg.perform_initialization:
                cfg.init_method(w1_full)
                cfg.output_layer_init_method(w2_full)
        w1, w2 = etp_shard(w1_full, w2_full, etp, etp_rank, self.gated)
        return w1.to(cfg.params_dtype), w2.to(cfg.params_dtype)

    # ---------------------------------------------------------------- logical (full) weights
    @torch.no_grad()
    def load_full_expert(self, logical_id: int, w1_GWD: torch.Tensor, w2_DW: torch.Tensor) -> None:
        """Copy an expert's full (unsharded) weights into this rank's ETP shard."""
        expert = self.local_experts[self.logical_ids.index(logical_id)]
        w1, w2 = etp_shard(w1_GWD, w2_DW, self.tp_group.size(), self.tp_group.rank(), self.gated)
        expert.linear_fc1.weight.copy_(w1)
        expert.linear_fc2.weight.copy_(w2)

    @torch.no_grad()
    def full_expert_tensors(self, grads: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{logical_id: (w1_GWD, w2_DW)}`` of the local experts, gathered over expert-TP
        (weights, or their gradients with ``grads=True``). Collective over the ETP group."""
        etp = self.tp_group.size()
        out = {}
        for expert in self.local_experts:
            pair = []
            for param, dim in ((expert.linear_fc1.weight, 0), (expert.linear_fc2.weight, 1)):
                t = (param.grad if grads else param).detach().contiguous()
                parts = [torch.empty_like(t) for _ in range(etp)]
                torch.distributed.all_gather(parts, t, group=self.tp_group)
                if dim == 0 and self.gated:  # every shard is [gate; up]: regroup the halves
                    gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
                    parts = list(gates) + list(ups)
                pair.append(torch.cat(parts, dim=dim))
            out[expert.logical_id] = (pair[0], pair[1])
        return out

    # ---------------------------------------------------------------------------- forward
    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        """Run every local expert on its contiguous block of permuted tokens.

        Returns ``(y_TD, None)``: the probability-weighted expert outputs (partial sums over
        the width when ETP > 1; the dispatcher reduces them).
        """
        x_TD, probs_T = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            if self.config.moe_router_topk != 1:
                raise ValueError("moe_apply_probs_on_input needs moe_router_topk=1")
            x_TD = (probs_T.unsqueeze(-1) * x_TD).to(x_TD.dtype)
            probs_T = torch.ones_like(probs_T)
        counts = [int(c) for c in tokens_per_expert.tolist()]
        if sum(counts) != x_TD.shape[0]:
            raise ValueError(f"tokens_per_expert sums to {sum(counts)}, input has {x_TD.shape[0]} rows")
        if self.impl == "loop":
            return self._forward_loop(x_TD, counts, probs_T), None
        if self.impl == te_experts.TE_IMPL:
            y_TD = te_experts.te_experts_forward(
                self.local_experts, x_TD, probs_T, counts, self.mlp_activation, self.quantization_align
            )
            return y_TD, None
        grouped_mm = self.use_grouped_mm
        if grouped_mm is None:
            grouped_mm = x_TD.is_cuda and hasattr(torch, "_grouped_mm")
        weights = [p for e in self.local_experts for p in (e.linear_fc1.weight, e.linear_fc2.weight)]
        y_TD = _GroupedExpertsFn.apply(
            x_TD, probs_T, counts, self.local_widths, self.scaled_activation, grouped_mm, *weights
        )
        return y_TD, None

    def _forward_loop(self, x_TD, counts, probs_T):
        """Reference oracle: megatron MLP's math, one expert at a time."""
        outputs = []
        for expert, xe_TD, pe_T in zip(self.local_experts, x_TD.split(counts), probs_T.split(counts)):
            h_TGW = xe_TD @ expert.linear_fc1.weight.t()
            z_TW = self.mlp_activation(h_TGW)
            z_TW = (z_TW * pe_T.unsqueeze(-1)).to(z_TW.dtype)
            outputs.append(z_TW @ expert.linear_fc2.weight.t())
        return torch.cat(outputs, dim=0)

    def backward_dw(self):
        """No deferred weight-gradient work (megatron's interface; used by its overlap schedules)."""

    # ---------------------------------------------------------------------------- checkpoint
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """One ShardedTensor per logical expert and weight, keyed ``{prefix}expert{id}.*``.

        Dict keys are this module's state-dict names (``local_experts.{i}...``), checkpoint keys
        use logical ids, so the same checkpoint serves any placement. fc1 of gated units is
        split into its gate/up halves (megatron's swiglu factory) so ETP resharding keeps the
        halves apart. Replicas: the expert-data-parallel group (rank 0 is the main replica).
        """
        etp, etp_rank = self.tp_group.size(), self.tp_group.rank()
        replica_id = (0, 0, self.dp_group.rank())
        axis = len(sharded_offsets)
        out = {}
        for i, expert in enumerate(self.local_experts):
            key = f"{prefix}expert{expert.logical_id}."
            for name, tp_axis in (("linear_fc1", 0), ("linear_fc2", 1)):
                param = getattr(expert, name).weight
                sh = ShardedTensor.from_rank_offsets(
                    f"{key}{name}.weight",
                    param,
                    *sharded_offsets,
                    (axis + tp_axis, etp_rank, etp),
                    replica_id=replica_id,
                    prepend_axis_num=axis,
                )
                if name == "linear_fc1" and self.gated:
                    sh = apply_swiglu_sharded_factory(sh, sharded_offsets)
                out[f"{prefix}local_experts.{i}.{name}.weight"] = sh
        return out


_EXPERT_EXTRA_STATE = re.compile(r"(^|\.)local_experts\.\d+\.linear_fc[12]\._extra_state$")


def _ignore_expert_extra_state(module, incompatible_keys) -> None:
    """Load-state-dict post hook: experts' ``linear_fc*._extra_state`` entries (TE's FP8
    metadata) are neither required nor unexpected, like megatron's ``GroupedMLP`` does."""
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k for k in keys if not _EXPERT_EXTRA_STATE.search(k)]


def etp_shard(w1_GWD: torch.Tensor, w2_DW: torch.Tensor, etp: int, rank: int, gated: bool):
    """ETP rank ``rank``'s shard of an expert's full weights: the same hidden units
    ``[rank*W/etp, (rank+1)*W/etp)`` of fc1 (of both halves when gated) and of fc2's columns."""
    width = w2_DW.shape[1]
    lo, hi = rank * width // etp, (rank + 1) * width // etp
    w1 = torch.cat([part[lo:hi] for part in w1_GWD.chunk(2 if gated else 1, dim=0)], dim=0)
    return w1.contiguous(), w2_DW[:, lo:hi].contiguous()


# -------------------------------------------------------------------------------- fast path
def _width_classes(widths: Sequence[int]) -> dict[int, list[int]]:
    """Local expert indices grouped by width (experts of one class share GEMM shapes)."""
    classes: dict[int, list[int]] = {}
    for i, w in enumerate(widths):
        classes.setdefault(w, []).append(i)
    return classes


def _fc(x_TK: torch.Tensor, w_NK: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T`` (into ``out`` when given)."""
    if out is None:
        return torch.mm(x_TK, w_NK.t())
    return torch.mm(x_TK, w_NK.t(), out=out)


class _ScaledActivation:
    """The elementwise middle of an expert scaled by the routing probability,
    ``zp = act(h) * p``, with a hand-written backward (for :class:`_GroupedExpertsFn`).

    Generic: any megatron activation, differentiated by autograd on a recomputed ``act(h)``.
    """

    def __init__(self, fn):
        self.fn = fn

    def forward(self, h_TGW, p_T):
        z_TW = self.fn(h_TGW)
        return (z_TW * p_T.unsqueeze(-1)).to(z_TW.dtype)

    def backward(self, h_TGW, p_T, dzp_TW):
        """Returns ``(zp_TW, dh_TGW, dp_T)`` given the gradient w.r.t. ``zp``."""
        with torch.enable_grad():
            h_TGW = h_TGW.detach().requires_grad_(True)
            z_TW = self.fn(h_TGW)
        zd_TW = z_TW.detach()
        dp_T = (dzp_TW * zd_TW).sum(-1)
        (dh_TGW,) = torch.autograd.grad(z_TW, h_TGW, (dzp_TW * p_T.unsqueeze(-1)).to(z_TW.dtype))
        return (zd_TW * p_T.unsqueeze(-1)).to(zd_TW.dtype), dh_TGW, dp_T


class _ScaledSwiGLU(_ScaledActivation):
    """SwiGLU written out by hand: fewer passes over ``[T, W]`` arrays, in-place where the
    operand is dead, and ``dh`` written into one buffer (no ``cat`` of gate/up gradients)."""

    def forward(self, h_TGW, p_T):
        gate_TW, up_TW = h_TGW.chunk(2, dim=-1)
        return F.silu(gate_TW).mul_(up_TW).mul_(p_T.unsqueeze(-1).to(h_TGW.dtype))

    def backward(self, h_TGW, p_T, dzp_TW):
        gate_TW, up_TW = h_TGW.chunk(2, dim=-1)
        width = gate_TW.shape[1]
        p_T1 = p_T.unsqueeze(-1).to(h_TGW.dtype)
        silu_TW = F.silu(gate_TW)
        z_TW = silu_TW * up_TW
        dp_T = torch.linalg.vecdot(dzp_TW, z_TW)
        dz_TW = dzp_TW.mul_(p_T1)
        dh_TGW = torch.empty_like(h_TGW)
        torch.mul(dz_TW, silu_TW, out=dh_TGW[:, width:])
        torch.ops.aten.silu_backward.grad_input(dz_TW.mul_(up_TW), gate_TW, grad_input=dh_TGW[:, :width])
        return z_TW.mul_(p_T1), dh_TGW, dp_T


def scaled_activation(config: TransformerConfig) -> _ScaledActivation:
    """The grouped experts' ``act(h) * p`` for this config: hand-written SwiGLU when it is plain
    SwiGLU, else megatron's activation differentiated by autograd."""
    plain_swiglu = (
        config.gated_linear_unit and config.activation_func is F.silu
        and config.activation_func_clamp_value is None and config.glu_linear_offset == 0.0
    )
    return _ScaledSwiGLU(None) if plain_swiglu else _ScaledActivation(mlp_activation(config))


class _GroupedExpertsFn(torch.autograd.Function):
    """All local experts as one autograd node.

    Forward stores only the inputs and the fc1 outputs; backward recomputes the activation
    (cheap, elementwise; :class:`_ScaledActivation`), so memory stays at one ``[T, G*W]`` per expert.
    Outputs and input gradients are written into preallocated buffers (no per-expert graph
    nodes, no ``cat``). With ``grouped_mm``, adjacent experts of one width class run their
    forward as one ``torch._grouped_mm``.
    """

    @staticmethod
    def forward(ctx, x_TD, probs_T, counts, widths, activation, grouped_mm, *weights):
        num = len(counts)
        w1s, w2s = weights[0::2], weights[1::2]
        y_TD = x_TD.new_empty(x_TD.shape)
        hs = [None] * num
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        classes = _width_classes(widths) if grouped_mm else {i: [i] for i in range(num)}
        for members in classes.values():
            if len(members) > 1 and _contiguous(members):
                _grouped_forward(x_TD, probs_T, offsets, members, w1s, w2s, activation, y_TD, hs)
                continue
            for e in members:
                s, t = offsets[e], offsets[e + 1]
                h_TGW = _fc(x_TD[s:t], w1s[e])
                _fc(activation.forward(h_TGW, probs_T[s:t]), w2s[e], out=y_TD[s:t])
                hs[e] = h_TGW
        ctx.counts, ctx.offsets, ctx.activation = counts, offsets, activation
        ctx.save_for_backward(x_TD, probs_T, *weights, *hs)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        num = len(ctx.counts)
        saved = ctx.saved_tensors
        x_TD, probs_T = saved[0], saved[1]
        weights, hs = saved[2 : 2 + 2 * num], saved[2 + 2 * num :]
        offsets = ctx.offsets
        dx_TD = torch.empty_like(x_TD)
        dprobs_T = torch.empty_like(probs_T)
        dweights = []
        dy_TD = dy_TD.contiguous()
        for e in range(num):
            s, t = offsets[e], offsets[e + 1]
            w1_GWD, w2_DW = weights[2 * e], weights[2 * e + 1]
            dye_TD = dy_TD[s:t]
            zp_TW, dh_TGW, dp_T = ctx.activation.backward(hs[e], probs_T[s:t], torch.mm(dye_TD, w2_DW))
            dprobs_T[s:t] = dp_T.to(dprobs_T.dtype)
            dweights += [torch.mm(dh_TGW.t(), x_TD[s:t]), torch.mm(dye_TD.t(), zp_TW)]
            torch.mm(dh_TGW, w1_GWD, out=dx_TD[s:t])
        return (dx_TD, dprobs_T, None, None, None, None, *dweights)


def _contiguous(members: list[int]) -> bool:
    return members == list(range(members[0], members[0] + len(members)))


def _grouped_forward(x_TD, probs_T, offsets, members, w1s, w2s, activation, y_TD, hs):
    """Experts of one width class (adjacent slots) as two ``torch._grouped_mm`` calls."""
    s, t = offsets[members[0]], offsets[members[-1] + 1]
    offs = torch.tensor([offsets[e + 1] - s for e in members], dtype=torch.int32, device=x_TD.device)
    w1_EDG = torch.stack([w1s[e] for e in members]).transpose(1, 2)
    w2_EWD = torch.stack([w2s[e] for e in members]).transpose(1, 2)
    h_TGW = torch._grouped_mm(x_TD[s:t], w1_EDG, offs=offs)
    y_TD[s:t] = torch._grouped_mm(activation.forward(h_TGW, probs_T[s:t]), w2_EWD, offs=offs)
    for e in members:
        hs[e] = h_TGW[offsets[e] - s : offsets[e + 1] - s]


__all__ = ["ALL_IMPLS", "IMPLS", "Expert", "MoDSEExperts", "etp_shard"]
