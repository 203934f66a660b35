"""Live expert migration in a real torchrun run: migrating every 2 steps (random equal-memory
placements) trains to the losses of a run that never migrates; every migration is a metrics
row; checkpoints saved afterwards record the placement and resume under another layout."""
import json

import pytest

from tests.training.test_pretrain import TINY, ok, torchrun

pytestmark = pytest.mark.slow

RTOL = 1e-5
EIGHT = [*TINY, "--num-experts", "8", "--moe-expert-widths", "144,16,128,32,96,64,80,80", "--moe-ffn-hidden-size", "80",
         "--expert-model-parallel-size", "2", "--train-iters", "6"]


def _rows(log):
    return [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]


def _train_losses(log):
    return {r["iteration"]: r["lm_loss"] for r in _rows(log) if "split" not in r and "event" not in r}


def test_migration_is_math_invariant(data, tmp_path):
    static, moving = tmp_path / "static", tmp_path / "moving"
    ok(torchrun([*EIGHT, "--log-dir", str(static)], data=data))
    ok(torchrun([*EIGHT, "--log-dir", str(moving), "--moe-replan-interval", "2", "--moe-replan-policy", "random",
                 "--save", str(moving / "ckpt")], data=data))
    a, b = _train_losses(static), _train_losses(moving)
    assert list(a) == list(b) == [1, 2, 3, 4, 5, 6]
    for it in a:
        assert abs(a[it] - b[it]) <= RTOL * abs(a[it]), (it, a, b)
    events = [r for r in _rows(moving) if r.get("event") == "replan"]
    assert [e["iteration"] for e in events] == [2, 4]
    for e in events:
        assert e["moved_experts"] > 0 and e["moved_bytes"] > 0 and e["seconds"] > 0
        assert {"max_over_mean_compute_before", "max_over_mean_compute_after", "layer"} <= set(e)
    train = [r for r in _rows(moving) if "split" not in r and "event" not in r]
    assert all(r["compute_max_over_mean"] >= 1.0 for r in train)
    # the final checkpoint records the last placement and resumes under EP=1
    meta_args = json.loads(json.dumps(events[-1]["placement"]))
    from modse_megatron.checkpoint.dcp_io import CheckpointReader
    from modse_megatron.checkpoint.describe import resolve

    stored = CheckpointReader(resolve(moving / "ckpt")).meta
    assert stored["args"]["modse"]["moe_expert_placement"] == ",".join(map(str, meta_args))
    assert stored["replan_loads"]["updates"] == 6
    resumed = tmp_path / "resumed"
    ok(torchrun([*EIGHT[:-4], "--expert-model-parallel-size", "1", "--train-iters", "7", "--load", str(moving / "ckpt"),
                 "--log-dir", str(resumed)], data=data))
    assert list(_train_losses(resumed)) == [7]
