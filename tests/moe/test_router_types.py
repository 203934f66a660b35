"""Router types (learned / frozen / random, Fan, Messmer & Jaggi): weights, routing by each
type's definition, and which ones training may change. Shares the router builders of
test_router.py; ``one_rank`` runs in this process (fast tier), ``dist2`` on two gloo ranks.
"""
import dataclasses
import functools

import pytest
import torch
import torch.distributed as dist

from modse_megatron.testing.megatron_utils import assert_close_rel
from tests.moe.test_router import E, H, PERM, _config, _fresh_aux_loss_tracker, _router, _tokens


def _router_variants_run():
    from megatron.core import parallel_state as ps

    torch.manual_seed(100 + dist.get_rank())  # the random projection must not depend on this
    config = _config()
    routers = {}
    for name, kw in {"random": dict(slot_to_logical=PERM), "random_identity": {}}.items():
        routers[name] = _router(config, router_type="random", **kw)
        routers[name].set_layer_number(1)
    layer2 = _router(config, router_type="random")
    layer2.set_layer_number(2)
    seeded, rng_after = {}, {}
    for router_type in ("learned", "frozen", "random"):
        torch.manual_seed(7)
        seeded[router_type] = _router(config, router_type=router_type, slot_to_logical=PERM)
        seeded[router_type].set_layer_number(1)
        rng_after[router_type] = torch.rand(3)  # the model's init stream continues identically
    errors = []
    for bad in (dict(router_type="trained"), dict(granularity="batch"), dict(slot_to_logical=[0, 0, 1, 2])):
        try:
            _router(config, **bad)
        except ValueError as e:
            errors.append(str(e))
    logical = routers["random"].weight.detach()[torch.argsort(torch.tensor(PERM))]
    everyone = [torch.empty_like(logical) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, logical)
    x = _tokens(6, 2, seed=2).detach()
    with torch.no_grad():
        routed = {name: _logical_choice(router, x) for name, router in
                  {**routers, "layer2": layer2, **{f"seeded_{k}": r for k, r in seeded.items()}}.items()}
    return dict(
        x=x, routed=routed,
        random=logical, random_identity=routers["random_identity"].weight.detach(), layer2=layer2.weight.detach(),
        learned=seeded["learned"].weight.detach(), frozen=seeded["frozen"].weight.detach(),
        requires_grad={k: r.weight.requires_grad for k, r in {**routers, **seeded}.items()},
        seeded_random=seeded["random"].weight.detach(), rng_after=rng_after,
        everyone=everyone, errors=errors, ep=ps.get_expert_model_parallel_rank(),
    )


def _logical_choice(router, x_SBH):
    """[T, E] bool: which LOGICAL experts each token is routed to."""
    _, map_TE = router(x_SBH)
    return map_TE[:, torch.argsort(router.slot_to_logical)]


def _topk_choice(x_SBH, weight_EH, k=2):
    """From the definition: the k largest logits x·w_e (softmax keeps their order)."""
    logits_TE = x_SBH.reshape(-1, H).float() @ weight_EH.float().t()
    return torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, logits_TE.topk(k, dim=1).indices, True)


def _documented_random_projection(layer):
    """The random router's projection as its docstring defines it (logical order)."""
    from modse_megatron.moe.router import DEFAULT_RANDOM_ROUTER_SEED

    gen = torch.Generator().manual_seed(DEFAULT_RANDOM_ROUTER_SEED * 1_000_003 + layer)
    rows_EH = torch.randn((E, H), generator=gen)
    return rows_EH / rows_EH.norm(dim=1, keepdim=True)


def test_random_and_frozen_router_weights_and_routing_one_rank(one_rank):
    _assert_router_variants(_router_variants_run())


def test_random_and_frozen_router_weights(dist2):
    for r in dist2.run(_router_variants_run, ep=2):
        _assert_router_variants(r)


def _assert_router_variants(r):
    assert all(torch.equal(w, r["random"]) for w in r["everyone"])  # same on every rank
    assert torch.equal(r["random"], r["random_identity"])  # and in every slot order
    assert_close_rel(r["random"].norm(dim=1), torch.ones(E), 1e-6, "unit rows")
    assert not torch.allclose(r["random"], r["layer2"], atol=0.1)  # a projection per layer
    assert torch.equal(r["frozen"], r["learned"])  # frozen = learned init, kept
    assert torch.equal(r["seeded_random"], r["random"][PERM])  # model seed irrelevant
    assert all(torch.equal(v, r["rng_after"]["learned"]) for v in r["rng_after"].values())
    assert r["requires_grad"] == {"random": False, "random_identity": False, "learned": True, "frozen": False}
    # Bad arguments: one line naming the bad value and what is allowed.
    trained, batch, slots = r["errors"]
    assert "'trained'" in trained and all(t in trained for t in ("learned", "frozen", "random"))
    assert "'batch'" in batch and "token" in batch and "sequence" in batch
    assert "permutation of range(4)" in slots and "[0, 0, 1, 2]" in slots
    assert not any("\n" in e for e in r["errors"])
    # Routing: every token goes to the top-2 logical experts of its projection, whatever
    # the slot order; the random router's projection is the documented one.
    routed, x = r["routed"], r["x"]
    assert all(int(m.sum()) == 6 * 2 * 2 and (m.sum(1) == 2).all() for m in routed.values())
    assert torch.equal(routed["random"], _topk_choice(x, _documented_random_projection(1)))
    assert torch.equal(routed["random_identity"], routed["random"])
    assert torch.equal(routed["seeded_random"], routed["random"])  # model seed irrelevant
    assert torch.equal(routed["layer2"], _topk_choice(x, _documented_random_projection(2)))
    assert not torch.equal(routed["layer2"], routed["random"])  # another layer, other experts
    learned_logical = r["learned"][torch.argsort(torch.tensor(PERM))]
    assert torch.equal(routed["seeded_learned"], _topk_choice(x, learned_logical))
    assert torch.equal(routed["seeded_frozen"], routed["seeded_learned"])  # frozen = learned init
    assert len({tuple(row.tolist()) for row in routed["random"]}) > 1  # tokens really differ


STEPS = 3


def _train_steps(router_type):
    """A 2-layer MoE GPT (MoDSERouter in both layers) trained with megatron's DDP + distributed
    optimizer; the router must be untouched unless it is learned."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from modse_megatron.moe.router import MoDSERouter
    from modse_megatron.testing.megatron_utils import token_batch

    _fresh_aux_loss_tracker()
    config = _config(num_layers=2, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2)
    spec = get_gpt_layer_local_spec(num_experts=E)
    moe = spec.submodules.mlp
    builder = functools.partial(MoDSERouter, router_type=router_type, slot_to_logical=PERM)
    moe = dataclasses.replace(moe, submodules=dataclasses.replace(moe.submodules, router=builder))
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=moe))
    model = GPTModel(config, spec, vocab_size=64, max_sequence_length=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0), [ddp]
    )
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        tokens, positions = token_batch(2, 16, 64, seed=10 * step + dist.get_rank())
        ddp(tokens, positions, None, labels=tokens).mean().backward()
        ddp.finish_grad_sync()
        ok, _, _ = optimizer.step()
        assert ok
    return dict(
        changed={n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()},
        router_in_ddp=any(id(p) in {id(q) for q in ddp.params_with_grad} for n, p in model.named_parameters()
                          if n.endswith("router.weight")),
    )


@pytest.mark.parametrize("router_type", ["learned", "frozen", "random"])
def test_only_a_learned_router_is_trained(dist2, router_type):
    for r in dist2.run(_train_steps, router_type, ep=2):
        routers = {n: c for n, c in r["changed"].items() if "router" in n}
        others = {n: c for n, c in r["changed"].items() if "router" not in n}
        assert len(routers) == 2 and len(others) > 10
        assert all(others.values()), [n for n, c in others.items() if not c]
        learned = router_type == "learned"
        assert all(c == learned for c in routers.values()), routers  # bit-identical unless learned
        assert r["router_in_ddp"] == learned
