"""Pretraining options: small dataclasses, one field per option, CLI flags generated from them.

Flag names follow Megatron-LM where a Megatron user expects them (``num_layers`` becomes
``--num-layers``); MoDSE's own options come from :class:`modse_megatron.config.MoDSEConfig`.
A YAML file (``--config``) sets any field by name (``num_layers`` or ``num-layers``); flags on the
command line override it. Unknown keys, misspelt flags and conflicting options are errors
(:class:`ConfigError`, one line naming the fix).

This module is pure Python (no torch): ``--help`` and validation errors come back instantly.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modse_megatron.config import MoDSEConfig


class ConfigError(ValueError):
    """A configuration problem; the message is one line that names the fix."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ModelArgs:
    """The GPT architecture (megatron ``TransformerConfig`` fields, Megatron-LM flag names)."""

    num_layers: int = _opt(2, "Number of transformer layers.")
    hidden_size: int = _opt(128, "Transformer hidden size.")
    num_attention_heads: int = _opt(4, "Number of attention heads.")
    num_query_groups: int | None = _opt(None, "Grouped-query attention groups (default: = heads).")
    ffn_hidden_size: int | None = _opt(None, "Dense FFN width (default: 4 x hidden size).")
    seq_length: int = _opt(128, "Sequence length in tokens.")
    max_position_embeddings: int | None = _opt(None, "Position-embedding table size (default: seq length).")
    position_embedding_type: str = _opt("learned_absolute", "learned_absolute or rope.", choices=("learned_absolute", "rope"))
    normalization: str = _opt("LayerNorm", "LayerNorm or RMSNorm.", choices=("LayerNorm", "RMSNorm"))
    swiglu: bool = _opt(False, "Use SwiGLU FFNs (dense and experts).")
    disable_bias_linear: bool = _opt(False, "No biases in linear layers.")
    untie_embeddings_and_output_weights: bool = _opt(False, "Separate input embedding and output layer.")
    hidden_dropout: float = _opt(0.0, "Dropout on hidden states.", megatron='0.1')
    attention_dropout: float = _opt(0.0, "Dropout on attention probabilities.", megatron='0.1')
    init_method_std: float = _opt(0.02, "Std of the normal weight initialisation.")
    num_experts: int | None = _opt(None, "Experts per MoE layer; 0 or unset = dense model.")
    moe_ffn_hidden_size: int | None = _opt(None, "Uniform expert width; MoDSE widths are scaled to the same total.")
    moe_router_topk: int = _opt(2, "Experts per token.")
    moe_layer_freq: int = _opt(1, "Every n-th layer is an MoE layer (1 = all).")
    moe_aux_loss_coeff: float = _opt(1e-2, "Load-balancing auxiliary loss coefficient.", megatron='0.0')
    moe_z_loss_coeff: float | None = _opt(None, "Router z-loss coefficient.")
    moe_router_load_balancing_type: str = _opt("aux_loss", "aux_loss, seq_aux_loss, global_aux_loss or none.",
                                               choices=("aux_loss", "seq_aux_loss", "global_aux_loss", "none"))
    moe_router_enable_expert_bias: bool = _opt(False, "Loss-free balancing: a per-expert routing bias.")
    moe_router_score_function: str = _opt("softmax", "softmax or sigmoid.", choices=("softmax", "sigmoid"))
    moe_router_pre_softmax: bool = _opt(False, "Softmax over all experts before top-k (megatron needs it for top-1).")
    moe_expert_capacity_factor: float | None = _opt(None, "Capacity factor (token dropping); unset = dropless.")
    moe_token_drop_policy: str = _opt("probs", "Which tokens to drop over capacity: probs or position.",
                                      choices=("probs", "position"))
    moe_token_dispatcher_type: str = _opt("alltoall", "alltoall or allgather.", choices=("alltoall", "allgather"), megatron='allgather')
    moe_shared_expert_intermediate_size: int | None = _opt(None, "Width of a shared (generalist) expert.")
    moe_layer_impl: str = _opt("modse", "modse (variable-width experts) or megatron (megatron's uniform MoE layer, the baseline).",
                               choices=("modse", "megatron"))
    bf16: bool = _opt(False, "bfloat16 parameters and activations (fp32 master weights).")
    fp8_format: str | None = _opt(None, "FP8 GEMMs via TransformerEngine: e4m3 or hybrid (GPU only).",
                                  choices=("e4m3", "hybrid"))


@dataclass
class ParallelArgs:
    """How the model is split over ranks (DP is what remains of the world size)."""

    tensor_model_parallel_size: int = _opt(1, "Tensor-parallel size.")
    pipeline_model_parallel_size: int = _opt(1, "Pipeline-parallel size.")
    expert_model_parallel_size: int = _opt(1, "Expert-parallel size.")
    expert_tensor_parallel_size: int | None = _opt(None, "Expert tensor-parallel size (default: = TP).")
    sequence_parallel: bool = _opt(False, "Sequence parallelism (needs TP > 1).")
    use_distributed_optimizer: bool = _opt(True, "Shard optimizer state over DP ranks (ZeRO-1).", megatron='False')
    device: str = _opt("auto", "auto, cpu (gloo) or cuda (nccl).", choices=("auto", "cpu", "cuda"))
    distributed_timeout_minutes: float = _opt(10.0, "Timeout of collectives; a rank that stops answering is "
                                                    "named in an error within this + 60 s.")


@dataclass
class OptimArgs:
    """Batch sizes, Adam, the learning-rate schedule."""

    micro_batch_size: int = _opt(4, "Sequences per micro-batch per DP rank.")
    global_batch_size: int | None = _opt(None, "Sequences per step (default: micro batch x DP); gradient accumulation makes up the rest.")
    train_iters: int = _opt(100, "Optimizer steps.")
    lr: float = _opt(1e-3, "Peak learning rate.")
    min_lr: float = _opt(1e-4, "Final learning rate of the decay.", megatron='0.0')
    lr_warmup_iters: int = _opt(10, "Linear warm-up steps.", megatron='0')
    lr_decay_iters: int | None = _opt(None, "Decay steps (default: train iters).")
    lr_decay_style: str = _opt("cosine", "cosine, linear or constant.", choices=("cosine", "linear", "constant"), megatron='linear')
    weight_decay: float = _opt(0.1, "AdamW weight decay (not applied to biases and norms).", megatron='0.01')
    adam_beta1: float = _opt(0.9, "Adam beta1.")
    adam_beta2: float = _opt(0.95, "Adam beta2.", megatron='0.999')
    adam_eps: float = _opt(1e-8, "Adam epsilon.")
    clip_grad: float = _opt(1.0, "Global gradient-norm clip (0 = off).")
    skip_nonfinite_steps: int = _opt(0, "Skip up to this many updates whose loss or gradients are NaN/Inf "
                                        "(counted in metrics), then stop; 0 = stop at the first.")
    seed: int = _opt(1234, "Random seed.")


@dataclass
class DataArgs:
    """Training data; without --data-path the built-in corpus (Python stdlib) is used."""

    data_path: list[str] | None = _opt(None, "Indexed dataset prefix(es) (without .bin/.idx); optional weights as in Megatron-LM: 0.7 a 0.3 b.")
    tokenizer: str | None = _opt(None, "tokenizer.json of the data (default: the built-in corpus tokenizer).")
    split: str = _opt("98,1,1", "train,valid,test split of the documents.")
    vocab_size: int = _opt(8192, "Vocabulary of the built-in corpus tokenizer.")
    data_cache_dir: str | None = _opt(None, "Where dataset index caches go (default: the modse cache).")


@dataclass
class RunArgs:
    """Evaluation, checkpoints and logs."""

    eval_interval: int = _opt(50, "Evaluate on the validation split every n steps.", megatron='1000')
    eval_iters: int = _opt(4, "Batches per evaluation.", megatron='100')
    save: str | None = _opt(None, "Checkpoint directory to save to.")
    load: str | None = _opt(None, "Checkpoint directory to resume from.")
    finetune: bool = _opt(False, "With --load: take only the model weights (any layout), start at iteration 0 with a fresh optimizer.")
    verify_checkpoint: bool = _opt(True, "Check every checkpoint file against its SHA-256 manifest before loading.")
    save_interval: int | None = _opt(None, "Save every n steps (and always at the end when --save is set).")
    exit_interval: int | None = _opt(None, "Stop (after saving) once this iteration is reached.")
    log_dir: str = _opt("runs/latest", "Directory for metrics.jsonl, the loss plot and TensorBoard.")
    log_interval: int = _opt(1, "Write metrics every n steps.", megatron='100')
    tensorboard: bool = _opt(False, "Also write TensorBoard events (needs the tensorboard package).")
    progress: bool = _opt(True, "Show a progress bar on rank 0.")
    loss_plot: bool = _opt(True, "Draw loss.png in --log-dir at the end (about a second of matplotlib).")
    moe_replan_interval: int = _opt(0, "Re-plan the expert placement from the observed loads every n steps and "
                                       "migrate experts live when it pays (0 = off).")
    moe_replan_min_gain: float = _opt(0.02, "Migrate a layer only when its predicted max-rank compute improves by more "
                                            "than this fraction (0.02 was as good as 0.03 or better on every trace of "
                                            "benchmarks/replan.py: with the move budget each migration is a smaller step).")
    moe_replan_policy: str = _opt("planner", "planner (the C++ planner on the observed loads) or random (a random "
                                             "equal-memory placement every time: tests migration).",
                                  choices=("planner", "random"))
    moe_replan_move_slack: float = _opt(0.01, "Accept a plan this fraction worse in max compute if it moves fewer "
                                              "bytes.")
    moe_replan_max_move: float = _opt(0.1, "Largest share of the expert bytes one re-plan may move (weights and "
                                           "optimizer state; 1 = no limit). Layers with few experts may need more: "
                                           "the smallest memory-preserving move of the paper's 8 experts at EP 2 is half of them.")
    moe_replan_ema_decay: float = _opt(0.5, "Decay of the moving average of tokens per expert (per step; 0.5 "
                                            "beat 0.7 and 0.9 on every trace of benchmarks/replan.py).")
    save_lock_timeout: float = _opt(600.0, "Seconds without a heartbeat after which another host's lock on --save "
                                           "counts as stale and is taken over.")
    debug_nonfinite_at: list[int] | None = _opt(None, "Testing aid: make the loss of these iterations NaN "
                                                      "(exercises the non-finite handling end to end).")
    debug_router_logit_bias: list[float] | None = _opt(None, "Testing aid: a constant added to the router logit of "
                                                             "each logical expert (one per expert), to skew routing on "
                                                             "purpose (benchmarks/replan_busy.py).")
    debug_die_during_save: int | None = _opt(None, "Testing aid: the last rank exits (code 9) in the middle of the "
                                                   "save of this iteration, after writing its part, as a rank killed "
                                                   "mid-save would.")


SECTIONS: tuple[type, ...] = (ModelArgs, ParallelArgs, OptimArgs, DataArgs, RunArgs, MoDSEConfig)


@dataclass
class PretrainArgs:
    """All pretraining options, one instance per section."""

    model: ModelArgs
    parallel: ParallelArgs
    optim: OptimArgs
    data: DataArgs
    run: RunArgs
    modse: MoDSEConfig

    def to_dict(self) -> dict[str, Any]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PretrainArgs":
        """Inverse of :meth:`to_dict` (e.g. the options stored in a checkpoint); fields this
        version does not know are ignored, missing ones take their defaults."""
        parts = []
        for f, section in zip(dataclasses.fields(cls), SECTIONS):
            known = {g.name for g in dataclasses.fields(section)}
            values = {k: v for k, v in (data.get(f.name) or {}).items() if k in known}
            parts.append(section(**values))
        return cls(*parts)

    def places_experts(self) -> bool:
        """MoDSE experts spread over several EP ranks: placement matters (loads and compute
        imbalance are logged, --moe-replan-interval may move experts)."""
        return bool(self.model.num_experts) and self.model.moe_layer_impl == "modse" and \
            self.parallel.expert_model_parallel_size > 1

    def moe_layer_numbers(self) -> list[int]:
        """1-based numbers of the MoE layers (megatron's ``moe_layer_freq`` pattern; [] if dense)."""
        from modse_megatron.config import moe_layer_indices

        return [i + 1 for i in moe_layer_indices(modse_view(self))] if self.model.num_experts else []

    def expert_widths(self) -> list[int]:
        """Every MoE layer's expert widths in logical order ([] for a dense model)."""
        m = self.model
        if not m.num_experts:
            return []
        if m.moe_layer_impl == "megatron":
            return [m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size] * m.num_experts
        return self.modse.expert_widths(modse_view(self))


def _fields() -> dict[str, tuple[type, dataclasses.Field]]:
    out: dict[str, tuple[type, dataclasses.Field]] = {}
    for section in SECTIONS:
        for f in dataclasses.fields(section):
            assert f.name not in out, f"option {f.name} defined twice"
            out[f.name] = (section, f)
    return out


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of a field annotation such as ``int | None``."""
    hint = annotation
    if isinstance(hint, str):
        hint = eval(hint, {**vars(typing), "list": list})  # annotations are postponed strings
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        hint = rest[0]
    return hint, optional


def _parse_list(item_type: type):
    def parse(text: str) -> list:
        try:
            return [item_type(x) for x in str(text).replace(" ", "").split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item_type.__name__}, got {text!r}")
    return parse


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    """Check/convert a YAML value to the field's type."""
    hint, optional = _base_type(f.type)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"option {name} cannot be null: give a value or remove the key")
    origin = typing.get_origin(hint)
    try:
        if origin is list:
            (item,) = typing.get_args(hint)
            if name == "data_path":
                return [str(v) for v in (value if isinstance(value, list) else str(value).split())]
            return [item(v) for v in value] if isinstance(value, list) else _parse_list(item)(value)
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint is str:
            return str(value)
        return hint(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"option {name}: {value!r} is not a valid {getattr(hint, '__name__', hint)}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``modse-pretrain`` parser, generated from the option dataclasses."""
    parser = argparse.ArgumentParser(
        prog="modse-pretrain",
        description="Pretrain a MoDSE (Mixture of Diverse Size Experts) GPT with megatron-core. "
        "Launch with torchrun; options come from --config YAML, overridden by flags.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # a misspelt flag is an error, never a silent prefix match
    )
    parser.add_argument("--config", help="YAML file of options (keys are the flag names).")
    for section in SECTIONS:
        group = parser.add_argument_group(section.__name__, (section.__doc__ or "").strip().splitlines()[0])
        for f in dataclasses.fields(section):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            hint, _ = _base_type(f.type)
            default = f.default if f.default is not dataclasses.MISSING else None
            theirs = f.metadata.get("megatron")
            help_text += f" (default: {default}" + (f"; Megatron-LM: {theirs}" if theirs is not None else "") + ")"
            if hint is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text, dest=f.name)
            elif typing.get_origin(hint) is list:
                (item,) = typing.get_args(hint)
                if f.name == "data_path":
                    group.add_argument(flag, nargs="+", help=help_text, dest=f.name)
                else:
                    group.add_argument(flag, type=_parse_list(item), help=help_text, dest=f.name)
            else:
                group.add_argument(flag, type=hint, choices=f.metadata.get("choices"), help=help_text, dest=f.name)
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: fix the syntax ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    return data


#: Options that are alternative ways to say one thing: a command-line flag for one of them
#: replaces whichever of them the YAML file set (instead of "both set").
_ALTERNATIVES = (("moe_expert_widths", "moe_expert_size_ratios", "moe_expert_size_preset"),)


def parse_args(argv: list[str] | None = None) -> PretrainArgs:
    """Defaults < YAML < command line; then every section's validation."""
    fields = _fields()
    parser = build_parser()

    def fail(message: str) -> None:
        raise ConfigError(message)

    parser.error = fail  # type: ignore[method-assign]
    cli = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if "config" in cli:
        for key, value in load_config_file(cli.pop("config")).items():
            name = str(key).replace("-", "_")
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"unknown option {key!r} in the config file{hint}: remove or rename it")
            values[name] = _coerce(name, value, fields[name][1])
    for group in _ALTERNATIVES:  # a flag replaces the YAML's choice among alternative specs
        if any(name in cli for name in group):
            for name in group:
                values.pop(name, None)
    values.update(cli)
    by_section: dict[type, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in values.items():
        by_section[fields[name][0]][name] = value
    args = PretrainArgs(*(section(**by_section[section]) for section in SECTIONS))
    validate(args)
    return args


def validate(args: PretrainArgs) -> None:
    """Layout and option checks that need no torch; one-line errors naming the fix."""
    m, p, o = args.model, args.parallel, args.optim
    positive = {
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
        "seq_length": m.seq_length, "micro_batch_size": o.micro_batch_size, "train_iters": o.train_iters,
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "expert_model_parallel_size": p.expert_model_parallel_size, "eval_iters": args.run.eval_iters,
        "eval_interval": args.run.eval_interval, "log_interval": args.run.log_interval,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}")
    if m.num_attention_heads % p.tensor_model_parallel_size:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--tensor-model-parallel-size {p.tensor_model_parallel_size}: choose a TP size that divides it")
    if m.num_layers % p.pipeline_model_parallel_size:
        raise ConfigError(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size "
                          f"{p.pipeline_model_parallel_size}: choose a PP size that divides it")
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1: drop the flag or raise TP")
    moe = bool(m.num_experts)
    if moe:
        if m.num_experts % p.expert_model_parallel_size:
            raise ConfigError(f"--num-experts {m.num_experts} is not divisible by --expert-model-parallel-size "
                              f"{p.expert_model_parallel_size}: choose an EP size that divides it")
        if not 1 <= m.moe_router_topk <= m.num_experts:
            raise ConfigError(f"--moe-router-topk {m.moe_router_topk} must be between 1 and --num-experts {m.num_experts}")
        if m.moe_router_topk == 1 and m.moe_router_score_function == "softmax" and not m.moe_router_pre_softmax:
            raise ConfigError("--moe-router-topk 1 with a softmax router needs --moe-router-pre-softmax "
                              "(a softmax over one chosen logit is always 1: the router would get no gradient)")
        if m.moe_layer_impl == "megatron" and _uses_modse_sizes(args.modse):
            raise ConfigError("--moe-layer-impl megatron builds uniform experts: drop the MoDSE expert-size options or use --moe-layer-impl modse")
        if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
            raise ConfigError("megatron MoE layers with tensor parallelism need --sequence-parallel: add it")
        if m.moe_layer_impl == "modse":
            _validate_modse(args)
    elif p.expert_model_parallel_size > 1 or _uses_modse_sizes(args.modse):
        raise ConfigError("expert options need an MoE model: set --num-experts (or drop --expert-model-parallel-size / expert sizes)")
    if m.fp8_format and m.bf16 is False:
        raise ConfigError("--fp8-format needs --bf16 (FP8 GEMMs run inside a bf16 model): add --bf16")
    if p.distributed_timeout_minutes <= 0:
        raise ConfigError("--distributed-timeout-minutes must be positive")
    r = args.run
    if r.moe_replan_interval < 0 or not 0 <= r.moe_replan_ema_decay < 1 or r.moe_replan_min_gain < 0:
        raise ConfigError("--moe-replan-interval must be >= 0, --moe-replan-ema-decay in [0, 1), --moe-replan-min-gain >= 0")
    if not 0 < r.moe_replan_max_move <= 1:
        raise ConfigError(f"--moe-replan-max-move {r.moe_replan_max_move:g} must be in (0, 1]: the largest share of the "
                          f"expert bytes one re-plan may move (1 = no limit)")
    if r.debug_router_logit_bias is not None and (m.moe_layer_impl != "modse" or len(r.debug_router_logit_bias) != (m.num_experts or 0)):
        raise ConfigError(f"--debug-router-logit-bias gives {len(r.debug_router_logit_bias)} values: it needs a MoDSE MoE "
                          f"model (--moe-layer-impl modse) and one value per expert (--num-experts {m.num_experts})")
    if r.moe_replan_interval and not args.places_experts():
        raise ConfigError("--moe-replan-interval moves experts between EP ranks: it needs a MoDSE MoE model "
                          "(--num-experts, --moe-layer-impl modse) with --expert-model-parallel-size > 1")
    if o.skip_nonfinite_steps < 0:
        raise ConfigError("--skip-nonfinite-steps must be 0 or more")
    if args.run.save_interval is not None and args.run.save_interval <= 0:
        raise ConfigError("--save-interval must be positive")
    if args.run.finetune and not args.run.load:
        raise ConfigError("--finetune needs --load DIR: say which checkpoint's weights to start from")
    if args.run.save_interval and not args.run.save:
        raise ConfigError("--save-interval needs --save DIR: say where checkpoints go")
    decay = o.lr_decay_iters or o.train_iters
    if o.lr_warmup_iters >= decay:
        raise ConfigError(f"--lr-warmup-iters {o.lr_warmup_iters} must be smaller than the decay length {decay} "
                          f"(--lr-decay-iters, default --train-iters): shorten the warm-up")
    if o.min_lr > o.lr:
        raise ConfigError(f"--min-lr {o.min_lr} is larger than --lr {o.lr}")


def modse_view(args: PretrainArgs):
    """The TransformerConfig fields MoDSEConfig reads, from the options alone (no torch)."""
    from types import SimpleNamespace

    m, p = args.model, args.parallel
    return SimpleNamespace(
        num_moe_experts=m.num_experts,
        num_layers=m.num_layers,
        moe_layer_freq=m.moe_layer_freq,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size,
        add_bias_linear=not m.disable_bias_linear,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        fp8=m.fp8_format,
    )


def _validate_modse(args: PretrainArgs) -> None:
    """MoDSEConfig's own checks, against the TransformerConfig fields it reads, before any
    process group exists (so every rank fails at once with the same line)."""
    try:
        args.modse.validate(modse_view(args))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _uses_modse_sizes(c: MoDSEConfig) -> bool:
    return bool(c.moe_expert_widths or c.moe_expert_size_ratios or (c.moe_expert_size_preset not in (None, "uniform")))


def world_layout(args: PretrainArgs, world_size: int) -> dict[str, int]:
    """DP size and micro-batch count for a world size, or a ConfigError naming the fix."""
    p, o = args.parallel, args.optim
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by TP x PP = {model_parallel}: "
                          f"launch a multiple of {model_parallel} ranks")
    dp = world_size // model_parallel
    etp = p.expert_tensor_parallel_size or p.tensor_model_parallel_size
    expert_dp_span = p.expert_model_parallel_size * etp
    if (world_size // p.pipeline_model_parallel_size) % expert_dp_span:
        raise ConfigError(f"ranks per pipeline stage ({world_size // p.pipeline_model_parallel_size}) are not divisible by "
                          f"EP x expert-TP = {expert_dp_span}: change --expert-model-parallel-size or the rank count")
    gbs = o.global_batch_size or o.micro_batch_size * dp
    if gbs % (o.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {gbs} is not divisible by micro batch x DP = {o.micro_batch_size} x {dp}: "
                          f"use a multiple of {o.micro_batch_size * dp}")
    return {"dp": dp, "global_batch_size": gbs, "num_microbatches": gbs // (o.micro_batch_size * dp)}
