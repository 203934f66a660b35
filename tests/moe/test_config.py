"""MoDSEConfig: expert size resolution, validation messages, CLI metadata, option choices.

(The placement policies it names are tested in tests/placement/test_layout.py.)
"""
import dataclasses
import subprocess
import sys

import pytest

from modse_megatron import config
from modse_megatron.config import MoDSEConfig, config_fields
from tests.placement.test_layout import without_planner


def _tc(**overrides):
    """A real megatron TransformerConfig (no process groups needed to build one)."""
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=8,
        moe_ffn_hidden_size=40, add_bias_linear=False, moe_token_dispatcher_type="alltoall",
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


PAPER8_F40 = [72, 8, 64, 16, 48, 32, 40, 40]


@pytest.mark.parametrize(
    "modse, tc_overrides, widths",
    [
        (dict(), {}, [40] * 8),
        (dict(moe_expert_size_preset="uniform"), {}, [40] * 8),
        (dict(moe_expert_size_preset="paper8"), {}, PAPER8_F40),
        (dict(moe_expert_size_ratios="4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5"), {}, PAPER8_F40),
        (dict(moe_expert_size_preset="paper8"), dict(num_moe_experts=16), PAPER8_F40 * 2),
        (dict(moe_expert_size_ratios="3:1,1:1"), dict(num_moe_experts=4, moe_ffn_hidden_size=24), [48, 16, 16, 16]),
        (dict(moe_expert_size_ratios="3:1"), dict(num_moe_experts=4, moe_ffn_hidden_size=8), [12, 4, 12, 4]),
        (dict(moe_expert_widths=[8, 72, 40, 40]), dict(num_moe_experts=4), [8, 72, 40, 40]),
        (dict(moe_expert_size_preset="paper8"), dict(expert_tensor_parallel_size=8), PAPER8_F40),
    ],
)
def test_expert_widths_resolve(modse, tc_overrides, widths):
    tc = _tc(**tc_overrides)
    cfg = MoDSEConfig(**modse)
    assert cfg.expert_widths(tc) == widths
    cfg.validate(tc)
    if modse.get("moe_expert_widths") is None:  # scaled specs keep the uniform parameter count
        assert sum(widths) == tc.num_moe_experts * tc.moe_ffn_hidden_size


@pytest.mark.parametrize(
    "modse, tc_overrides, message",
    [
        (dict(moe_expert_size_preset="paper8"), dict(moe_ffn_hidden_size=32), "multiple of 5"),
        (dict(moe_expert_size_preset="paper8"), dict(num_moe_experts=6), "multiple of 8 experts"),
        (dict(moe_expert_widths=[8, 72, 40]), dict(num_moe_experts=4), "one width per expert"),
        (dict(moe_expert_widths=[8, 0, 40, 40]), dict(num_moe_experts=4), "moe_expert_widths[1]=0"),
        (dict(moe_expert_widths=[8, -8, 40, 40]), dict(num_moe_experts=4), "positive integer"),
        (dict(moe_expert_size_ratios="4.5:0,1:1"), dict(num_moe_experts=4), "non-positive"),
        (dict(moe_expert_size_ratios="4.5-0.5"), {}, "not a pair"),
        (dict(moe_expert_size_ratios="a:b"), {}, "non-number"),
        (dict(moe_expert_size_preset="paper8"), dict(expert_tensor_parallel_size=16), "not divisible by 16"),
        (dict(moe_expert_size_preset="paper8", moe_expert_widths=[40] * 8), {}, "both set"),
        (dict(moe_expert_size_preset="paper9"), {}, "paper8, uniform"),
        (dict(moe_router_type="trained"), {}, "learned, frozen, random"),
        (dict(moe_routing_granularity="batch"), {}, "token, sequence"),
        (dict(moe_experts_impl="fast"), {}, "auto, loop, grouped, te"),
        (dict(), dict(add_bias_linear=True), "add_bias_linear=False"),
        (dict(moe_expert_placement="0,0,0,0,1,1,1,2"), dict(expert_model_parallel_size=2), "EP rank"),
        (dict(moe_expert_placement="0,1"), dict(expert_model_parallel_size=2), "one EP rank per expert"),
        (dict(moe_expert_placement="zigzag"), {}, "auto, pairs, contiguous"),
    ],
)
def test_validation_errors_name_the_fix(modse, tc_overrides, message):
    with pytest.raises(ValueError) as err:
        MoDSEConfig(**modse).validate(_tc(**tc_overrides))
    text = str(err.value)
    assert message in text
    assert "\n" not in text and ":" in text  # one line: problem, then the fix


def test_fp8_needs_width_alignment():
    tc = _tc(moe_ffn_hidden_size=80)  # paper8 widths 144,16,128,32,96,64,80,80: all multiples of 16
    tc.fp8 = "hybrid"
    assert MoDSEConfig(moe_expert_size_preset="paper8").expert_widths(tc)[1] == 16
    tc.moe_ffn_hidden_size = 40  # width 8 is not a multiple of 16
    with pytest.raises(ValueError, match="FP8 alignment"):
        MoDSEConfig(moe_expert_size_preset="paper8").expert_widths(tc)


def test_dense_model_needs_no_sizes():
    dense = _tc(num_moe_experts=None, moe_ffn_hidden_size=None)
    MoDSEConfig().validate(dense)
    with pytest.raises(ValueError, match="set num_moe_experts"):
        MoDSEConfig(moe_expert_size_ratios="3:1").validate(dense)


def test_every_field_has_cli_help_and_a_default():
    names = [f.name for f in config_fields()]
    assert {"moe_expert_widths", "moe_expert_size_ratios", "moe_expert_size_preset",
            "moe_expert_placement", "moe_router_type", "moe_routing_granularity",
            "moe_experts_impl"} <= set(names)
    for f in config_fields():
        assert f.metadata["help"] and f.metadata["help"][0].isupper(), f.name
        assert f.default is not dataclasses.MISSING, f.name
    assert MoDSEConfig().moe_expert_placement == "auto"


def test_config_imports_without_torch_or_megatron():
    code = "import sys, modse_megatron.config; assert 'torch' not in sys.modules and 'megatron' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_option_choices_are_defined_once():
    """Router types, granularities and expert impls: the router and experts use config's."""
    from modse_megatron.moe import experts, router

    assert router.ROUTER_TYPES is config.ROUTER_TYPES
    assert router.GRANULARITIES is config.ROUTING_GRANULARITIES
    assert experts.IMPLS is config.EXPERTS_IMPLS_ANY_DEVICE
    assert experts.ALL_IMPLS is config.EXPERTS_IMPLS_BUILT
    assert config.EXPERTS_IMPLS == ("auto", *experts.ALL_IMPLS)


def test_auto_placement_without_the_planner_is_one_line(monkeypatch):
    """No silent fallback to `pairs`: validation names the missing planner and the fix."""
    without_planner(monkeypatch, "libfoo.so: cannot open shared object file")
    tc = _tc(expert_model_parallel_size=2)
    with pytest.raises(ValueError) as err:
        MoDSEConfig(moe_expert_size_preset="paper8").validate(tc)
    text = str(err.value)
    assert text.startswith("moe_expert_placement=auto: the C++ placement planner")
    assert "libfoo.so" in text and "pip install -e ." in text and "\n" not in text
    MoDSEConfig(moe_expert_size_preset="paper8", moe_expert_placement="pairs").validate(tc)
    MoDSEConfig(moe_expert_size_preset="paper8").validate(_tc())  # EP=1 places nothing
