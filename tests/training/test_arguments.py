"""Pretraining options: generated flags, YAML + overrides, one-line errors for bad input."""
import json

import pytest

from modse_megatron.training.arguments import (ConfigError, OptimArgs, PretrainArgs, build_parser, parse_args,
                                               world_layout)

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
    # Two size specs given in one place conflict (a flag replacing the YAML's spec is
    # tests/training/test_options_ux.py).
    with pytest.raises(ConfigError, match="give only one expert size spec"):
        parse_args(["--num-experts", "8", "--moe-expert-widths", "9,7,8,8,8,8,8,8",
                    "--moe-expert-size-preset", "paper8", "--disable-bias-linear"])


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
        (["--num-layers", "0"], None, "--num-layers must be positive, got 0"),
        (["--num-attention-heads", "4", "--tensor-model-parallel-size", "3"], None,
         "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3: choose a TP size that divides it"),
        (["--num-experts", "4", "--moe-router-topk", "5", "--disable-bias-linear"], None,
         "--moe-router-topk 5 must be between 1 and --num-experts 4"),
        (["--num-experts", "4", "--moe-router-topk", "1", "--disable-bias-linear"], None,
         "--moe-router-topk 1 with a softmax router needs --moe-router-pre-softmax"),
        (["--fp8-format", "e4m3"], None, "--fp8-format needs --bf16"),
        (["--distributed-timeout-minutes", "0"], None, "--distributed-timeout-minutes must be positive"),
        (["--skip-nonfinite-steps", "-1"], None, "--skip-nonfinite-steps must be 0 or more"),
        (["--finetune"], None, "--finetune needs --load DIR"),
        (["--save-interval", "0", "--save", "ckpt"], None, "--save-interval must be positive"),
        (["--train-iters", "5", "--lr-warmup-iters", "5"], None,
         "--lr-warmup-iters 5 must be smaller than the decay length 5"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], None, "--min-lr 0.001 is larger than --lr 0.0001"),
        (["--moe-expert-widths", "8,x"], None, "--moe-expert-widths: expected a comma-separated list of int, got '8,x'"),
        (["--device", "tpu"], None, "--device: invalid choice: 'tpu'"),
        (["--micro-batch-size", "two"], None, "--micro-batch-size: invalid int value: 'two'"),
        ([], "num_layers: null\n", "option num_layers cannot be null: give a value or remove the key"),
        ([], "- num_layers\n- 2\n", "must be a mapping of option: value"),
        ([], "swiglu: 3\n", "option swiglu: 3 is not a valid bool"),
        (["--moe-replan-interval", "-1"], None, "--moe-replan-interval must be >= 0"),
        (["--num-experts", "4", "--disable-bias-linear", "--debug-router-logit-bias", "1,0"], None,
         "--debug-router-logit-bias gives 2 values: it needs a MoDSE MoE model (--moe-layer-impl modse) and one value "
         "per expert (--num-experts 4)"),
        (["--moe-replan-policy", "greedy"], None, "--moe-replan-policy: invalid choice: 'greedy'"),
        (["--moe-replan-max-move", "0"], None, "--moe-replan-max-move 0 must be in (0, 1]"),
        (["--moe-replan-max-move", "1.5"], None, "--moe-replan-max-move 1.5 must be in (0, 1]"),
        (["--moe-replan-interval", "5", "--num-experts", "8", "--disable-bias-linear"], None,
         "--moe-replan-interval moves experts between EP ranks: it needs a MoDSE MoE model"),
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
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    assert str(err.value) == f"config file {tmp_path / 'nope.yaml'} does not exist: pass an existing YAML file to --config"


def test_options_round_trip_through_a_checkpoint_dict():
    """Checkpoints store ``to_dict()`` as JSON; reading it back gives the same options, and a
    checkpoint from another version (unknown keys, missing keys) still loads."""
    args = parse_args(["--num-layers", "3", "--num-experts", "8", "--moe-expert-size-ratios", "3:1,2:2",
                       "--disable-bias-linear", "--lr", "3e-4", "--data-path", "0.3", "a", "0.7", "b"])
    stored = json.loads(json.dumps(args.to_dict()))
    assert PretrainArgs.from_dict(stored) == args
    stored["model"]["option_from_the_future"] = 1
    del stored["optim"]["lr"]
    back = PretrainArgs.from_dict(stored)
    assert back.model == args.model and back.modse == args.modse
    assert back.optim.lr == OptimArgs().lr and back.data.data_path == ["0.3", "a", "0.7", "b"]


@pytest.mark.parametrize("argv, widths", [
    (["--moe-expert-size-preset", "paper8", "--moe-ffn-hidden-size", "40"], [72, 8, 64, 16, 48, 32, 40, 40]),
    (["--moe-expert-size-preset", "uniform", "--moe-ffn-hidden-size", "40"], [40] * 8),
    (["--moe-layer-impl", "megatron", "--moe-ffn-hidden-size", "40"], [40] * 8),
    (["--moe-layer-impl", "megatron", "--hidden-size", "32"], [128] * 8),  # megatron's default: 4 x hidden
])
def test_expert_widths_from_the_options(argv, widths):
    args = parse_args(["--num-experts", "8", "--disable-bias-linear", *argv])
    assert args.expert_widths() == widths
    assert parse_args([]).expert_widths() == []  # dense


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
        (["--tensor-model-parallel-size", "2"], 3,
         "world size 3 is not divisible by TP x PP = 2: launch a multiple of 2 ranks"),
        (["--micro-batch-size", "2", "--global-batch-size", "6"], 2,
         "--global-batch-size 6 is not divisible by micro batch x DP = 2 x 2: use a multiple of 4"),
        (["--num-experts", "4", "--expert-model-parallel-size", "4", "--disable-bias-linear"], 2,
         "not divisible by EP x expert-TP = 4: change --expert-model-parallel-size or the rank count"),
    ],
)
def test_world_layout_errors(argv, world, expected):
    with pytest.raises(ConfigError) as err:
        world_layout(parse_args(argv), world)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_options_need_neither_torch_nor_megatron():
    """``--help`` and option errors come back at once: parsing imports no torch/megatron-core
    (checked in a fresh interpreter: this one has imported them already)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from modse_megatron.training.arguments import ConfigError, build_parser, parse_args\n"
            "build_parser().format_help()\n"
            "try:\n    parse_args(['--num-layers', '0'])\nexcept ConfigError as e:\n    print(e)\n"
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["--num-layers must be positive, got 0", "[]"], proc.stderr[-2000:]
