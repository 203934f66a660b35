"""megatron-core itself, unchanged, on CPU/gloo through the platform layer (real 2-rank runs)."""
import functools

import pytest
import torch
import torch.distributed as dist

from modse_megatron.testing.megatron_utils import (
    assert_close_rel,
    gathered_named,
    tiny_gpt,
    tiny_transformer_config,
    token_batch,
)
from modse_megatron.testing.seeded import seeded_randn

RTOL = 1e-5
VOCAB = 128


# ---------------------------------------------------------------- GPTModel TP=2 vs TP=1
def _gpt_loss_and_grads():
    from megatron.core import parallel_state as ps

    model = tiny_gpt(tiny_transformer_config(), vocab_size=VOCAB)
    tokens, positions = token_batch(2, 16, VOCAB, seed=7)
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    out = {
        "loss": loss.detach(),
        "weights": dict(gathered_named(model)),
        "grads": dict(gathered_named(model, grads=True)),
    }
    return out if ps.get_tensor_model_parallel_rank() == 0 else None


def test_gpt_tensor_parallel_2_matches_1(dist2):
    tp2 = dist2.run(_gpt_loss_and_grads, tp=2)[0]
    tp1 = dist2.run(_gpt_loss_and_grads, tp=1)[0]
    assert tp1["weights"].keys() == tp2["weights"].keys()
    for name, w in tp1["weights"].items():  # CPU init is TP-invariant: same logical weights
        assert torch.equal(w, tp2["weights"][name]), name
    assert_close_rel(tp2["loss"], tp1["loss"], RTOL, "loss")
    assert len(tp1["grads"]) == len(tp1["weights"])
    for name, g in tp1["grads"].items():
        assert_close_rel(tp2["grads"][name], g, RTOL, f"grad {name}")


# ---------------------------------------------------------------- MoELayer EP=2 vs EP=1
NUM_EXPERTS = 4


def _moe_config(dispatcher, **extra):
    return tiny_transformer_config(
        num_layers=1,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=2,
        moe_ffn_hidden_size=48,
        moe_token_dispatcher_type=dispatcher,
        moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss",
        add_bias_linear=False,
        **extra,
    )


def _build_moe(config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS).submodules.mlp
    return build_module(spec, config=config)


# A deterministic weight per logical name, identical on every rank and layout.
_logical_weight = functools.partial(seeded_randn, scale=0.05)


def _load_logical_moe_weights(layer, ep_rank: int, local: int) -> None:
    """Megatron places experts [r*L, (r+1)*L) on EP rank r: give each its logical weights."""
    state = {}
    for key, value in layer.state_dict().items():
        if not torch.is_tensor(value):
            continue
        logical = key
        if ".local_experts." in key:
            prefix, rest = key.split(".local_experts.")
            idx, tail = rest.split(".", 1)
            logical = f"{prefix}.local_experts.{ep_rank * local + int(idx)}.{tail}"
        state[key] = _logical_weight(logical, value.shape) if value.dtype.is_floating_point else value
    layer.load_state_dict(state, strict=False)


def _moe_run(dispatcher):
    from megatron.core import parallel_state as ps

    ep_rank, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    config = _moe_config(dispatcher)
    layer = _build_moe(config)
    local = NUM_EXPERTS // ep_size
    _load_logical_moe_weights(layer, ep_rank, local)

    rank = dist.get_rank()
    x = torch.randn(16, 1, config.hidden_size, generator=torch.Generator().manual_seed(100 + rank))
    x.requires_grad_(True)
    out, _ = layer(x)
    (out.square().sum()).backward()
    expert_grads = {}
    for name, p in layer.named_parameters():
        if ".local_experts." in name:
            prefix, rest = name.split(".local_experts.")
            idx, tail = rest.split(".", 1)
            expert_grads[f"{prefix}.local_experts.{ep_rank * local + int(idx)}.{tail}"] = p.grad.clone()
    if ep_size == 1:  # every rank saw only its own tokens: the EP=2 expert grad is their sum
        for g in expert_grads.values():
            dist.all_reduce(g)
    else:
        gathered = [None] * ep_size
        dist.all_gather_object(gathered, expert_grads, group=ps.get_expert_model_parallel_group())
        expert_grads = {k: v for part in gathered for k, v in part.items()}
    router_grad = dict(layer.router.named_parameters())["weight"].grad.clone()
    return {"out": out.detach(), "x_grad": x.grad, "router_grad": router_grad, "expert_grads": expert_grads}


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_moe_layer_expert_parallel_2_matches_1(dist2, dispatcher):
    ep2 = dist2.run(_moe_run, dispatcher, ep=2)
    ep1 = dist2.run(_moe_run, dispatcher, ep=1)
    for rank in range(2):
        a, b = ep2[rank], ep1[rank]
        assert_close_rel(a["out"], b["out"], RTOL, f"rank {rank} output")
        assert_close_rel(a["x_grad"], b["x_grad"], RTOL, f"rank {rank} input grad")
        assert_close_rel(a["router_grad"], b["router_grad"], RTOL, f"rank {rank} router grad")
        assert a["expert_grads"].keys() == b["expert_grads"].keys()
        assert len(a["expert_grads"]) == NUM_EXPERTS * 2  # fc1 + fc2 per expert
        for k, g in b["expert_grads"].items():
            assert_close_rel(a["expert_grads"][k], g, RTOL, f"rank {rank} {k}")


# ---------------------------------------------------------------- DDP + distributed optimizer
LR, STEPS = 1e-2, 3


def _zero_optimizer_steps():
    """Train 3 steps with megatron DDP + the distributed (ZeRO) optimizer on 2 DP ranks, and
    replay the same steps with torch.optim.Adam on the rank-averaged gradients."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = tiny_transformer_config()
    torch.manual_seed(5)
    model = tiny_gpt(config, vocab_size=VOCAB)
    torch.manual_seed(5)
    reference = tiny_gpt(config, vocab_size=VOCAB)
    initial = [p.detach().clone() for p in reference.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))
    ref_opt = torch.optim.Adam(reference.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
        clip_grad=0.0, use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    shards = sum(p.numel() for g in optimizer.optimizer.param_groups for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    world = dist.get_world_size()
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        tokens, positions = token_batch(2, 16, VOCAB, seed=1000 * step + dist.get_rank())
        ddp(tokens, positions, None, labels=tokens).mean().backward()
        ddp.finish_grad_sync()
        ok, _, _ = optimizer.step()
        assert ok, "megatron optimizer step was skipped"
        # Reference: plain Adam on the mean of every rank's gradient.
        ref_opt.zero_grad()
        for r in range(world):
            tokens, positions = token_batch(2, 16, VOCAB, seed=1000 * step + r)
            (reference(tokens, positions, None, labels=tokens).mean() / world).backward()
        ref_opt.step()
    for (name, p), q, p0 in zip(model.named_parameters(), reference.parameters(), initial):
        # Compare the update (p − p0), not p: a 1e-5 error on the weights would hide a wrong step.
        assert_close_rel(p.detach() - p0, q.detach() - p0, RTOL, f"{name} update after {STEPS} steps")
    return {"optimizer_numel": shards, "model_numel": total}


def test_distributed_optimizer_matches_adam(dist2):
    results = dist2.run(_zero_optimizer_steps)
    for r in results:
        # ZeRO: each rank's optimizer holds only its shard of the parameters.
        assert r["optimizer_numel"] < r["model_numel"]
    assert sum(r["optimizer_numel"] for r in results) >= results[0]["model_numel"]


# ---------------------------------------------------------------- dist_checkpointing TP=2 → TP=1
def _save_gpt(ckpt_dir):
    from megatron.core import dist_checkpointing

    model = tiny_gpt(tiny_transformer_config(), vocab_size=VOCAB)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return dict(gathered_named(model))


def _load_gpt(ckpt_dir):
    from megatron.core import dist_checkpointing

    torch.manual_seed(999)  # different init: everything must come from the checkpoint
    model = tiny_gpt(tiny_transformer_config(init_method_std=0.5), vocab_size=VOCAB)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    return dict(gathered_named(model))


def test_dist_checkpointing_tp2_save_tp1_load(dist2, tmp_path):
    saved = dist2.run(_save_gpt, str(tmp_path), tp=2)[0]
    loaded = dist2.run(_load_gpt, str(tmp_path), tp=1)
    for rank_state in loaded:
        assert rank_state.keys() == saved.keys()
        for name, tensor in saved.items():
            assert torch.equal(rank_state[name], tensor), name


# ---------------------------------------------------------------- gloo all_gather of unequal sizes
def _unequal_all_gather():
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = torch.full((rank + 1, 3), float(rank + 1))  # rank 0: 1 row, rank 1: 2 rows
    # megatron's call (mappings.py:150, the alltoall dispatcher with EP x expert-TP)
    gathered = gather_from_sequence_parallel_region(
        mine, tensor_parallel_output_grad=False, group=dist.group.WORLD,
        output_split_sizes=[r + 1 for r in range(world)],
    )
    # the same gather from anyone else's code: torch's own behaviour (gloo refuses it)
    try:
        dist.all_gather([torch.empty(r + 1, 3) for r in range(world)], mine)
        user_error = None
    except RuntimeError as err:
        user_error = str(err)
    return gathered.clone(), user_error


def test_all_gather_of_unequal_sizes(dist2):
    """megatron's alltoall dispatcher with EP x expert-TP gathers unequal token counts (NCCL
    accepts them, gloo does not): its calls are emulated, a user's fail as torch's do."""
    for rank, (gathered, user_error) in enumerate(dist2.run(_unequal_all_gather)):
        assert torch.equal(gathered, torch.tensor([[1.0] * 3, [2.0] * 3, [2.0] * 3]))
        assert user_error is not None and "ProcessGroupGloo::allgather: invalid tensor size" in user_error, rank
