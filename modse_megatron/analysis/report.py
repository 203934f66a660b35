"""Plots (matplotlib, Agg) and the short markdown summary of a ``modse-analyze`` report.

Both are drawn from the finished ``report.json`` dict only, so what a reader sees always
matches the numbers stored next to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, panels: int, width: float = 4.2, height: float = 3.2):
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _layer_title(name: str) -> str:
    return "all MoE layers" if name in ("all", "all_layers") else f"layer {name}"


def _save(fig, plt, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def plot_share_over_time(section: dict[str, Any], out: Path) -> str:
    plt = _pyplot()
    layers = section["layers"]
    fig, axes = _grid(plt, len(layers))
    xs = section["iterations"]
    for ax, (name, series) in zip(axes, layers.items()):
        for width, ys in series.items():
            ax.plot(xs, [float("nan") if y is None else y for y in ys], lw=1.2, label=f"width {width}")
        ax.set_title(_layer_title(name))
        ax.set_xlabel("iteration")
        ax.set_ylabel("share of routed tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, plt, out / "token_share_over_time.png")


def plot_share_by_width(section: dict[str, Any], out: Path) -> str:
    plt = _pyplot()
    layers = section["layers"]
    widths = sorted({int(w) for v in layers.values() for w in v["share"]})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(widths) * len(layers) / 3), 3.6))
    step = 0.8 / len(layers)
    for i, (name, v) in enumerate(layers.items()):
        ax.bar([j + i * step for j in range(len(widths))], [v["share"][str(w)] for w in widths], step,
               label=_layer_title(name))
    ax.set_xticks([j + 0.4 - step / 2 for j in range(len(widths))], [str(w) for w in widths])
    ax.set_xlabel("expert width")
    ax.set_ylabel("share of routed tokens")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, out / "token_share_by_width.png")


def plot_difficulty(section: dict[str, Any], out: Path) -> str:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    deciles = [d["decile"] for d in section["deciles"]]
    for name, v in {**section["layers"], "all": section["all_layers"]}.items():
        left.plot(deciles, v["mean_width"], "o-" if name == "all" else "-", lw=2 if name == "all" else 1,
                  label=_layer_title(name))
    left.set_xlabel("loss decile (1 = easiest tokens)")
    left.set_ylabel("routed mean expert width")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    bottom = [0.0] * len(deciles)
    for width, mass in section["all_layers"]["mass_by_width"].items():
        right.bar(deciles, mass, bottom=bottom, label=f"width {width}")
        bottom = [b + m for b, m in zip(bottom, mass)]
    right.set_xlabel("loss decile (1 = easiest tokens)")
    right.set_ylabel("routing mass (mean over MoE layers)")
    right.legend(fontsize=7)
    return _save(fig, plt, out / "difficulty_by_width.png")


def plot_rank_compute(section: dict[str, Any], out: Path, label: str) -> str:
    plt = _pyplot()
    layers = section["layers"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ep = section["ep"]
    step = 0.8 / len(layers)
    for i, (name, v) in enumerate(layers.items()):
        mean = sum(v["compute"]) / ep or 1.0
        ax.bar([r + i * step for r in range(ep)], [c / mean for c in v["compute"]], step, label=_layer_title(name))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([r + 0.4 - step / 2 for r in range(ep)], [f"EP rank {r}" for r in range(ep)])
    ax.set_ylabel("Σ tokens x width / mean")
    ax.set_title(f"EP ranks' compute on {label}, placement {section['placement']}", fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, plt, out / "rank_compute.png")


def plot_specialisation(section: dict[str, Any], out: Path, widths: Optional[list[int]] = None, top: int = 12) -> str:
    """Per MoE layer: each expert's share of its units by topic (the most frequent topics)."""
    plt = _pyplot()
    topics = list(section["topic_counts"])[:top]
    layers = section["layers"]
    fig, axes = _grid(plt, len(layers), width=5.0, height=3.6)
    for ax, (name, v) in zip(axes, layers.items()):
        grid = [[e["common_topics"].get(t, 0.0) for t in topics] for e in v["experts"]]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_xticks(range(len(topics)), topics, rotation=60, fontsize=6, ha="right")
        experts = [e["expert"] for e in v["experts"]]
        ax.set_yticks(range(len(experts)), [f"{e} (w {widths[e]})" if widths else str(e) for e in experts], fontsize=7)
        ax.set_ylabel("expert (width)")
        ax.set_title(f"{_layer_title(name)}: NMI {v['nmi']:.3f} (shuffled {v['nmi_shuffled_mean']:.3f})"
                     if v["nmi"] is not None and v["nmi_shuffled_mean"] is not None else _layer_title(name), fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.04)
    return _save(fig, plt, out / "specialisation.png")


def draw(report: dict[str, Any], out: Path) -> list[str]:
    """Every plot the report has data for; returns the file names written."""
    plots: list[tuple[str, Callable[[dict[str, Any], Path], str]]] = [
        ("token_share_over_time", plot_share_over_time), ("token_share_by_width", plot_share_by_width),
        ("difficulty_by_width", plot_difficulty)]
    names = [fn(report[key], out) for key, fn in plots if report.get(key)]
    if report.get("specialisation"):
        names.append(plot_specialisation(report["specialisation"], out, (report.get("model") or {}).get("expert_widths")))
    rank = (report.get("rank_compute") or {})
    if rank.get("from_metrics"):
        names.append(plot_rank_compute(rank["from_metrics"], out, "the training tokens (metrics.jsonl)"))
    elif rank.get("from_eval_routing"):
        names.append(plot_rank_compute(rank["from_eval_routing"], out, "the analysed data"))
    return names


# ----------------------------------------------------------------------------- markdown
def _f(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict[str, Any]) -> str:
    """The short human summary (``report.md``); report.json holds everything."""
    inputs, model = report["inputs"], report.get("model") or {}
    lines = ["# modse-analyze report", ""]
    source = ", ".join(f"{k} `{inputs[k]}`" for k in ("metrics", "checkpoint", "export") if inputs.get(k))
    lines.append(f"Inputs: {source}.")
    if model:
        lines.append(f"Model: {model['num_layers']} layers, {model['num_experts']} experts of widths "
                     f"{','.join(map(str, model['expert_widths']))}, top-{model['router_topk']}, "
                     f"{model['routing_granularity']}-level {model['router_type']} router.")
    if inputs.get("sequences"):
        lines.append(f"Model analyses: {inputs['sequences']} windows of {inputs['seq_length']} tokens from the "
                     f"{inputs['split']} split of `{inputs['data']}`.")
    last = report.get("last_valid_loss")
    if last and last.get("lm_loss") is not None:
        lines.append(f"Last validation loss: {_f(last['lm_loss'], 4)} at iteration {last['iteration']}.")
    share = report.get("token_share_by_width")
    if share:
        widths = sorted({int(w) for v in share["layers"].values() for w in v["share"]})
        lines += ["", f"## Share of routed tokens by expert width ({share['iterations']} logged steps)", ""]
        lines += _table(["layer"] + [f"w={w}" for w in widths] + ["mean width"],
                        [[name] + [_f(v["share"][str(w)]) for w in widths] + [_f(v["mean_width"], 1)]
                         for name, v in share["layers"].items()])
    diff = report.get("difficulty_by_width")
    if diff:
        lines += ["", f"## Harder tokens -> larger experts? ({diff['tokens']} tokens, {diff['sequences']} sequences)",
                  "", "Routed mean width (probability-weighted) in the easiest and hardest loss decile; Spearman "
                  "rho of token loss vs routed width (p: tokens as independent; CI: sequences resampled).", ""]
        rows = []
        for name, v in {**diff["layers"], "all": diff["all_layers"]}.items():
            s = v["spearman"]
            ci = s.get("ci95_by_sequence")
            rows.append([name, _f(v["mean_width"][0], 1), _f(v["mean_width"][-1], 1), _f(s["rho"]), _f(s["p_value"]),
                         f"[{_f(ci[0])}, {_f(ci[1])}]" if ci else "n/a"])
        lines += _table(["layer", "width, easiest 10%", "width, hardest 10%", "rho", "p", "95% CI"], rows)
        if diff.get("note"):
            lines += ["", diff["note"]]
    entropy, stability = report.get("router_entropy"), report.get("routing_stability")
    if entropy:
        lines += ["", "## Router entropy" + (" and stability" if stability else ""), ""]
        header = ["layer", "entropy (nats)", "/ ln E"]
        if stability:
            header += ["top-1 changed vs B", "top-k set changed vs B"]
        rows = []
        for name, v in entropy.items():
            row = [name, _f(v["mean_nats"]), _f(v["normalized"])]
            if stability:
                row += [_f(stability[name]["top1_changed"]), _f(stability[name]["topk_set_changed"])]
            rows.append(row)
        lines += _table(header, rows)
    rank = report.get("rank_compute") or {}
    for key, title in (("from_metrics", "the training tokens in metrics.jsonl"), ("from_eval_routing", "the analysed data")):
        section = rank.get(key)
        if section:
            lines += ["", f"## EP ranks' compute, Σ tokens x width, on {title} (EP {section['ep']}, "
                          f"placement {section['placement']})", ""]
            lines += _table(["layer", "per rank / mean", "max / mean"],
                            [[name, ", ".join(_f(c / (sum(v["compute"]) / section["ep"] or 1.0), 2) for c in v["compute"]),
                              _f(v["max_over_mean"])] for name, v in section["layers"].items()])
    logged = rank.get("logged_by_training")
    if logged:
        lines += ["", "## EP ranks' compute as training logged it (MoDSE runs with EP > 1)", ""]
        if logged["values"]:
            lines.append(f"max / mean per step: first {_f(logged['first'])}, last {_f(logged['last'])}, "
                         f"mean {_f(logged['mean'])} over {len(logged['values'])} steps.")
        for event in logged["replans"]:
            which = "" if event.get("layer", "all") == "all" else f" layer {event['layer']}"
            lines.append(f"- iteration {event['iteration']}: re-planned{which} to placement {event['placement']} "
                         f"({event['moved_experts']} experts moved)")
    spec = report.get("specialisation")
    if spec:
        topics = f"{spec['topics']} topic" + ("s" if spec["topics"] != 1 else "")
        lines += ["", f"## Specialisation by topic ({spec['unit']} units, {spec['sequences']} sequences, {topics})", "",
                  "Normalised mutual information between each unit's top-1 expert and its topic (top-level package "
                  "of its source file), next to the same with topics shuffled over sequences (the level of no "
                  "specialisation at this sample size).", ""]
        lines += _table(["layer", "NMI(expert, topic)", "shuffled mean", "shuffled p95"],
                        [[name, _f(v["nmi"]), _f(v["nmi_shuffled_mean"]), _f(v["nmi_shuffled_p95"])]
                         for name, v in spec["layers"].items()])
        if spec.get("note"):
            lines += ["", spec["note"]]
    if report.get("skipped"):
        lines += ["", "## Not analysed", ""] + [f"- {k}: {v}" for k, v in report["skipped"].items()]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report.get("plots", [])), ""]
    return "\n".join(lines)
