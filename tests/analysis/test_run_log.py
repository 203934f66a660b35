"""metrics.jsonl as modse-pretrain writes it (the real MetricsWriter): training rows, evaluations,
re-planning events, a resumed run's replayed steps, a torn last line -> token share per expert
width, over time, and the EP ranks' compute, checked against sums done by hand."""
import json

import pytest

from modse_megatron.analysis import AnalysisError
from modse_megatron.analysis import run_log
from modse_megatron.training.metrics import MetricsWriter

WIDTHS = [96, 32, 80, 48]

# iteration -> tokens_per_expert as the training loop logs them (layer numbers are 1-based).
STEPS = {
    1: {"1": [10, 20, 30, 40], "3": [5, 5, 5, 5]},
    2: {"1": [0, 10, 0, 10], "3": [20, 0, 0, 0]},
    3: {"1": [99, 99, 99, 99], "3": [99, 99, 99, 99]},   # replayed after the resume below
    4: {"1": [7, 0, 0, 1], "3": [1, 2, 3, 4]},
}
REPLAYED = {3: {"1": [1, 1, 1, 1], "3": [2, 0, 2, 0]}}


def _row(it, tokens, **extra):
    return {"iteration": it, "lm_loss": 6.0 - 0.1 * it, "lr": 1e-3, "tokens_per_sec": 100.0, "step_time_s": 0.1,
            "grad_norm": 1.0, "skipped": False, "skipped_nonfinite": 0, "load_balancing_loss": 1.0,
            "tokens_per_expert": tokens, **extra}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def metrics(written, tmp_path):
    """A fresh copy of the written metrics.jsonl (tests may damage it)."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(written.read_bytes())
    return path


def write_run(log_dir):
    """Iterations 1-4, a valid/test eval at 2 and 4, a re-planning event at 2; then a resume from
    iteration 2 replays 3 (other counts) and 4 (same counts) into the same file."""
    writer = MetricsWriter(str(log_dir), enabled=True, total_iters=4, start_iter=0, progress=False)
    for it in (1, 2, 3, 4):
        writer.train(_row(it, STEPS[it], compute_max_over_mean=1.0 + it / 10))
        if it == 2:
            writer.event({"iteration": 2, "event": "replan", "layer": "all", "policy": "planner", "moved_experts": 2,
                          "moved_bytes": 1024, "max_over_mean_compute_before": 1.4,
                          "max_over_mean_compute_after": 1.1, "placement": [0, 1, 1, 0], "seconds": 0.5})
        if it in (2, 4):
            writer.evaluation(it, "valid", 5.0 - it / 10)
            writer.evaluation(it, "test", 5.1 - it / 10)
    writer._bar = None
    writer.close()
    resumed = MetricsWriter(str(log_dir), enabled=True, total_iters=4, start_iter=2, progress=False)
    resumed.train(_row(3, REPLAYED[3], lm_loss=None))  # a NaN loss is logged as null
    resumed.train(_row(4, STEPS[4]))
    resumed.evaluation(4, "valid", 4.5)
    resumed.close()
    return log_dir / "metrics.jsonl"


def _final_counts():
    steps = {**STEPS, **REPLAYED}
    return {layer: [sum(steps[it][layer][e] for it in steps) for e in range(4)] for layer in ("1", "3")}


def test_parses_rows_events_and_resumes(written):
    log = run_log.read_metrics(written)
    assert sorted(log.train) == [1, 2, 3, 4]
    assert log.train[3]["tokens_per_expert"] == REPLAYED[3]  # the replayed step wins
    assert [e["event"] for e in log.events] == ["replan"]
    assert [(r["iteration"], r["split"]) for r in log.evals] == [(2, "valid"), (2, "test"), (4, "valid"),
                                                                 (4, "test"), (4, "valid")]
    assert run_log.last_eval(log) == {"iteration": 4, "split": "valid", "lm_loss": 4.5}  # the resumed run's
    assert [it for it, _ in log.routed()] == [1, 2, 3, 4] and not log.notes


def test_token_share_by_width_by_hand(written):
    log = run_log.read_metrics(written)
    share = run_log.token_share_by_width(log, WIDTHS)
    counts = _final_counts()
    assert counts == {"1": [18, 31, 31, 52], "3": [28, 7, 10, 9]}
    assert share["widths"] == WIDTHS and share["iterations"] == 4 and list(share["layers"]) == ["1", "3", "all"]
    layer1 = share["layers"]["1"]
    assert layer1["tokens"] == 132
    assert layer1["tokens_by_width"] == {"32": 31, "48": 52, "80": 31, "96": 18}
    assert layer1["share"] == pytest.approx({"32": 31 / 132, "48": 52 / 132, "80": 31 / 132, "96": 18 / 132})
    assert layer1["mean_width"] == pytest.approx((18 * 96 + 31 * 32 + 31 * 80 + 52 * 48) / 132)
    every = share["layers"]["all"]
    assert every["tokens_by_width"] == {"32": 38, "48": 61, "80": 41, "96": 46} and every["tokens"] == 186
    for name, layer in share["layers"].items():
        assert sum(layer["share"].values()) == pytest.approx(1.0), name
        assert sum(layer["share_by_expert"]) == pytest.approx(1.0), name


def test_equal_widths_are_pooled(written):
    log = run_log.read_metrics(written)
    layer3 = run_log.token_share_by_width(log, [64, 32, 64, 32])["layers"]["3"]
    assert layer3["tokens_by_width"] == {"32": 7 + 9, "64": 28 + 10}
    assert layer3["share_by_expert"] == pytest.approx([28 / 54, 7 / 54, 10 / 54, 9 / 54])


def test_share_over_time_bins(written):
    log = run_log.read_metrics(written)
    over = run_log.share_over_time(log, WIDTHS, max_points=2)
    assert over["iterations"] == [2, 4] and over["steps_per_point"] == 2
    # Bin 1 = iterations 1+2 of layer 1: [10, 30, 30, 50] over 120 tokens; width 32 is expert 1.
    assert over["layers"]["1"]["32"][0] == pytest.approx(30 / 120)
    assert over["layers"]["1"]["48"][1] == pytest.approx((1 + 1) / (4 + 8))  # iterations 3 (replayed) + 4
    every = over["layers"]["all"]
    assert every["96"][0] == pytest.approx((10 + 5 + 0 + 20) / (100 + 20 + 20 + 20))
    for name, series in over["layers"].items():
        for point in range(2):
            assert sum(series[w][point] for w in series) == pytest.approx(1.0), name
    assert run_log.share_over_time(log, WIDTHS)["steps_per_point"] == 1


def test_rank_compute_by_hand():
    # Placement [0, 0, 1, 1]: rank 0 holds widths 96, 32; rank 1 holds 80, 48.
    result = run_log.rank_compute([10, 20, 30, 40], WIDTHS, [0, 0, 1, 1], 2)
    assert result["compute"] == [10 * 96 + 20 * 32, 30 * 80 + 40 * 48]
    assert result["max_over_mean"] == pytest.approx(4320 / 2960)
    assert run_log.rank_compute([0, 0, 0, 0], WIDTHS, [0, 0, 1, 1], 2)["max_over_mean"] is None
    totals = {"1": [10, 20, 30, 40], "2": [1, 1, 1, 1]}
    load = run_log.rank_load(totals, WIDTHS, {"1": [0, 1, 1, 0], "2": [0, 1, 1, 0]}, 2, "test")
    assert load["layers"]["all"]["compute"] == [11 * 96 + 41 * 48, 21 * 32 + 31 * 80]
    assert all(v["max_over_mean"] >= 1.0 for v in load["layers"].values())
    assert load["placement"] == [0, 1, 1, 0]  # one placement for every layer
    # each layer under its own placement (re-planned runs); "all" sums every rank's compute
    own = run_log.rank_load(totals, WIDTHS, {"1": [0, 0, 1, 1], "2": [0, 1, 1, 0]}, 2, "test")
    assert own["layers"]["1"]["compute"] == result["compute"]
    assert own["layers"]["all"]["compute"] == [result["compute"][0] + 96 + 48, result["compute"][1] + 32 + 80]
    assert own["placement"] == {"1": [0, 0, 1, 1], "2": [0, 1, 1, 0]}


def test_logged_imbalance_and_replans(written):
    log = run_log.read_metrics(written)
    logged = run_log.logged_imbalance(log)
    assert logged["iterations"] == [1, 2]  # the replayed iterations 3 and 4 logged none
    assert logged["values"] == pytest.approx([1.1, 1.2]) and logged["last"] == pytest.approx(1.2)
    assert logged["mean"] == pytest.approx(1.15)
    assert logged["replans"] == [{"iteration": 2, "layer": "all", "placement": [0, 1, 1, 0], "moved_experts": 2}]


def test_torn_last_line_is_skipped_with_a_note(metrics):
    with metrics.open("a") as f:
        f.write('{"iteration": 5, "lm_loss": 5.')
    log = run_log.read_metrics(metrics)
    assert sorted(log.train) == [1, 2, 3, 4]
    assert log.notes == ["metrics.jsonl line 13 is incomplete (run stopped mid-write): skipped"]


def test_bad_rows_name_the_line_and_the_fix(metrics, tmp_path):
    path = metrics
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ["not json"] + lines[3:]) + "\n")
    with pytest.raises(AnalysisError, match=r"line 4 is not a metrics row .*modse-pretrain --log-dir"):
        run_log.read_metrics(path)
    path.write_text(json.dumps([1, 2]) + "\n" + lines[0] + "\n")
    with pytest.raises(AnalysisError, match="line 1 is not a metrics row"):
        run_log.read_metrics(path)
    with pytest.raises(AnalysisError, match="cannot read"):
        run_log.read_metrics(tmp_path / "missing.jsonl")


def test_widths_of_another_run_are_refused(written):
    log = run_log.read_metrics(written)
    with pytest.raises(AnalysisError) as err:
        run_log.token_share_by_width(log, [64, 64, 64])
    message = str(err.value)
    assert "lists 4 expert counts but the model has 3 experts" in message and "--expert-widths" in message
    assert "\n" not in message


def test_dense_run_has_no_routing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"iteration": 1, "lm_loss": 5.0}) + "\n")
    log = run_log.read_metrics(path)
    assert log.routed() == [] and run_log.logged_imbalance(log) is None and run_log.last_eval(log) is None
    with pytest.raises(AnalysisError, match="no tokens_per_expert rows"):
        run_log.token_share_by_width(log, WIDTHS)
