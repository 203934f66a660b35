"""Layer specs: megatron's GPTModel builds MoDSE models (dense/MoE mixing, TP+EP+ETP, PP stages)."""
import pytest
import torch
import torch.nn.functional as F

from modse_megatron.config import MoDSEConfig
from modse_megatron.testing.megatron_utils import assert_close_rel, tiny_transformer_config, token_batch

RTOL = 1e-5
VOCAB = 128


def _gpt_config(**extra):
    from megatron.core import parallel_state as ps

    kwargs = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=8,
        moe_ffn_hidden_size=40, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=1e-2, moe_router_load_balancing_type="aux_loss", add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, moe_layer_freq=[1, 0],
    )
    if ps.get_pipeline_model_parallel_world_size() > 1:
        kwargs["pipeline_dtype"] = torch.float32
    kwargs.update(extra)
    return tiny_transformer_config(**kwargs)


def _gpt(config, modse_config, **kw):
    from megatron.core.models.gpt import GPTModel

    from modse_megatron.moe.specs import get_modse_decoder_block_spec

    spec = get_modse_decoder_block_spec(modse_config, config)
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=32, **kw)


def _mlp_kinds(model):
    from megatron.core.transformer.mlp import MLP

    from megatron.core.transformer.moe.moe_layer import MoELayer

    from modse_megatron.moe.experts import MoDSEExperts
    from modse_megatron.moe.router import MoDSERouter

    kinds = []
    for layer in model.decoder.layers:
        mlp = layer.mlp
        modse = isinstance(mlp, MoELayer) and isinstance(mlp.experts, MoDSEExperts) and isinstance(mlp.router, MoDSERouter)
        kinds.append("modse" if modse else "dense" if type(mlp) is MLP else type(mlp).__name__)
    return kinds


# ------------------------------------------------------------------ GPT loss across layouts
def _gpt_loss(preset):
    import torch.distributed as dist

    torch.manual_seed(21)  # CPU init of every module is layout-invariant given the RNG state
    model = _gpt(_gpt_config(), MoDSEConfig(moe_expert_size_preset=preset))
    # megatron refuses MoE+TP training without sequence parallelism, and sequence parallelism
    # needs a TE/Apex LayerNorm (torch's refuses it): eval mode runs the same forward/backward
    # math minus the aux loss.
    model.eval()
    tokens, positions = token_batch(2, 8, VOCAB, seed=40 + dist.get_rank() // model.config.tensor_model_parallel_size)
    token_losses = model(tokens, positions, None, labels=tokens)
    token_losses.mean().backward()
    router_grad = model.decoder.layers[0].mlp.router.weight.grad
    experts = model.decoder.layers[0].mlp.experts
    return {"kinds": _mlp_kinds(model), "losses": token_losses.detach(),
            "widths": dict(zip(experts.logical_ids, experts.expert_widths)), "router_grad_norm": router_grad.norm()}


@pytest.mark.parametrize("preset", ["paper8", "uniform"])
def test_gpt_tp2_ep2_matches_single_rank_layout(dist4, preset):
    """TP=2 (sequence parallel), EP=2, ETP=2 vs TP=EP=1: same model, same losses."""
    parallel = dist4.run(_gpt_loss, preset, tp=2, ep=2)
    # Ranks of one TP group see the same batch; data-parallel ranks see their own.
    single = dist4.run(_gpt_loss, preset)
    for rank in range(4):
        assert parallel[rank]["kinds"] == ["modse", "dense"]
        ref = single[rank // 2]  # the TP=1 rank that holds the same batch
        assert_close_rel(parallel[rank]["losses"], ref["losses"], RTOL, f"rank {rank} token losses")
        assert_close_rel(parallel[rank]["router_grad_norm"], ref["router_grad_norm"], RTOL, f"rank {rank} router grad")
    expected = [72, 8, 64, 16, 48, 32, 40, 40] if preset == "paper8" else [40] * 8
    held = {}
    for rank in range(4):  # every logical expert is held (by its EP rank) with its own width
        held.update(parallel[rank]["widths"])
    assert held == dict(enumerate(expected))


def _dense_gpt():
    model = _gpt(_gpt_config(num_moe_experts=None, moe_ffn_hidden_size=None, moe_layer_freq=1, ffn_hidden_size=64), MoDSEConfig())
    tokens, positions = token_batch(2, 8, VOCAB, seed=3)
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    return _mlp_kinds(model), bool(torch.isfinite(loss))


def _layer_build_warnings():
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    logger.addHandler(handler)
    try:
        _gpt(_gpt_config(), MoDSEConfig(moe_expert_size_preset="paper8"))
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records]


def test_transformer_layer_hands_the_moe_layer_its_process_groups_one_rank(one_rank):
    messages = _layer_build_warnings()
    assert not [m for m in messages if "Unknown MLP type" in m], messages


def test_transformer_layer_hands_the_moe_layer_its_process_groups(dist2):
    """The spec's MLP is megatron's MoELayer (with MoDSE experts/router), which megatron's
    TransformerLayer recognises: it passes the model's process groups instead of warning
    "Unknown MLP type ... Using default kwargs" (it did for a MoELayer subclass)."""
    for messages in dist2.run(_layer_build_warnings):
        assert not [m for m in messages if "Unknown MLP type" in m], messages


def test_sequence_parallel_local_specs_get_norms_that_support_it(one_rank):
    """megatron's local torch norms refuse sequence parallelism: the MoDSE specs (block and
    layer) swap in ones that support it, so library users building their own GPTModel get them."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from modse_megatron.moe.specs import get_modse_decoder_block_spec, get_modse_gpt_layer_spec
    from modse_megatron.platform.megatron_0_16.norm import SequenceParallelTorchNorm

    def norms(spec):
        found = []

        def walk(obj):
            if obj in (WrappedTorchNorm, SequenceParallelTorchNorm):
                found.append(obj)
            elif hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
                for name in obj.__dataclass_fields__:
                    walk(getattr(obj, name))
            elif isinstance(obj, (list, tuple)):
                for o in obj:
                    walk(o)
        walk(spec)
        return found

    modse = MoDSEConfig(moe_expert_size_preset="paper8")
    for sequence_parallel in (False, True):
        config = _gpt_config()
        config.sequence_parallel = sequence_parallel  # (megatron checks TP > 1 only at __post_init__)
        for spec in (get_modse_decoder_block_spec(modse, config), get_modse_gpt_layer_spec(modse, config)):
            expected = SequenceParallelTorchNorm if sequence_parallel else WrappedTorchNorm
            assert norms(spec) and set(norms(spec)) == {expected}, (sequence_parallel, norms(spec))


def test_dense_baseline_through_the_same_spec_one_rank(one_rank):
    assert _dense_gpt() == (["dense", "dense"], True)


def test_dense_baseline_through_the_same_spec(dist2):
    for kinds, finite in dist2.run(_dense_gpt):
        assert kinds == ["dense", "dense"] and finite


# ------------------------------------------------------------------ pipeline stages
def _pp_stage_layers():
    from megatron.core import parallel_state as ps

    from modse_megatron.moe.specs import get_modse_decoder_block_spec

    config = _gpt_config(num_layers=4, moe_layer_freq=[1, 0, 0, 1])
    block = get_modse_decoder_block_spec(MoDSEConfig(moe_expert_size_preset="paper8"), config)
    stage = ps.get_pipeline_model_parallel_rank()
    model = _gpt(config, MoDSEConfig(moe_expert_size_preset="paper8"),
                 pre_process=stage == 0, post_process=stage == 1)
    numbers = [layer.layer_number for layer in model.decoder.layers]
    return stage, len(block.layer_specs), _mlp_kinds(model), numbers


def test_pipeline_stages_build_only_their_layers(dist2):
    results = dict((stage, rest) for stage, *rest in (tuple(r) for r in dist2.run(_pp_stage_layers, pp=2)))
    assert results[0] == [2, ["modse", "dense"], [1, 2]]
    assert results[1] == [2, ["dense", "modse"], [3, 4]]


# ------------------------------------------------------------------ checkpoint keys per layer
def _gpt_expert_keys():
    model = _gpt(_gpt_config(num_layers=3, moe_layer_freq=[1, 0, 1]), MoDSEConfig(moe_expert_size_preset="paper8"))
    keys = set()
    for value in model.sharded_state_dict().values():
        built = value.build() if hasattr(value, "build_fn") else value
        keys |= {sh.key for sh in (built if isinstance(built, list) else [built]) if ".experts." in sh.key}
    return keys


def _gpt_moe_layer_widths():
    """(MLP kind per layer, logical id -> width of the first MoE layer's experts) at EP=1."""
    model = _gpt(_gpt_config(num_layers=3, moe_layer_freq=[1, 0, 1]), MoDSEConfig(moe_expert_size_preset="paper8"))
    experts = model.decoder.layers[0].mlp.experts
    return _mlp_kinds(model), dict(zip(experts.logical_ids, experts.expert_widths))


def test_gpt_checkpoint_has_one_key_per_logical_expert_per_layer_one_rank(one_rank):
    assert _gpt_expert_keys() == {f"decoder.layers.{layer}.mlp.experts.expert{e}.{name}.weight"
                                  for layer in (0, 2) for e in range(8) for name in ("linear_fc1", "linear_fc2")}
    kinds, widths = _gpt_moe_layer_widths()
    assert kinds == ["modse", "dense", "modse"]  # moe_layer_freq decides, layer by layer
    assert widths == dict(enumerate([72, 8, 64, 16, 48, 32, 40, 40]))  # paper pairs of width 40


def test_gpt_checkpoint_has_one_key_per_logical_expert_per_layer(dist2):
    keys = set().union(*dist2.run(_gpt_expert_keys, ep=2))
    assert keys == {f"decoder.layers.{layer}.mlp.experts.expert{e}.{name}.weight"
                    for layer in (0, 2) for e in range(8) for name in ("linear_fc1", "linear_fc2")}


# ------------------------------------------------------------------ TransformerEngine backend
@pytest.mark.gpu
def test_transformer_engine_backend_spec():
    from megatron.core.transformer import TransformerConfig

    from megatron.core.transformer.moe.moe_layer import MoELayer

    from modse_megatron.moe.experts import MoDSEExperts
    from modse_megatron.moe.specs import get_modse_gpt_layer_spec

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_moe_experts=8,
                               moe_ffn_hidden_size=40, add_bias_linear=False)
    spec = get_modse_gpt_layer_spec(MoDSEConfig(moe_expert_size_preset="paper8"), config, backend="te")
    assert spec.submodules.mlp.module is MoELayer
    assert spec.submodules.mlp.submodules.experts.module is MoDSEExperts


# ------------------------------------------------------------------ DDP + distributed optimizer
def _train_steps(steps=3):
    """megatron DDP + distributed optimizer on a MoDSE GPT: per-step losses (averaged over the
    data-parallel ranks) and the final logical expert weights."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    torch.manual_seed(5)
    config = _gpt_config()
    model = _gpt(config, MoDSEConfig(moe_expert_size_preset="paper8"))
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.0,
                        use_distributed_optimizer=True), [ddp],
    )
    losses = []
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        tokens, positions = token_batch(2, 8, VOCAB, seed=1000 * step + dist.get_rank())
        loss = ddp(tokens, positions, None, labels=tokens).mean()
        loss.backward()
        ddp.finish_grad_sync()
        assert optimizer.step()[0], "optimizer step skipped"
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean / dist.get_world_size())
    experts = model.decoder.layers[0].mlp.experts.full_expert_tensors()
    group = ps.get_expert_model_parallel_group()
    everyone = [None] * group.size()
    dist.all_gather_object(everyone, experts, group=group)
    return torch.stack(losses), {lid: pair for part in everyone for lid, pair in part.items()}


def test_ddp_distributed_optimizer_ep2_matches_ep1(dist2):
    """Expert params are reduced over the expert-data-parallel group (their ``allreduce``
    attribute): 3 Adam steps at EP=2 give the same losses and expert weights as at EP=1."""
    ep2, ep1 = dist2.run(_train_steps, ep=2)[0], dist2.run(_train_steps, ep=1)[0]
    assert_close_rel(ep2[0], ep1[0], RTOL, "per-step losses")
    assert not torch.allclose(ep1[0][0], ep1[0][-1])  # training moved the loss
    assert sorted(ep2[1]) == sorted(ep1[1]) == list(range(8))
    for lid, (w1, w2) in ep1[1].items():
        assert_close_rel(ep2[1][lid][0], w1, RTOL, f"expert {lid} fc1 after 3 steps")
        assert_close_rel(ep2[1][lid][1], w2, RTOL, f"expert {lid} fc2 after 3 steps")


def test_each_moe_layer_gets_its_own_placement(one_rank):
    """A per-layer moe_expert_placement (';'-separated, MoE layers in model order): every MoE
    layer's experts and router get that layer's slot order, on every pipeline stage (global
    layer numbers, megatron's slicing); one list or a named mode serves every layer."""
    from modse_megatron.moe.specs import get_modse_decoder_block_spec, get_modse_gpt_layer_spec

    def slots(block):
        out = []
        for spec in block.layer_specs:
            mlp = spec.submodules.mlp
            if mlp.submodules is not None and getattr(mlp.submodules, "experts", None) is not None:
                experts, router = mlp.submodules.experts, mlp.submodules.router
                assert experts.params["slot_to_logical"] == router.keywords["slot_to_logical"]
                out.append(experts.params["slot_to_logical"])
            else:
                out.append(None)
        return out

    first, second = "0,0,0,0,1,1,1,1", "1,0,1,0,1,0,1,0"
    modse = MoDSEConfig(moe_expert_size_preset="paper8", moe_expert_placement=f"{first};{second}")
    config = _gpt_config(num_layers=4, moe_layer_freq=[1, 0, 0, 1], expert_model_parallel_size=2)
    whole = slots(get_modse_decoder_block_spec(modse, config))
    assert whole == [[0, 1, 2, 3, 4, 5, 6, 7], None, None, [1, 3, 5, 7, 0, 2, 4, 6]]
    config.pipeline_model_parallel_size = 2  # stage slicing by global layer number
    stages = [slots(get_modse_decoder_block_spec(modse, config, pp_rank=r)) for r in (0, 1)]
    assert stages == [whole[:2], whole[2:]]
    config.pipeline_model_parallel_size = 1
    one = slots(get_modse_decoder_block_spec(MoDSEConfig(moe_expert_size_preset="paper8",
                                                         moe_expert_placement=second), config))
    assert one == [whole[3], None, None, whole[3]]
    with pytest.raises(ValueError, match="gives 3 per-layer placements but the model has 2 MoE layers"):
        get_modse_decoder_block_spec(MoDSEConfig(moe_expert_size_preset="paper8",
                                                 moe_expert_placement=f"{first};{second};{first}"), config)
    with pytest.raises(ValueError, match="use get_modse_decoder_block_spec"):
        get_modse_gpt_layer_spec(modse, config)
