"""MoDSERouter on real gloo ranks, inside megatron's own MoELayer (local spec, SequentialMLP).

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


def _seeded(name: str, shape, scale: float = 0.1) -> torch.Tensor:
    """A deterministic tensor per name, identical on every rank and layout."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(name)) % (2**31)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


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


@pytest.mark.parametrize("case", list(CASES))
def test_identity_learned_token_router_is_topk_router(dist2, case):
    padded = CASES[case].get("moe_pad_expert_input_to_capacity", False)
    for r in dist2.run(_same_as_topk_router, case, ep=2):
        a, b = r["megatron"], r["modse"]
        assert torch.equal(a["probs"], b["probs"])
        if padded:  # zero-probability padding slots: megatron's topk picks arbitrary ties
            assert torch.equal(a["map"] & (a["probs"] > 0), b["map"] & (b["probs"] > 0))
            assert torch.equal(a["map"].sum(0), b["map"].sum(0))
        else:
            assert torch.equal(a["map"], b["map"])
        for key in ("out", "x_grad", "router_grad"):
            assert torch.equal(a[key], b[key]), key
        if a["tokens"] is not None:
            assert torch.equal(a["tokens"], b["tokens"]) and a["tokens"].sum() > 0


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


def _permuted_layer_run(dispatcher, slot_to_logical, **extra):
    from modse_megatron.moe.router import MoDSERouter

    config = _config(
        moe_token_dispatcher_type=dispatcher, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3, **extra,
    )
    layer = _moe_layer(config, functools.partial(MoDSERouter, slot_to_logical=slot_to_logical))
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


@pytest.mark.parametrize("ep", [1, 2])
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_permuted_slots_compute_the_same_layer(dist2, ep, dispatcher):
    ident = dist2.run(_permuted_layer_run, dispatcher, list(range(E)), ep=ep)
    perm = dist2.run(_permuted_layer_run, dispatcher, PERM, ep=ep)
    for rank, (a, b) in enumerate(zip(ident, perm)):
        assert_close_rel(b["out"], a["out"], RTOL, f"rank {rank} output")
        assert_close_rel(b["x_grad"], a["x_grad"], RTOL, f"rank {rank} input grad")
        assert_close_rel(b["router_grad_logical"], a["router_grad_logical"], RTOL, "router grad")
        assert a["experts"].keys() == b["experts"].keys() and len(a["experts"]) == 2 * E
        for k, g in a["experts"].items():
            assert_close_rel(b["experts"][k], g, RTOL, f"expert grad {k}")
        assert torch.equal(a["stats"], b["stats"]) and int(a["stats"].sum()) == 16 * 2 * 2


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


@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops_exactly_what_the_policy_says(dist2, policy, granularity):
    r = dist2.run(_capacity_run, policy, granularity, 0.75)[0]
    expected = _expected_kept(r["probs"], r["map"], r["capacity"], policy)
    assert int(r["map"].sum()) > int(expected.sum()), "nothing was dropped: the test would be vacuous"
    assert torch.equal(r["capped_map"], expected)
    assert torch.equal(r["capped_probs"], r["probs"] * expected)
    assert torch.equal(r["stats"], r["free_stats"])  # counted before dropping
    if granularity == "sequence":  # the kept choices are still the sequence's choice
        seq_choice = r["map"].view(10, 4, E)[0]
        assert torch.equal(r["map"].view(10, 4, E), seq_choice.expand(10, 4, E))
        assert not (r["capped_map"].view(10, 4, E) & ~seq_choice).any()
