"""The Python API: sizes helpers, errors, previous placements, hierarchy, batching."""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

from modse_megatron.placement import (
    METHODS,
    PlacementPlan,
    plan_placement,
    plan_placement_batch,
    widths_from_ratios,
)

MODSE = "4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5"
PACKAGE = Path(__file__).resolve().parents[2] / "modse_megatron" / "placement"


def test_widths_from_ratios():
    assert widths_from_ratios(MODSE, 256) == [1152, 128, 1024, 256, 768, 512, 640, 640]
    assert widths_from_ratios([(1.5, 0.5)], 2, repeat=3) == [3, 1] * 3
    with pytest.raises(ValueError, match="not an integer width"):
        widths_from_ratios("4.3:0.7", 256)
    with pytest.raises(ValueError, match="not a pair"):
        widths_from_ratios("4.5:0.5:1", 256)
    with pytest.raises(ValueError, match="unit"):
        widths_from_ratios(MODSE, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sizes=list(range(1, 11)), num_ranks=4),
         r"num_experts=10 is not divisible by num_ranks=4"),
        (dict(sizes=[1, 2, 3, 4], num_ranks=0), r"num_ranks=0 must be a positive integer"),
        (dict(sizes=[1, 2, 3, 4]), r"num_ranks is required"),
        (dict(sizes=[1, 2, 3, 4], loads=[1, 2, 3], num_ranks=2),
         r"loads has 3 entries .* sizes has 4"),
        (dict(sizes=[1, -2, 3, 4], num_ranks=2), r"sizes\[1\]=-2.0 is invalid"),
        (dict(sizes=[1, 0, 3, 4], num_ranks=2), r"sizes\[1\]=0.0 is invalid"),
        (dict(sizes=[1, math.nan, 3, 4], num_ranks=2), r"sizes\[1\]=nan is invalid"),
        (dict(sizes=[1, 2, 3, 4], loads=[1, 2, math.inf, 3], num_ranks=2), r"loads\[2\]=inf"),
        (dict(sizes=[1, 2, 3, 4], loads=[1, -1, 1, 3], num_ranks=2), r"loads\[1\]=-1.0"),
        (dict(sizes=[1, 2, 3, 4], loads=[1, math.nan, 1, 3], num_ranks=2), r"loads\[1\]=nan"),
        (dict(sizes=[1, 2, 3, 4], num_ranks=4, ranks_per_node=3),
         r"ranks_per_node=3 does not divide"),
        (dict(sizes=[1, 2, 3, 4], num_ranks=2, previous=[0, 1, 2, 0]),
         r"previous\[2\]=2 is not a rank"),
        (dict(sizes=[1, 2, 3, 4], num_ranks=2, previous=[0, 1]), r"previous has 2 entries"),
        (dict(sizes=[1, 2, 3, 4], num_ranks=2, balance="speed"), r"balance='speed' is unknown"),
        (dict(sizes=[], num_ranks=1), r"sizes is empty"),
        (dict(sizes=["a", "b"], num_ranks=1), r"sizes must be numbers"),
        (dict(sizes=[1, 2], num_ranks=1, bytes_per_param=-1), r"bytes_per_param"),
    ],
)
def test_bad_input_is_one_line_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        plan_placement(**kwargs)
    assert "\n" not in str(info.value)


def test_core_validates_too():
    """The C++ core refuses bad values on its own (std::invalid_argument -> ValueError)."""
    from modse_megatron.placement import _planner

    s = np.ones((1, 4))
    with pytest.raises(ValueError, match="not divisible"):
        _planner.plan_batch(s, s, None, 3, 0, 0, 1.0, 0.0, 16, 1000, 1)
    with pytest.raises(ValueError, match="loads"):
        _planner.plan_batch(s, s * np.nan, None, 2, 0, 0, 1.0, 0.0, 16, 1000, 1)
    with pytest.raises(ValueError, match="num_ranks"):
        _planner.plan_batch(s, s, None, 0, 0, 0, 1.0, 0.0, 16, 1000, 1)


def test_batch_error_names_the_layer():
    with pytest.raises(ValueError, match=r"layer 1: loads\[3\]=-4.0"):
        plan_placement_batch([1, 2, 3, 4], [[1, 2, 3, 4], [1, 2, 3, -4]], 2)


def test_plan_fields_and_slot_order():
    sizes = widths_from_ratios(MODSE, 256)
    plan = plan_placement(sizes, num_ranks=4)
    assert isinstance(plan, PlacementPlan)
    assert plan.method in METHODS and plan.optimal and plan.gap == 0.0
    assert plan.paired and plan.memory_per_rank == [1280.0] * 4
    assert sorted(plan.slot_order) == list(range(8))
    for r, experts in enumerate(plan.experts_of_rank):
        assert plan.slot_order[2 * r : 2 * r + 2] == experts
    d = plan.to_dict()
    assert d["rank_of_expert"] == plan.rank_of_expert and d["memory_balanced"]


def test_uniform_sizes_are_not_paired_and_loads_default_uniform():
    plan = plan_placement([4.0] * 8, num_ranks=2)
    assert not plan.paired and plan.memory_balanced
    assert plan.max_compute == 16.0 and plan.optimal


def test_compute_mode_may_trade_memory_for_compute():
    sizes = widths_from_ratios(MODSE, 256)
    loads = [1, 30, 1, 1, 1, 1, 1, 1]  # the small expert 1 is hot
    paired = plan_placement(sizes, loads, 4)
    free = plan_placement(sizes, loads, 4, balance="compute")
    assert paired.paired and paired.memory_balanced
    assert not free.paired
    assert free.max_compute <= paired.max_compute


def test_previous_placement_is_kept_when_it_is_as_good():
    rng = np.random.default_rng(1)
    sizes = widths_from_ratios(MODSE, 256, repeat=8)
    loads = rng.lognormal(size=64)
    first = plan_placement(sizes, loads, 16)
    again = plan_placement(sizes, loads, 16, previous=first.rank_of_expert)
    assert again.moved_bytes == 0.0
    assert again.rank_of_expert == first.rank_of_expert
    # A relabelled copy of the same plan is recognised as the same plan: nothing moves.
    perm = rng.permutation(16)
    relabelled = [int(perm[r]) for r in first.rank_of_expert]
    same = plan_placement(sizes, loads, 16, previous=relabelled)
    assert same.moved_bytes == 0.0 and same.max_compute == first.max_compute


def test_moved_bytes_counts_changed_experts():
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 100, size=32).astype(float)
    previous = np.repeat(np.arange(8), 4)  # Megatron's contiguous default
    plan = plan_placement(sizes, rng.lognormal(size=32), 8, previous=previous, bytes_per_param=2)
    moved = [e for e in range(32) if plan.rank_of_expert[e] != previous[e]]
    assert plan.moved_bytes == pytest.approx(2 * sizes[moved].sum())


def test_move_slack_trades_compute_for_fewer_moves():
    rng = np.random.default_rng(3)
    sizes = [1.0] * 64
    loads = rng.lognormal(size=64)
    previous = np.repeat(np.arange(8), 8)
    strict = plan_placement(sizes, loads, 8, previous=previous)
    loose = plan_placement(sizes, loads, 8, previous=previous, move_slack=0.5)
    assert loose.moved_bytes <= strict.moved_bytes
    assert loose.max_compute <= strict.max_compute * 1.5 + 1e-9


def test_hierarchy_balances_nodes_without_hurting_compute():
    rng = np.random.default_rng(4)
    sizes = widths_from_ratios(MODSE, 256, repeat=16)  # 128 experts
    loads = rng.lognormal(size=128) * rng.zipf(2.0, size=128)
    flat = plan_placement(sizes, loads, 32)
    hier = plan_placement(sizes, loads, 32, ranks_per_node=8)
    assert hier.max_compute <= flat.max_compute * (1 + 1e-12)
    assert hier.memory_balanced
    assert len(hier.node_inflow) == 4
    assert sum(hier.node_inflow) == pytest.approx(loads.sum())
    assert max(hier.node_inflow) >= hier.node_inflow_bound * (1 - 1e-12)
    assert np.bincount(np.array(hier.rank_of_expert) // 8, minlength=4).tolist() == [32] * 4
    again = plan_placement(sizes, loads, 32, ranks_per_node=8, previous=hier.rank_of_expert)
    assert again.moved_bytes == 0.0


@pytest.mark.parametrize("num_ranks", [1, 4, 256])
def test_degenerate_inputs(num_ranks):
    """Zero loads, one rank, one expert per rank, many ranks (greedy relabelling)."""
    n = 4 * num_ranks if num_ranks > 1 else 5
    plan = plan_placement([3.0] * n, [0.0] * n, num_ranks)
    assert plan.max_compute == 0.0 and plan.optimal and plan.gap == 0.0
    rng = np.random.default_rng(7)
    loads = rng.lognormal(size=n)
    first = plan_placement([3.0] * n, loads, num_ranks)
    again = plan_placement([3.0] * n, loads, num_ranks, previous=first.rank_of_expert)
    assert again.moved_bytes == 0.0


def test_threads_do_not_change_results():
    rng = np.random.default_rng(5)
    loads = rng.lognormal(size=(12, 64))
    one = plan_placement_batch([1.0] * 64, loads, 16, num_threads=1)
    two = plan_placement_batch([1.0] * 64, loads, 16, num_threads=2)
    assert (one.rank_of_expert == two.rank_of_expert).all()


def test_many_layers_plan_fast():
    """61 layers x 256 experts x 64 ranks (benchmarks/planner.py measures it properly)."""
    rng = np.random.default_rng(6)
    sizes = widths_from_ratios(MODSE, 256, repeat=32)
    loads = rng.lognormal(size=(61, 256)) * rng.zipf(1.5, size=(61, 256))
    plan_placement_batch(sizes, loads, 64)  # warm up
    start = time.perf_counter()
    batch = plan_placement_batch(sizes, loads, 64)
    assert time.perf_counter() - start < 0.5
    assert batch.paired.all() and (batch.gap >= 0).all()


def test_package_is_torch_free():
    """The planner must not need torch: no file of the package (or the stub) imports it."""
    for path in list(PACKAGE.glob("*.py")) + list(PACKAGE.glob("*.pyi")):
        text = path.read_text()
        assert not re.search(r"^\s*(import torch|from torch)", text, re.M), path
