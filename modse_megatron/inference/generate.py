"""``modse-generate``: text continuation with the reference model of an export.

Examples::

    modse-generate --load runs/tiny_cpu/export --prompt "def fibonacci(n):"
    modse-generate --load runs/tiny_cpu/checkpoints --prompt "import os" --temperature 0.8 --top-p 0.95 --seed 1

``--load`` takes an export directory (``config.json`` + safetensors + tokenizer) or a megatron
training checkpoint directory, which is first exported to a temporary directory with
``modse_megatron.checkpoint.export.export_checkpoint``. Greedy decoding by default; the
continuation (up to the end-of-document token) is printed to stdout. Bad input exits with status 2
and one line ``modse-generate: error: ...``.

Decoding uses the KV cache. Sequence-routed MoE models (``routing_granularity = "sequence"``)
are the exception: their training-time routing pools over the whole sequence, so by default
(``--sequence-routing full``) every step recomputes the sequence - exactly megatron's logits
for the current text. ``--sequence-routing causal`` uses the cache with causal prefix pooling
instead (faster, but not what the model was trained with; see ``model.py``).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import NoReturn, Optional, Sequence

import torch

from modse_megatron.cli_common import OneLineArgumentParser, fail
from modse_megatron.training.special_tokens import EOD_CANDIDATES  # the tokenizer's order, without megatron

from .config import CONFIG_FILE, ExportError
from .model import SEQUENCE_ROUTING, ReferenceGPT

PROG = "modse-generate"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- decoding
def next_token(logits_V: torch.Tensor, vocab_size: int, temperature: float = 0.0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None) -> int:
    """Pick the next id from one position's logits; padding ids (>= ``vocab_size``) never win.

    ``temperature == 0``: argmax (greedy). Otherwise sample from ``softmax(logits / T)``
    restricted to the smallest set of most likely ids whose probability reaches ``top_p``
    (nucleus sampling; the most likely id is always kept).
    """
    logits_V = logits_V[:vocab_size].float()
    if temperature == 0:
        return int(torch.argmax(logits_V))
    probs_V = torch.softmax(logits_V / temperature, dim=-1)
    if top_p < 1.0:
        sorted_V, order_V = torch.sort(probs_V, descending=True)
        before_V = torch.cumsum(sorted_V, dim=0) - sorted_V  # mass of the more likely ids
        sorted_V = torch.where(before_V < top_p, sorted_V, torch.zeros_like(sorted_V))  # keeps the top id
        probs_V = torch.zeros_like(probs_V).scatter(0, order_V, sorted_V)
    return int(torch.multinomial(probs_V.cpu(), 1, generator=generator))


@torch.inference_mode()
def generate(
    model: ReferenceGPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    sequence_routing: str = "full",
) -> list[int]:
    """New token ids after ``prompt_ids`` (a stop id ends generation and is not returned).

    With ``use_cache`` the prompt is run once and each new token reuses the keys/values of
    all earlier ones; without it every step recomputes the whole sequence (the oracle the
    cache is tested against). Sequence-routed models with ``sequence_routing="full"`` always
    recompute (a cache cannot reproduce full-sequence pooling).
    """
    cfg = model.config
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1")
    if sequence_routing not in SEQUENCE_ROUTING:
        raise ValueError(f"sequence_routing={sequence_routing!r} is not valid: use one of {', '.join(SEQUENCE_ROUTING)}")
    total = len(prompt_ids) + max_new_tokens - 1  # the last new token is never fed back
    if cfg.position_embedding_type == "learned_absolute" and total > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens need {total} positions but the "
            f"model has max_position_embeddings={cfg.max_position_embeddings}: shorten the prompt or generate fewer tokens"
        )
    device = model.word_embeddings.device
    pooled = cfg.moe is not None and cfg.moe.routing_granularity == "sequence" and sequence_routing == "full"
    cache = model.new_cache(1, max(total, len(prompt_ids))) if use_cache and not pooled else None
    ids = list(prompt_ids)
    new: list[int] = []
    feed = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits_BSV = model(feed, cache=cache, sequence_routing=sequence_routing)
        token = next_token(logits_BSV[0, -1], cfg.vocab_size, temperature, top_p, generator)
        if token in stop_ids:
            break
        new.append(token)
        ids.append(token)
        feed = torch.tensor([[token]] if cache is not None else [ids], dtype=torch.long, device=device)
    return new


# ----------------------------------------------------------------------------- loading
def is_checkpoint_dir(path: Path) -> bool:
    """A megatron training checkpoint: a save directory (tracker file) or one ``iter_*`` dir."""
    if (path / "latest_checkpointed_iteration.txt").is_file():
        return True
    if path.name.startswith("iter_") and (path / "metadata.json").is_file():
        return True
    return any(p.name.startswith("iter_") and (p / "metadata.json").is_file() for p in path.iterdir())


def _load_model(load: Path, workdir: str, device: str, dtype: Optional[torch.dtype]) -> tuple[ReferenceGPT, Path]:
    """(model, export directory) for ``--load``; checkpoints are exported into ``workdir``."""
    if not load.exists():
        raise ExportError(f"--load {load} does not exist: give an export directory or a training checkpoint")
    if not load.is_dir():
        raise ExportError(f"--load {load} is not a directory: give an export directory or a training checkpoint")
    if not (load / CONFIG_FILE).is_file():
        if not is_checkpoint_dir(load):
            raise ExportError(f"--load {load} has no {CONFIG_FILE} and is no training checkpoint: "
                              "give a directory written by `modse-convert export` or `modse-pretrain --save`")
        try:
            from modse_megatron.checkpoint.export import export_checkpoint
            from modse_megatron.platform.megatron_0_16.messages import quiet_megatron_warnings

            quiet_megatron_warnings()
        except ImportError:
            raise ExportError(f"{load} is a training checkpoint: export it first with "
                              f"`modse-convert export {load} OUT_DIR` and pass --load OUT_DIR") from None
        try:
            export_checkpoint(str(load), Path(workdir) / "export")
        except Exception as err:  # the exporter's own one-line errors, or anything else: one line
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ExportError(f"exporting training checkpoint {load} failed: {reason}") from None
        load = Path(workdir) / "export"
    return ReferenceGPT.from_export(load, device=device, dtype=dtype), load


def load_tokenizer(export_dir: Path, config):
    """(``tokenizers.Tokenizer``, end-of-document id or None) of an export."""
    from tokenizers import Tokenizer

    if config.tokenizer is None:
        raise ExportError(f"export {export_dir} has no tokenizer (config.json tokenizer is null): "
                          "re-export with the run's tokenizer")
    file = export_dir / config.tokenizer
    if not file.is_file():
        raise ExportError(f"export {export_dir} lacks its tokenizer file {config.tokenizer}: re-export the model")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception with a serde message
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(f"{file} is not a valid tokenizer.json ({reason}): re-export the model") from None
    eod = config.eod_token_id
    if eod is None:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        eod = next((vocab[name] for name in EOD_CANDIDATES if name in vocab), None)
    return tokenizer, eod


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda but no CUDA device is available: use --device cpu (or auto)")
    return name


# ----------------------------------------------------------------------------- CLI
def _fail(message: str) -> NoReturn:
    fail(PROG, message)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description="Continue a prompt with an exported MoDSE GPT (pure-PyTorch reference model).")
    p.add_argument("--load", required=True, type=Path,
                   help="export directory (config.json + safetensors) or training checkpoint")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: smallest set of ids with this probability (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="where to run (default auto)")
    p.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto", help="compute dtype (default: the export's)")
    p.add_argument("--sequence-routing", choices=SEQUENCE_ROUTING, default="full",
                   help="sequence-routed models only: full = megatron's pooling, recomputed each step (default); "
                        "causal = prefix pooling with the KV cache")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step (slow; for checking)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0:
        _fail("--max-new-tokens must be >= 0")
    if args.temperature < 0:
        _fail("--temperature must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        _fail("--top-p must be in (0, 1]")
    try:
        with tempfile.TemporaryDirectory(prefix="modse-generate-") as workdir:
            dtype = None if args.dtype == "auto" else _DTYPES[args.dtype]
            model, export_dir = _load_model(args.load, workdir, _device(args.device), dtype)
            tokenizer, eod = load_tokenizer(export_dir, model.config)
            prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
            if not prompt_ids:
                raise ExportError("--prompt encodes to no tokens: give a non-empty prompt")
            generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
            new_ids = generate(
                model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                generator=generator, stop_ids=() if eod is None else (eod,), use_cache=not args.no_kv_cache,
                sequence_routing=args.sequence_routing,
            )
    except (ExportError, ValueError) as err:
        _fail(str(err))
    print(tokenizer.decode(new_ids, skip_special_tokens=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
