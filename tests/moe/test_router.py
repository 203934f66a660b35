"""MoDSERouter inside megatron's own MoELayer (local spec, SequentialMLP): in this process on one
rank (``one_rank``, the fast tier) and on real gloo ranks (``dist2``, the slow tier), running the
same task functions.

Oracles: megatron's ``TopKRouter`` (same weights → same routing, bit for bit), the identity slot
order (a permuted placement must not change what the layer computes), and small loops written
here from the definitions (capacity policies, sequence pooling, aux loss, routing counts).
"""
import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

from modse_megatron.testing.megatron_utils import assert_close_rel, tiny_transformer_config
from modse_megatron.testing.seeded import seeded_randn

E, H, FFN = 4, 32, 16
RTOL = 1e-5
PERM = [2, 0, 3, 1]  # slot -> logical expert


def _config(**overrides):
    kwargs = dict(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=4,
        num_moe_experts=E,
        moe_ffn_hidden_size=FFN,
        moe_router_topk=2,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        add_bias_linear=False,
    )
    kwargs.update(overrides)
    return tiny_transformer_config(**kwargs)


def _router(config, **kw):
    from modse_megatron.moe.router import MoDSERouter

    return MoDSERouter(config=config, pg_collection=None, **kw)


def _moe_layer(config, router_builder):
    """megatron's local MoE spec (SequentialMLP experts) with the router swapped."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    spec = get_gpt_layer_local_spec(num_experts=E).submodules.mlp
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, router=router_builder))
    return build_module(spec, config=config)


# A deterministic tensor per name, identical on every rank and layout.
_seeded = functools.partial(seeded_randn, scale=0.1)


def _fresh_aux_loss_tracker():
    """megatron's aux-loss tracker is a process-global dict sized by the first model's
    num_layers; the pool's teardown only zeroes it, so a task with more layers must empty it."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()


def _tokens(seq, batch, seed):
    return _seeded(f"x{seed}", (seq, batch, H), scale=1.0).requires_grad_(True)


# ---------------------------------------------------------------- TopKRouter equivalence table
CASES = {
    "top1": dict(moe_router_topk=1, moe_router_pre_softmax=True),
    "top2_aux": dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2),
    "top2_seq_aux": dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2),
    "top2_global_aux": dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=1e-2),
    "expert_bias_sigmoid": dict(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid"),
    "z_loss": dict(moe_z_loss_coeff=1e-3),
    "capacity_probs": dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
    # expert bias counts the map after capacity dropping (MoDSERouter defers it past its own dropping)
    "capacity_expert_bias_aux": dict(moe_expert_capacity_factor=0.75, moe_router_enable_expert_bias=True,
                                     moe_router_score_function="sigmoid", moe_router_load_balancing_type="aux_loss",
                                     moe_aux_loss_coeff=1e-2),
    "capacity_pad": dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True),
    "top1_capacity_allgather": dict(
        moe_router_topk=1, moe_router_pre_softmax=True, moe_expert_capacity_factor=0.5, moe_token_dispatcher_type="allgather"
    ),
    "sigmoid_scaled_allgather": dict(
        moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.0, moe_token_dispatcher_type="allgather"
    ),
    "group_limited": dict(moe_router_num_groups=2, moe_router_group_topk=1),
    "pre_softmax": dict(moe_router_pre_softmax=True),
    "sinkhorn_top1": dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_router_load_balancing_type="sinkhorn"),
}


def _same_as_topk_router(case):
    from megatron.core.transformer.moe.router import TopKRouter

    from modse_megatron.moe.router import MoDSERouter

    config = _config(**CASES[case])
    layers = {}
    for name, builder in (("megatron", TopKRouter), ("modse", MoDSERouter)):
        torch.manual_seed(11)  # same init stream: the identity MoDSERouter draws TopKRouter's weights
        layers[name] = _moe_layer(config, builder)
        layers[name].router.set_layer_number(1)
    ref, new = layers["megatron"], layers["modse"]
    for (k, a), b in zip(ref.state_dict().items(), new.state_dict().values()):
        assert not torch.is_tensor(a) or torch.equal(a, b), f"init differs: {k}"
    results = {}
    x = _tokens(12, 2, seed=dist.get_rank())
    for name, layer in layers.items():
        xi = x.detach().clone().requires_grad_(True)
        probs, routing_map = layer.router(xi.detach())
        out, _ = layer(xi)
        out.square().sum().backward()
        results[name] = dict(
            probs=probs.detach(), map=routing_map, out=out.detach(), x_grad=xi.grad,
            router_grad=layer.router.weight.grad,
            tokens=getattr(layer.router, "local_tokens_per_expert", None),
        )
    return results


def _assert_same_as_topk_router(r, case):
    a, b = r["megatron"], r["modse"]
    assert torch.equal(a["probs"], b["probs"])
    if CASES[case].get("moe_pad_expert_input_to_capacity", False):
        # zero-probability padding slots: megatron's topk picks arbitrary ties
        assert torch.equal(a["map"] & (a["probs"] > 0), b["map"] & (b["probs"] > 0))
        assert torch.equal(a["map"].sum(0), b["map"].sum(0))
    else:
        assert torch.equal(a["map"], b["map"])
    for key in ("out", "x_grad", "router_grad"):
        assert torch.equal(a[key], b[key]), key
    if a["tokens"] is not None:
        assert torch.equal(a["tokens"], b["tokens"]) and a["tokens"].sum() > 0


@pytest.mark.parametrize("case", list(CASES))
def test_identity_learned_token_router_is_topk_router_one_rank(one_rank, case):
    _assert_same_as_topk_router(_same_as_topk_router(case), case)


@pytest.mark.parametrize("case", list(CASES))
def test_identity_learned_token_router_is_topk_router(dist2, case):
    for r in dist2.run(_same_as_topk_router, case, ep=2):
        _assert_same_as_topk_router(r, case)


# ---------------------------------------------------------------- permuted slots = same layer
def _load_logical(layer, slot_to_logical):
    """Router rows and expert weights by LOGICAL id, placed in this rank's slots."""
    from megatron.core import parallel_state as ps

    local = E // ps.get_expert_model_parallel_world_size()
    first = ps.get_expert_model_parallel_rank() * local
    with torch.no_grad():
        layer.router.weight.copy_(_seeded("router", (E, H), scale=0.3)[slot_to_logical])
        for i, expert in enumerate(layer.experts.local_experts):
            for pname, p in expert.named_parameters():
                p.copy_(_seeded(f"expert{slot_to_logical[first + i]}.{pname}", p.shape))
    return first, local


def _permuted_layer_run(dispatcher, slot_to_logical, granularity="token"):
    from modse_megatron.moe.router import MoDSERouter

    config = _config(
        moe_token_dispatcher_type=dispatcher, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3,
    )
    builder = functools.partial(MoDSERouter, slot_to_logical=slot_to_logical, granularity=granularity)
    layer = _moe_layer(config, builder)
    first, local = _load_logical(layer, slot_to_logical)
    x = _tokens(16, 2, seed=dist.get_rank())
    out, _ = layer(x)
    out.square().sum().backward()
    inverse = torch.argsort(torch.tensor(slot_to_logical))
    experts = {}
    for i, expert in enumerate(layer.experts.local_experts):
        for pname, p in expert.named_parameters():
            experts[f"{slot_to_logical[first + i]}.{pname}"] = p.grad.clone()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, experts)
    return {
        "out": out.detach(), "x_grad": x.grad, "router_grad_logical": layer.router.weight.grad[inverse],
        "experts": {k: v for part in gathered for k, v in part.items()},
        "stats": layer.router.routing_stats,
    }


def _assert_permutation_invariant(ident, perm):
    for rank, (a, b) in enumerate(zip(ident, perm)):
        assert_close_rel(b["out"], a["out"], RTOL, f"rank {rank} output")
        assert_close_rel(b["x_grad"], a["x_grad"], RTOL, f"rank {rank} input grad")
        assert_close_rel(b["router_grad_logical"], a["router_grad_logical"], RTOL, "router grad")
        assert a["experts"].keys() == b["experts"].keys() and len(a["experts"]) == 2 * E
        for k, g in a["experts"].items():
            assert_close_rel(b["experts"][k], g, RTOL, f"expert grad {k}")
        assert torch.equal(a["stats"], b["stats"]) and int(a["stats"].sum()) == 16 * 2 * 2
        assert len(set(a["stats"].tolist())) > 1  # uneven routing: a wrong slot order would show


@pytest.mark.parametrize("dispatcher, granularity", [("alltoall", "token"), ("allgather", "token"),
                                                     ("alltoall", "sequence")])
def test_permuted_slots_compute_the_same_layer_one_rank(one_rank, dispatcher, granularity):
    ident = _permuted_layer_run(dispatcher, list(range(E)), granularity)
    perm = _permuted_layer_run(dispatcher, PERM, granularity)
    _assert_permutation_invariant([ident], [perm])


@pytest.mark.parametrize(
    "ep, dispatcher, granularity",
    [(1, "alltoall", "token"), (2, "alltoall", "token"), (1, "allgather", "token"), (2, "allgather", "token"),
     (2, "alltoall", "sequence")],
)
def test_permuted_slots_compute_the_same_layer(dist2, ep, dispatcher, granularity):
    ident = dist2.run(_permuted_layer_run, dispatcher, list(range(E)), granularity, ep=ep)
    perm = dist2.run(_permuted_layer_run, dispatcher, PERM, granularity, ep=ep)
    _assert_permutation_invariant(ident, perm)


# ---------------------------------------------------------------- capacity dropping policies
def _expected_kept(probs, routing_map, capacity, policy):
    """Per expert: routed tokens ranked by (-prob, index) or by index; the first `capacity`."""
    kept = torch.zeros_like(routing_map)
    for e in range(routing_map.shape[1]):
        routed = [t for t in range(routing_map.shape[0]) if routing_map[t, e]]
        if policy == "probs":
            routed.sort(key=lambda t: (-float(probs[t, e]), t))
        for t in routed[:capacity]:
            kept[t, e] = True
    return kept


def _capacity_run(policy, granularity, factor):
    import math

    free = _router(_config(), granularity=granularity, slot_to_logical=PERM)
    capped = _router(
        _config(moe_expert_capacity_factor=factor, moe_token_drop_policy=policy),
        granularity=granularity, slot_to_logical=PERM,
    )
    capped.load_state_dict(free.state_dict())
    x = _tokens(10, 4, seed=5)  # T=40 tokens, top-2
    probs, routing_map = free(x)
    capped_probs, capped_map = capped(x)
    capacity = math.ceil(40 * 2 / E * factor)
    return dict(probs=probs.detach(), map=routing_map, capped_probs=capped_probs.detach(), capped_map=capped_map,
                capacity=capacity, stats=capped.routing_stats, free_stats=free.routing_stats)


# A router alone routes the tokens it is given: these checks need no second rank (the pool
# versions only ever looked at rank 0's result).
@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops_exactly_what_the_policy_says(one_rank, policy, granularity):
    r = _capacity_run(policy, granularity, 0.75)
    expected = _expected_kept(r["probs"], r["map"], r["capacity"], policy)
    assert int(r["map"].sum()) > int(expected.sum()), "nothing was dropped: the test would be vacuous"
    assert torch.equal(r["capped_map"], expected)
    assert torch.equal(r["capped_probs"], r["probs"] * expected)
    assert torch.equal(r["stats"], r["free_stats"])  # counted before dropping
    if granularity == "sequence":  # the kept choices are still the sequence's choice
        seq_choice = r["map"].view(10, 4, E)[0]
        assert torch.equal(r["map"].view(10, 4, E), seq_choice.expand(10, 4, E))
        assert not (r["capped_map"].view(10, 4, E) & ~seq_choice).any()


# ---------------------------------------------------------------- sequence-level routing
def _expected_sequence_routing(x, weight, valid_SB, topk):
    """From the definition: mean logits over a sequence's valid tokens, top-k, softmax over the
    chosen logits (megatron's default score function), the same for all its tokens."""
    logits_SBE = x.detach().float() @ weight.detach().float().t()
    pooled_BE = (logits_SBE * valid_SB.unsqueeze(-1)).sum(0) / valid_SB.sum(0).unsqueeze(-1)
    top_vals, top_idx = pooled_BE.topk(topk, dim=1)
    probs_BE = torch.zeros_like(pooled_BE).scatter(1, top_idx, top_vals.softmax(-1))
    return pooled_BE, probs_BE, probs_BE > 0


def _sequence_run():
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    _fresh_aux_loss_tracker()
    seq, batch = 8, 3
    config = _config(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2)
    router = _router(config, granularity="sequence", slot_to_logical=PERM)
    router.set_layer_number(1)
    x = _tokens(seq, batch, seed=3)
    padding = torch.zeros(seq, batch, dtype=torch.bool)
    padding[5:, 1] = True  # megatron's router convention: True = padding token
    probs, routing_map = router(x, padding)
    _, exp_probs, exp_map = _expected_sequence_routing(x, router.weight, (~padding).float(), 2)
    out = dict(probs=probs.detach().view(seq, batch, E), map=routing_map.view(seq, batch, E),
               exp_probs=exp_probs, exp_map=exp_map, stats=router.routing_stats)

    # Aux loss on the broadcast per-token map (no padding): E/(k T^2) Σ_e (Σ_t score_te) count_e.
    _fresh_aux_loss_tracker()
    router.reset_routing_stats()
    probs, routing_map = router(x)
    ones = torch.ones(seq, batch)
    pooled, _, exp_map = _expected_sequence_routing(x, router.weight, ones, 2)
    scores_TE = pooled.softmax(-1).expand(seq, batch, E).reshape(-1, E)
    count_E = exp_map.expand(seq, batch, E).reshape(-1, E).sum(0).float()
    tokens = seq * batch
    out["aux"] = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0].clone()
    out["exp_aux"] = (scores_TE.sum(0) * count_E).sum() * E / (2 * tokens * tokens)
    (probs * torch.arange(1.0, E + 1)).sum().backward()
    out["grads"] = (router.weight.grad.abs().sum(), x.grad.abs().sum())
    return out


def test_sequence_routing_shares_experts_across_the_sequence(one_rank):
    r = _sequence_run()
    for s in range(r["map"].shape[0]):  # every token, padding included, carries its sequence's choice
        assert torch.equal(r["map"][s], r["exp_map"])
        assert_close_rel(r["probs"][s], r["exp_probs"], 1e-6, f"probs at position {s}")
    assert r["map"].sum() == 8 * 3 * 2 and len({tuple(m.tolist()) for m in r["exp_map"]}) > 1
    valid = torch.tensor([8, 5, 8]).view(3, 1)  # padding excluded from the counts
    assert torch.equal(r["stats"][PERM], (r["exp_map"].long() * valid).sum(0))
    assert_close_rel(r["aux"], r["exp_aux"], 1e-6, "aux loss of the broadcast map")
    assert all(g > 0 for g in r["grads"])


def _sequence_parallel_run():
    """TP=2 with sequence parallelism: each rank routes half of every sequence; the result must
    be the full-sequence routing, and the gradients those of the full computation."""
    from megatron.core import parallel_state as ps

    seq, batch = 8, 2
    rank, half = ps.get_tensor_model_parallel_rank(), 4
    torch.manual_seed(0)
    sp = _router(_config(sequence_parallel=True), granularity="sequence")
    full = _router(_config(), granularity="sequence")
    full.load_state_dict(sp.state_dict())
    x = _tokens(seq, batch, seed=9)
    weight_SB1 = _seeded("loss weights", (seq, batch, E), scale=1.0)
    x_part = x.detach()[rank * half:(rank + 1) * half].clone().requires_grad_(True)
    probs, routing_map = sp(x_part)
    (probs.view(half, batch, E) * weight_SB1[rank * half:(rank + 1) * half]).sum().backward()
    ref_probs, ref_map = full(x)
    (ref_probs.view(seq, batch, E) * weight_SB1).sum().backward()
    router_grad = sp.weight.grad.clone()
    dist.all_reduce(router_grad, group=ps.get_tensor_model_parallel_group())  # as finalize_model_grads does
    sl = slice(rank * half * batch, (rank + 1) * half * batch)
    return dict(probs=probs.detach(), ref_probs=ref_probs.detach()[sl], map=routing_map, ref_map=ref_map[sl],
                x_grad=x_part.grad, ref_x_grad=x.grad[rank * half:(rank + 1) * half],
                router_grad=router_grad, ref_router_grad=full.weight.grad)


def test_sequence_routing_under_sequence_parallelism(dist2):
    for r in dist2.run(_sequence_parallel_run, tp=2):
        assert torch.equal(r["map"], r["ref_map"])
        assert_close_rel(r["probs"], r["ref_probs"], 1e-6, "probs")
        assert_close_rel(r["x_grad"], r["ref_x_grad"], RTOL, "input grad")
        assert_close_rel(r["router_grad"], r["ref_router_grad"], RTOL, "router grad")


def _sequence_parallel_layer_run(dispatcher, sequence_parallel):
    """megatron's MoELayer with sequence routing: TP=2 + SP (each rank half of each sequence)
    or TP=1 on the whole sequence."""
    from megatron.core import parallel_state as ps

    from modse_megatron.moe.router import MoDSERouter

    config = _config(moe_token_dispatcher_type=dispatcher, sequence_parallel=sequence_parallel)
    layer = _moe_layer(config, functools.partial(MoDSERouter, granularity="sequence", slot_to_logical=PERM))
    _load_logical(layer, PERM)
    x = _tokens(8, 2, seed=4)
    if sequence_parallel:
        rank = ps.get_tensor_model_parallel_rank()
        x = x.detach()[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    out, _ = layer(x)
    out.square().sum().backward()
    return dict(out=out.detach(), x_grad=x.grad)


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_sequence_routed_layer_under_sequence_parallelism(dist2, dispatcher):
    sp = dist2.run(_sequence_parallel_layer_run, dispatcher, True, tp=2, etp=1)
    full = dist2.run(_sequence_parallel_layer_run, dispatcher, False)[0]
    for rank, r in enumerate(sp):
        part = slice(rank * 4, (rank + 1) * 4)
        assert_close_rel(r["out"], full["out"][part], RTOL, f"rank {rank} output")
        assert_close_rel(r["x_grad"], full["x_grad"][part], RTOL, f"rank {rank} input grad")


# ---------------------------------------------------------------- routing statistics
def _stats_run():
    from megatron.core import tensor_parallel

    router = _router(_config(moe_expert_capacity_factor=0.5), slot_to_logical=PERM)
    x = _tokens(6, 2, seed=1)
    _, routing_map = router(x)
    expected = torch.zeros(E, dtype=torch.long)
    plain = _router(_config(), slot_to_logical=PERM)
    plain.load_state_dict(router.state_dict())
    _, free_map = plain(x)
    expected[PERM] = free_map.sum(0)  # slot s counts for logical PERM[s]
    once = router.routing_stats.clone()
    router.reset_routing_stats()
    zero = router.routing_stats.clone()
    # Activation recomputation re-runs the forward inside backward: counted once, not twice.
    out = tensor_parallel.checkpoint(lambda t: router(t)[0], False, x)
    out.sum().backward()
    recomputed = router.routing_stats.clone()
    with torch.no_grad():  # evaluation counts too
        router.eval()
        router(x)
    return dict(once=once, zero=zero, recomputed=recomputed, evaluated=router.routing_stats,
                expected=expected, dropped=int(free_map.sum() - routing_map.sum()))


def test_routing_stats_count_logical_assignments_before_dropping(one_rank):
    r = _stats_run()
    assert r["dropped"] > 0 and r["once"].dtype == torch.long
    assert torch.equal(r["once"], r["expected"]) and int(r["expected"].sum()) == 6 * 2 * 2
    assert int(r["zero"].sum()) == 0
    assert torch.equal(r["recomputed"], r["expected"])
    assert torch.equal(r["evaluated"], 2 * r["expected"])


def test_debug_logit_bias_skews_logical_experts(one_rank):
    """--debug-router-logit-bias is given in logical order whatever the slot order: a large bias
    on logical experts 1 and 3 sends every token to them; None removes it."""
    router = _router(_config(), slot_to_logical=PERM)
    x = _tokens(6, 2, seed=1)
    router.set_logit_bias([0.0, 50.0, 0.0, 50.0])
    with torch.no_grad():
        router(x)
    assert router.routing_stats.tolist() == [0, 12, 0, 12]
    router.set_logit_bias(None)
    router.reset_routing_stats()
    with torch.no_grad():
        router(x)
    assert router.routing_stats.tolist() != [0, 12, 0, 12] and int(router.routing_stats.sum()) == 24


# ---------------------------------------------------------------- layout-free checkpoints
def _logical_router_state(router, slot_to_logical):
    with torch.no_grad():
        router.weight.copy_(_seeded("ckpt router", (E, H))[slot_to_logical])
        router.bias.copy_(_seeded("ckpt bias", (E,))[slot_to_logical])
        router.expert_bias.copy_(_seeded("ckpt expert bias", (E,))[slot_to_logical])


def _checkpoint_run(ckpt_dir, save_order, load_order):
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    config = _config(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid", add_bias_linear=True)
    saver = _router(config, slot_to_logical=save_order)
    _logical_router_state(saver, save_order)
    dist_checkpointing.save(saver.sharded_state_dict(prefix="router."), ckpt_dir)
    loaded = {}
    for name, router in {"permuted": _router(config, slot_to_logical=load_order),
                         "megatron": TopKRouter(config, pg_collection=get_default_pg_collection())}.items():
        state = dist_checkpointing.load(router.sharded_state_dict(prefix="router."), ckpt_dir)
        router.load_state_dict({k.removeprefix("router."): v for k, v in state.items()})
        loaded[name] = {k: v.detach().clone() for k, v in router.state_dict().items()}
    expected = _router(config, slot_to_logical=load_order)
    _logical_router_state(expected, load_order)
    logical = _router(config)
    _logical_router_state(logical, list(range(E)))
    return dict(loaded=loaded, expected=expected.state_dict(), logical=logical.state_dict())


def test_checkpoint_is_layout_free(dist2, tmp_path):
    for r in dist2.run(_checkpoint_run, str(tmp_path), PERM, [1, 3, 0, 2]):
        for key in ("weight", "bias", "expert_bias"):
            assert torch.equal(r["loaded"]["permuted"][key], r["expected"][key]), key
            assert torch.equal(r["loaded"]["megatron"][key], r["logical"][key]), key  # logical rows on disk
        assert not torch.equal(r["expected"]["weight"], r["logical"]["weight"])
