"""``modse-convert import --from megatron``: megatron-core GPT checkpoints into MoDSE checkpoints.

* **Uniform MoE** (megatron's ``SequentialMLP``, and ``GroupedMLP``/TE grouped experts, whose
  weights megatron stores in the same layout): experts are one key stacked over layers and
  experts, ``decoder.layers.mlp.experts.linear_fc1.weight`` ``[L, E, G*F, D]`` (or one key per
  expert with ``singleton_local_shards``: ``experts.{e}.linear_fc1.weight``, GLU halves as
  ``_w``/``_v``). Each expert becomes our ``expert{e}`` at width F: the uniform twin.
* **Dense -> MoDSE by upcycling**: the FFN's F hidden units are partitioned into consecutive
  blocks of the requested widths (they must sum to F); expert e gets its block's rows of fc1
  (gate and up halves alike) and columns of fc2. An FFN over disjoint hidden units is the sum
  of the FFNs over each block, so ``sum_e FFN_e(x) = FFN(x)`` exactly. fc2 is scaled by E: with
  top-k = E and uniform router probabilities (1/E each) the MoE layer reproduces the dense FFN
  exactly; with random routing and top-k = k each expert is chosen with probability k/E at
  weight 1/k, so the expected output is the dense one. The router starts random (``random``:
  N(0, init_method_std^2), seeded) or at zero (``zero``: uniform probabilities).

The model's options come from the checkpoint's modse-megatron meta when it has one, else from
``--config`` (a ``modse-pretrain`` YAML describing the source model). Only the DCP index and
tensors are read (``common.pt`` of other tools is not unpickled at all).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

import torch

from modse_megatron.checkpoint import manifest
from modse_megatron.checkpoint.dcp_io import CheckpointReader, CheckpointWriter
from modse_megatron.checkpoint.describe import is_model_key, resolve
from modse_megatron.checkpoint.errors import CheckpointError
from modse_megatron.checkpoint.export import TRACKER, staged
from modse_megatron.checkpoint.names import LAYER_STACK

_EXPERTS = "decoder.layers.mlp.experts."
_MEGATRON_EXPERTS = _EXPERTS + "experts."  # megatron's expert modules live under mlp.experts.experts
_DENSE_FC = ("decoder.layers.mlp.linear_fc1.weight", "decoder.layers.mlp.linear_fc2.weight")


def source_args(reader: CheckpointReader, config_path: str | None):
    """The source model's options: ``--config`` YAML, else the checkpoint's own meta."""
    from modse_megatron.training.arguments import ConfigError, PretrainArgs, parse_args

    if config_path:
        try:
            return parse_args(["--config", config_path])
        except ConfigError as err:
            raise CheckpointError(f"--config {config_path}: {err}") from None
    try:
        stored = reader.meta.get("args")
    except CheckpointError:
        stored = None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{reader.path} records no model options: pass --config MODEL.yaml (modse-pretrain options "
                              f"describing the source model: layers, hidden size, heads, FFN, experts, ...)")
    return PretrainArgs.from_dict(stored)


def _uniform_expert_chunks(reader: CheckpointReader, infos) -> Callable:
    """(layer, expert) -> {"linear_fc1.weight": t, "linear_fc2.weight": t} for megatron's
    stacked or singleton expert layouts."""
    stacked = {f"{_MEGATRON_EXPERTS}linear_fc1.weight", f"{_MEGATRON_EXPERTS}linear_fc2.weight"}
    if stacked <= set(infos):
        full = {k.rsplit(".", 2)[-2]: reader.read(k, infos[k]) for k in sorted(stacked)}  # [L, E, ...]
        return lambda layer, e: {f"{name}.weight": full[name][layer, e] for name in ("linear_fc1", "linear_fc2")}

    def singleton(layer: int, e: int) -> dict:
        out = {}
        for name in ("linear_fc1", "linear_fc2"):
            key = f"{_MEGATRON_EXPERTS}{e}.{name}.weight"
            if key in infos:
                out[f"{name}.weight"] = reader.read(key, infos[key])[layer]
            elif f"{key}_w" in infos:  # GLU halves stored apart
                out[f"{name}.weight"] = torch.cat([reader.read(f"{key}_{h}", infos[f"{key}_{h}"])[layer] for h in "wv"])
            else:
                raise CheckpointError(f"{reader.path} has no weights of expert {e} ({key}): not a megatron MoE checkpoint "
                                      f"this tool reads")
        return out

    return singleton


def import_megatron(source: str | os.PathLike, out_root: str | os.PathLike, *, upcycle_widths: list[int] | None = None,
                    topk: int = 2, router_init: str = "random", config_path: str | None = None,
                    dtype: str | None = None) -> Path:
    """Write a weights-only checkpoint root (iteration 0) from a megatron GPT checkpoint."""
    reader = CheckpointReader(resolve(source))
    infos = {k: i for k, i in reader.tensors().items() if is_model_key(k)}
    args = source_args(reader, config_path)
    num_layers = args.model.num_layers
    convert = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype or "")
    has_experts = any(k.startswith(_EXPERTS) for k in infos)
    if upcycle_widths is not None:
        if has_experts or not set(_DENSE_FC) <= set(infos):
            raise CheckpointError(f"{reader.path} is not a dense GPT checkpoint (no {_DENSE_FC[0]}): upcycling needs one")
        target = _upcycled_args(args, upcycle_widths, topk)
    elif has_experts:
        target = _uniform_twin_args(args)
    else:
        raise CheckpointError(f"{reader.path} has no experts: to make a MoDSE model of a dense checkpoint add "
                              f"--upcycle-widths W1,W2,... (summing to its FFN width)")
    gen = torch.Generator().manual_seed(args.optim.seed)
    with staged(out_root) as tmp:
        writer = CheckpointWriter(tmp / "iter_0000000")
        try:
            put = lambda key, t, layer=None: _put(writer, key, t.to(convert) if convert else t, layer, num_layers)  # noqa: E731
            expert_of = _uniform_expert_chunks(reader, infos) if has_experts else None
            for key in sorted(infos):
                if key.startswith(_EXPERTS) or key in _DENSE_FC:
                    continue
                tensor = reader.read(key, infos[key])
                if key.startswith(LAYER_STACK):
                    for layer in sorted({o[0] for o, _ in infos[key].chunks}):
                        put(key, tensor[layer], layer)
                else:
                    put(key, tensor)
            moe_layers = [n - 1 for n in target.moe_layer_numbers()]
            if expert_of is not None:
                for layer in moe_layers:
                    for e in range(target.model.num_experts):
                        for name, t in expert_of(layer, e).items():
                            put(f"{_EXPERTS}expert{e}.{name}", t, layer)
            else:
                fc1, fc2 = (reader.read(k, infos[k]) for k in _DENSE_FC)
                gated = args.model.swiglu
                for layer in sorted({o[0] for o, _ in infos[_DENSE_FC[0]].chunks}):
                    for e, (w1, w2) in enumerate(partition_ffn(fc1[layer], fc2[layer], upcycle_widths, gated)):
                        put(f"{_EXPERTS}expert{e}.linear_fc1.weight", w1, layer)
                        put(f"{_EXPERTS}expert{e}.linear_fc2.weight", w2, layer)
                    hidden = fc1.shape[-1]
                    router = torch.zeros(len(upcycle_widths), hidden)
                    if router_init == "random":
                        router.normal_(0.0, args.model.init_method_std, generator=gen)
                    put("decoder.layers.mlp.router.weight", router.to(fc1.dtype), layer)
        except BaseException:
            writer.abort()
            raise
        meta = {"iteration": 0, "consumed_samples": 0, "weights_only": True, "args": target.to_dict(),
                "integrity": manifest.INTEGRITY, "source": f"modse-convert import --from megatron {source}"}
        writer.finish({"meta": meta})
        (tmp / TRACKER).write_text("0")
    return Path(out_root) / "iter_0000000"


def _put(writer: CheckpointWriter, key: str, tensor: torch.Tensor, layer: int | None, num_layers: int) -> None:
    if layer is None:
        writer.add_chunk(key, tensor, (0,) * tensor.dim(), tuple(tensor.shape))
    else:
        writer.add_chunk(key, tensor.unsqueeze(0), (layer,) + (0,) * tensor.dim(), (num_layers, *tensor.shape))


def partition_ffn(w1: torch.Tensor, w2: torch.Tensor, widths: list[int], gated: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a dense FFN (fc1 ``[G*F, D]``, fc2 ``[D, F]``) into experts over consecutive blocks
    of hidden units; fc2 scaled by the number of experts (see the module docstring)."""
    ffn = w2.shape[1]
    if sum(widths) != ffn or any(w <= 0 for w in widths):
        raise CheckpointError(f"--upcycle-widths {','.join(map(str, widths))} must be positive and sum to the dense FFN "
                              f"width {ffn} (they partition its hidden units)")
    halves = w1.chunk(2, dim=0) if gated else (w1,)
    experts, start = [], 0
    scale = float(len(widths))
    for width in widths:
        block = slice(start, start + width)
        fc1 = torch.cat([h[block] for h in halves], dim=0)
        experts.append((fc1.clone(), (w2[:, block] * scale).contiguous()))
        start += width
    return experts


def _uniform_twin_args(args):
    target = copy.deepcopy(args)
    m = target.model
    width = m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size
    m.moe_layer_impl = "modse"
    target.modse.moe_expert_widths = [width] * m.num_experts
    target.modse.moe_expert_size_ratios = target.modse.moe_expert_size_preset = None
    return _validated(target)


def _upcycled_args(args, widths: list[int], topk: int):
    target = copy.deepcopy(args)
    m = target.model
    if not m.disable_bias_linear:
        raise CheckpointError("upcycling needs a bias-free dense model (MoDSE experts have no biases): the source was "
                              "trained with linear biases (drop --disable-bias-linear from its options only if it had none)")
    m.num_experts = len(widths)
    m.moe_ffn_hidden_size = (m.ffn_hidden_size or 4 * m.hidden_size) // len(widths)
    m.moe_router_topk = topk
    m.moe_layer_impl = "modse"
    target.modse.moe_expert_widths = list(widths)
    target.modse.moe_expert_size_ratios = target.modse.moe_expert_size_preset = None
    return _validated(target)


def _validated(target):
    from modse_megatron.training.arguments import ConfigError, validate

    try:
        validate(target)
    except ConfigError as err:
        raise CheckpointError(f"the imported model's options: {err}") from None
    return target
