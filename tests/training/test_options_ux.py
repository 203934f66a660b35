"""Options UX: a flag over a YAML spec wins (also across alternative expert-size specs), and
every default that differs from Megatron-LM's says so in --help."""
import dataclasses

import pytest

from modse_megatron.training.arguments import SECTIONS, ConfigError, build_parser, parse_args

YAML = "num_experts: 8\nmoe_expert_size_preset: paper8\nmoe_ffn_hidden_size: 80\ndisable_bias_linear: true\nlr: 0.002\n"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(YAML)
    return str(path)


def test_flag_over_yaml_value(config):
    assert parse_args(["--config", config]).optim.lr == 0.002
    assert parse_args(["--config", config, "--lr", "0.0005"]).optim.lr == 0.0005


@pytest.mark.parametrize("flag, value, widths", [
    ("--moe-expert-size-ratios", "3:2,2.5:2.5,4:1,4.5:0.5", [96, 64, 80, 80, 128, 32, 144, 16]),
    ("--moe-expert-widths", "80,80,80,80,80,80,80,80", [80] * 8),
])
def test_flag_replaces_the_yaml_choice_among_alternative_specs(config, flag, value, widths):
    assert parse_args(["--config", config]).expert_widths() == [144, 16, 128, 32, 96, 64, 80, 80]
    args = parse_args(["--config", config, flag, value])
    assert args.modse.moe_expert_size_preset is None
    assert args.expert_widths() == widths


def test_two_alternatives_in_one_place_still_conflict(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text(YAML + "moe_expert_widths: [80, 80, 80, 80, 80, 80, 80, 80]\n")
    with pytest.raises(ConfigError):
        parse_args(["--config", str(path)])


def test_defaults_differing_from_megatron_lm_are_listed_in_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping inside "Megatron-LM"
    text = " ".join(build_parser().format_help().split())
    marked = [f for s in SECTIONS for f in dataclasses.fields(s) if "megatron" in f.metadata]
    assert len(marked) >= 10
    for f in marked:
        assert f"(default: {f.default}; Megatron-LM: {f.metadata['megatron']})" in text, f.name
    assert "(default: 10; Megatron-LM: 0)" in text  # --lr-warmup-iters
