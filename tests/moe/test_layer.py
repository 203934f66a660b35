"""MoDSEMoELayer on real gloo ranks: the same logical weights give the same outputs and
gradients under every EP/ETP size, dispatcher and placement; uniform widths reproduce
megatron's MoELayer; capacity dropping keeps exactly the policy's tokens; checkpoints are
keyed by logical expert and reload under another EP/ETP size or placement.
"""
import functools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from modse_megatron.config import MoDSEConfig
from modse_megatron.testing.megatron_utils import assert_close_rel, tiny_transformer_config
from modse_megatron.testing.seeded import seeded_randn

RTOL = 1e-5
E, FFN, HIDDEN, SEQ, BATCH = 8, 40, 32, 8, 2
PAPER8 = [72, 8, 64, 16, 48, 32, 40, 40]


def _config(dispatcher="alltoall", **extra):
    kwargs = dict(
        num_layers=1, hidden_size=HIDDEN, num_moe_experts=E, moe_ffn_hidden_size=FFN,
        moe_router_topk=2, moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss", add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu,
    )
    kwargs.update(extra)
    return tiny_transformer_config(**kwargs)


def _build(config, modse_config):
    """MoDSEMoELayer with megatron's MoE submodules (shared expert included when configured).
    (GPT models get the same modules from the specs: tests/moe/test_specs.py.)"""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from modse_megatron.moe.layer import MoDSEMoELayer

    moe_spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts).submodules.mlp
    return MoDSEMoELayer(config, moe_spec.submodules, modse_config=modse_config)


# Deterministic weights per logical name: identical on every rank, layout and placement.
_logical_weight = functools.partial(seeded_randn, scale=0.1)


@torch.no_grad()
def _load_logical(layer):
    """Router rows by the slot order, experts by logical id (ETP-sharded), the rest by name."""
    router = _logical_weight("router", (E, HIDDEN))
    layer.router.weight.copy_(router[layer.slot_to_logical])
    gated = layer.experts.gated
    for lid in layer.local_logical_ids:
        w = layer.expert_widths[lid]
        layer.experts.load_full_expert(
            lid, _logical_weight(f"fc1.{lid}", ((2 if gated else 1) * w, HIDDEN)),
            _logical_weight(f"fc2.{lid}", (HIDDEN, w)),
        )
    for name, p in layer.named_parameters():
        if not name.startswith(("router.", "experts.")):
            p.copy_(_logical_weight(name, p.shape))


def _tokens(seed_offset=0):
    g = torch.Generator().manual_seed(100 + dist.get_rank() + seed_offset)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=g)


def _logical_expert_grads(layer):
    """Total gradient of every logical expert: gathered over ETP, summed over its replicas
    (the expert-data-parallel group), then shared with every rank."""
    from megatron.core import parallel_state as ps

    grads = layer.experts.full_expert_tensors(grads=True)
    for pair in grads.values():
        for g in pair:
            dist.all_reduce(g, group=ps.get_expert_data_parallel_group())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, grads)
    return {lid: pair for part in everyone for lid, pair in part.items()}


def _forward_backward(layer, x):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out.square().sum()).backward()
    router_grad = layer.router.weight.grad
    logical_router_grad = torch.empty_like(router_grad)
    logical_router_grad[getattr(layer, "slot_to_logical", list(range(E)))] = router_grad
    return out.detach(), x.grad, logical_router_grad


def _run_layer(dispatcher, placement, sizes="paper8", **extra):
    layer = _build(_config(dispatcher, **extra), MoDSEConfig(moe_expert_size_preset=sizes, moe_expert_placement=placement))
    _load_logical(layer)
    out, x_grad, router_grad = _forward_backward(layer, _tokens())
    return {"out": out, "x_grad": x_grad, "router_grad": router_grad,
            "experts": _logical_expert_grads(layer), "slots": layer.slot_to_logical}


def _assert_same(runs, refs):
    for rank, (a, b) in enumerate(zip(runs, refs)):
        for what in ("out", "x_grad", "router_grad"):
            assert_close_rel(a[what], b[what], RTOL, f"rank {rank} {what}")
        assert a["experts"].keys() == b["experts"].keys() == set(range(E))
        for lid, (g1, g2) in b["experts"].items():
            assert_close_rel(a["experts"][lid][0], g1, RTOL, f"rank {rank} expert {lid} fc1 grad")
            assert_close_rel(a["experts"][lid][1], g2, RTOL, f"rank {rank} expert {lid} fc2 grad")


_REFS = {}


def _reference(pool, extra=()):
    """EP=1, ETP=1 on the same number of ranks (each rank routes its own tokens)."""
    key = (pool.world_size, extra)
    if key not in _REFS:
        _REFS[key] = pool.run(_run_layer, "allgather", "contiguous", **dict(extra))
    return _REFS[key]


EXPLICIT = "1,0,1,0,0,1,1,0"  # an arbitrary valid 2-rank placement (4 experts per rank)


@pytest.mark.parametrize(
    "dispatcher, placement, layout",
    [
        ("alltoall", "contiguous", dict(ep=1)),
        ("alltoall", "contiguous", dict(ep=2)),
        ("alltoall", "pairs", dict(ep=2)),
        ("allgather", "pairs", dict(ep=2)),
        ("alltoall", EXPLICIT, dict(ep=2)),
        ("allgather", EXPLICIT, dict(ep=2)),
        ("alltoall", "auto", dict(ep=1, etp=2)),
        ("allgather", "auto", dict(ep=1, etp=2)),
    ],
)
def test_two_ranks_match_ep1(dist2, dispatcher, placement, layout):
    runs = dist2.run(_run_layer, dispatcher, placement, **layout)
    if layout["ep"] == 2 and placement != "contiguous":
        assert runs[0]["slots"] != list(range(E))  # the placement really permutes slots
    _assert_same(runs, _reference(dist2))


# gloo's all_gather needs equal sizes, but megatron's alltoall dispatcher all-gathers uneven
# per-rank token counts over expert-TP (fine on NCCL). Padding every expert to a capacity that
# equals the token count (top-2 of 16 tokens over 8 experts: factor 4) makes the counts equal
# without dropping anything or changing the math (padded slots have prob 0).
PAD_NO_DROP = (("moe_expert_capacity_factor", 4.0), ("moe_pad_expert_input_to_capacity", True))


@pytest.mark.parametrize(
    "dispatcher, placement, layout, extra",
    [
        ("alltoall", "pairs", dict(ep=4), ()),
        ("allgather", "auto", dict(ep=4), ()),
        ("alltoall", "pairs", dict(ep=2, etp=2), PAD_NO_DROP),
        ("allgather", "contiguous", dict(ep=2, etp=2), ()),
    ],
)
def test_four_ranks_match_ep1(dist4, dispatcher, placement, layout, extra):
    runs = dist4.run(_run_layer, dispatcher, placement, **layout, **dict(extra))
    _assert_same(runs, _reference(dist4, extra))


ROUTER_OPTIONS = {
    "seq_aux_loss": (("moe_router_load_balancing_type", "seq_aux_loss"),),
    "global_aux_loss+z_loss": (("moe_router_load_balancing_type", "global_aux_loss"), ("moe_z_loss_coeff", 1e-3)),
    "expert_bias+sigmoid": (("moe_router_enable_expert_bias", True), ("moe_router_score_function", "sigmoid"),
                            ("moe_router_load_balancing_type", "none"), ("moe_aux_loss_coeff", 0.0)),
    "top1+pre_softmax": (("moe_router_topk", 1), ("moe_router_pre_softmax", True)),
}


@pytest.mark.parametrize("option", sorted(ROUTER_OPTIONS))
def test_router_options_with_variable_widths(dist2, option):
    """megatron's router features (aux-loss variants, z-loss, loss-free bias, top-1) give the
    same results with a permuted placement at EP=2 as at EP=1."""
    extra = ROUTER_OPTIONS[option]
    _assert_same(dist2.run(_run_layer, "alltoall", EXPLICIT, ep=2, **dict(extra)), _reference(dist2, extra))


def _expected_choice(x_SBH, router_weight_EH, slot_to_logical, granularity):
    """[T, E] bool over LOGICAL experts, from the definition: top-2 of the logits x·w_e
    (softmax keeps their order), of each token or of its sequence's mean logits."""
    logical_EH = torch.empty_like(router_weight_EH)
    logical_EH[slot_to_logical] = router_weight_EH
    logits_SBE = x_SBH.float() @ logical_EH.float().t()
    if granularity == "sequence":
        logits_SBE = logits_SBE.mean(0, keepdim=True).expand_as(logits_SBE)
    logits_TE = logits_SBE.reshape(-1, E)
    return torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, logits_TE.topk(2, dim=1).indices, True)


def _router_variant(router_type, granularity):
    layer = _build(_config(), MoDSEConfig(moe_expert_size_preset="paper8", moe_router_type=router_type,
                                          moe_routing_granularity=granularity))
    x = _tokens()
    expected = _expected_choice(x, layer.router.weight.detach(), layer.slot_to_logical, granularity)
    before = layer.router.weight.detach().clone()
    out, _ = layer(x)
    out.sum().backward()
    with torch.no_grad():  # what the router chose inside the layer (same input, same weights)
        _, map_TE = layer.router(x)
    slot_of_logical = torch.argsort(torch.tensor(layer.slot_to_logical))
    return dict(
        kind=(layer.router.router_type, layer.router.granularity, layer.router.weight.requires_grad),
        routed=map_TE[:, slot_of_logical], expected=expected, stats=layer.routing_stats.clone(),
        router_grad=layer.router.weight.grad, unchanged=torch.equal(layer.router.weight.detach(), before),
        finite=bool(torch.isfinite(out).all()),
    )


def _assert_router_variant(r, router_type, granularity):
    assert r["kind"] == (router_type, granularity, router_type == "learned")
    assert torch.equal(r["routed"], r["expected"])  # each token went to the experts the definition picks
    if granularity == "sequence":  # all tokens of a sequence share their experts
        per_seq = r["routed"].view(SEQ, BATCH, E)
        assert torch.equal(per_seq, per_seq[:1].expand_as(per_seq))
    # The layer's statistics count exactly those choices (per logical expert), twice: the
    # layer's forward and the check's.
    assert torch.equal(r["stats"], 2 * r["routed"].sum(0))
    assert int(r["stats"].sum()) == 2 * SEQ * BATCH * 2
    assert (r["router_grad"] is not None) == (router_type == "learned") and r["unchanged"] and r["finite"]


VARIANTS = [("frozen", "token"), ("random", "sequence"), ("learned", "sequence"), ("random", "token")]


@pytest.mark.parametrize("router_type, granularity", VARIANTS)
def test_router_variants_route_by_their_definition_one_rank(one_rank, router_type, granularity):
    _assert_router_variant(_router_variant(router_type, granularity), router_type, granularity)


@pytest.mark.parametrize("router_type, granularity", VARIANTS[:3])
def test_router_variants_reach_the_router(dist2, router_type, granularity):
    for r in dist2.run(_router_variant, router_type, granularity, ep=2):
        _assert_router_variant(r, router_type, granularity)


def test_shared_expert_with_modse_experts(dist2):
    """A shared (generalist) expert adds to the MoDSE experts the same way under EP=2."""
    extra = (("moe_shared_expert_intermediate_size", 24),)
    ep2 = dist2.run(_run_layer, "alltoall", "pairs", ep=2, **dict(extra))
    ref = _reference(dist2, extra)
    _assert_same(ep2, ref)
    assert not torch.allclose(ref[0]["out"], _reference(dist2)[0]["out"])  # it contributes


# ------------------------------------------------------------------ uniform == megatron MoELayer
def _uniform_vs_megatron(dispatcher):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    config = _config(dispatcher)
    megatron_layer = build_module(get_gpt_layer_local_spec(num_experts=E).submodules.mlp, config=config)
    ours = _build(config, MoDSEConfig(moe_expert_size_preset="uniform", moe_expert_placement="contiguous"))
    result = ours.load_state_dict(megatron_layer.state_dict(), strict=False)
    assert not result.missing_keys and all("_extra_state" in k for k in result.unexpected_keys)
    x = _tokens()
    a, b = _forward_backward(ours, x), _forward_backward(megatron_layer, x)
    for what, ta, tb in zip(("out", "x_grad", "router_grad"), a, b):
        assert_close_rel(ta, tb, RTOL, what)
    megatron_grads = dict(megatron_layer.named_parameters())
    for name, p in ours.named_parameters():
        assert_close_rel(p.grad, megatron_grads[name].grad, RTOL, name)
    return True


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_uniform_widths_match_megatron_moe_layer_one_rank(one_rank, dispatcher):
    assert _uniform_vs_megatron(dispatcher)


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_uniform_widths_match_megatron_moe_layer(dist2, dispatcher):
    assert all(dist2.run(_uniform_vs_megatron, dispatcher, ep=2))


# ------------------------------------------------------------------ capacity dropping
def _capacity_oracle(x_TD, policy, capacity_factor):
    """Independent oracle: megatron's default top-2 (softmax over the two largest logits) over
    logical experts; per expert keep the ``capacity`` routed tokens with the highest prob
    ("probs") or the earliest ("position")."""
    router = _logical_weight("router", (E, HIDDEN))
    top_logits, top_e = (x_TD @ router.t()).topk(2, dim=-1)
    top_p = torch.softmax(top_logits, dim=-1)
    num_tokens = x_TD.shape[0]
    capacity = math.ceil(num_tokens * 2 / E * capacity_factor)
    out_TD = torch.zeros_like(x_TD)
    dropped = 0
    for e in range(E):
        routed = [(t, float(top_p[t, j])) for t in range(num_tokens) for j in range(2) if top_e[t, j] == e]
        if policy == "probs":
            routed.sort(key=lambda tp: -tp[1])  # stable: ties keep token order
        kept = routed[:capacity]
        dropped += len(routed) - len(kept)
        w1, w2 = _logical_weight(f"fc1.{e}", (2 * PAPER8[e], HIDDEN)), _logical_weight(f"fc2.{e}", (HIDDEN, PAPER8[e]))
        for t, p in kept:
            gate, up = (x_TD[t] @ w1.t()).chunk(2)
            out_TD[t] += p * ((F.silu(gate) * up) @ w2.t())
    return out_TD, dropped


def _capacity_run(dispatcher, policy, capacity_factor):
    layer = _build(
        _config(dispatcher, moe_expert_capacity_factor=capacity_factor, moe_token_drop_policy=policy),
        MoDSEConfig(moe_expert_size_preset="paper8", moe_expert_placement="pairs"),
    )
    _load_logical(layer)
    x = _tokens(seed_offset=7)
    with torch.no_grad():
        out, _ = layer(x)
    expected, dropped = _capacity_oracle(x.reshape(-1, HIDDEN), policy, capacity_factor)
    assert dropped > 0, "the case must drop tokens to test anything"
    assert_close_rel(out.reshape(-1, HIDDEN), expected, RTOL, f"{policy} capacity output")
    return dropped


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_capacity_dropping_drops_exactly_the_policy_tokens_one_rank(one_rank, policy, dispatcher):
    assert _capacity_run(dispatcher, policy, 0.5) > 0


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("dispatcher, ep", [("alltoall", 2), ("allgather", 2), ("alltoall", 1)])
def test_capacity_dropping_drops_exactly_the_policy_tokens(dist2, policy, dispatcher, ep):
    assert all(d > 0 for d in dist2.run(_capacity_run, dispatcher, policy, 0.5, ep=ep))


# ------------------------------------------------------------------ checkpoints
def _save(ckpt_dir):
    from megatron.core import dist_checkpointing

    layer = _build(_config(), MoDSEConfig(moe_expert_size_preset="paper8", moe_expert_placement="pairs"))
    _load_logical(layer)
    state = layer.sharded_state_dict(prefix="mlp.")
    dist_checkpointing.save(state, ckpt_dir)
    keys = set()
    for value in state.values():
        built = value.build() if hasattr(value, "build_fn") else value
        keys |= {sh.key for sh in (built if isinstance(built, list) else [built])}
    return sorted(keys)


def _load(ckpt_dir, placement):
    from megatron.core import dist_checkpointing

    torch.manual_seed(999)  # a different init: everything must come from the checkpoint
    layer = _build(_config(), MoDSEConfig(moe_expert_size_preset="paper8", moe_expert_placement=placement))
    loaded = dist_checkpointing.load(layer.sharded_state_dict(prefix="mlp."), ckpt_dir)
    layer.load_state_dict({k.removeprefix("mlp."): v for k, v in loaded.items()})
    router = torch.empty_like(layer.router.weight)
    router[layer.slot_to_logical] = layer.router.weight.detach()
    experts = layer.experts.full_expert_tensors()
    assert torch.equal(router, _logical_weight("router", (E, HIDDEN)))
    for lid, (w1, w2) in experts.items():
        assert torch.equal(w1, _logical_weight(f"fc1.{lid}", w1.shape)), f"expert {lid} fc1"
        assert torch.equal(w2, _logical_weight(f"fc2.{lid}", w2.shape)), f"expert {lid} fc2"
    return sorted(experts)


def test_checkpoint_one_key_per_logical_expert_and_reshards(dist2, dist4, tmp_path):
    keys = dist2.run(_save, str(tmp_path), ep=2)
    expert_keys = {f"mlp.experts.expert{i}.{n}.weight" for i in range(E) for n in ("linear_fc1", "linear_fc2")}
    assert set(keys[0]) | set(keys[1]) == expert_keys | {"mlp.router.weight"}
    assert set(keys[0]) & set(keys[1]) == {"mlp.router.weight"}  # each expert lives on one rank
    for pool, layout, placement in [
        (dist2, dict(ep=1), "contiguous"),
        (dist2, dict(ep=2), EXPLICIT),
        (dist2, dict(ep=1, etp=2), "auto"),
        (dist4, dict(ep=4), "pairs"),
        (dist4, dict(ep=2, etp=2), "contiguous"),
    ]:
        held = pool.run(_load, str(tmp_path), placement, **layout)
        assert sorted({lid for ids in held for lid in ids}) == list(range(E)), (layout, placement)
