"""Run observability on rank 0: progress bar, ``metrics.jsonl``, optional TensorBoard, loss plot.

``metrics.jsonl`` holds one JSON object per logged training iteration::

    {"iteration", "lm_loss" (null when NaN/Inf), "lr", "tokens_per_sec", "step_time_s", "grad_norm",
     "skipped", "skipped_nonfinite", "load_balancing_loss"?, "z_loss"?,
     "tokens_per_expert"?: {layer: [per logical expert]},
     "compute_max_over_mean"?: max / mean over EP ranks of Σ tokens x width (with re-planning)}

one per evaluation: ``{"iteration", "split": "valid"|"test", "lm_loss"}``, and one per event,
e.g. ``{"iteration", "event": "replan", "moved_experts", "moved_bytes", ...}``. The loss plot
(``loss.png``) is drawn from that file at the end, so it always matches what was logged.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Writes metrics on the logging rank; every method is a no-op elsewhere."""

    def __init__(self, log_dir: str, enabled: bool, total_iters: int, start_iter: int,
                 progress: bool = True, tensorboard: bool = False, plot: bool = True):
        self.enabled = enabled
        self.plot = plot
        self.dir = Path(log_dir)
        self._bar = None
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file.
        self._file = open(self.dir / "metrics.jsonl", "a", buffering=1)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_iters, initial=start_iter, desc="pretrain", unit="it", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("--tensorboard needs the tensorboard package: pip install 'modse-megatron[tensorboard]'") from None
            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def train(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self._tb.add_scalar(f"train/{key}", value, record["iteration"])
        if self._bar is not None:
            loss = record["lm_loss"]
            post = {"loss": "nan" if loss is None else f"{loss:.3f}", "lr": f"{record['lr']:.2e}",
                    "tok/s": f"{record['tokens_per_sec']:.0f}"}
            if "load_balancing_loss" in record:
                post["aux"] = f"{record['load_balancing_loss']:.3f}"
            if "compute_layer_max_over_mean" in record:  # EP ranks' compute imbalance (Σ tokens x width, per layer)
                post["imb"] = f"{record['compute_layer_max_over_mean']:.2f}"
            self._bar.set_postfix(post, refresh=False)

    def event(self, row: dict[str, Any]) -> None:
        """A non-training row of metrics.jsonl (e.g. ``{"event": "replan", ...}``)."""
        if self.enabled:
            self._file.write(json.dumps(row) + "\n")

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def evaluation(self, iteration: int, split: str, loss: float) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"iteration": iteration, "split": split, "lm_loss": loss}) + "\n")
        if self._tb is not None:
            self._tb.add_scalar(f"{split}/lm_loss", loss, iteration)
        self.message(f"iteration {iteration}: {split} loss {loss:.4f}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> Path | None:
        """Finish the files and draw the loss curve (unless ``plot`` is off); returns the plot path."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()
        return plot_losses(self.dir / "metrics.jsonl", self.dir / "loss.png") if self.plot else None


def plot_losses(metrics_path: Path, out_path: Path) -> Path | None:
    """Training loss per iteration (and validation points) from a metrics.jsonl file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = {}, {}
    for line in Path(metrics_path).read_text().splitlines():
        rec = json.loads(line)
        if "split" in rec:
            if rec["split"] == "valid":
                valid[rec["iteration"]] = rec["lm_loss"]
        elif "event" not in rec and rec.get("lm_loss") is not None:
            train[rec["iteration"]] = rec["lm_loss"]  # a resumed run overwrites replayed steps
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = sorted(train)
    ax.plot(xs, [train[x] for x in xs], label="train", lw=1)
    if valid:
        vx = sorted(valid)
        ax.plot(vx, [valid[x] for x in vx], "o-", label="valid")
    ax.set_xlabel("iteration")
    ax.set_ylabel("LM loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


class Throughput:
    """Tokens per second over one step (wall clock, measured on every rank alike)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()

    def lap(self, tokens: int) -> tuple[float, float]:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return tokens / dt if dt > 0 else 0.0, dt
