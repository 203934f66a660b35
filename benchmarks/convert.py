"""Checkpoint conversion: export/import throughput vs a plain file copy, and peak memory.

Builds a synthetic MoDSE checkpoint of >= --gb GiB (paper pairs 4.5:0.5 ... 2.5:2.5, real key
names and shapes, random fp32 weights) with modse-convert's own writer, then measures, each in a
fresh process:

* a plain copy of the checkpoint's tensor file (``shutil.copyfile``; the same bytes),
* ``export`` (checkpoint -> safetensors, --max-shard-size = the largest tensor),
* ``import`` (safetensors -> checkpoint),

as GB/s of model bytes, and each conversion's peak RSS above the process's baseline (the same
interpreter with the same modules imported, measured in its own process) divided by the largest
tensor (resident memory sampled every 2 ms while converting, minus the resident memory right
before). All runs read warm page cache (the copy runs first). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CHILD = r"""
import json, sys, time
mode, src, dst = sys.argv[1:4]
import modse_megatron  # noqa: F401
from modse_megatron.platform.megatron_0_16.messages import quiet_megatron_warnings
quiet_megatron_warnings()
import shutil
from modse_megatron.checkpoint import export as ex
import megatron.core  # noqa: F401  (imported before timing: the exporter builds megatron's config)
from megatron.core.transformer import TransformerConfig  # noqa: F401
import modse_megatron.training.model  # noqa: F401
from modse_megatron.inference import from_megatron, model as ref  # noqa: F401
from modse_megatron.checkpoint import dcp_io, options, safe_load  # noqa: F401
import safetensors.torch  # noqa: F401
import threading, psutil, gc
gc.collect()
proc = psutil.Process()
base = proc.memory_info().rss
peak, running = [base], [True]
def sample():  # the conversion's own peak: resident memory sampled every 2 ms
    while running[0]:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
t0 = time.perf_counter()
if mode == "copy":
    shutil.copyfile(src, dst)
elif mode == "export":
    ex.export_checkpoint(src, dst, shard_bytes=int(sys.argv[4]))
elif mode == "import":
    ex.import_export(src, dst)
seconds = time.perf_counter() - t0
running[0] = False
sampler.join()
print(json.dumps({"seconds": seconds, "baseline_bytes": base, "peak_bytes": peak[0]}))
"""


def _run(mode: str, src: Path, dst: Path, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(dst), *extra], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_checkpoint(root: Path, num_layers: int, hidden: int, vocab: int, moe_ffn: int) -> tuple[int, int]:
    """Write a MoDSE checkpoint root; returns (model bytes, largest tensor bytes)."""
    import torch

    from modse_megatron.checkpoint import manifest
    from modse_megatron.checkpoint.dcp_io import CheckpointWriter
    from modse_megatron.checkpoint.export import write_export_tensor
    from modse_megatron.inference.from_megatron import export_config_from_megatron
    from modse_megatron.inference.model import ReferenceGPT
    from modse_megatron.training.arguments import parse_args
    from modse_megatron.training.model import transformer_config

    args = parse_args(["--num-layers", str(num_layers), "--hidden-size", str(hidden), "--num-attention-heads", "16",
                       "--seq-length", "1024", "--num-experts", "8", "--moe-expert-size-preset", "paper8",
                       "--moe-ffn-hidden-size", str(moe_ffn), "--swiglu", "--disable-bias-linear"])
    writer = CheckpointWriter(root / "iter_0000000")
    config = export_config_from_megatron(transformer_config(args), args.modse, vocab_size=vocab, padded_vocab_size=vocab,
                                         max_position_embeddings=1024, expert_widths=args.expert_widths())
    shapes = {n: tuple(t.shape) for n, t in ReferenceGPT(config, device="meta").export_tensors().items()}
    gen = torch.Generator().manual_seed(0)
    total = 0
    stacked: dict[str, int] = {}
    for name in sorted(shapes):
        tensor = torch.randn(shapes[name], generator=gen) * 0.02
        write_export_tensor(writer, name, tensor, num_layers)
        size = tensor.numel() * 4
        total += size
        key = name.split(".", 3)[3] if name.startswith("decoder.layers.") else name
        stacked[key] = stacked.get(key, 0) + size
    writer.finish({"meta": {"iteration": 0, "weights_only": True, "args": args.to_dict(), "integrity": manifest.INTEGRITY,
                            "tokenizer_vocab_size": vocab}})
    (root / "latest_checkpointed_iteration.txt").write_text("0")
    return total, max(stacked.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-ffn", type=int, default=2560, help="mean expert width (paper pairs scale it)")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="modse-convert-bench-"))
    try:
        ckpt = work / "ckpt"
        model_bytes, largest = synthetic_checkpoint(ckpt, args.layers, args.hidden, args.vocab, args.moe_ffn)
        tensor_file = ckpt / "iter_0000000" / "__0_0.distcp"
        copy = _run("copy", tensor_file, work / "copy.bin")
        export = _run("export", ckpt, work / "export", str(largest))
        imported = _run("import", work / "export", work / "imported")
        gb = model_bytes / 1e9

        def rss_ratio(r: dict) -> float:
            return (r["peak_bytes"] - r["baseline_bytes"]) / largest

        result = {
            "benchmark": "checkpoint conversion (modse-convert export/import) vs plain file copy",
            "model": {"layers": args.layers, "hidden": args.hidden, "experts": 8, "expert_widths": "paper8 pairs",
                      "vocab": args.vocab, "model_gb": round(gb, 3), "largest_tensor_mb": round(largest / 1e6, 1)},
            "copy_gb_per_s": round(gb / copy["seconds"], 3),
            "export_gb_per_s": round(gb / export["seconds"], 3),
            "import_gb_per_s": round(gb / imported["seconds"], 3),
            "export_vs_copy": round(copy["seconds"] / export["seconds"], 3),
            "import_vs_copy": round(copy["seconds"] / imported["seconds"], 3),
            "export_peak_rss_over_largest_tensor": round(rss_ratio(export), 2),
            "import_peak_rss_over_largest_tensor": round(rss_ratio(imported), 2),
            "baseline_rss_mb": round(export["baseline_bytes"] / 2**20, 1),
            "export_shard_bytes": largest,
        }
        result["targets"] = {
            "checkpoint_ge_1gb": gb >= 1.0,
            "export_ge_0.5x_copy": result["export_vs_copy"] >= 0.5,
            "import_ge_0.5x_copy": result["import_vs_copy"] >= 0.5,
            "export_rss_le_3x_largest": result["export_peak_rss_over_largest_tensor"] <= 3.0,
            "import_rss_le_3x_largest": result["import_peak_rss_over_largest_tensor"] <= 3.0,
        }
        print(json.dumps(result, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
