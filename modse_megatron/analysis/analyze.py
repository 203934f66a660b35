"""``modse-analyze``: what diverse expert sizes do in one run.

    modse-analyze TARGET --out DIR [--checkpoint CKPT] [--metrics FILE] [--checkpoint-b CKPT]
                  [--data PREFIX] [--tokenizer PATH] [--split valid|test|train|all]
                  [--max-sequences 64] [--seq-length N] [--batch-size 8]
                  [--config YAML] [--expert-widths W1,W2,..]

TARGET is any of

* a run's ``--log-dir`` (holding ``metrics.jsonl``) or that file itself: the metrics analyses.
  The run's checkpoint is used too when ``--checkpoint`` names it or the directory holds exactly
  one ``--save`` root (``RUN/checkpoints``, as ``modse-ablate`` and ``examples/configs`` lay runs
  out); without one, expert widths and placement come from ``--config`` (or ``RUN/config.yaml``,
  which modse-ablate writes), or widths from ``--expert-widths``;
* a checkpoint (a ``--save`` root = its latest iteration, or one ``iter_N``): the model analyses,
  plus the metrics analyses when ``--metrics`` is given or found (the run's recorded
  ``--log-dir``, relative to the current directory, or the directory above the ``--save`` root);
* an export (``modse-convert export`` output): the model analyses only.

Metrics analyses (from ``metrics.jsonl``, whole run): ``token_share_by_width`` (per MoE layer:
expert width -> share of routed tokens; shares sum to 1), ``token_share_over_time``, and the EP
ranks' compute load (Σ tokens x width under the checkpoint's placement; max / mean).
Model analyses (the checkpoint exported to the pure-PyTorch reference model, run on CPU over at
most ``--max-sequences`` windows of ``seq_length + 1`` tokens inside held-out documents:
``--split`` of the run's own document split, default ``valid``; data = ``--data`` or the data the
run trained on): loss deciles x routing mass per width with Spearman's rho, router entropy,
routing stability against ``--checkpoint-b``, compute load on that data, and expert x topic
specialisation (built-in corpus only: a document's source file is known by replaying the corpus
build; topic = top-level stdlib package). Sections that cannot run are listed under
``skipped`` with the reason. Everything is in :mod:`.run_log`, :mod:`.routing`, :mod:`.topics`.

Writes ``DIR/report.json`` (see :func:`build_report` for the fields), ``DIR/report.md`` and PNGs;
files of an earlier report in DIR are replaced. Bad input: one line
``modse-analyze: error: ...``, exit code 2.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from modse_megatron.cli_common import OneLineArgumentParser, fail

from . import AnalysisError
from . import run_log

PROG = "modse-analyze"
TRACKER = "latest_checkpointed_iteration.txt"
SPLITS = ("valid", "test", "train", "all")
REPORT_FORMAT = "modse-analyze-report"


@dataclass
class Inputs:
    """What TARGET and the options resolve to."""

    target: str
    metrics: Optional[Path] = None
    checkpoint: Optional[Path] = None      # an iter_N directory
    export: Optional[Path] = None          # an export directory given directly
    run_args: Any = None                   # PretrainArgs from the checkpoint or a config file
    args_source: Optional[str] = None
    ep: Optional[int] = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- inputs
def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("format") == "modse-megatron-export"
    except (OSError, ValueError, AttributeError):
        return False


def _is_checkpoint(path: Path) -> bool:
    return (path / TRACKER).is_file() or (path / "metadata.json").is_file()


def _open_model_source(path: Path, inputs: Inputs, what: str) -> None:
    from modse_megatron.checkpoint.describe import resolve

    if _is_export(path):
        inputs.export = path
    elif _is_checkpoint(path):
        inputs.checkpoint = resolve(path)
    else:
        raise AnalysisError(f"{what} {path} is neither a checkpoint (--save root or iter_N) nor an export "
                            f"(modse-convert export): point at one")


def resolve_inputs(target: str, checkpoint: Optional[str] = None, metrics: Optional[str] = None,
                   config: Optional[str] = None) -> Inputs:
    """TARGET + options -> the metrics file, the checkpoint or export, and the run's options."""
    path = Path(target)
    inputs = Inputs(target)
    if not path.exists():
        raise AnalysisError(f"{path} does not exist: give a run's --log-dir, its metrics.jsonl, a checkpoint "
                            f"(--save root or iter_N) or an export")
    if path.is_file():
        inputs.metrics = path
    elif _is_export(path) or _is_checkpoint(path):
        _open_model_source(path, inputs, "TARGET")
        if (path / "metrics.jsonl").is_file():
            inputs.metrics = path / "metrics.jsonl"
    elif (path / "metrics.jsonl").is_file():
        inputs.metrics = path / "metrics.jsonl"
        roots = sorted(d for d in path.iterdir() if d.is_dir() and (d / TRACKER).is_file())
        if len(roots) > 1 and checkpoint is None:
            raise AnalysisError(f"{path} holds several checkpoint roots ({', '.join(d.name for d in roots)}): "
                                f"choose one with --checkpoint")
        if roots and checkpoint is None:
            inputs.checkpoint = _resolve(roots[0])
    else:
        raise AnalysisError(f"{path} has no metrics.jsonl and is not a checkpoint or an export: give a run's "
                            f"--log-dir, a checkpoint (--save root or iter_N) or an export")
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise AnalysisError(f"--checkpoint {checkpoint} does not exist: give a --save root, an iter_N or an export")
        inputs.checkpoint = inputs.export = None
        _open_model_source(Path(checkpoint), inputs, "--checkpoint")
    if metrics is not None:
        if not Path(metrics).is_file():
            raise AnalysisError(f"--metrics {metrics} is not a file: give the metrics.jsonl of the run")
        inputs.metrics = Path(metrics)
    _run_options(inputs, config)
    if inputs.metrics is None and inputs.checkpoint is not None:
        inputs.metrics = _find_metrics(inputs)
    return inputs


def _resolve(root: Path) -> Path:
    from modse_megatron.checkpoint.describe import resolve

    return resolve(root)


def _run_options(inputs: Inputs, config: Optional[str]) -> None:
    """The run's PretrainArgs: the checkpoint's (placement after any re-planning) or a config file."""
    if inputs.checkpoint is not None:
        from modse_megatron.checkpoint.dcp_io import CheckpointReader
        from modse_megatron.checkpoint.describe import saved_args, saved_layout

        reader = CheckpointReader(inputs.checkpoint)
        inputs.run_args = saved_args(reader)
        inputs.ep = int(saved_layout(reader).get("ep", 1))
        inputs.args_source = str(inputs.checkpoint)
        return
    from modse_megatron.training.arguments import ConfigError, parse_args

    found = inputs.metrics.parent / "config.yaml" if inputs.metrics is not None else None
    if config is None and (found is None or not found.is_file()):
        return
    path = Path(config) if config is not None else found
    if not path.is_file():
        raise AnalysisError(f"--config {path} is not a file: give the run's modse-pretrain YAML")
    try:
        inputs.run_args = parse_args(["--config", str(path)])
    except ConfigError as err:
        if config is None:  # found next to the metrics, not asked for: analyse without it
            inputs.notes.append(f"{path} is not a usable modse-pretrain config ({err}): not used")
            return
        raise AnalysisError(f"--config {path} is not a usable modse-pretrain config ({err}): fix it or pass "
                            f"--expert-widths instead") from None
    inputs.ep = inputs.run_args.parallel.expert_model_parallel_size
    inputs.args_source = str(path)


def _find_metrics(inputs: Inputs) -> Optional[Path]:
    """The checkpoint's metrics: its recorded --log-dir (if it resolves from here), else the
    directory above the --save root (``runs/x/checkpoints`` -> ``runs/x/metrics.jsonl``)."""
    root = inputs.checkpoint.parent
    candidates = [Path(inputs.run_args.run.log_dir) / "metrics.jsonl", root.parent / "metrics.jsonl"]
    for path in candidates:
        if path.is_file():
            inputs.notes.append(f"metrics.jsonl found at {path} (give --metrics to choose another)")
            return path
    return None


def expert_widths(inputs: Inputs, model_config, widths_option: Optional[str]) -> Optional[list[int]]:
    if widths_option:
        try:
            widths = [int(w) for w in widths_option.split(",")]
        except ValueError:
            widths = []
        if not widths or any(w <= 0 for w in widths):
            raise AnalysisError(f"--expert-widths {widths_option!r} is not a list of positive integers: write e.g. 96,32,80,48")
        return widths
    if inputs.run_args is not None:
        try:
            return inputs.run_args.expert_widths() or None
        except ValueError as err:
            raise AnalysisError(f"the run's expert sizes do not resolve ({err}): pass --expert-widths") from None
    if model_config is not None and model_config.moe is not None:
        return list(model_config.moe.expert_widths)
    return None


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    prefix: str
    tokenizer: Optional[str]
    split_text: str


def choose_data(inputs: Inputs, data: Optional[str], tokenizer: Optional[str], model_config) -> Data:
    """``--data``, else what the run trained on (its --data-path, or the built-in corpus)."""
    args = inputs.run_args
    split = args.data.split if args is not None else "98,1,1"
    if data:
        prefix = data[:-4] if data.endswith((".bin", ".idx")) else data
        return Data(prefix, tokenizer or _tokenizer_near(prefix), split)
    if args is not None and args.data.data_path:
        if len(args.data.data_path) != 1:
            raise AnalysisError(f"the run trained on a blend ({' '.join(args.data.data_path)}): choose one dataset with --data")
        prefix = args.data.data_path[0]
        return Data(prefix, tokenizer or args.data.tokenizer or _tokenizer_near(prefix), split)
    from modse_megatron.training.corpus import builtin_corpus

    vocab = args.data.vocab_size if args is not None else model_config.vocab_size
    prefix, tok = builtin_corpus(vocab_size=vocab)
    return Data(prefix, tokenizer or tok, split)


def _tokenizer_near(prefix: str) -> Optional[str]:
    for path in (prefix + ".tokenizer.json", os.path.join(os.path.dirname(prefix), "tokenizer.json")):
        if os.path.isfile(path):
            return path
    return None


def _check_same_tokenizer(model_dir: Path, model_config, data: Data) -> None:
    """The data must be tokenised like the model's training data: refuse a different file."""
    if not model_config.tokenizer or not data.tokenizer:
        return
    mine = model_dir / model_config.tokenizer
    if mine.is_file() and Path(data.tokenizer).is_file() and mine.read_bytes() != Path(data.tokenizer).read_bytes():
        raise AnalysisError(f"the data's tokenizer {data.tokenizer} is not the model's: analyse data tokenised with "
                            f"the model's tokenizer (--data/--tokenizer)")


def document_range(split: str, split_text: str, num_documents: int) -> tuple[int, int]:
    if split == "all":
        return 0, num_documents
    from modse_megatron.training.data import _split_ranges  # megatron's rounding of the split

    bounds = _split_ranges(split_text, num_documents)[("train", "valid", "test").index(split)]
    if bounds is None or bounds[1] <= bounds[0]:
        raise AnalysisError(f"the {split} split of {split_text!r} has no documents of {num_documents}: "
                            f"choose another --split (or --split all)")
    return bounds


# ----------------------------------------------------------------------------- model analyses
def _load_model(path: Path, workdir: Path, name: str):
    """A ReferenceGPT of an export, or of a checkpoint exported into ``workdir`` first."""
    from modse_megatron.inference.model import ReferenceGPT

    if _is_export(path):
        return ReferenceGPT.from_export(path), path
    from modse_megatron.checkpoint.export import export_checkpoint

    out = workdir / name
    export_checkpoint(path, out)
    return ReferenceGPT.from_export(out), out


def model_analyses(inputs: Inputs, opts, report: dict[str, Any], skipped: dict[str, str], workdir: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from . import routing, topics
    from modse_megatron.training.data import check_indexed_dataset

    source = inputs.export or inputs.checkpoint
    path_b = _model_b(opts.checkpoint_b) if opts.checkpoint_b else None  # a bad path fails before any work
    model, model_dir = _load_model(source, workdir, "export_a")
    cfg = model.config
    if cfg.moe is None:
        for key in ("difficulty_by_width", "router_entropy", "routing_stability", "specialisation"):
            skipped[key] = "dense model: no routing"
        return
    moe = cfg.moe
    report["model"] = {"num_layers": cfg.num_layers, "moe_layers": [i + 1 for i in moe.moe_layers],
                       "num_experts": moe.num_experts, "expert_widths": list(moe.expert_widths),
                       "router_topk": moe.router_topk, "routing_granularity": moe.routing_granularity,
                       "router_type": moe.router_type, "score_function": moe.score_function}
    data = choose_data(inputs, opts.data, opts.tokenizer, cfg)
    _check_same_tokenizer(model_dir, cfg, data)
    info = check_indexed_dataset(data.prefix)
    seq = opts.seq_length or (inputs.run_args.model.seq_length if inputs.run_args is not None else cfg.max_position_embeddings)
    if cfg.position_embedding_type == "learned_absolute" and seq > cfg.max_position_embeddings:
        raise AnalysisError(f"--seq-length {seq} exceeds the model's max_position_embeddings="
                            f"{cfg.max_position_embeddings}: give --seq-length {cfg.max_position_embeddings} or less")
    first, last = document_range(opts.split, data.split_text, info.num_documents)
    windows = routing.select_windows(info.sequence_lengths, first, last, seq, opts.max_sequences)
    if not windows:
        raise AnalysisError(f"no document of the {opts.split} split ({last - first} documents) has seq_length + 1 = "
                            f"{seq + 1} tokens: use a smaller --seq-length or another --split")
    dataset = IndexedDataset(data.prefix)
    tokens_NS1 = routing.window_tokens(dataset, windows, seq)
    report["inputs"].update(data=data.prefix, tokenizer=data.tokenizer, split=opts.split, documents=[first, last],
                            sequences=len(windows), seq_length=seq)
    main = routing.run_model(model, tokens_NS1, opts.batch_size)
    widths = list(moe.expert_widths)
    report["difficulty_by_width"] = routing.difficulty_by_width(main, widths)
    report["router_entropy"] = routing.router_entropy(main, moe.score_function)
    if inputs.ep is not None and inputs.run_args is not None:
        ranks = _placement(inputs, skipped)
        if ranks is not None:
            report["rank_compute"]["from_eval_routing"] = run_log.rank_load(
                routing.routed_counts(main, moe.num_experts), widths, ranks, inputs.ep, "analysed data")
    if path_b is not None:
        other, _ = _load_model(path_b, workdir, "export_b")
        if other.config.moe is None or list(other.config.moe.expert_widths) != widths:
            raise AnalysisError(f"--checkpoint-b {opts.checkpoint_b} has other experts "
                                f"({other.config.describe()}) than the model ({cfg.describe()}): compare two "
                                f"checkpoints of the same run")
        report["routing_stability"] = routing.routing_stability(main, routing.run_model(other, tokens_NS1, opts.batch_size))
        report["inputs"]["checkpoint_b"] = str(path_b)
    else:
        skipped["routing_stability"] = "needs a second checkpoint: pass --checkpoint-b CKPT" + _earlier_hint(inputs)
    sources, reason = topics.replay_builtin(data.prefix, info.num_documents)
    if sources is not None:
        reason = topics.verify(sources, [d for d, _ in windows], lambda d: dataset[d], _tokenizer(data.tokenizer))
    if reason:
        skipped["specialisation"] = reason
    else:
        labels = [sources.topic(d) for d, _ in windows]
        report["specialisation"] = routing.specialisation(main, labels, moe.routing_granularity)
        report["specialisation"]["files"] = sorted({sources.files[d] for d, _ in windows})[:200]


def _earlier_hint(inputs: Inputs) -> str:
    """`` (e.g. .../iter_N)``: the earliest other iteration next to the analysed checkpoint."""
    if inputs.checkpoint is None:
        return ""
    others = sorted(d for d in inputs.checkpoint.parent.glob("iter_*")
                    if d.is_dir() and d != inputs.checkpoint and d.name[5:].isdigit())
    return f" (e.g. {others[0]})" if others else ""


def _model_b(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise AnalysisError(f"--checkpoint-b {path} does not exist: give a --save root, an iter_N or an export")
    if _is_export(p):
        return p
    if not _is_checkpoint(p):
        raise AnalysisError(f"--checkpoint-b {path} is neither a checkpoint nor an export: point at one")
    return _resolve(p)


def _tokenizer(path: Optional[str]):
    if path is None:
        raise AnalysisError("no tokenizer for the data: pass --tokenizer")
    from modse_megatron.training.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _placement(inputs: Inputs, skipped: dict[str, str]) -> Optional[dict[str, list[int]]]:
    """The EP rank of every logical expert, per MoE layer (keyed like tokens_per_expert)."""
    from modse_megatron.checkpoint.describe import placement

    try:
        per_layer = placement(inputs.run_args, inputs.ep)
        return {str(n): ranks for n, ranks in zip(inputs.run_args.moe_layer_numbers(), per_layer)}
    except ImportError as err:
        skipped["rank_compute"] = f"the placement planner is not available ({err})"
        return None


# ----------------------------------------------------------------------------- the report
def build_report(inputs: Inputs, opts, out: Path) -> dict[str, Any]:
    """report.json: ``format``, ``inputs`` (paths, split, documents, sequences, seq_length),
    ``model``, ``token_share_by_width``, ``token_share_over_time``, ``last_valid_loss``,
    ``difficulty_by_width``, ``router_entropy``, ``routing_stability``, ``rank_compute``
    (``from_metrics``, ``from_eval_routing``, ``logged_by_training``), ``specialisation``,
    ``skipped`` (section -> reason), ``notes``, ``plots``, ``seconds``."""
    start = time.perf_counter()
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "version": 1,
        "inputs": {"target": inputs.target, "metrics": str(inputs.metrics) if inputs.metrics else None,
                   "checkpoint": str(inputs.checkpoint) if inputs.checkpoint else None,
                   "export": str(inputs.export) if inputs.export else None, "options_from": inputs.args_source},
    }
    report["rank_compute"] = {}
    skipped: dict[str, str] = {}
    notes = list(inputs.notes)
    model_config = None
    if inputs.export is not None:
        from modse_megatron.inference.config import ExportConfig

        model_config = ExportConfig.from_json(inputs.export)
    widths = expert_widths(inputs, model_config, opts.expert_widths)
    log = run_log.read_metrics(inputs.metrics) if inputs.metrics is not None else None
    if log is not None:
        notes += log.notes
        report["last_valid_loss"] = run_log.last_eval(log)
    if log is not None and not log.routed():
        skipped["token_share_by_width"] = f"{inputs.metrics} has no tokens_per_expert rows (a dense run?)"
    elif log is not None:
        if widths is None:
            raise AnalysisError(f"{inputs.metrics} lists tokens per expert but not their widths: pass --checkpoint "
                                f"CKPT (the run's), --config YAML or --expert-widths W1,W2,..")
        report["token_share_by_width"] = run_log.token_share_by_width(log, widths)
        report["token_share_over_time"] = run_log.share_over_time(log, widths)
        rank = report["rank_compute"]
        logged = run_log.logged_imbalance(log)
        if logged:
            rank["logged_by_training"] = logged
        if inputs.ep is not None and inputs.run_args is not None:
            ranks = _placement(inputs, skipped)
            if ranks is not None:
                rank["from_metrics"] = run_log.rank_load(run_log.layer_counts(log, widths), widths, ranks, inputs.ep,
                                                         f"placement of {inputs.args_source}")
                if logged and logged["replans"]:
                    notes.append("the run re-planned its placement; rank_compute.from_metrics applies the final "
                                 "placement to the whole run (logged_by_training has the live values)")
    else:
        skipped["token_share_by_width"] = "no metrics.jsonl: pass --metrics or analyse the run's --log-dir"
    if inputs.checkpoint is not None or inputs.export is not None:
        with tempfile.TemporaryDirectory(prefix="modse-analyze-") as tmp:
            model_analyses(inputs, opts, report, skipped, Path(tmp))
    else:
        for key in ("difficulty_by_width", "router_entropy", "routing_stability", "specialisation"):
            skipped[key] = "needs a checkpoint or export: pass --checkpoint CKPT"
    if not {"from_metrics", "from_eval_routing"} & set(report["rank_compute"]):
        skipped.setdefault("rank_compute", "needs the run's EP size and placement: analyse its checkpoint, or pass "
                                           "--config YAML")
    if not report["rank_compute"]:  # (logged_by_training stays: what training itself measured)
        del report["rank_compute"]
    if not any(report.get(k) for k in ("token_share_by_width", "difficulty_by_width")):
        raise AnalysisError(f"nothing to analyse in {inputs.target}: {'; '.join(skipped.values())}")
    report["skipped"], report["notes"] = skipped, notes
    report["plots"] = _draw(report, out)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def _draw(report: dict[str, Any], out: Path) -> list[str]:
    from .report import draw

    return draw(report, out)


def finite(value: Any) -> Any:
    """``value`` with every NaN/Inf float replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_report(report: dict[str, Any], out: Path) -> None:
    """report.json (renamed into place: never half-written) and report.md."""
    from .report import markdown

    report = finite(report)
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, out / "report.json")
    (out / "report.md").write_text(markdown(report))


def _parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description="Routing by expert width, difficulty x width, router entropy "
                                                     "and stability, EP compute load and topic specialisation of a run.")
    p.add_argument("target", metavar="RUN_DIR_OR_CKPT", help="a run's --log-dir or metrics.jsonl, a checkpoint "
                                                             "(--save root or iter_N), or an export")
    p.add_argument("--out", required=True, help="output directory (report.json, report.md, PNGs)")
    p.add_argument("--checkpoint", help="the run's checkpoint (or an export) when TARGET is a run directory")
    p.add_argument("--metrics", help="the run's metrics.jsonl when TARGET is a checkpoint")
    p.add_argument("--checkpoint-b", help="second checkpoint (or export) for routing stability")
    p.add_argument("--data", help="indexed dataset prefix to analyse (default: the run's training data)")
    p.add_argument("--tokenizer", help="tokenizer.json of --data (default: found next to it)")
    p.add_argument("--split", choices=SPLITS, default="valid", help="documents to analyse, by the run's split (default valid)")
    p.add_argument("--max-sequences", type=int, default=64, help="windows of seq_length + 1 tokens to run (default 64)")
    p.add_argument("--seq-length", type=int, help="tokens per window (default: the run's seq_length)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--config", help="the run's modse-pretrain YAML (widths, placement) when there is no checkpoint")
    p.add_argument("--expert-widths", help="widths of the logical experts, e.g. 96,32,80,48 (metrics-only runs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    for name in ("max_sequences", "batch_size", "seq_length"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            fail(PROG, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from modse_megatron.checkpoint.errors import CheckpointError
    from modse_megatron.inference.config import ExportError
    from modse_megatron.training import DataError

    from modse_megatron.training.arguments import ConfigError

    errors = (AnalysisError, CheckpointError, ExportError, DataError, ConfigError)
    out = Path(opts.out)
    try:
        if out.exists() and not out.is_dir():
            raise AnalysisError(f"--out {out} is a file: give a directory")
        inputs = resolve_inputs(opts.target, opts.checkpoint, opts.metrics, opts.config)
        out.mkdir(parents=True, exist_ok=True)
        report = build_report(inputs, opts, out)
        write_report(report, out)
    except errors as err:
        fail(PROG, str(err))
    except OSError as err:  # unreadable input, full disk, no permission to write --out
        fail(PROG, f"{err}: check the path and its permissions (and free space for --out)")
    print(f"{PROG}: wrote {out / 'report.json'}, {out / 'report.md'} and {len(report['plots'])} plots "
          f"in {report['seconds']} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
