"""A live migration (``replanning.migrate``, the code ``--moe-replan-interval`` runs) carries every
expert's state: after moving experts between the 2 EP ranks (a different placement per MoE layer),
every logical tensor of the model and of the distributed optimizer (weights, fp32 main params,
Adam moments) equals what it was before, element for element, although it now lives on another
rank. Each rank reports its pieces of megatron's own sharded state dicts; the test assembles the
global tensors. Both optimizers: the distributed one (fp32) and the plain one (bf16)."""
import torch

EIGHT = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--num-experts", "8", "--moe-expert-widths", "144,16,128,32,96,64,80,80", "--moe-ffn-hidden-size", "80",
         "--swiglu", "--disable-bias-linear", "--micro-batch-size", "4", "--global-batch-size", "8",
         "--expert-model-parallel-size", "2", "--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid"]
START = "0,0,0,0,1,1,1,1"  # both layers
MOVED = [[0, 1, 1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 1, 0, 0, 1]]  # every expert of layer 2 changes rank


def _pieces(ddp, optimizer, scheduler) -> list:
    """(key, global shape, global slice, flattened range, data) of this rank's main replicas."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    from modse_megatron.training.checkpointing import _state_dict

    state = _state_dict(ddp, optimizer, scheduler, False, False)
    apply_factories(state)
    out = []
    for sh in nested_values(state):
        if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id):
            fr = None if sh.flattened_range is None else (sh.flattened_range.start, sh.flattened_range.stop)
            out.append((sh.key, tuple(sh.global_shape), sh.global_slice(), tuple(sh.local_shape), fr,
                        sh.data.detach().double().clone()))
    return out


def _local_experts(ddp) -> list[list[int]]:
    """The logical experts this rank holds, per MoE layer."""
    model = ddp.module
    while not hasattr(model, "decoder"):  # (bf16: Float16Module around the GPTModel)
        model = model.module
    return [list(layer.mlp.experts.logical_ids) for layer in model.decoder.layers]


def _migrate_after_a_step(save_dir: str, extra: list[str]) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from modse_megatron.training import replanning
    from modse_megatron.training.arguments import parse_args
    from modse_megatron.training.model import build_model, transformer_config, wrap_and_optimize

    args = parse_args([*EIGHT, "--moe-expert-placement", START, "--save", save_dir, *extra])
    config = transformer_config(args)
    ddp, optimizer, scheduler = wrap_and_optimize(args, config, build_model(args, config, 128))
    # One real update (Adam moments and expert bias move away from their initial values).
    gen = torch.Generator().manual_seed(ps.get_data_parallel_rank())
    tokens = torch.randint(0, 128, (4, 33), generator=gen)
    position_ids = torch.arange(32).expand(4, 32)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = ddp(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    assert optimizer.step()[0]
    before = _pieces(ddp, optimizer, scheduler)
    local_before = _local_experts(ddp)
    ddp, optimizer, scheduler = replanning.migrate(args, config, 128, MOVED, 1, ddp, optimizer, scheduler,
                                                   {"args": args.to_dict(), "consumed_samples": 8})
    after = _pieces(ddp, optimizer, scheduler)
    local_after = _local_experts(ddp)
    return {"rank": dist.get_rank(), "before": before, "after": after, "placement": args.modse.moe_expert_placement,
            "local_before": local_before, "local_after": local_after}


def _assemble(per_rank: list[list]) -> dict[str, torch.Tensor]:
    full: dict[str, torch.Tensor] = {}
    for pieces in per_rank:
        for key, shape, where, local_shape, fr, data in pieces:
            t = full.setdefault(key, torch.full(shape, float("nan"), dtype=torch.float64))
            if fr is None:
                t[where] = data.reshape(t[where].shape)
            else:
                chunk = t[where].clone().reshape(-1)
                chunk[fr[0]:fr[1]] = data.reshape(-1)
                t[where] = chunk.view(t[where].shape)
    return full


def _check(results: list[dict]) -> None:
    assert {r["placement"] for r in results} == {";".join(",".join(map(str, p)) for p in MOVED)}
    before = _assemble([r["before"] for r in results])
    after = _assemble([r["after"] for r in results])
    assert set(before) == set(after)
    experts = [k for k in before if ".experts.expert" in k]
    moments = [k for k in experts if "exp_avg" in k]
    assert experts and moments and any("expert_bias" in k for k in before)
    for key in before:
        assert not torch.isnan(before[key]).any(), key  # every piece was reported
        assert torch.equal(before[key], after[key]), key
    assert any(float(before[k].abs().max()) > 0 for k in moments)  # a real update happened
    # the experts really changed rank: EP rank 0's slots hold other logical experts now
    rank0 = next(r for r in results if r["rank"] == 0)
    assert rank0["local_before"][0] != rank0["local_after"][0] and rank0["local_before"][1] != rank0["local_after"][1]


def test_migration_keeps_every_expert_state_distributed_optimizer(dist2, tmp_path):
    """fp32 with megatron's distributed optimizer (ZeRO-1: state sharded over DP ranks)."""
    _check(dist2.run(_migrate_after_a_step, str(tmp_path), [], ep=2, timeout=240))


def test_migration_keeps_every_expert_state_plain_optimizer_bf16(dist2, tmp_path):
    """bf16 with the plain optimizer (fp32 main params kept beside the bf16 weights). bf16 with the
    distributed optimizer migrates in tests/training/test_replan_training.py (equal losses)."""
    _check(dist2.run(_migrate_after_a_step, str(tmp_path), ["--bf16", "--no-use-distributed-optimizer"], ep=2,
                     timeout=240))
