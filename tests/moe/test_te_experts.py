"""TransformerEngine experts (``moe_experts_impl='te'``).

On CPU: the FP8 token padding (plain torch), the TE forward's math with torch ``Linear``
stand-ins against the loop oracle, the selection rules and their one-line errors, and state
dicts loading across impls despite TE's ``_extra_state``. On a CUDA machine with TE (``gpu``
marker): the real TE impl against the loop oracle in BF16, checkpoint layout identical to
``grouped`` under ETP, and FP8 forward/backward close to BF16.
"""
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from modse_megatron.config import MoDSEConfig
from modse_megatron.moe import te_experts
from modse_megatron.moe.te_experts import pad_rows, padded_counts, unpad_rows
from modse_megatron.testing.megatron_utils import assert_close_rel
from tests.moe.test_config import _tc
from tests.moe.test_experts import HIDDEN, _config, _experts

NO_CUDA = ("moe_experts_impl='te' needs a CUDA GPU and none is "
           "available: use moe_experts_impl=grouped on CPU")
NO_TE = ("moe_experts_impl='te' needs TransformerEngine, which is not installed: "
         "pip install 'modse-megatron[gpu]' (or use moe_experts_impl=grouped)")
COUNTS = [7, 3, 0, 12, 5, 16, 9, 2]  # one expert without tokens, one already aligned


# ------------------------------------------------------------------ FP8 padding (plain torch)
@pytest.mark.parametrize("counts, align, expected", [
    ([7, 3, 0, 12], 16, [16, 16, 0, 16]),
    ([16, 17, 32], 16, [16, 32, 32]),
    ([1, 33, 0], 32, [32, 64, 0]),
    ([5, 0, 2], 1, [5, 0, 2]),
])
def test_padded_counts(counts, align, expected):
    assert padded_counts(counts, align) == expected


@pytest.mark.parametrize("align", [16, 32])
def test_pad_unpad_round_trip(align):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(COUNTS), HIDDEN, generator=g)
    probs = torch.rand(sum(COUNTS), generator=g) + 0.5  # no zero among the real probabilities
    x_p, probs_p, padded = pad_rows(x, probs, COUNTS, align)
    assert padded == padded_counts(COUNTS, align) and x_p.shape == (sum(padded), HIDDEN)
    assert all(p % align == 0 and c <= p < c + align for c, p in zip(COUNTS, padded))
    for c, xe, pe, xe_p, pe_p in zip(COUNTS, x.split(COUNTS), probs.split(COUNTS),
                                      x_p.split(padded), probs_p.split(padded)):
        assert torch.equal(xe_p[:c], xe) and torch.equal(pe_p[:c], pe)  # real rows first, in order
        assert not xe_p[c:].any() and not pe_p[c:].any()  # then zero rows with zero probabilities
    assert torch.equal(unpad_rows(x_p, COUNTS, padded), x)


def test_padding_is_a_no_op_when_aligned():
    x, probs = torch.randn(32, 4), torch.rand(32)
    for counts, align in (([16, 0, 16], 16), ([5, 27], 1)):
        x_p, probs_p, padded = pad_rows(x, probs, counts, align)
        assert x_p is x and probs_p is probs and padded == counts
        assert unpad_rows(x, counts, padded) is x


def test_padding_gradients_reach_only_real_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(COUNTS), HIDDEN, generator=g, requires_grad=True)
    probs = torch.rand(sum(COUNTS), generator=g, requires_grad=True)
    x_p, probs_p, padded = pad_rows(x, probs, COUNTS, 16)
    real = unpad_rows(torch.arange(sum(padded)), COUNTS, padded)  # real rows' padded positions
    dx_p, dprobs_p = torch.randn(x_p.shape, generator=g), torch.randn(probs_p.shape, generator=g)
    ((x_p * dx_p).sum() + (probs_p * dprobs_p).sum()).backward()
    assert torch.equal(x.grad, dx_p[real]) and torch.equal(probs.grad, dprobs_p[real])

    y_p = torch.randn(sum(padded), HIDDEN, generator=g, requires_grad=True)
    dy = torch.randn(sum(COUNTS), HIDDEN, generator=g)
    (unpad_rows(y_p, COUNTS, padded) * dy).sum().backward()
    pad_mask = torch.ones(sum(padded), dtype=torch.bool)
    pad_mask[real] = False
    assert torch.equal(y_p.grad[real], dy) and not y_p.grad[pad_mask].any()


# ------------------------------------------------------------------ TE forward math on CPU
def _torch_linear(weight):
    """A torch ``Linear`` sharing ``weight`` (stands in for ``te.pytorch.Linear`` on CPU)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = weight
    return linear


def _te_math_vs_loop(activation, align):
    """``te_experts_forward`` (padding, zero-token experts, probabilities) == loop oracle."""
    widths = [72, 8, 64, 16, 48, 32, 40, 40]
    loop = _experts(_config(activation, len(widths)), widths, "loop")
    stand_ins = [SimpleNamespace(linear_fc1=_torch_linear(e.linear_fc1.weight),
                                 linear_fc2=_torch_linear(e.linear_fc2.weight)) for e in loop.local_experts]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(sum(COUNTS), HIDDEN, generator=g)
    probs = torch.rand(sum(COUNTS), generator=g)
    dy = torch.randn(sum(COUNTS), HIDDEN, generator=g)
    results = []
    for run in (lambda x, p: loop(x, torch.tensor(COUNTS), p)[0],
                lambda x, p: te_experts.te_experts_forward(stand_ins, x, p, COUNTS, loop.mlp_activation, align)):
        loop.zero_grad(set_to_none=True)
        x_, p_ = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
        out = run(x_, p_)
        out.backward(dy)
        results.append([out.detach(), x_.grad, p_.grad] + [p.grad.clone() for p in loop.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        assert_close_rel(a, b, 1e-5, f"tensor {i}")
    empty = loop.local_experts[COUNTS.index(0)]
    assert all(p.grad is not None and not p.grad.any() for p in empty.parameters())  # zero, not None
    return True


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("align", [1, 16])
def test_te_forward_math_matches_loop_oracle_one_rank(one_rank, activation, align):
    assert _te_math_vs_loop(activation, align)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("align", [1, 16])
def test_te_forward_math_matches_loop_oracle(dist2, activation, align):
    assert all(dist2.run(_te_math_vs_loop, activation, align))


# ------------------------------------------------------------------ selection and errors
def _te_errors():
    """The error of every way of asking for ``te`` (config, layer resolution, experts)."""
    from modse_megatron.moe.experts import MoDSEExperts
    from modse_megatron.moe.layer import resolve_experts_impl

    tc = _tc()
    calls = (lambda: MoDSEConfig(moe_experts_impl="te").validate(tc),
             lambda: resolve_experts_impl("te", tc),
             lambda: MoDSEExperts(1, tc, expert_widths=[16], logical_ids=[0], impl="te"))
    messages = []
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        messages.append(str(err.value))
    return messages


def test_te_without_cuda_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _te_errors() == [NO_CUDA] * 3


def test_te_without_transformer_engine_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails, as if not installed
    assert _te_errors() == [NO_TE] * 3
    assert "\n" not in NO_TE + NO_CUDA


def test_auto_picks_te_only_for_fp8_with_te(monkeypatch):
    from modse_megatron.moe.layer import resolve_experts_impl

    bf16, fp8 = _tc(), _tc()
    fp8.fp8 = "hybrid"  # set after construction: megatron refuses fp8 configs without TE
    assert resolve_experts_impl("auto", bf16) == "grouped"
    assert resolve_experts_impl("auto", None) == "grouped"
    if te_experts.te_unavailable_reason(import_te=True) is not None:
        assert resolve_experts_impl("auto", fp8) == "grouped"  # the training entry point refuses FP8 here
    monkeypatch.setattr(te_experts, "te_unavailable_reason", lambda import_te=False: None)
    assert resolve_experts_impl("auto", fp8) == "te"
    assert resolve_experts_impl("auto", bf16) == "grouped"
    for impl in ("loop", "grouped"):
        assert resolve_experts_impl(impl, fp8) == impl


# ------------------------------------------------------------------ state dicts across impls
class _LinearWithExtraState(nn.Module):
    """A weight holder with ``_extra_state``, as ``te.pytorch.Linear`` has (FP8 metadata)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def get_extra_state(self):
        return torch.zeros(3)

    def set_extra_state(self, state):
        pass


def _state_dicts_across_impls():
    torch.manual_seed(2)
    widths = [48, 16]
    grouped = _experts(_config("swiglu", 2), widths, "grouped")
    state = grouped.state_dict()
    te_like = _experts(_config("swiglu", 2), widths, "loop")
    for e in te_like.local_experts:
        e.linear_fc1 = _LinearWithExtraState(e.linear_fc1.weight)
        e.linear_fc2 = _LinearWithExtraState(e.linear_fc2.weight)
    te_like.load_state_dict(state)  # strict: its _extra_state entries are not "missing"
    te_state = te_like.state_dict()
    assert {k for k in te_state if k.endswith("_extra_state")} == {
        f"local_experts.{i}.linear_fc{j}._extra_state" for i in range(2) for j in (1, 2)}
    grouped.load_state_dict(te_state)  # strict: nor are they "unexpected" for grouped
    assert all(torch.equal(te_state[k], v) for k, v in grouped.state_dict().items())
    return True


def test_state_dicts_load_across_impls_one_rank(one_rank):
    assert _state_dicts_across_impls()


def test_state_dicts_load_across_impls(dist2):
    assert all(dist2.run(_state_dicts_across_impls))


# ------------------------------------------------------------------ GPU: real TransformerEngine
BF16_RTOL = 2e-2
FP8_RTOL = 0.25  # E4M3 activations/weights, E5M2 gradients ("hybrid"): a few % per element


def _require_te(fp8=False):
    pytest.importorskip("transformer_engine.pytorch", reason="needs TransformerEngine")
    if fp8:
        try:  # TE >= 2.8; older releases keep it in transformer_engine.pytorch.fp8
            from transformer_engine.pytorch.quantization import FP8GlobalStateManager
        except ImportError:
            from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
        ok, reason = FP8GlobalStateManager.is_fp8_available()
        if not ok:
            pytest.skip(f"this GPU has no FP8 GEMMs: {reason}")


def _this_ranks_gpu():
    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())


def _paper8_config(activation="swiglu", **extra):
    """8 local experts with the paper's width ratios (ffn 80: every ETP<=2 shard a multiple of 8)."""
    config = _config(activation, 8, ffn=80, params_dtype=torch.bfloat16, bf16=True, **extra)
    return config, MoDSEConfig(moe_expert_size_preset="paper8").expert_widths(config)


def _cuda_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(COUNTS), HIDDEN, generator=g)
    probs, dy = torch.rand(sum(COUNTS), generator=g), torch.randn(sum(COUNTS), HIDDEN, generator=g)
    return x.cuda().bfloat16(), probs.cuda(), dy.cuda().bfloat16()


def _fwd_bwd(module, x, probs, dy, context=None):
    """Output, input/probs gradients and every weight gradient (by name) of one step."""
    module.zero_grad(set_to_none=True)
    x, probs = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    with context if context is not None else nullcontext():
        out, _ = module(x, torch.tensor(COUNTS), probs)
    out.backward(dy)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return {"output": out.detach(), "x grad": x.grad, "probs grad": probs.grad, **grads}


def _te_vs_loop_bf16(activation):
    _this_ranks_gpu()
    config, widths = _paper8_config(activation)
    torch.manual_seed(5)
    loop = _experts(config, widths, "loop").cuda()
    torch.manual_seed(5)
    te = _experts(config, widths, "te")
    assert type(te.local_experts[0].linear_fc1).__module__.startswith("transformer_engine")
    for (name, a), (other, b) in zip(loop.named_parameters(), te.named_parameters()):
        assert name == other and b.is_cuda and b.dtype == torch.bfloat16
        assert torch.equal(a, b), f"{name}: te initialises differently from loop"
    x, probs, dy = _cuda_inputs(seed=6)
    ref, out = _fwd_bwd(loop, x, probs, dy), _fwd_bwd(te, x, probs, dy)
    assert ref.keys() == out.keys()
    for what, expected in ref.items():
        assert_close_rel(out[what], expected, BF16_RTOL, what)
    empty = COUNTS.index(0)
    assert not out[f"local_experts.{empty}.linear_fc1.weight"].any()
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("etp", [1, 2])
def test_te_matches_loop_oracle_bf16(dist2, activation, etp):
    _require_te()
    assert all(dist2.run(_te_vs_loop_bf16, activation, etp=etp))


def _checkpoint_layout(impl):
    _this_ranks_gpu()
    config, widths = _paper8_config()
    torch.manual_seed(9)
    module = _experts(config, widths, impl, logical_ids=[3, 0, 7, 1, 6, 2, 5, 4])
    entries = {}
    for name, factory in module.sharded_state_dict(prefix="decoder.layers.0.mlp.experts.").items():
        shards = factory.build() if hasattr(factory, "build_fn") else factory
        shards = shards if isinstance(shards, list) else [shards]
        entries[name] = [(s.key, s.global_shape, s.global_offset, s.replica_id, s.data.float().cpu())
                         for s in shards]
    params = {n: tuple(p.shape) for n, p in module.named_parameters()}
    weights = {k: v.float().cpu() for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    return entries, params, weights


def _checkpoint_layouts_match():
    (te_entries, te_params, te_weights), (entries, params, weights) = map(_checkpoint_layout, ("te", "grouped"))
    assert te_params == params and te_weights.keys() == weights.keys()
    assert te_entries.keys() == entries.keys()
    for name, shards in entries.items():
        for (*meta, data), (*te_meta, te_data) in zip(shards, te_entries[name], strict=True):
            assert te_meta == meta and torch.equal(te_data, data), name
    # Cross-loading plain state dicts (TE's _extra_state is neither missing nor unexpected).
    torch.manual_seed(9)
    config, widths = _paper8_config()
    te = _experts(config, widths, "te", logical_ids=[3, 0, 7, 1, 6, 2, 5, 4])
    te.load_state_dict({k: v.cuda().bfloat16() for k, v in weights.items()})
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("etp", [1, 2])
def test_te_checkpoint_layout_is_grouped_layout(dist2, etp):
    _require_te()
    assert all(dist2.run(_checkpoint_layouts_match, etp=etp))


def _fp8_vs_bf16(recipe):
    from megatron.core.fp8_utils import get_fp8_context

    _this_ranks_gpu()
    config, widths = _paper8_config(fp8="hybrid", fp8_recipe=recipe)
    assert all(w % 16 == 0 for w in widths)
    torch.manual_seed(11)
    te = _experts(config, widths, "te")
    assert te.quantization_align == 16 and any(c % 16 for c in COUNTS)  # padding is exercised
    x, probs, dy = _cuda_inputs(seed=12)
    bf16 = _fwd_bwd(te, x, probs, dy)  # outside the FP8 context: BF16 GEMMs on padded blocks
    for _ in range(3):  # delayed scaling needs amax history; current scaling is ready at once
        fp8 = _fwd_bwd(te, x, probs, dy, get_fp8_context(config))
    for what, expected in bf16.items():
        assert torch.isfinite(fp8[what]).all(), what
        assert_close_rel(fp8[what], expected, FP8_RTOL, f"{what} (FP8 vs BF16)")
    rel = float((fp8["output"].double() - bf16["output"].double()).norm() / bf16["output"].double().norm())
    assert rel > 1e-4, "FP8 output equals BF16: the FP8 GEMMs did not run"
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_te_fp8_forward_backward_close_to_bf16(dist2, recipe):
    _require_te(fp8=True)
    assert all(dist2.run(_fp8_vs_bf16, recipe))


@pytest.mark.gpu
def test_auto_picks_te_under_fp8_on_a_gpu():
    _require_te()
    from modse_megatron.moe.layer import resolve_experts_impl

    assert resolve_experts_impl("auto", SimpleNamespace(fp8="hybrid")) == "te"
    assert resolve_experts_impl("auto", SimpleNamespace(fp8=None)) == "grouped"
    MoDSEConfig(moe_experts_impl="te").validate(_tc())
