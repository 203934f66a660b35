"""Re-planning decisions (pure Python + the C++ planner): load averages, imbalance, equal-memory
random placements, and the planner's proposal under skewed loads."""
import random

import pytest

from modse_megatron.moe.replan import (
    LoadStats,
    imbalance,
    layer_imbalance,
    propose,
    propose_layers,
    random_equal_memory,
    rank_compute,
)

WIDTHS = [144, 16, 128, 32, 96, 64, 80, 80]  # paper8 pairs at unit 32: every pair sums to 160


def test_load_stats_average_per_layer_over_steps():
    stats = LoadStats(4, decay=0.5)
    stats.update({"1": [10, 0, 0, 0], "2": [0, 10, 0, 0]})
    assert stats.layers == {"1": [10, 0, 0, 0], "2": [0, 10, 0, 0]}
    stats.update({"1": [0, 0, 20, 0], "2": [0, 10, 0, 0]})
    assert stats.layers == {"1": [5, 0, 10, 0], "2": [0, 10, 0, 0]} and stats.updates == 2
    again = LoadStats.from_state(stats.state(), 4, 0.5)
    assert again.layers == stats.layers and again.updates == 2
    assert LoadStats.from_state(stats.state(), 8, 0.5).layers == {}  # another model: start over
    # a checkpoint of the earlier format (one sum over layers) cannot be split: start over
    assert LoadStats.from_state({"num_experts": 4, "decay": 0.5, "ema": [1, 2, 3, 4], "updates": 3}, 4, 0.5).layers == {}


def test_layers_are_planned_on_their_own_loads():
    """Two layers whose hot experts differ: each gets its own placement; a balanced layer keeps
    its placement; the step imbalance counts every layer's slowest rank."""
    current = [[0, 0, 0, 0, 1, 1, 1, 1]] * 3
    hot_first = [700, 900, 80, 40, 40, 60, 100, 900]
    hot_second = [700, 60, 60, 900, 900, 100, 40, 60]
    out = propose_layers(WIDTHS, [hot_first, hot_second, None], 2, current, min_gain=0.03)
    assert sorted(out.changed) == [0, 1] and out.ranks[2] == current[2]
    assert out.ranks[0] != out.ranks[1]
    for i, loads in ((0, hot_first), (1, hot_second)):
        assert out.changed[i].after < out.changed[i].before
        assert imbalance(WIDTHS, loads, out.ranks[i], 2) == pytest.approx(out.changed[i].after)
    own = layer_imbalance(WIDTHS, [hot_first, hot_second], out.ranks[:2], 2)
    for shared in out.ranks[:2]:  # one placement for both layers cannot balance both
        assert own < layer_imbalance(WIDTHS, [hot_first, hot_second], [shared] * 2, 2) - 0.25


def test_imbalance_is_max_over_mean_of_tokens_times_width():
    compute = rank_compute([2, 1, 1, 2], [10, 10, 10, 10], [0, 0, 1, 1], 2)
    assert compute == [30, 30] and imbalance([2, 1, 1, 2], [10, 10, 10, 10], [0, 0, 1, 1], 2) == 1.0
    assert imbalance([2, 1, 1, 2], [30, 10, 10, 10], [0, 0, 1, 1], 2) == pytest.approx(70 / 50)


@pytest.mark.parametrize("ep", [2, 4])
def test_random_placements_keep_memory_equal_and_vary(ep):
    seen = set()
    rng = random.Random(0)
    for _ in range(20):
        ranks = random_equal_memory(WIDTHS, ep, rng)
        memory = [sum(w for w, r in zip(WIDTHS, ranks) if r == k) for k in range(ep)]
        assert len(set(memory)) == 1 and all(ranks.count(k) == len(WIDTHS) // ep for k in range(ep))
        seen.add(tuple(ranks))
    assert len(seen) > 1


def test_planner_rebalances_skewed_loads_with_equal_memory():
    current = [0, 0, 0, 0, 1, 1, 1, 1]
    loads = [900, 40, 700, 120, 100, 60, 80, 50]  # the big experts of rank 0 are hot
    proposal = propose(WIDTHS, loads, 2, current, policy="planner", min_gain=0.03)
    assert proposal.migrate and proposal.moved_experts > 0
    assert proposal.after < proposal.before - 0.03 * proposal.before
    memory = [sum(w for w, r in zip(WIDTHS, proposal.ranks) if r == k) for k in range(2)]
    assert memory[0] == memory[1]
    assert proposal.after == pytest.approx(imbalance(WIDTHS, loads, proposal.ranks, 2))


def test_move_budget_limits_a_proposal():
    """8 experts at EP 2 (one expert of each width but the 80s): the smallest memory-preserving
    exchange is two experts for two (half the bytes), so a 40% budget proposes nothing and 50%
    allows one exchange."""
    current = [0, 0, 0, 0, 1, 1, 1, 1]
    loads = [900, 40, 700, 120, 100, 60, 80, 50]
    assert not propose(WIDTHS, loads, 2, current, max_move_fraction=0.4).migrate
    half = propose(WIDTHS, loads, 2, current, max_move_fraction=0.5)
    moved = sum(w for w, a, b in zip(WIDTHS, current, half.ranks) if a != b)
    assert half.migrate and moved == 0.5 * sum(WIDTHS) and half.moved_experts == 4
    assert half.after < half.before


def test_small_gains_do_not_migrate():
    current = [0, 0, 0, 0, 1, 1, 1, 1]
    loads = [100] * 8
    proposal = propose(WIDTHS, loads, 2, current, policy="planner", min_gain=0.03)
    assert not proposal.migrate  # already balanced: nothing to gain


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="moe_replan_policy='greedy' is unknown"):
        propose(WIDTHS, [1] * 8, 2, [0] * 4 + [1] * 4, policy="greedy")


@pytest.mark.parametrize("max_move", ["0.1", "1"])
def test_replanner_budget_decides_and_says_why(tmp_path, capsys, max_move):
    """The training loop's Replanner (real options, real metrics file; the migration itself is
    what tests/training/test_replan_training.py runs): under the default 10% budget the paper's 8
    experts at EP 2 cannot move (the smallest exchange is half of them), and it says so once;
    with no limit it migrates and writes the replan row."""
    import json

    from modse_megatron.moe.replan import LoadStats
    from modse_megatron.training.arguments import parse_args
    from modse_megatron.training.metrics import MetricsWriter
    from modse_megatron.training.replanning import Replanner

    args = parse_args(["--num-experts", "8", "--disable-bias-linear", "--moe-expert-widths", ",".join(map(str, WIDTHS)),
                       "--expert-model-parallel-size", "2", "--moe-replan-interval", "2",
                       "--moe-replan-max-move", max_move])
    widths = args.expert_widths()
    metrics = MetricsWriter(str(tmp_path), True, 10, 0, progress=False, plot=False)
    moves = []
    start = [0, 0, 0, 0, 1, 1, 1, 1]
    replanner = Replanner(args, widths, 2, [start, start], [1, 2], LoadStats(8, 0.5), moves.append, metrics, 16)
    skew = {"1": [900, 40, 700, 120, 100, 60, 80, 50], "2": [100] * 8}  # layer 1: the big experts of rank 0 are hot
    for it in range(1, 7):
        record = {"tokens_per_expert": skew}
        replanner.observe(record)
        assert record["compute_layer_max_over_mean"] >= record["compute_max_over_mean"] >= 1.0
        replanner.maybe_replan(it)
    metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    out = capsys.readouterr().out
    if max_move == "1":
        assert len(moves) == 1 and replanner.ranks == moves[0]  # then balanced: no second move
        assert moves[0][1] == start  # layer 2 is balanced: it keeps its placement
        (row,) = rows
        assert row["event"] == "replan" and row["moved_experts"] == 4 and row["iteration"] == 2
        assert row["layer"] == "1" and row["placement"] == moves[0][0]
        per_width = 2 * args.model.hidden_size  # fc1 + fc2 (no SwiGLU) per hidden unit
        assert row["moved_bytes"] == per_width * sum(w for w, a, b in zip(widths, start, moves[0][0]) if a != b) * 16
        assert row["max_over_mean_compute_after"] < row["max_over_mean_compute_before"]
        assert "no exchange of experts fits" not in out
    else:
        assert moves == [] and rows == []
        assert out.count("no exchange of experts fits --moe-replan-max-move 0.1") == 1
