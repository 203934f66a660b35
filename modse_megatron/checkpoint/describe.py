"""What a checkpoint holds: ``modse-convert inspect`` and the pieces other commands share
(resolving a path, the options it was trained with, its MoE layers and placement)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modse_megatron.checkpoint.dcp_io import MEGATRON_METADATA, CheckpointReader, TensorInfo
from modse_megatron.checkpoint.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"


def resolve(path: str | os.PathLike) -> Path:
    """A ``--save`` root (its latest iteration) or one ``iter_N`` directory -> that directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: give a --save root or an iter_N checkpoint directory")
    tracker = p / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker} is corrupt ({text[:40]!r}): restore it or point at an iter_N directory")
        target = p / f"iter_{int(text):07d}"
        if not target.is_dir():
            raise CheckpointError(f"{tracker} names iteration {int(text)} but {target} is missing: restore it or fix the tracker")
        return target
    if (p / MEGATRON_METADATA).is_file():
        return p
    raise CheckpointError(f"{p} is not a checkpoint (no {TRACKER} and no {MEGATRON_METADATA}): "
                          f"point at a --save root or an iter_N directory")


def is_model_key(key: str) -> bool:
    """Model weights (not optimizer state, RNG or TE metadata)."""
    return not (key.startswith("optimizer.") or key.startswith("chained_") or "_extra_state" in key
                or key.startswith("rng_state"))


def is_optimizer_key(key: str) -> bool:
    return key.startswith("optimizer.") or (key.startswith("chained_") and ".optimizer." in key)


def saved_args(reader: CheckpointReader):
    """The :class:`PretrainArgs` the checkpoint was trained (or imported) with."""
    from modse_megatron.training.arguments import PretrainArgs

    stored = reader.meta.get("args")
    if not isinstance(stored, dict):
        raise CheckpointError(f"{reader.path} records no training options (not written by modse-megatron): "
                              f"import it with modse-convert import instead")
    return PretrainArgs.from_dict(stored)


def moe_layers(args) -> list[int]:
    """0-based indices of the MoE layers (megatron's ``moe_layer_freq`` rule)."""
    return [n - 1 for n in args.moe_layer_numbers()]


def saved_layout(reader: CheckpointReader) -> dict[str, int]:
    meta = reader.meta
    layout = dict(meta.get("layout") or {})
    if not layout:  # saved before layouts were recorded: what the options say
        p = saved_args(reader).parallel
        layout = {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                  "ep": p.expert_model_parallel_size,
                  "etp": p.expert_tensor_parallel_size or p.tensor_model_parallel_size}
        if meta.get("world_size"):
            layout["world_size"] = meta["world_size"]
            layout["dp"] = meta["world_size"] // (layout["tp"] * layout["pp"])
    return layout


def placement(args, ep: int) -> list[list[int]]:
    """EP rank of every logical expert of every MoE layer under ``ep`` (the checkpoint's
    placement option; re-planned runs have one per layer)."""
    from modse_megatron.placement.layout import resolve_layer_ranks

    widths = args.expert_widths()
    return resolve_layer_ranks(args.modse.moe_expert_placement, widths, ep, len(moe_layers(args))) if widths else []


def _group_sizes(infos: dict[str, TensorInfo], keep) -> tuple[int, int]:
    chosen = [i for k, i in infos.items() if keep(k)]
    return len(chosen), sum(i.nbytes for i in chosen)


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``modse-convert inspect`` reports, as a JSON-able dict."""
    ckpt = resolve(path)
    reader = CheckpointReader(ckpt)
    meta = reader.meta
    infos = reader.tensors()
    args = saved_args(reader)
    layout = saved_layout(reader)
    widths = args.expert_widths()
    ranks = placement(args, layout.get("ep", 1)) if widths else []
    n_model, b_model = _group_sizes(infos, is_model_key)
    n_opt, b_opt = _group_sizes(infos, is_optimizer_key)
    optimizer = reader.common.get("optimizer")
    subs = [optimizer[k] for k in sorted(optimizer)] if isinstance(optimizer, dict) and optimizer and \
        all(isinstance(k, int) for k in optimizer) else ([optimizer] if optimizer else [])
    formats = sorted({s.get("param_state_sharding_type", "unknown") for s in subs if isinstance(s, dict)})
    m = args.model
    return {
        "path": str(ckpt),
        "iteration": meta.get("iteration"),
        "weights_only": bool(meta.get("weights_only")),
        "layout": layout,
        "model": {
            "num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.num_query_groups, "seq_length": m.seq_length, "swiglu": m.swiglu,
            "normalization": m.normalization, "position_embedding_type": m.position_embedding_type,
            "num_experts": m.num_experts, "moe_router_topk": m.moe_router_topk if m.num_experts else None,
            "moe_layer_impl": m.moe_layer_impl if m.num_experts else None,
            "router_type": args.modse.moe_router_type if m.num_experts else None,
            "vocab_size": _vocab_rows(infos), "bf16": m.bf16,
        },
        "moe_layers": [{"layer": layer, "experts": [{"logical_id": e, "width": w, "rank": ranks[i][e] if ranks else 0}
                                                    for e, w in enumerate(widths)]}
                       for i, layer in enumerate(moe_layers(args))],
        "tensors": {"model": {"count": n_model, "bytes": b_model}, "optimizer": {"count": n_opt, "bytes": b_opt},
                    "total": {"count": len(infos), "bytes": sum(i.nbytes for i in infos.values())}},
        "optimizer": {"present": n_opt > 0, "format": formats[0] if len(formats) == 1 else (formats or None)},
        "rng_present": any(k.startswith("rng_state") for k in reader.object_keys()),
        "data_position": {"consumed_samples": meta.get("consumed_samples")} if "consumed_samples" in meta else None,
        "integrity_manifest": (ckpt / "modse_manifest.json").is_file(),
    }


def _vocab_rows(infos: dict[str, TensorInfo]) -> int | None:
    emb = infos.get("embedding.word_embeddings.weight")
    return emb.shape[0] if emb else None


def render(report: dict[str, Any]) -> str:
    """The human-readable ``inspect`` output."""
    lay = report["layout"]
    m, t = report["model"], report["tensors"]
    gb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    lines = [
        f"checkpoint   {report['path']}",
        f"iteration    {report['iteration']}" + ("  (weights only: starts at iteration 0 with a fresh optimizer)"
                                                 if report["weights_only"] else ""),
        "layout       " + " ".join(f"{k.upper()} {v}" for k, v in lay.items() if k != "world_size")
        + (f"  (world size {lay['world_size']})" if "world_size" in lay else ""),
        f"model        {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
        f"vocab {m['vocab_size']}, {m['normalization']}, {'SwiGLU' if m['swiglu'] else 'GELU'}, "
        f"{m['position_embedding_type']}{', bf16' if m['bf16'] else ''}",
    ]
    if m["num_experts"]:
        lines.append(f"moe          {m['num_experts']} experts, top-{m['moe_router_topk']}, {m['router_type']} router, "
                     f"{m['moe_layer_impl']} layer, MoE layers {[x['layer'] for x in report['moe_layers']]}")
        if report["moe_layers"]:
            first = report["moe_layers"][0]["experts"]
            lines.append("experts      " + ", ".join(f"{x['logical_id']}: width {x['width']} on rank {x['rank']}" for x in first)
                         + ("  (same in every MoE layer)" if len(report["moe_layers"]) > 1 else ""))
    lines += [
        f"tensors      model {t['model']['count']} ({gb(t['model']['bytes'])}), optimizer {t['optimizer']['count']} "
        f"({gb(t['optimizer']['bytes'])}), total {t['total']['count']} ({gb(t['total']['bytes'])})",
        f"optimizer    {'format ' + str(report['optimizer']['format']) if report['optimizer']['present'] else 'absent'}",
        f"rng          {'present' if report['rng_present'] else 'absent'}",
        f"data         {('consumed samples ' + str(report['data_position']['consumed_samples'])) if report['data_position'] else 'absent'}",
        f"integrity    {'SHA-256 manifest' if report['integrity_manifest'] else 'no manifest'}",
    ]
    return "\n".join(lines)
