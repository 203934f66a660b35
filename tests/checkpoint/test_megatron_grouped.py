"""megatron's GroupedMLP experts checkpoint -> our uniform twin (``modse-convert import --from
megatron``), at EP 1 and EP 2.

GroupedMLP keeps every local expert in two matrices (``weight1`` ``[D, E*G*F]``, ``weight2``
``[E*F, D]``) and its ``sharded_state_dict`` writes them in SequentialMLP's stacked layout
(``experts.experts.linear_fc{1,2}.weight`` ``[L, E, ...]``, transposed). Its forward needs the
``grouped_gemm`` CUDA package, its construction only asserts the package is there: the module is
built with that assertion lifted (the checkpoint is written by megatron's own code), and each
expert's output is computed with GroupedMLP's own arithmetic (``weight1.view(E, D, -1)``, GLU,
``weight2.view(E, -1, D)``: what ``gg.ops.gmm`` computes) from its parameters."""
import torch
import torch.nn.functional as F

from modse_megatron.testing.megatron_utils import tiny_transformer_config

E, D, FFN, LAYERS = 4, 32, 24, 2
CONFIG_YAML = f"""num_layers: {LAYERS}
hidden_size: {D}
num_attention_heads: 4
seq_length: 32
swiglu: true
disable_bias_linear: true
num_experts: {E}
moe_ffn_hidden_size: {FFN}
moe_layer_impl: megatron
"""


def _save_grouped(ckpt: str) -> dict:
    """Build a GPT with megatron's GroupedMLP experts under this rank's EP layout, save it with
    dist_checkpointing; return this rank's expert parameters per layer."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    lifted = gg.assert_grouped_gemm_is_available
    gg.assert_grouped_gemm_is_available = lambda: None  # (only GroupedMLP.forward needs grouped_gemm)
    try:
        config = tiny_transformer_config(num_layers=LAYERS, hidden_size=D, num_attention_heads=4, num_moe_experts=E,
                                         moe_ffn_hidden_size=FFN, moe_grouped_gemm=True, gated_linear_unit=True,
                                         activation_func=F.silu, add_bias_linear=False, moe_router_topk=2,
                                         moe_token_dispatcher_type="alltoall")
        model = GPTModel(config, get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=True), vocab_size=128,
                         max_sequence_length=32)
    finally:
        gg.assert_grouped_gemm_is_available = lifted
    experts = [layer.mlp.experts for layer in model.decoder.layers]
    assert type(experts[0]).__name__ == "GroupedMLP"
    dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    return {"ep_rank": ps.get_expert_model_parallel_rank(), "local": experts[0].num_local_experts,
            "weights": [(x.weight1.detach().clone(), x.weight2.detach().clone()) for x in experts]}


def _glu_ffn(x, w_in, w_out):
    """x [T, D] through one expert: w_in [D, 2F] (gate | up), w_out [F, D]."""
    gate, up = torch.chunk(x @ w_in, 2, dim=-1)
    return (F.silu(gate) * up) @ w_out


def _check_import(tmp_path, ckpt, per_rank: list[dict]) -> None:
    from modse_megatron.checkpoint.dcp_io import CheckpointReader
    from modse_megatron.checkpoint.describe import resolve
    from modse_megatron.checkpoint.megatron_import import import_megatron

    config = tmp_path / "model.yaml"
    config.write_text(CONFIG_YAML)
    out = tmp_path / "twin"
    import_megatron(ckpt, out, config_path=str(config))
    reader = CheckpointReader(resolve(out))
    assert reader.meta["args"]["model"]["moe_layer_impl"] == "modse"
    ours = {k: reader.read(k) for k in reader.tensors() if ".experts.expert" in k}
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    seen = set()
    for rank in per_rank:
        for layer, (weight1, weight2) in enumerate(rank["weights"]):
            w1 = weight1.view(rank["local"], D, -1)  # GroupedMLP.forward's views
            w2 = weight2.view(rank["local"], -1, D)
            for i in range(rank["local"]):
                e = rank["ep_rank"] * rank["local"] + i
                fc1 = ours[f"decoder.layers.mlp.experts.expert{e}.linear_fc1.weight"][layer]  # [2F, D]
                fc2 = ours[f"decoder.layers.mlp.experts.expert{e}.linear_fc2.weight"][layer]  # [D, F]
                assert fc1.shape == (2 * FFN, D) and fc2.shape == (D, FFN)
                assert torch.equal(fc1.t(), w1[i]) and torch.equal(fc2.t(), w2[i])
                theirs, mine = _glu_ffn(x, w1[i], w2[i]), _glu_ffn(x, fc1.t(), fc2.t())
                assert torch.equal(theirs, mine)
                seen.add((layer, e))
    assert seen == {(layer, e) for layer in range(LAYERS) for e in range(E)}


def test_grouped_mlp_checkpoint_imports_one_rank(one_rank, tmp_path):
    ckpt = tmp_path / "grouped"
    ckpt.mkdir()
    _check_import(tmp_path, ckpt, [_save_grouped(str(ckpt))])


def test_grouped_mlp_checkpoint_imports_at_ep2(dist2, tmp_path):
    ckpt = tmp_path / "grouped"
    ckpt.mkdir()
    per_rank = dist2.run(_save_grouped, str(ckpt), ep=2)
    assert sorted(r["ep_rank"] for r in per_rank) == [0, 1] and per_rank[0]["local"] == E // 2
    _check_import(tmp_path, ckpt, per_rank)
