"""MoDSE router: megatron's ``TopKRouter`` plus placement slots, frozen/random routers and
sequence-level routing.

Why a subclass and not a new router: everything megatron's router offers (top-k, the three aux
losses, loss-free expert bias, z-loss, capacity dropping, sigmoid/softmax scores, group-limited
routing, sinkhorn, routing replay) must keep working for the variable-width experts, and
megatron's dispatchers only need ``(probs, routing_map)`` in *physical slot* columns. So this
class reuses megatron's pieces and changes only four things:

1. **Slots** (``slot_to_logical``). Megatron puts experts ``[r*L, (r+1)*L)`` on EP rank r; a
   placement plan is realised by listing the logical experts rank by rank. Physical slot ``s``
   holds logical expert ``slot_to_logical[s]``. The weight rows, ``expert_bias`` and every
   per-expert buffer are in slot order (what the dispatcher needs); :meth:`sharded_state_dict`
   writes weight rows / bias / ``expert_bias`` in *logical* order, so checkpoints do not depend
   on the placement. (The plain ``state_dict()`` stays in slot order, like the module.)
   Initialisation draws the logical matrix exactly as ``TopKRouter`` would, then permutes the
   rows, so with the identity order this router is bit-identical to ``TopKRouter``.
2. **Router type** (``router_type``), the learned/frozen/random axis of Fan, Messmer & Jaggi
   ("Towards an empirical understanding of MoE design choices", 2024):

   * ``"learned"`` — megatron's router, trained.
   * ``"frozen"`` — initialised exactly like ``"learned"`` (``config.init_method``, i.e.
     N(0, init_method_std²) from the model's init RNG), then never updated. This is Fan et
     al.'s "frozen, randomly initialised router": comparing it with ``"learned"`` isolates the
     effect of training the router, everything else (init, seed) being equal.
   * ``"random"`` — a fixed random projection that does not depend on the model's seed, init
     std or RNG streams: rows drawn i.i.d. N(0, I) from a dedicated generator seeded with
     ``(random_seed, layer_number)`` — identical on all ranks, different per layer — and
     normalised to unit L2 norm (bias, if any, zero). Logits are projections of the hidden
     state on E fixed random directions (an LSH-like hash of the token's representation), with
     a scale O(‖x‖) instead of O(init_std·‖x‖): routing by the geometry of the hidden state,
     not by an (untrained) learned router's init.

   Non-learned routers have ``requires_grad=False`` parameters, so megatron's DDP and
   ``get_megatron_optimizer`` skip them (no grad buffer, no optimizer state). Aux/z losses are
   still computed exactly as megatron does; with a fixed router their gradient can only flow
   into the hidden states (the tokens learn to spread over the fixed projection), never into
   the router. ``expert_bias`` (loss-free balancing) is not a router weight and keeps being
   updated — that combination is a meaningful experiment (a fixed router balanced by bias).
3. **Granularity**. ``"token"`` (megatron's) or ``"sequence"``: the logits of a sequence are
   averaged over its (non-padding) tokens — the logits of the mean hidden state, since the gate
   is linear up to a shared bias — and broadcast to every token before megatron's top-k. So all
   tokens of a sequence get the same experts and probabilities, while the aux losses, z-loss,
   expert bias and capacity dropping keep working on the ordinary per-token view (the aux loss
   counts each sequence's choice once per token). Under sequence parallelism (and context
   parallelism) a rank sees only a slice of each sequence: the per-sequence logit sums and
   token counts are all-reduced over the TP×CP (CP) group, with an all-reduce whose backward is
   an all-reduce too, because every rank's tokens depend on every rank's slice.
4. **Capacity dropping** with a deterministic tie-break (see :func:`capacity_mask`): megatron
   uses ``torch.topk`` on ties, which keeps an arbitrary subset — for the ``"position"`` policy
   (topk over a 0/1 map) that is not the first tokens, and under sequence routing all tokens of
   a sequence tie on ``"probs"``. Here ties are broken by token order (earlier kept). Without
   ties (token routing, ``"probs"``, no padding) the kept set equals megatron's.

Plus :attr:`routing_stats`: top-k assignments per *logical* expert on this rank (before
capacity dropping, padding excluded) since :meth:`reset_routing_stats`, kept on device.

Shape legend: S sequence (local slice), B batch, T = S*B tokens, E experts (= slots), H hidden.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.moe.moe_utils import apply_random_logits, get_capacity, get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter

from ..config import ROUTER_TYPES, ROUTING_GRANULARITIES as GRANULARITIES

DEFAULT_RANDOM_ROUTER_SEED = 20240918  # MoDSE's arXiv date; any fixed value shared by all ranks


def capacity_mask(
    probs_TE: torch.Tensor, map_TE: torch.Tensor, capacity: int, drop_policy: str
) -> torch.Tensor:
    """Per expert, the ``capacity`` tokens to keep: highest prob first ("probs") or routed
    tokens first ("position"); ties go to the earlier token (stable sort), so the choice is
    deterministic and "position" really means first-come-first-served."""
    if drop_policy == "probs":
        key_TE = probs_TE
    elif drop_policy == "position":
        key_TE = map_TE.to(torch.int8)
    else:
        raise ValueError(f"Invalid drop_policy: {drop_policy}")
    keep_CE = torch.sort(key_TE, dim=0, descending=True, stable=True).indices[:capacity]
    return torch.zeros_like(map_TE, dtype=torch.bool).scatter(0, keep_CE, True)


def drop_tokens_over_capacity(
    probs_TE: torch.Tensor,
    map_TE: torch.Tensor,
    topk: int,
    capacity_factor: float,
    drop_policy: str,
    pad_to_capacity: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron's ``apply_router_token_dropping`` (same capacity, same padding semantics) with
    the deterministic tie-break of :func:`capacity_mask`."""
    num_tokens, num_experts = probs_TE.shape
    capacity = get_capacity(num_tokens * topk, num_experts, capacity_factor)
    if capacity > num_tokens:
        mask_TE = torch.ones_like(map_TE, dtype=torch.bool)
    else:
        mask_TE = capacity_mask(probs_TE, map_TE, capacity, drop_policy)
    final_TE = mask_TE if pad_to_capacity else map_TE & mask_TE
    return probs_TE * final_TE, final_TE


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group whose backward is a sum over the group too: each rank's partial sum
    feeds every rank's tokens, so its gradient is the sum of all ranks' gradients. (megatron's
    ``reduce_from_tensor_model_parallel_region`` has an identity backward, right only when every
    rank computes the same loss from the sum.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class MoDSERouter(TopKRouter):
    """``TopKRouter`` with placement slots, learned/frozen/random weights and token/sequence
    granularity (see the module docstring). ``functools.partial(MoDSERouter, router_type=...,
    granularity=..., slot_to_logical=...)`` is a megatron ``RouterBuilder``.

    Args:
        config: megatron TransformerConfig (``num_moe_experts`` = number of slots).
        pg_collection: process groups; None = megatron's defaults from ``parallel_state``.
        router_type: "learned" | "frozen" | "random".
        granularity: "token" | "sequence".
        slot_to_logical: logical expert held by each physical slot; None = identity.
        random_seed: base seed of the "random" router's projection (combined with the layer).
    """

    def __init__(
        self,
        config,
        pg_collection=None,
        *,
        router_type: str = "learned",
        granularity: str = "token",
        slot_to_logical: Optional[Sequence[int]] = None,
        random_seed: int = DEFAULT_RANDOM_ROUTER_SEED,
    ) -> None:
        num_experts = config.num_moe_experts
        if router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {router_type!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        slots = list(range(num_experts)) if slot_to_logical is None else [int(e) for e in slot_to_logical]
        if sorted(slots) != list(range(num_experts)):
            raise ValueError(f"slot_to_logical must be a permutation of range({num_experts}), got {slots}")
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        # Plain attributes read by reset_parameters(), which Router.__init__ calls.
        self.router_type = router_type
        self.granularity = granularity
        self.random_seed = int(random_seed)
        self._slots = slots
        self._is_identity = slots == list(range(num_experts))
        self._logit_bias: Optional[torch.Tensor] = None
        super().__init__(config=config, pg_collection=pg_collection)
        device = self.weight.device
        self.register_buffer("slot_to_logical", torch.tensor(slots, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("_routed_per_slot", torch.zeros(num_experts, dtype=torch.long, device=device), persistent=False)

    # ------------------------------------------------------------------ weights
    def reset_parameters(self):
        """megatron's init of the logical matrix, then (random router) the fixed projection,
        then rows permuted into slot order, then frozen unless learned. megatron's init runs for
        every router type so all of them consume the model's init RNG identically: a random-
        or frozen-router model gets the very same non-router weights as its learned twin."""
        super().reset_parameters()
        if self.router_type == "random":
            self._draw_random_projection()
        self._logical_rows_to_slots()
        if self.router_type != "learned":
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)

    def _logical_rows_to_slots(self) -> None:
        """weight/bias hold logical rows; reorder them so that row s is slot s's expert."""
        if self._is_identity:
            return
        with torch.no_grad():
            self.weight.data = self.weight.data[self._slots].contiguous()
            if self.bias is not None:
                self.bias.data = self.bias.data[self._slots].contiguous()

    def _draw_random_projection(self) -> None:
        """Unit-norm Gaussian rows in LOGICAL order from a generator private to this router."""
        layer = self.layer_number or 0
        gen = torch.Generator(device="cpu").manual_seed(self.random_seed * 1_000_003 + layer)
        rows_EH = torch.randn(self.weight.shape, generator=gen, dtype=torch.float32)
        rows_EH = rows_EH / rows_EH.norm(dim=1, keepdim=True)
        self.weight.data = rows_EH.to(device=self.weight.device, dtype=self.weight.dtype)
        if self.bias is not None:
            self.bias.data.zero_()

    def set_logit_bias(self, bias: Optional[Sequence[float]]) -> None:
        """Testing aid (``--debug-router-logit-bias``): a constant added to every token's logit of
        each logical expert (given in logical order), to skew routing on purpose; None = off."""
        self._logit_bias = None if bias is None else torch.tensor(
            [float(bias[e]) for e in self._slots], dtype=torch.float32, device=self.weight.device)

    def set_layer_number(self, layer_number: int):
        """The random projection differs per layer, so it is redrawn once the layer is known
        (from its private generator only: the model's RNG is not touched)."""
        super().set_layer_number(layer_number)
        if self.router_type == "random":
            self._draw_random_projection()
            self._logical_rows_to_slots()

    # ------------------------------------------------------------------ routing
    def _sequence_pooling_group(self) -> Optional[dist.ProcessGroup]:
        """The ranks that each hold a slice of the same sequences (SP splits over TP, CP over
        CP), or None when this rank sees whole sequences."""
        group = self.tp_cp_group if self.config.sequence_parallel else self.cp_group
        return group if group is not None and group.size() > 1 else None

    def sequence_logits(self, logits_SBE: torch.Tensor, padding_mask_SB: Optional[torch.Tensor]):
        """Mean logits of each sequence's non-padding tokens, broadcast back to every token.

        ``padding_mask`` follows megatron's router code: True marks a padding token."""
        num_slices, batch, num_experts = logits_SBE.shape
        logits_SBE = logits_SBE.float()
        if padding_mask_SB is None:
            valid_SB1 = torch.ones(num_slices, batch, 1, dtype=torch.float32, device=logits_SBE.device)
        else:
            valid_SB1 = (~padding_mask_SB.bool()).unsqueeze(-1).float()
        sum_BE = (logits_SBE * valid_SB1).sum(dim=0)
        count_B1 = valid_SB1.sum(dim=0)
        group = self._sequence_pooling_group()
        if group is not None:
            sum_BE = _AllReduceSum.apply(sum_BE, group)
            count_B1 = count_B1.clone()
            dist.all_reduce(count_B1, group=group)
        pooled_BE = sum_BE / count_B1.clamp_min(1.0)
        return pooled_BE.unsqueeze(0).expand(num_slices, batch, num_experts).contiguous()

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``TopKRouter.forward`` with sequence pooling between gating and routing.

        Pooling comes after ``moe_router_force_load_balancing``'s random logits so that
        benchmark mode also routes whole sequences."""
        self._maintain_float32_expert_bias()
        input = self.apply_input_jitter(input)
        logits = self.gating(input)
        if self._logit_bias is not None:
            logits = logits + self._logit_bias.to(logits.dtype)
        if self.config.moe_router_force_load_balancing:
            logits = apply_random_logits(logits)
        if self.granularity == "sequence":
            logits = self.sequence_logits(logits, padding_mask).to(logits.dtype)
        return self.routing(logits, padding_mask=padding_mask)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """megatron's ``TopKRouter.routing`` (z-loss, top-k or sinkhorn, aux losses, expert bias)
        with two changes: the top-k choice is counted for :attr:`routing_stats` before capacity
        dropping, and capacity dropping is :func:`drop_tokens_over_capacity` (deterministic ties).

        For that, megatron's own dropping is switched off for the call (its capacity factor reads
        None meanwhile; restored at once, one thread) and its expert-bias update, which must see
        the final map, waits until ours has dropped. Dropping after the aux loss is attached
        instead of before changes nothing: that loss is computed from the logits, and the
        masking multiplies the same probs in either order."""
        config = self.config
        capacity_factor = config.moe_expert_capacity_factor
        config.moe_expert_capacity_factor = None
        try:
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        finally:
            config.moe_expert_capacity_factor = capacity_factor
        padding_mask_T = None if padding_mask is None else padding_mask.reshape(-1)
        self._count_routed_tokens(routing_map, padding_mask_T)
        if capacity_factor is not None:
            probs, routing_map = drop_tokens_over_capacity(
                probs,
                routing_map,
                topk=self.topk,
                capacity_factor=capacity_factor,
                drop_policy=config.moe_token_drop_policy,
                pad_to_capacity=config.moe_pad_expert_input_to_capacity,
            )
        TopKRouter._apply_expert_bias(self, routing_map, padding_mask=padding_mask_T)
        return probs, routing_map

    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Nothing where megatron's routing calls it (its only caller, router.py:629): :meth:`routing`
        applies ``TopKRouter._apply_expert_bias`` itself, after capacity dropping."""

    # ------------------------------------------------------------------ statistics
    def _count_routed_tokens(self, map_TE: torch.Tensor, padding_mask_T: Optional[torch.Tensor]) -> None:
        """Accumulate top-k assignments per slot on device (no host sync). Skipped while
        autograd's backward is running: that is activation recomputation re-running the forward
        (megatron's checkpoint runs the first forward under no_grad, which *is* counted, so
        evaluation passes count too)."""
        if torch._C._current_graph_task_id() != -1:
            return
        with torch.no_grad():
            if padding_mask_T is not None:
                map_TE = map_TE & ~padding_mask_T.bool().unsqueeze(-1)
            self._routed_per_slot += map_TE.sum(dim=0)

    @property
    def routing_stats(self) -> torch.Tensor:
        """[num_experts] int64: top-k assignments to each LOGICAL expert made by this rank's
        router since the last :meth:`reset_routing_stats` (before capacity dropping, padding
        tokens excluded; with TP but no sequence parallelism every TP rank counts the same
        tokens). A device tensor: reading it does not synchronise until you ``.item()`` it."""
        logical_E = torch.zeros_like(self._routed_per_slot)
        return logical_E.index_copy(0, self.slot_to_logical, self._routed_per_slot)

    def reset_routing_stats(self) -> None:
        """Start a new counting window (e.g. at each logging interval)."""
        self._routed_per_slot.zero_()

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """megatron's sharded state dict with per-expert tensors stored in LOGICAL order, so a
        checkpoint loads under any placement (and into a plain ``TopKRouter`` with the logical
        rows). Works for optimizer states too: the factory is applied to whatever tensor the
        optimizer substitutes for the parameter."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self._is_identity:
            return state
        for name in ("weight", "bias", "expert_bias"):
            key = f"{prefix}{name}"
            if isinstance(state.get(key), ShardedTensor):
                state[key] = self._logical_order_factory(state[key])
        return state

    def _logical_order_factory(self, sh_ten: ShardedTensor) -> ShardedTensorFactory:
        slots = torch.tensor(self._slots, dtype=torch.long)
        logical_to_slot = torch.empty_like(slots).scatter_(0, slots, torch.arange(len(slots)))

        def build(key, data, replica_id, flattened_range):
            assert flattened_range is None, "router tensors are never flattened (not TP/DP sharded)"
            logical = data.detach()[logical_to_slot.to(data.device)]
            # dtype follows the data: optimizer states (fp32) replace bf16 parameters here.
            return dataclasses.replace(sh_ten, key=key, data=logical, dtype=logical.dtype, replica_id=replica_id)

        def merge(loaded):
            return loaded[slots.to(loaded.device)]

        return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)
