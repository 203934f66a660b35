"""What ``metrics.jsonl`` says about routing: token share per expert width (whole run and over
training time) and the EP ranks' compute load (Σ tokens x width).

Torch-free: a run directory can be analysed without loading a model. The per-iteration rows
hold ``tokens_per_expert`` = {layer_number (1-based, as megatron numbers layers): [tokens routed
to each LOGICAL expert in that step, summed over DP ranks and micro-batches, top-k assignments
before capacity dropping]}. A resumed run appends to the same file and replays the steps after
its checkpoint, so rows are de-duplicated by iteration, the last one winning (as the loss plot
does): every step is counted once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from . import AnalysisError

ALL = "all"  # key of the over-all-MoE-layers entries next to per-layer ones
MAX_TIME_POINTS = 200


@dataclass
class MetricsLog:
    """The rows of one ``metrics.jsonl``: training steps by iteration, evaluations, events."""

    path: Path
    train: dict[int, dict[str, Any]] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def routed(self) -> list[tuple[int, dict[str, list[int]]]]:
        """(iteration, tokens_per_expert) of every step that logged them, by iteration."""
        return [(it, row["tokens_per_expert"]) for it, row in sorted(self.train.items())
                if row.get("tokens_per_expert")]


def read_metrics(path: str | Path) -> MetricsLog:
    """Parse ``metrics.jsonl``. A torn last line (a run killed mid-write) is skipped with a
    note; any other unreadable line is an :class:`AnalysisError` naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AnalysisError(f"cannot read {path} ({err}): point at a run's --log-dir or its metrics.jsonl") from None
    log = MetricsLog(path)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
                raise ValueError("not an object with an integer 'iteration'")
        except ValueError as err:
            if number == len(lines):
                log.notes.append(f"{path.name} line {number} is incomplete (run stopped mid-write): skipped")
                continue
            raise AnalysisError(f"{path} line {number} is not a metrics row ({str(err)[:80]}): "
                                f"give the metrics.jsonl written by modse-pretrain --log-dir") from None
        if "event" in row:
            log.events.append(row)
        elif "split" in row:
            log.evals.append(row)
        else:
            log.train[row["iteration"]] = row  # a replayed step overwrites the earlier one
    return log


def _check_counts(it: int, layer: str, counts: Any, widths: Sequence[int], path: Path) -> None:
    if not isinstance(counts, list) or len(counts) != len(widths) or \
            any(not isinstance(c, (int, float)) or c < 0 for c in counts):
        size = len(counts) if isinstance(counts, list) else "no"
        raise AnalysisError(f"{path}: iteration {it} layer {layer} lists {size} expert counts but the model has "
                            f"{len(widths)} experts (widths {','.join(map(str, widths))}): the widths do not "
                            f"belong to this run; give the run's own checkpoint, --config or --expert-widths")


def _shares(counts: Sequence[float], widths: Sequence[int]) -> dict[str, Any]:
    total = float(sum(counts))
    by_width: dict[int, float] = {}
    for c, w in zip(counts, widths):
        by_width[w] = by_width.get(w, 0.0) + float(c)
    share = {str(w): (by_width[w] / total if total else 0.0) for w in sorted(by_width)}
    return {
        "tokens": int(total),
        "tokens_by_width": {str(w): int(by_width[w]) for w in sorted(by_width)},
        "share": share,
        "share_by_expert": [float(c) / total if total else 0.0 for c in counts],
        "mean_width": sum(float(c) * w for c, w in zip(counts, widths)) / total if total else None,
    }


def layer_counts(log: MetricsLog, widths: Sequence[int]) -> dict[str, list[float]]:
    """Tokens per logical expert summed over the whole run, per layer (checked against widths)."""
    totals: dict[str, list[float]] = {}
    for it, per_layer in log.routed():
        for layer, counts in per_layer.items():
            _check_counts(it, layer, counts, widths, log.path)
            acc = totals.setdefault(layer, [0.0] * len(widths))
            for e, c in enumerate(counts):
                acc[e] += c
    return dict(sorted(totals.items(), key=lambda kv: int(kv[0])))


def token_share_by_width(log: MetricsLog, widths: Sequence[int]) -> dict[str, Any]:
    """Per MoE layer (and ``all`` layers together): tokens and share of routed tokens per expert
    width over the whole run; shares of a layer sum to 1. Experts of equal width are pooled
    (``share_by_expert`` keeps them apart, in logical order)."""
    totals = layer_counts(log, widths)
    if not totals:
        raise AnalysisError(f"{log.path} has no tokens_per_expert rows: the run is dense, or logged before "
                            f"routing statistics existed")
    out = {layer: _shares(counts, widths) for layer, counts in totals.items()}
    out[ALL] = _shares([sum(c[e] for c in totals.values()) for e in range(len(widths))], widths)
    return {"widths": list(widths), "iterations": len(log.routed()), "layers": out}


def share_over_time(log: MetricsLog, widths: Sequence[int], max_points: int = MAX_TIME_POINTS) -> dict[str, Any]:
    """Share per width vs iteration: consecutive steps are pooled into at most ``max_points``
    bins (counts summed, then normalised), each labelled by its last iteration."""
    rows = log.routed()
    size = max(1, -(-len(rows) // max_points))
    bins: list[tuple[int, dict[str, dict[str, float]]]] = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        sums: dict[str, list[float]] = {}
        for it, per_layer in chunk:
            for layer, counts in per_layer.items():
                _check_counts(it, layer, counts, widths, log.path)
                for name in (layer, ALL):
                    acc = sums.setdefault(name, [0.0] * len(widths))
                    for e, c in enumerate(counts):
                        acc[e] += c
        bins.append((chunk[-1][0], {name: _shares(acc, widths)["share"] for name, acc in sums.items()}))
    names = sorted({name for _, b in bins for name in b if name != ALL}, key=int) + [ALL]
    distinct = [str(w) for w in sorted(set(widths))]
    # A layer absent from some bins (e.g. logged later) gets None there, so series stay aligned.
    layers = {name: {w: [b[name][w] if name in b else None for _, b in bins] for w in distinct} for name in names}
    iterations = [it for it, _ in bins]
    return {"iterations": iterations, "steps_per_point": size, "layers": layers}


def rank_compute(counts: Sequence[float], widths: Sequence[int], ranks: Sequence[int], ep: int) -> dict[str, Any]:
    """Σ tokens x width on every EP rank (the FLOPs an expert spends grow with its width) and
    max / mean over ranks (1.0 = balanced): what a placement costs for these loads."""
    per_rank = [0.0] * ep
    for c, w, r in zip(counts, widths, ranks):
        per_rank[r] += float(c) * w
    mean = sum(per_rank) / ep if ep else 0.0
    return {"compute": per_rank, "max_over_mean": max(per_rank) / mean if mean > 0 else None}


def rank_load(totals: dict[str, list[float]], widths: Sequence[int], ranks: dict[str, list[int]], ep: int,
              source: str) -> dict[str, Any]:
    """:func:`rank_compute` per layer (each under its own placement, ``ranks[layer]``) and over all
    layers (every rank's compute summed over the layers)."""
    layers = {layer: rank_compute(c, widths, ranks[layer], ep) for layer, c in totals.items()}
    if totals:
        per_rank = [sum(v["compute"][r] for v in layers.values()) for r in range(ep)]
        mean = sum(per_rank) / ep
        layers[ALL] = {"compute": per_rank, "max_over_mean": max(per_rank) / mean if mean > 0 else None}
    distinct = {tuple(ranks[layer]) for layer in totals} or {tuple(next(iter(ranks.values()), []))}
    placement: Any = list(distinct.pop()) if len(distinct) == 1 else {layer: list(ranks[layer]) for layer in totals}
    return {"ep": ep, "placement": placement, "source": source, "layers": layers}


def logged_imbalance(log: MetricsLog) -> Optional[dict[str, Any]]:
    """The imbalance training itself logged (``compute_max_over_mean``, MoDSE runs with EP > 1) and
    the placements of its re-planning events, or None when it logged none."""
    values = [(it, row["compute_max_over_mean"]) for it, row in sorted(log.train.items())
              if isinstance(row.get("compute_max_over_mean"), (int, float))]
    replans = [{"iteration": e["iteration"], "layer": e.get("layer", "all"), "placement": e.get("placement"),
                "moved_experts": e.get("moved_experts")} for e in log.events if e.get("event") == "replan"]
    if not values and not replans:
        return None
    mean = sum(v for _, v in values) / len(values) if values else None
    return {"mean": mean, "first": values[0][1] if values else None, "last": values[-1][1] if values else None,
            "iterations": [it for it, _ in values], "values": [v for _, v in values], "replans": replans}


def last_eval(log: MetricsLog, split: str = "valid") -> Optional[dict[str, Any]]:
    """The evaluation of ``split`` at the latest iteration; of two at that iteration (a resumed
    run evaluating a replayed step again) the later row in the file."""
    rows = [r for r in log.evals if r.get("split") == split]
    return max(reversed(rows), key=lambda r: r["iteration"]) if rows else None
