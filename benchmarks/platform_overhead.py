"""Cost of the CPU platform layer: GPT training-step time with the layer vs plain torch.

Protocol: one process, megatron-core ``GPTModel`` (local spec, TP=1) built once, trained with
``torch.optim.Adam`` on fixed random tokens. Blocks of ``--steps`` steps alternate between the
platform layer active (the device-redirecting TorchFunctionMode, re-entered in every Python
autograd backward) and suspended (plain torch: the same model code, which for this model names
no CUDA device once an explicit attention mask is passed). The figure is the median over
``--rounds`` of the per-round time ratio; the target is < 1.05. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    import torch
    import torch.distributed as dist

    import modse_megatron  # noqa: F401
    from megatron.core import parallel_state, tensor_parallel
    from modse_megatron.platform.megatron_0_16 import cpu
    from modse_megatron.testing.megatron_utils import tiny_gpt, tiny_transformer_config, token_batch

    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    config = tiny_transformer_config(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=4
    )
    model = tiny_gpt(config, vocab_size=args.vocab_size, max_sequence_length=args.seq_length)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens, positions = token_batch(args.micro_batch_size, args.seq_length, args.vocab_size, seed=0)
    mask = torch.triu(torch.ones(1, 1, args.seq_length, args.seq_length, dtype=torch.bool), diagonal=1)

    def block() -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            model(tokens, positions, mask, labels=tokens).mean().backward()
            optimizer.step()
        return (time.perf_counter() - start) / args.steps

    block()  # warm-up both paths
    with cpu.suspended():
        block()
    with_layer, plain, ratios = [], [], []
    for _ in range(args.rounds):
        a = block()
        with cpu.suspended():
            b = block()
        with_layer.append(a)
        plain.append(b)
        ratios.append(a / b)
    ratio = statistics.median(ratios)
    print(json.dumps({
        "benchmark": "platform_overhead",
        "model": {"hidden_size": args.hidden_size, "num_layers": args.num_layers,
                  "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
                  "params": sum(p.numel() for p in model.parameters())},
        "torch_threads": torch.get_num_threads(),
        "step_s_with_layer_median": statistics.median(with_layer),
        "step_s_plain_torch_median": statistics.median(plain),
        "overhead_ratio_median": ratio,
        "overhead_ratio_per_round": ratios,
        "target_ratio_below": 1.05,
        "meets_target": ratio < 1.05,
    }))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
