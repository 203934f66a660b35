"""``modse-convert``: inspect, reshard, export, import and verify checkpoints, in one CPU process.

    modse-convert inspect CKPT [--json]
    modse-convert reshard CKPT OUT --tensor-model-parallel-size 2 --expert-model-parallel-size 1 ...
    modse-convert export CKPT OUT_DIR [--max-shard-size 2GB] [--dtype bf16|fp32]
    modse-convert import EXPORT_DIR OUT_ROOT [--dtype bf16|fp32]
    modse-convert verify A [B]

CKPT is a ``--save`` root (its latest iteration) or one ``iter_N`` directory. Every command reads
through the allow-listed loaders (a checkpoint cannot run code), writes into a temporary
directory renamed at the end (nothing half-written, nothing overwritten) and reports problems as
one line ``modse-convert: error: ...`` with exit code 2.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Sequence

from modse_megatron.cli_common import OneLineArgumentParser, fail

PROG = "modse-convert"


def _size(text: str) -> int:
    units = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40, "b": 1}
    t = text.strip().lower()
    for unit, factor in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (write e.g. 500MB or 2GB)") from None


def build_parser():
    p = OneLineArgumentParser(prog=PROG, description="Inspect, reshard, export, import and verify MoDSE checkpoints "
                                                     "(one CPU process; no GPU, no torchrun).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineArgumentParser)
    s = sub.add_parser("inspect", help="what a checkpoint holds: iteration, layout, model, experts and placement")
    s.add_argument("ckpt", help="--save root or iter_N directory")
    s.add_argument("--json", action="store_true", help="print JSON")
    s = sub.add_parser("reshard", help="prove a checkpoint loads under a target layout and write it for that layout")
    s.add_argument("ckpt")
    s.add_argument("out", help="new checkpoint root (must not exist)")
    s.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="TP")
    s.add_argument("--pipeline-model-parallel-size", type=int, default=1, metavar="PP")
    s.add_argument("--expert-model-parallel-size", type=int, default=1, metavar="EP")
    s.add_argument("--expert-tensor-parallel-size", type=int, default=None, metavar="ETP", help="default: = TP")
    s.add_argument("--world-size", type=int, default=None, help="ranks of the target job (default: the smallest that fits)")
    s.add_argument("--moe-expert-placement", default=None, help="placement of the target (default: the checkpoint's)")
    s.add_argument("--drop-optimizer", action="store_true", help="leave the optimizer state behind (fresh Adam moments)")
    s.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="convert the model weights")
    s = sub.add_parser("export", help="safetensors + config.json (one tensor per logical expert at its width)")
    s.add_argument("ckpt")
    s.add_argument("out_dir")
    s.add_argument("--max-shard-size", type=_size, default="2GB",
                   help="split files above this size (default 2GB); export holds one file in memory, so the "
                   "largest tensor's size bounds memory by that tensor")
    s.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    s = sub.add_parser("import", help="an export (or megatron uniform-MoE / dense checkpoint) -> a checkpoint root")
    s.add_argument("source", help="export directory, or a megatron checkpoint with --from megatron-moe/--upcycle")
    s.add_argument("out_root")
    s.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    s.add_argument("--from", dest="source_kind", choices=("export", "megatron"), default="export",
                   help="export (default) or megatron: a megatron-core GPT checkpoint (uniform MoE or dense)")
    s.add_argument("--upcycle-widths", default=None,
                   help="dense checkpoint -> MoDSE: comma-separated expert widths partitioning its FFN (e.g. 96,32,80,48)")
    s.add_argument("--upcycle-topk", type=int, default=2, help="router top-k of the upcycled model (default 2)")
    s.add_argument("--upcycle-router", choices=("random", "zero"), default="random",
                   help="router init of the upcycled model: random N(0, init_std^2) or zero (uniform probabilities)")
    s.add_argument("--config", default=None,
                   help="with --from megatron: modse-pretrain YAML describing the source model (when its checkpoint "
                        "does not record modse-megatron options)")
    s = sub.add_parser("verify", help="A alone: complete and intact; A B: same tensors (names, dtypes, shapes, values)")
    s.add_argument("a")
    s.add_argument("b", nargs="?")
    return p


def _progress(total: int, what: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A byte progress bar on stderr for checkpoints over 256 MiB (else silent)."""
    if total < (256 << 20) or not sys.stderr.isatty():
        return (lambda n: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=what, file=sys.stderr)
    return bar.update, bar.close


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from modse_megatron.checkpoint.errors import CheckpointError

    try:
        import modse_megatron  # noqa: F401  (CPU layer before megatron is imported)
        from modse_megatron.platform.megatron_0_16.messages import quiet_megatron_warnings

        quiet_megatron_warnings()
        return {"inspect": _inspect, "reshard": _reshard, "export": _export, "import": _import,
                "verify": _verify}[args.command](args)
    except (CheckpointError, ValueError) as err:
        fail(PROG, str(err))
    except BrokenPipeError:  # output piped into `head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        fail(PROG, f"{err.strerror or err}{f' ({err.filename})' if err.filename else ''}: check the path and free space")


def _inspect(args) -> int:
    from modse_megatron.checkpoint.describe import inspect, render

    report = inspect(args.ckpt)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


def _export(args) -> int:
    from modse_megatron.checkpoint.dcp_io import CheckpointReader
    from modse_megatron.checkpoint.describe import is_model_key, resolve
    from modse_megatron.checkpoint.export import export_checkpoint

    total = sum(i.nbytes for k, i in CheckpointReader(resolve(args.ckpt)).tensors().items() if is_model_key(k))
    update, close = _progress(total, "export")
    try:
        out = export_checkpoint(args.ckpt, args.out_dir, shard_bytes=args.max_shard_size, dtype=args.dtype, progress=update)
    finally:
        close()
    files = sorted(p.name for p in out.iterdir())
    print(f"{PROG}: exported {total / 2**20:.1f} MiB of weights to {out} ({', '.join(files)})")
    return 0


def _import(args) -> int:
    if args.source_kind == "megatron":
        from modse_megatron.checkpoint.megatron_import import import_megatron

        widths = [int(w) for w in args.upcycle_widths.split(",")] if args.upcycle_widths else None
        path = import_megatron(args.source, args.out_root, upcycle_widths=widths, topk=args.upcycle_topk,
                               router_init=args.upcycle_router, config_path=args.config, dtype=args.dtype)
    else:
        if args.upcycle_widths or args.config:
            raise ValueError("--upcycle-widths and --config need --from megatron (a megatron checkpoint)")
        from modse_megatron.checkpoint.export import import_export

        path = import_export(args.source, args.out_root, dtype=args.dtype)
    print(f"{PROG}: wrote {path} (weights only: `modse-pretrain --load {args.out_root}` starts at iteration 0 with a "
          f"fresh optimizer, under any layout)")
    return 0


def _verify(args) -> int:
    from modse_megatron.checkpoint.verify import compare, verify_complete

    if args.b is None:
        report = verify_complete(args.a)
        print(f"{PROG}: {report['path']} is complete and intact ({report['tensors']} tensors, {report['bytes'] / 2**20:.1f} "
              f"MiB read{', manifest verified' if report['manifest'] else ', no manifest (older checkpoint)'})")
        return 0
    differences, checked = compare(args.a, args.b)
    if differences:
        for line in differences[:10]:
            print(f"differs: {line}")
        more = f" (first 10 of {len(differences)} shown)" if len(differences) > 10 else ""
        print(f"{PROG}: {args.a} and {args.b} differ in {len(differences)} tensor(s){more}", file=sys.stderr)
        return 1
    print(f"{PROG}: {args.a} and {args.b} hold identical model tensors ({checked} compared: names, dtypes, shapes, values)")
    return 0


def _reshard(args) -> int:
    from modse_megatron.checkpoint.relayout import reshard

    result = reshard(args.ckpt, args.out, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                     ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size, world=args.world_size,
                     placement=args.moe_expert_placement, drop_optimizer=args.drop_optimizer, dtype=args.dtype)
    t = result["layout"]
    print(f"{PROG}: checked {result['ranks_checked']} target ranks (TP {t['tp']} PP {t['pp']} EP {t['ep']} ETP {t['etp']} "
          f"DP {t['dp']}, world {t['world_size']}): every rank's request exists with its shape and the ranks cover "
          f"every tensor exactly once")
    print(f"{PROG}: wrote {result['path']}" + ("; optimizer state dropped" if args.drop_optimizer else "")
          + "; RNG streams are re-derived from --seed at start-up (per-rank streams do not carry across layouts)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
