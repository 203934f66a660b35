"""Re-planning decisions (pure Python + the C++ planner): load averages, imbalance, equal-memory
random placements, and the planner's proposal under skewed loads."""
import random

import pytest

from modse_megatron.moe.replan import LoadStats, imbalance, propose, random_equal_memory, rank_compute

WIDTHS = [144, 16, 128, 32, 96, 64, 80, 80]  # paper8 pairs at unit 32: every pair sums to 160


def test_load_stats_average_over_layers_and_steps():
    stats = LoadStats(4, decay=0.5)
    stats.update({"1": [10, 0, 0, 0], "2": [0, 10, 0, 0]})
    assert stats.ema == [10, 10, 0, 0]
    stats.update({"1": [0, 0, 20, 0]})
    assert stats.ema == [5, 5, 10, 0] and stats.updates == 2
    again = LoadStats.from_state(stats.state(), 4, 0.5)
    assert again.ema == stats.ema and again.updates == 2
    assert LoadStats.from_state(stats.state(), 8, 0.5).ema == []  # another model: start over


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


def test_small_gains_do_not_migrate():
    current = [0, 0, 0, 0, 1, 1, 1, 1]
    loads = [100] * 8
    proposal = propose(WIDTHS, loads, 2, current, policy="planner", min_gain=0.03)
    assert not proposal.migrate  # already balanced: nothing to gain


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="moe_replan_policy='greedy' is unknown"):
        propose(WIDTHS, [1] * 8, 2, [0] * 4 + [1] * 4, policy="greedy")
