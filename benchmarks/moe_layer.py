"""MoDSE MoE layer forward+backward throughput vs megatron's uniform MoE layer and a dense FFN.

Prints ONE JSON object. All variants run in one process, interleaved round by round, so
they see the same machine state. The clock is this process's CPU time with one intra-op
thread (the default ``--threads 1``): on a shared machine, wall-clock steps of the same work
varied 10x with other jobs' load, while CPU time counts only the work this process did. With
``--threads N`` (N > 1) the clock is wall time (CPU time would count OpenMP spin-waits).
Throughput uses each variant's median round; the best round and every round are reported,
with the machine's load average.

* ``modse``: our layer with the paper's pair ratios (4.5:0.5,4:1,3:2,2.5:2.5), fast path;
* ``modse_loop``: the same layer with the reference loop experts (why the fast path exists);
* ``megatron_uniform``: megatron-core's own ``MoELayer`` (local spec, ``SequentialMLP``) with
  the same expert count, ``moe_ffn_hidden_size`` and therefore the same total parameters;
* ``dense``: one SwiGLU FFN of width ``topk * moe_ffn_hidden_size`` on the same tokens — the
  same FLOPs as the experts do under balanced routing, no routing, run by the same fused
  kernels as our experts (a single expert with every token at probability 1): the GEMM limit;
* ``dense_torch``: the same FFN as three plain torch ops with autograd (for reference).

Both MoE layers use megatron's forced load balancing (random router logits), so in
expectation every expert gets ``topk*T/E`` tokens and MoDSE does the same FLOPs as the uniform
layer; the measured routing of the MoDSE layer is reported as ``flops_ratio_vs_dense``.

Usage (repo root): ``python -m benchmarks.moe_layer [--tokens 2048] [--hidden 512] [--ffn 1280] [--rounds 9]``
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

RATIOS = "4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5"


def _init_single_rank() -> None:
    """A 1-rank gloo world with megatron's parallel state (what the layers need to build)."""
    import torch.distributed as dist

    import modse_megatron  # noqa: F401  (CPU layer for megatron-core)
    from modse_megatron.testing.distributed import Layout, _free_port, init_parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    init_parallel_state(Layout())


def _config(args, **extra):
    from modse_megatron.testing.megatron_utils import tiny_transformer_config

    return tiny_transformer_config(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=8, num_moe_experts=args.experts,
        moe_ffn_hidden_size=args.ffn, moe_router_topk=args.topk, moe_token_dispatcher_type="alltoall",
        moe_router_force_load_balancing=True, moe_router_load_balancing_type="none",
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu, **extra,
    )


def _modse_layer(args, impl):
    from megatron.core.transformer.spec_utils import build_module

    from modse_megatron.config import MoDSEConfig
    from modse_megatron.moe.specs import get_modse_gpt_layer_spec

    config = _config(args)
    modse = MoDSEConfig(moe_expert_size_ratios=RATIOS, moe_experts_impl=impl)
    return build_module(get_modse_gpt_layer_spec(modse, config).submodules.mlp, config=config)


def _megatron_layer(args):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    return build_module(get_gpt_layer_local_spec(num_experts=args.experts).submodules.mlp, config=_config(args))


class _DenseFused(torch.nn.Module):
    """The GEMM limit: one expert of width ``width`` over all tokens, probabilities 1."""

    def __init__(self, args, width):
        super().__init__()
        from modse_megatron.moe.experts import MoDSEExperts

        self.ffn = MoDSEExperts(1, _config(args), expert_widths=[width], logical_ids=[0], impl="grouped")

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        count = torch.tensor([x_TD.shape[0]])
        y_TD, _ = self.ffn(x_TD, count, x_TD.new_ones(x_TD.shape[0]))
        return y_TD.view(x.shape), None


class _DenseSwiGLU(torch.nn.Module):
    """The GEMM limit: x -> (silu(x W_gate) * x W_up) W_down, width ``topk * ffn``."""

    def __init__(self, hidden, width):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(2 * width, hidden) * 0.02)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, width) * 0.02)

    def forward(self, x):
        gate, up = (x @ self.w1.t()).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w2.t(), None


def _step(module, x, dy):
    module.zero_grad(set_to_none=True)
    x.grad = None
    out, _ = module(x)
    out.backward(dy)


def _saved_activation_bytes(module, x) -> int:
    """Bytes autograd keeps for backward (unique storages saved during one forward)."""
    storages: dict[int, int] = {}

    def pack(t):
        if t.requires_grad and t.grad_fn is None:  # a parameter or the input: not an activation
            return t
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = module(x)
    del out
    return sum(storages.values())


def _params(module, experts_only):
    return sum(p.numel() for n, p in module.named_parameters() if not experts_only or "experts" in n)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1280, help="moe_ffn_hidden_size (multiple of 5 for the ratios)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _init_single_rank()
    torch.manual_seed(0)

    variants = {
        "modse": _modse_layer(args, "auto"),
        "modse_loop": _modse_layer(args, "loop"),
        "megatron_uniform": _megatron_layer(args),
        "dense": _DenseFused(args, args.topk * args.ffn),
        "dense_torch": _DenseSwiGLU(args.hidden, args.topk * args.ffn),
    }
    seq = args.tokens // 4
    x = torch.randn(seq, 4, args.hidden, requires_grad=True)
    dy = torch.randn(seq, 4, args.hidden)
    for module in variants.values():  # warm-up (allocator, MKL/oneDNN kernels)
        _step(module, x, dy)
        _step(module, x, dy)
    times: dict[str, list[float]] = {name: [] for name in variants}
    modse_router = variants["modse"].router
    modse_router.reset_routing_stats()
    clock = time.process_time if args.threads == 1 else time.perf_counter
    for _ in range(args.rounds):
        for name, module in variants.items():
            t0 = clock()
            _step(module, x, dy)
            times[name].append(clock() - t0)

    tokens_per_s = {name: args.tokens / statistics.median(ts) for name, ts in times.items()}
    tokens_per_s_best = {name: args.tokens / min(ts) for name, ts in times.items()}
    experts = variants["modse"].experts  # EP = 1: every expert is local
    widths = [w for _, w in sorted(zip(experts.logical_ids, experts.expert_widths))]  # logical order
    routed = modse_router.routing_stats.double() / args.rounds  # per logical expert, per step
    modse_expert_flops = float((routed * torch.tensor(widths, dtype=torch.float64)).sum()) * args.hidden * 6 * 3
    dense_flops = args.tokens * args.topk * args.ffn * args.hidden * 6 * 3
    result = {
        "benchmark": "moe_layer_forward_backward",
        "config": {
            "tokens": args.tokens, "hidden": args.hidden, "moe_ffn_hidden_size": args.ffn,
            "experts": args.experts, "topk": args.topk, "ratios": RATIOS, "widths": widths,
            "activation": "swiglu", "dtype": "float32", "threads": args.threads, "rounds": args.rounds,
            "routing": "forced balanced (random logits)", "device": "cpu",
        },
        "clock": "process CPU time, 1 thread" if args.threads == 1 else "wall time",
        "tokens_per_s": {k: round(v, 1) for k, v in tokens_per_s.items()},
        "tokens_per_s_best_round": {k: round(v, 1) for k, v in tokens_per_s_best.items()},
        "step_ms_all_rounds": {k: [round(1e3 * t, 1) for t in v] for k, v in times.items()},
        "expert_params": {
            "modse": _params(variants["modse"], True),
            "megatron_uniform": _params(variants["megatron_uniform"], True),
            "dense": _params(variants["dense"], False),
            "dense_torch": _params(variants["dense_torch"], False),
        },
        "saved_activation_MiB": {
            name: round(_saved_activation_bytes(module, x) / 2**20, 1) for name, module in variants.items()
        },
        "flops_ratio_vs_dense": {"modse_measured_routing": round(modse_expert_flops / dense_flops, 4)},
        "speedup": {
            "modse_vs_megatron_uniform": round(tokens_per_s["modse"] / tokens_per_s["megatron_uniform"], 3),
            "modse_vs_dense_limit": round(tokens_per_s["modse"] / tokens_per_s["dense"], 3),
            "modse_fast_vs_loop": round(tokens_per_s["modse"] / tokens_per_s["modse_loop"], 3),
            "megatron_uniform_vs_dense_limit": round(tokens_per_s["megatron_uniform"] / tokens_per_s["dense"], 3),
            "dense_torch_vs_dense_limit": round(tokens_per_s["dense_torch"] / tokens_per_s["dense"], 3),
        },
        "speedup_best_round": {
            "modse_vs_megatron_uniform": round(tokens_per_s_best["modse"] / tokens_per_s_best["megatron_uniform"], 3),
            "modse_vs_dense_limit": round(tokens_per_s_best["modse"] / tokens_per_s_best["dense"], 3),
        },
        "targets": {"modse_vs_megatron_uniform": 1.0, "modse_vs_dense_limit": 0.85},
            "machine_load_avg_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
