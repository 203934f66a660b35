"""Pretraining options: generated flags, YAML + overrides, one-line errors for bad input."""
import pytest

from modse_megatron.training.arguments import ConfigError, build_parser, parse_args, world_layout

MEGATRON_FLAGS = [
    "--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length", "--num-experts",
    "--moe-router-topk", "--moe-ffn-hidden-size", "--moe-aux-loss-coeff", "--moe-token-dispatcher-type",
    "--tensor-model-parallel-size", "--expert-model-parallel-size", "--expert-tensor-parallel-size",
    "--pipeline-model-parallel-size", "--micro-batch-size", "--global-batch-size", "--lr", "--min-lr",
    "--lr-warmup-iters", "--train-iters", "--eval-interval", "--eval-iters", "--save", "--load",
    "--save-interval", "--exit-interval", "--seed", "--bf16", "--data-path", "--tokenizer",
    # ours, generated from MoDSEConfig
    "--moe-expert-size-ratios", "--moe-expert-widths", "--moe-router-type", "--moe-routing-granularity",
    "--moe-expert-placement",
]


def test_megatron_lm_flag_names_exist():
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    missing = [f for f in MEGATRON_FLAGS if f not in flags]
    assert not missing


def test_yaml_then_cli_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num-layers: 4\nhidden_size: 64\nnum_experts: 8\nmoe_expert_widths: [8, 8, 8, 8, 8, 8, 8, 8]\nlr: 1.0e-3\n")
    args = parse_args(["--config", str(cfg), "--num-layers", "2", "--moe-expert-widths", "9,7,8,8,8,8,8,8",
                       "--disable-bias-linear"])
    assert args.model.num_layers == 2 and args.model.hidden_size == 64
    assert args.modse.moe_expert_widths == [9, 7, 8, 8, 8, 8, 8, 8]
    assert args.optim.lr == 1e-3 and args.parallel.use_distributed_optimizer is True
    assert parse_args(["--no-use-distributed-optimizer"]).parallel.use_distributed_optimizer is False
    # Two size specs at once conflict, wherever they come from.
    with pytest.raises(ConfigError, match="give only one expert size spec"):
        parse_args(["--config", str(cfg), "--moe-expert-size-preset", "paper8", "--disable-bias-linear"])


@pytest.mark.parametrize(
    "argv, yaml_text, expected",
    [
        (["--num-layer", "2"], None, "unrecognized arguments: --num-layer"),  # no prefix matching
        ([], "num_layer: 2\n", "unknown option 'num_layer' in the config file (did you mean num_layers?)"),
        ([], "num_layers: [2\n", "is not valid YAML"),
        ([], "num_layers: two\n", "option num_layers: 'two' is not a valid int"),
        (["--hidden-size", "100", "--num-attention-heads", "3"], None, "not divisible by --num-attention-heads"),
        (["--num-experts", "6", "--expert-model-parallel-size", "4"], None, "choose an EP size that divides it"),
        (["--moe-expert-size-preset", "paper8"], None, "expert options need an MoE model"),
        (["--sequence-parallel"], None, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (["--num-experts", "8"], None, "MoDSE experts have no linear biases"),
        (["--num-experts", "8", "--disable-bias-linear", "--tensor-model-parallel-size", "2"], None,
         "need --sequence-parallel"),
        (["--num-experts", "6", "--moe-expert-size-preset", "paper8", "--disable-bias-linear"], None,
         "4 ratio pairs describe 8 experts"),
        (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], None, "choose a PP size that divides it"),
        (["--save-interval", "5"], None, "--save-interval needs --save DIR"),
        (["--num-experts", "8", "--moe-layer-impl", "megatron", "--moe-expert-size-preset", "paper8"], None,
         "--moe-layer-impl megatron builds uniform experts"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, argv, yaml_text, expected):
    if yaml_text is not None:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml_text)
        argv = ["--config", str(cfg), *argv]
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    "argv, world, expected",
    [
        (["--micro-batch-size", "2"], 2, {"dp": 2, "global_batch_size": 4, "num_microbatches": 1}),
        (["--micro-batch-size", "2", "--global-batch-size", "8"], 2, {"dp": 2, "global_batch_size": 8, "num_microbatches": 2}),
        (["--tensor-model-parallel-size", "2"], 2, {"dp": 1, "global_batch_size": 4, "num_microbatches": 1}),
    ],
)
def test_world_layout(argv, world, expected):
    assert world_layout(parse_args(argv), world) == expected


@pytest.mark.parametrize(
    "argv, world, expected",
    [
        (["--tensor-model-parallel-size", "2"], 3, "not divisible by TP x PP"),
        (["--micro-batch-size", "2", "--global-batch-size", "6"], 2, "use a multiple of 4"),
        (["--num-experts", "4", "--expert-model-parallel-size", "4", "--disable-bias-linear"], 2,
         "not divisible by EP x expert-TP"),
    ],
)
def test_world_layout_errors(argv, world, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        world_layout(parse_args(argv), world)
