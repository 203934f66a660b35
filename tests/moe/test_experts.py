"""MoDSEExperts: uniform widths == megatron's SequentialMLP, fast path == loop oracle, ETP
sharding, layout-free initialisation and per-logical-expert checkpoint entries.

Each check is a task function: the fast tier runs it in this process (one rank, ``one_rank``),
the slow tier inside the gloo worker pool (megatron process groups are real; the pool's ranks
run the same check, so every case is exercised twice, and under expert-TP).
"""
import pytest
import torch
import torch.nn.functional as F

from modse_megatron.testing.megatron_utils import assert_close_rel, tiny_transformer_config

RTOL = 1e-5
HIDDEN = 32

ACTIVATIONS = {
    "swiglu": dict(gated_linear_unit=True, activation_func=F.silu),
    "geglu": dict(gated_linear_unit=True, activation_func=F.gelu),
    "gelu": dict(gated_linear_unit=False, activation_func=F.gelu),
    "swiglu_clamped": dict(gated_linear_unit=True, activation_func=F.silu,
                           activation_func_clamp_value=0.05, glu_linear_offset=1.0),
}


def _config(activation: str, num_local: int, ffn: int = 40, **extra):
    from megatron.core import parallel_state as ps

    return tiny_transformer_config(
        num_layers=1, hidden_size=HIDDEN, num_moe_experts=num_local * ps.get_expert_model_parallel_world_size(),
        moe_ffn_hidden_size=ffn, add_bias_linear=False, moe_router_topk=2, **ACTIVATIONS[activation], **extra,
    )


def _experts(config, widths, impl="grouped", logical_ids=None, **kw):
    from modse_megatron.moe.experts import MoDSEExperts

    ids = list(range(len(widths))) if logical_ids is None else logical_ids
    return MoDSEExperts(len(widths), config, expert_widths=widths, logical_ids=ids, impl=impl, **kw)


def _inputs(counts, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), HIDDEN, generator=g)
    probs = torch.rand(sum(counts), generator=g)
    return x, probs, torch.tensor(counts)


def _run(module, x, probs, counts, grad_seed=3):
    x = x.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    out, bias = module(x, counts, probs)
    assert bias is None
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)))
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return out.detach(), x.grad, probs.grad, grads


# ------------------------------------------------------------------ uniform == SequentialMLP
def _uniform_vs_sequential(activation, counts):
    from modse_megatron.moe.experts import IMPLS

    return all(_uniform_vs_sequential_impl(activation, impl, counts) for impl in IMPLS)


def _uniform_vs_sequential_impl(activation, impl, counts):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module

    config = _config(activation, len(counts))
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts).submodules.mlp.submodules.experts
    sequential = build_module(spec, len(counts), config, pg_collection=get_default_pg_collection())
    ours = _experts(config, [config.moe_ffn_hidden_size] * len(counts), impl)
    assert set(dict(sequential.named_parameters())) == set(dict(ours.named_parameters()))
    result = ours.load_state_dict(sequential.state_dict(), strict=False)  # same names and layout
    assert not result.missing_keys and all("_extra_state" in k for k in result.unexpected_keys)
    x, probs, tpe = _inputs(counts, seed=11)
    ref, ours_out = _run(sequential, x, probs, tpe), _run(ours, x, probs, tpe)
    for what, a, b in zip(("output", "x grad", "probs grad"), ours_out[:3], ref[:3]):
        assert_close_rel(a, b, RTOL, what)
    for name, g in ref[3].items():
        assert_close_rel(ours_out[3][name], g, RTOL, name)
    return True


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "swiglu_clamped"])
def test_uniform_widths_match_megatron_sequential_mlp_one_rank(one_rank, activation):
    assert _uniform_vs_sequential(activation, [5, 0, 9, 3])


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "swiglu_clamped"])
@pytest.mark.parametrize("etp", [1, 2])
def test_uniform_widths_match_megatron_sequential_mlp(dist2, activation, etp):
    """Both implementations (loop oracle and fast path) against megatron's SequentialMLP."""
    counts = [5, 0, 9, 3]  # includes an expert that receives no tokens
    assert all(dist2.run(_uniform_vs_sequential, activation, counts, etp=etp))


# ------------------------------------------------------------------ fast path == loop oracle
def _fast_vs_loop(activation, widths, counts, dtype=torch.float32):
    """The fast path, with and without ``torch._grouped_mm``, against the loop oracle."""
    config = _config(activation, len(widths), params_dtype=dtype)
    loop = _experts(config, widths, "loop")
    x, probs, tpe = _inputs(counts, seed=5)
    x = x.to(dtype)
    ref = _run(loop, x, probs, tpe)
    rtol = RTOL if dtype == torch.float32 else 1e-2
    for grouped_mm in (False, True):
        fast = _experts(config, widths, "grouped", use_grouped_mm=grouped_mm)
        fast.load_state_dict(loop.state_dict())
        out = _run(fast, x, probs, tpe)
        for what, a, b in zip(("output", "x grad", "probs grad"), out[:3], ref[:3]):
            assert_close_rel(a, b, rtol, f"{what} (grouped_mm={grouped_mm})")
        for name, g in ref[3].items():
            assert_close_rel(out[3][name], g, rtol, f"{name} (grouped_mm={grouped_mm})")
    return True


FAST_CASES = [  # (widths, tokens per expert)
    ([72, 8, 64, 16], [7, 3, 0, 12]),
    ([40, 40, 40, 40], [4, 4, 4, 4]),
    ([8, 40, 40, 72, 16, 16], [1, 6, 0, 9, 2, 5]),  # two width classes of adjacent experts
    ([24], [13]),
    ([48, 32], [0, 0]),  # no tokens at all: weights still get (zero) gradients
]


@pytest.mark.parametrize("widths, counts", FAST_CASES)
def test_fast_path_matches_loop_oracle_one_rank(one_rank, widths, counts):
    assert _fast_vs_loop("swiglu", widths, counts)


@pytest.mark.parametrize("activation", ["geglu", "gelu", "swiglu_clamped"])
def test_fast_path_matches_loop_oracle_activations_one_rank(one_rank, activation):
    assert _fast_vs_loop(activation, *FAST_CASES[2])
    assert _fast_vs_loop(activation, [72, 8], [6, 3], torch.bfloat16)


@pytest.mark.parametrize("widths, counts", FAST_CASES)
def test_fast_path_matches_loop_oracle(dist2, widths, counts):
    assert all(dist2.run(_fast_vs_loop, "swiglu", widths, counts))


@pytest.mark.parametrize("activation", ["geglu", "gelu", "swiglu_clamped"])
def test_fast_path_matches_loop_oracle_activations(dist2, activation):
    widths, counts = FAST_CASES[2]
    assert all(dist2.run(_fast_vs_loop, activation, widths, counts))


def test_fast_path_bf16(dist2):
    assert all(dist2.run(_fast_vs_loop, "swiglu", [72, 8], [6, 3], torch.bfloat16))


# ------------------------------------------------------------------ ETP sharding and init
def _init_weights(widths, logical_ids):
    torch.manual_seed(77)
    module = _experts(_config("swiglu", len(widths)), widths, logical_ids=logical_ids)
    return module.full_expert_tensors()


def test_initialisation_depends_on_logical_id_only(dist2):
    """Same RNG state -> the same logical experts, whatever the ETP size or slot order."""
    widths = [72, 8, 64, 16]
    ref = dist2.run(_init_weights, widths, [0, 1, 2, 3], etp=1)[0]
    sharded = dist2.run(_init_weights, widths, [0, 1, 2, 3], etp=2)[0]
    moved = dist2.run(_init_weights, [64, 16, 72, 8], [2, 3, 0, 1], etp=1)[0]
    for lid, (w1, w2) in ref.items():
        assert w1.shape == (2 * widths[lid], HIDDEN) and w2.shape == (HIDDEN, widths[lid])
        for other in (sharded, moved):
            assert torch.equal(other[lid][0], w1) and torch.equal(other[lid][1], w2)
    assert not torch.equal(ref[2][0][:8], ref[3][0][:8])  # experts are not clones of each other


def _etp_partial_sums(widths, counts):
    """ETP=2 partial outputs summed over the ETP group == the ETP=1 expert output."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    torch.manual_seed(3)
    config = _config("swiglu", len(widths))
    module = _experts(config, widths)
    full = module.full_expert_tensors()
    x, probs, tpe = _inputs(counts, seed=9)
    out, x_grad, probs_grad, _ = _run(module, x, probs, tpe)
    for t in (out, x_grad, probs_grad):
        dist.all_reduce(t, group=ps.get_expert_tensor_parallel_group())
    # Reference: the same math on the gathered logical weights, one expert at a time.
    ref_x, ref_p = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    outs = []
    for lid, xe, pe in zip(range(len(widths)), ref_x.split(counts), ref_p.split(counts)):
        w1, w2 = full[lid]
        gate, up = (xe @ w1.t()).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up * pe.unsqueeze(-1)) @ w2.t())
    ref = torch.cat(outs)
    ref.backward(torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)))
    assert_close_rel(out, ref.detach(), RTOL, "output")
    assert_close_rel(x_grad, ref_x.grad, RTOL, "x grad")
    assert_close_rel(probs_grad, ref_p.grad, RTOL, "probs grad")
    return True


def test_expert_tensor_parallel_partial_sums(dist2):
    assert all(dist2.run(_etp_partial_sums, [72, 8, 64, 16], [5, 2, 7, 1], etp=2))


# ------------------------------------------------------------------ checkpoint entries
def _sharded_entries(widths, logical_ids):
    from megatron.core import parallel_state as ps

    module = _experts(_config("swiglu", len(widths)), widths, logical_ids=logical_ids)
    state = module.sharded_state_dict(prefix="decoder.layers.3.mlp.experts.")
    entries = {}
    for name, factory in state.items():
        shards = factory.build() if hasattr(factory, "build_fn") else factory  # fc1: [gate, up]
        shards = shards if isinstance(shards, list) else [shards]
        entries[name] = [(s.key, s.global_shape, s.global_offset, s.replica_id) for s in shards]
    return ps.get_expert_tensor_parallel_rank(), entries


def test_sharded_state_dict_one_entry_per_logical_expert_one_rank(one_rank):
    widths, ids = [64, 16], [5, 2]
    etp_rank, entries = _sharded_entries(widths, ids)
    assert etp_rank == 0
    for i, (lid, w) in enumerate(zip(ids, widths)):  # whole experts, keyed by logical id
        key = f"decoder.layers.3.mlp.experts.expert{lid}."
        gate, up = entries[f"decoder.layers.3.mlp.experts.local_experts.{i}.linear_fc1.weight"]
        (fc2,) = entries[f"decoder.layers.3.mlp.experts.local_experts.{i}.linear_fc2.weight"]
        assert gate == (key + "linear_fc1.weight", (2 * w, HIDDEN), (0, 0), (0, 0, 0))
        assert up == (key + "linear_fc1.weight", (2 * w, HIDDEN), (w, 0), (0, 0, 0))
        assert fc2 == (key + "linear_fc2.weight", (HIDDEN, w), (0, 0), (0, 0, 0))


def test_sharded_state_dict_one_entry_per_logical_expert(dist2):
    widths, ids = [64, 16], [5, 2]
    for etp_rank, entries in dist2.run(_sharded_entries, widths, ids, etp=2):
        assert set(entries) == {f"decoder.layers.3.mlp.experts.local_experts.{i}.{n}.weight"
                                for i in range(2) for n in ("linear_fc1", "linear_fc2")}
        for i, (lid, w) in enumerate(zip(ids, widths)):
            key = f"decoder.layers.3.mlp.experts.expert{lid}."
            gate, up = entries[f"decoder.layers.3.mlp.experts.local_experts.{i}.linear_fc1.weight"]
            (fc2,) = entries[f"decoder.layers.3.mlp.experts.local_experts.{i}.linear_fc2.weight"]
            half = w // 2  # this rank's share of the width
            assert gate == (key + "linear_fc1.weight", (2 * w, HIDDEN), (etp_rank * half, 0), (0, 0, 0))
            assert up == (key + "linear_fc1.weight", (2 * w, HIDDEN), (w + etp_rank * half, 0), (0, 0, 0))
            assert fc2 == (key + "linear_fc2.weight", (HIDDEN, w), (0, etp_rank * half), (0, 0, 0))
