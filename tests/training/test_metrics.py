"""MetricsWriter: metrics.jsonl rows, the loss plot, resumed runs appending, silent non-logging ranks."""
import json

import pytest

from modse_megatron.training.metrics import MetricsWriter, Throughput, plot_losses


def _row(iteration, loss, **extra):
    return {"iteration": iteration, "lm_loss": loss, "lr": 1e-3, "tokens_per_sec": 512.0, "step_time_s": 0.5,
            "grad_norm": 1.5, **extra}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_plot_and_resumed_run_appends(tmp_path, capsys):
    log = tmp_path / "run" / "log"  # created on demand
    writer = MetricsWriter(str(log), enabled=True, total_iters=3, start_iter=0, progress=False)
    first = [_row(1, 5.0, load_balancing_loss=0.1, tokens_per_expert={"1": [3, 1, 0, 4]}), _row(2, 4.0)]
    for row in first:
        writer.train(row)
    writer.evaluation(2, "valid", 4.25)
    writer.message("saved checkpoint x")
    plot = writer.close()
    assert _rows(log / "metrics.jsonl") == [*first, {"iteration": 2, "split": "valid", "lm_loss": 4.25}]
    assert plot == log / "loss.png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.splitlines() == ["iteration 2: valid loss 4.2500", "saved checkpoint x"]

    resumed = MetricsWriter(str(log), enabled=True, total_iters=3, start_iter=2, progress=False)
    resumed.train(_row(3, 3.5))
    resumed.close()
    rows = _rows(log / "metrics.jsonl")
    assert len(rows) == 4 and rows[-1] == _row(3, 3.5)  # appended, earlier rows kept


def test_other_ranks_write_nothing(tmp_path, capsys):
    writer = MetricsWriter(str(tmp_path / "log"), enabled=False, total_iters=3, start_iter=0, progress=True)
    writer.train(_row(1, 5.0))
    writer.evaluation(1, "valid", 5.0)
    writer.message("hello")
    writer.advance()
    assert writer.close() is None
    assert not (tmp_path / "log").exists()
    assert capsys.readouterr() == ("", "")


def test_no_plot_without_training_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"iteration": 0, "split": "valid", "lm_loss": 6.0}) + "\n")
    assert plot_losses(path, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_tensorboard_without_the_package_names_the_fix(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(RuntimeError) as err:
        MetricsWriter(str(tmp_path), enabled=True, total_iters=1, start_iter=0, progress=False, tensorboard=True)
    assert str(err.value) == "--tensorboard needs the tensorboard package: pip install 'modse-megatron[tensorboard]'"


def test_throughput_is_tokens_over_the_step_time():
    meter = Throughput()
    sum(range(10000))
    rate, dt = meter.lap(4096)
    assert dt > 0 and rate == pytest.approx(4096 / dt)
