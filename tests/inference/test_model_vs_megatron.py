"""The reference model reproduces megatron's GPTModel: same export tensors, same logits (fp32,
‖a−e‖/‖e‖ ≤ 1e-5), for MoDSE / dense / shared-expert / sequence-routed / sigmoid+bias models.

megatron runs in THIS process (one gloo rank, parallel_state initialised once per module), built
as the training driver builds it: ``parse_args`` -> ``transformer_config`` -> ``build_model``.
Weights are drawn with a large std (0.1) and every bias, norm and expert bias is randomised, so
a missing bias, a swapped gate/up half or a wrong routing probability moves the logits by far
more than the tolerance (a mutated router moves them by ~1e-1, see the sanity checks).
"""
import dataclasses
import re

import pytest
import torch

from modse_megatron.inference import ExportError, ReferenceGPT, export_config_from_gpt_model, export_config_from_megatron
from modse_megatron.inference.generate import generate

from . import rel_error, write_export

RTOL = 1e-5
VOCAB = 250  # padded to 256 like megatron-LM pads
BASE = "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --init-method-std 0.1 "
MODSE = "--num-experts 4 --moe-expert-widths 96,32,80,48 --swiglu --disable-bias-linear --moe-router-topk 2 "

# name: (flags, TransformerConfig attributes set after parsing, GPTModel keyword overrides)
CASES = {
    "modse_swiglu": (MODSE, {}, {}),
    "dense_gelu_bias_layernorm": ("--ffn-hidden-size 48", {}, {}),
    "modse_rmsnorm_rope_untied_gqa": (
        "--num-experts 4 --moe-expert-widths 96,32,80,48 --swiglu --disable-bias-linear --moe-router-topk 2 "
        "--normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights --num-query-groups 2",
        {}, {}),
    "dense_rope_partial_interleaved": (
        "--swiglu --disable-bias-linear --position-embedding-type rope --num-query-groups 1",
        {"rotary_interleaved": True}, {"rotary_percent": 0.5, "rotary_base": 500}),
    "modse_shared_expert_gated_every_2nd_layer": (
        MODSE + "--moe-shared-expert-intermediate-size 24 --moe-layer-freq 2", {"moe_shared_expert_gate": True}, {}),
    "modse_sequence_routing": (MODSE + "--moe-routing-granularity sequence", {}, {}),
    "modse_sigmoid_expert_bias_random_router": (
        MODSE + "--moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-type random", {}, {}),
    "modse_pre_softmax_scaled_top3_fp64_router": (
        MODSE.replace("--moe-router-topk 2", "--moe-router-topk 3"),
        {"moe_router_pre_softmax": True, "moe_router_topk_scaling_factor": 2.5, "moe_router_dtype": "fp64"}, {}),
}


@pytest.fixture(scope="module")
def megatron_rank():
    """One gloo rank in this process with megatron's parallel_state (TP=PP=EP=1)."""
    import torch.distributed as dist

    import modse_megatron  # noqa: F401  (megatron-core on CPU)
    from modse_megatron.testing.distributed import Layout, destroy_parallel_state, init_parallel_state

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        pytest.skip("this process already belongs to a multi-rank group")
    init_parallel_state(Layout())
    yield
    destroy_parallel_state()
    if created:
        dist.destroy_process_group()


def _build(flags: str, config_attrs: dict, gpt_kwargs: dict, slot_to_logical=None):
    """(megatron GPTModel in eval mode with randomised biases/norms, parsed args)."""
    from megatron.core.models.gpt import GPTModel

    from modse_megatron.training.arguments import parse_args
    from modse_megatron.training.model import build_model, padded_vocab_size, transformer_config

    args = parse_args((BASE + flags).split())
    config = transformer_config(args)
    for name, value in config_attrs.items():
        setattr(config, name, value)
    torch.manual_seed(11)
    if not gpt_kwargs and slot_to_logical is None:
        model = build_model(args, config, padded_vocab_size(VOCAB, 1))
    else:  # build_model's GPTModel with a placement / RoPE arguments it does not expose
        model = GPTModel(
            config=config, transformer_layer_spec=_block_spec(args, config, slot_to_logical),
            vocab_size=padded_vocab_size(VOCAB, 1), max_sequence_length=args.model.seq_length,
            share_embeddings_and_output_weights=not args.model.untie_embeddings_and_output_weights,
            position_embedding_type=args.model.position_embedding_type, **gpt_kwargs,
        )
    _randomise_biases_and_norms(model)
    return model.eval(), args


def _block_spec(args, config, slot_to_logical):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from modse_megatron.moe.layer import modse_moe_submodules
    from modse_megatron.moe.specs import get_modse_decoder_block_spec

    if not config.num_moe_experts:
        return get_gpt_layer_local_spec(normalization=config.normalization)
    block = get_modse_decoder_block_spec(args.modse, config)
    for spec in block.layer_specs:
        mlp = spec.submodules.mlp
        if getattr(mlp, "module", None) is MoELayer:
            mlp.submodules, _, _ = modse_moe_submodules(config, args.modse, 1, mlp.submodules, slot_to_logical=slot_to_logical)
    return block


@torch.no_grad()
def _randomise_biases_and_norms(model) -> None:
    """megatron initialises biases to 0, norms to 1 and the expert bias to 0: values under
    which a forgotten bias or norm parameter would go unnoticed."""
    gen = torch.Generator().manual_seed(5)
    for name, param in model.named_parameters():
        if "layernorm" in name:
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
        elif name.endswith(".bias") or name.endswith("gate_weight"):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    for module in model.modules():
        if getattr(module, "expert_bias", None) is not None:
            module.expert_bias.copy_(torch.randn(module.expert_bias.shape, generator=gen) * 0.3)


def _reference(model) -> ReferenceGPT:
    from modse_megatron.checkpoint.names import model_export_state

    ref = ReferenceGPT(export_config_from_gpt_model(model, vocab_size=VOCAB))
    ref.load_tensors(model_export_state(model))
    return ref.eval()


def _tokens(batch=2, seq=12, seed=3):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _megatron_logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None).float()


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_logits_match_megatron(megatron_rank, case):
    model, _ = _build(*CASES[case])
    ref = _reference(model)
    tokens = _tokens()
    expected = _megatron_logits(model, tokens)
    actual = ref(tokens)
    assert actual.shape == expected.shape == (2, 12, 256)
    assert rel_error(actual, expected) <= RTOL, f"{case}: relative error {rel_error(actual, expected):.2e}"


@torch.no_grad()
def test_non_identity_placement_matches_megatron(megatron_rank):
    """Physical slots [2, 0, 3, 1]: megatron's router rows and experts are permuted in memory,
    the export is in logical order, and the logits still agree."""
    from modse_megatron.checkpoint.names import model_export_state

    slots = [2, 0, 3, 1]
    model, _ = _build(MODSE, {}, {}, slot_to_logical=slots)
    moe = model.decoder.layers[0].mlp
    assert moe.experts.logical_ids == slots and moe.experts.expert_widths == [80, 96, 48, 32]
    exported = model_export_state(model)["decoder.layers.0.mlp.router.weight"]
    assert torch.equal(moe.router.weight, exported[slots]) and not torch.equal(moe.router.weight, exported)
    tokens = _tokens()
    assert rel_error(_reference(model)(tokens), _megatron_logits(model, tokens)) <= RTOL


@torch.no_grad()
def test_routing_variants_are_exercised(megatron_rank):
    """Sanity for the cases above: sequence pooling, the expert bias and the routing
    probabilities each change the logits far beyond RTOL, so matching megatron means
    they are reproduced, not merely negligible."""
    tokens = _tokens()
    for case, change in (
        ("modse_sequence_routing", dict(routing_granularity="token")),
        ("modse_sigmoid_expert_bias_random_router", dict(expert_bias=False)),
        ("modse_swiglu", dict(pre_softmax=True)),
    ):
        model, _ = _build(*CASES[case])
        ref = _reference(model)
        cfg = dataclasses.replace(ref.config, moe=dataclasses.replace(ref.config.moe, **change))
        mutated = ReferenceGPT(cfg).eval()
        state = ref.export_state_dict()
        if change.get("expert_bias") is False:
            state = {n: t for n, t in state.items() if not n.endswith("expert_bias")}
        mutated.load_tensors(state)
        assert rel_error(mutated(tokens), ref(tokens)) > 100 * RTOL, case


@torch.no_grad()
def test_export_on_disk_single_and_sharded(megatron_rank, tmp_path):
    from modse_megatron.checkpoint.names import model_export_state

    model, _ = _build(*CASES["modse_shared_expert_gated_every_2nd_layer"])
    config = export_config_from_gpt_model(model, vocab_size=VOCAB)
    tokens = _tokens()
    expected = _megatron_logits(model, tokens)
    for shards in (1, 3):
        path = write_export(tmp_path / f"export{shards}", config, model_export_state(model), shards=shards)
        ref = ReferenceGPT.from_export(path)
        assert ref.config == config
        assert rel_error(ref(tokens), expected) <= RTOL


@torch.no_grad()
def test_greedy_generation_equals_megatron_argmax(megatron_rank):
    """KV-cached greedy decoding = argmax of megatron's full forward on the growing sequence."""
    model, _ = _build(*CASES["modse_rmsnorm_rope_untied_gqa"])
    prompt = _tokens(1, 5, seed=8)[0].tolist()
    new = generate(_reference(model), prompt, 8)
    ids = list(prompt)
    for _ in range(8):
        logits = _megatron_logits(model, torch.tensor([ids]))[0, -1, :VOCAB]
        ids.append(int(torch.argmax(logits)))
    assert new == ids[len(prompt):]


def test_config_from_transformer_config_matches_model_reader(megatron_rank):
    from modse_megatron.training.model import transformer_config

    model, args = _build(*CASES["modse_sequence_routing"])
    direct = export_config_from_megatron(
        transformer_config(args), args.modse, vocab_size=VOCAB, padded_vocab_size=256,
        max_position_embeddings=16, tokenizer="tokenizer.json", eod_token_id=0,
    )
    from_model = export_config_from_gpt_model(model, vocab_size=VOCAB, tokenizer="tokenizer.json", eod_token_id=0)
    assert direct == from_model
    assert direct.moe.expert_widths == [96, 32, 80, 48] and direct.moe.routing_granularity == "sequence"
    assert direct.moe.moe_layers == [0, 1] and direct.activation == "silu" and direct.gated_linear_unit


@pytest.mark.parametrize("attrs, message", [
    ({"qk_layernorm": True}, "query/key layernorm (qk_layernorm=True) is not supported"),
    ({"activation_func": torch.tanh}, "activation tanh is not supported"),
    ({"num_moe_experts": 4, "moe_router_num_groups": 2, "moe_router_group_topk": 1}, "group-limited routing"),
    ({"params_dtype": torch.float16}, "params_dtype=torch.float16 cannot be exported"),
])
def test_unsupported_megatron_options_are_refused(megatron_rank, attrs, message):
    from modse_megatron.testing.megatron_utils import tiny_transformer_config

    config = tiny_transformer_config()
    for name, value in attrs.items():
        setattr(config, name, value)
    with pytest.raises(ExportError, match=re.escape(message)) as err:
        export_config_from_megatron(config, vocab_size=100, padded_vocab_size=128, max_position_embeddings=16)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@torch.no_grad()
def test_fused_bias_gelu_is_the_tanh_approximation(megatron_rank):
    """``bias_activation_fusion`` runs megatron's fused bias-GELU (tanh approximation, compiled
    with torch.compile - slow on CPU); the export records ``gelu_tanh`` and still matches."""
    model, _ = _build("--ffn-hidden-size 48", {"bias_activation_fusion": True}, {})
    ref = _reference(model)
    assert ref.config.activation == "gelu_tanh"
    tokens = _tokens()
    assert rel_error(ref(tokens), _megatron_logits(model, tokens)) <= RTOL
