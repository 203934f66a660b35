"""The Python API: sizes helpers, options, errors, previous placements, hierarchy, batching.

Speed is measured by benchmarks/planner.py, not asserted here.
"""
from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modse_megatron.placement import (
    METHODS,
    PlacementPlan,
    PlanOptions,
    _planner,
    options as options_module,
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
        (dict(sizes=[1, 2], num_ranks=1, move_slack=math.nan), r"move_slack=nan must be"),
        (dict(sizes=[1, 2], num_ranks=1, exact_max_experts=257),
         r"exact_max_experts=257 must be at most 256: branch and bound recurses"),
        (dict(sizes=[1, 2], num_ranks=1, exact_max_experts=-1),
         r"exact_max_experts=-1 must be an integer >= 0"),
        (dict(sizes=[1, 2], num_ranks=1, exact_node_budget=1.5),
         r"exact_node_budget=1.5 must be an integer"),
        (dict(sizes=[1, 2], num_ranks=1, options="fast"), r"options='fast' must be a PlanOptions"),
        (dict(sizes=[1, 2], num_ranks=2**40), r"num_experts=2 is not divisible"),
    ],
)
def test_bad_input_is_one_line_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        plan_placement(**kwargs)
    assert "\n" not in str(info.value)


def _core_plan(sizes, loads, num_ranks=2, **changes):
    """_planner.plan_batch with valid defaults for every argument but the changed ones."""
    args = dict(previous=None, num_ranks=num_ranks, ranks_per_node=0, balance=0,
                bytes_per_param=1.0, move_slack=0.0, exact_max_experts=16,
                exact_node_budget=1000, num_threads=1, num_replicas=0)
    args.update(changes)
    return _planner.plan_batch(sizes, loads, **args)


S4 = np.ones((1, 4))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: _core_plan(S4, S4, 3), r"num_experts=4 is not divisible by num_ranks=3"),
        (lambda: _core_plan(S4, S4 * np.nan), r"loads\[0\]=nan is invalid"),
        (lambda: _core_plan(S4, -S4), r"loads\[0\]=-1 is invalid"),
        (lambda: _core_plan(S4 * np.inf, S4), r"sizes\[0\]=inf is invalid"),
        (lambda: _core_plan(S4, S4, 0), r"num_ranks=0 must be a positive integer"),
        (lambda: _core_plan(S4, S4, -2), r"num_ranks=-2 must be a positive integer"),
        (lambda: _core_plan(np.ones((1, 0)), np.ones((1, 0))), r"no experts given"),
        (lambda: _core_plan(S4, np.ones((0, 4))), r"loads has 0 layers"),
        (lambda: _core_plan(S4, np.ones(4)), r"loads must be a 2-D array"),
        (lambda: _core_plan(np.ones((2, 4)), np.ones((3, 4))), r"sizes must be \[1 or layers"),
        (lambda: _core_plan(S4, S4, previous=np.zeros((1, 3), np.int32)), r"previous must be"),
        (lambda: _core_plan(S4, S4, previous=np.full((1, 4), 2, np.int32)),
         r"previous\[0\]=2 is not a rank in \[0, 2\)"),
        (lambda: _core_plan(S4, S4, balance=2), r"balance=2 must be 0"),
        (lambda: _core_plan(S4, S4, ranks_per_node=3), r"ranks_per_node=3 does not divide"),
        (lambda: _core_plan(S4, S4, ranks_per_node=-1), r"ranks_per_node=-1 does not divide"),
        (lambda: _core_plan(S4, S4, bytes_per_param=0.0), r"bytes_per_param=0 must be a positive finite"),
        (lambda: _core_plan(S4, S4, move_slack=np.inf), r"move_slack=inf must be a finite number >= 0"),
        (lambda: _core_plan(S4, S4, exact_max_experts=10**6),
         r"exact_max_experts=1000000 must be in \[0, 256\]: branch and bound recurses"),
        (lambda: _core_plan(S4, S4, exact_node_budget=-1), r"exact_node_budget=-1 must be >= 0"),
        (lambda: _core_plan(S4, S4, num_threads=-1), r"num_threads=-1 must be >= 0"),
        (lambda: _core_plan(S4, S4, 2**30, num_replicas=2**30),
         r"slots exceeds the planner's limit of 268435456"),
        (lambda: _planner.cardinality_lower_bound(np.ones(6), 2, 2), r"len\(weights\)=6 but"),
        (lambda: _planner.cardinality_lower_bound(np.ones(4), 2**16, 2**16),
         r"num_ranks \* per_rank=4294967296"),
        (lambda: _planner.cardinality_lower_bound(np.ones(4), 0, 4), r"num_ranks=0 must be"),
        (lambda: _planner.cardinality_lower_bound(np.ones(4), 4, -1), r"per_rank=-1 must be"),
        (lambda: _planner.cardinality_lower_bound(np.array([1.0, np.nan]), 1, 2),
         r"weights\[1\]=nan is invalid"),
        (lambda: _planner.cardinality_lower_bound(np.ones((2, 2)), 2, 2), r"must be a 1-D array"),
        (lambda: _planner.cardinality_lower_bound(np.ones(0), 1, 1), r"weights is empty"),
        (lambda: _planner.balanced_packing(np.array([1.0, -1.0]), 2, 1),
         r"weights\[1\]=-1 is invalid"),
        (lambda: _planner.balanced_packing(np.ones(4), 2**16, 2**16),
         r"num_ranks \* per_rank=4294967296"),
        (lambda: _planner.balanced_packing(np.ones(3), 2, 2), r"len\(weights\)=3 but"),
    ],
)
def test_core_validates_every_binding(call, message):
    """The C++ core refuses bad values on its own: ValueError, one line naming the argument."""
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_core_bindings():
    """Only the bindings something uses; the limits the wrapper mirrors."""
    assert not hasattr(_planner, "detect_pairs")
    assert _planner.EXACT_MAX_EXPERTS_CAP == options_module.EXACT_MAX_EXPERTS_CAP
    assert _planner.MAX_SLOTS == options_module.MAX_SLOTS
    assert _core_plan(S4, S4, exact_max_experts=256)["optimal"].all()  # the cap itself is fine


def test_plan_options_and_keywords_are_one_set():
    """Keywords build a PlanOptions; options= and keywords combine (keywords win)."""
    rng = np.random.default_rng(8)
    sizes, loads = widths_from_ratios(MODSE, 256, repeat=2), rng.lognormal(size=16)
    opts = PlanOptions(balance="compute", exact_max_experts=0)
    by_options = plan_placement(sizes, loads, 4, options=opts)
    assert by_options == plan_placement(sizes, loads, 4, balance="compute", exact_max_experts=0)
    assert not by_options.paired
    assert plan_placement(sizes, loads, 4, options=opts, balance="memory_then_compute").paired
    batch = plan_placement_batch(sizes, loads[None], 4, options=opts, num_threads=1)
    assert batch[0] == by_options
    assert PlanOptions(num_replicas=np.int64(2)).num_replicas == 2  # numpy ints are plain ints
    fields = {f.name for f in dataclasses.fields(PlanOptions)}
    assert fields == {"balance", "bytes_per_param", "move_slack", "max_move_fraction", "exact_max_experts",
                      "exact_node_budget", "num_threads", "num_replicas", "joint_counts",
                      "stack_copies", "num_groups"}
    with pytest.raises(TypeError, match="unexpected keyword argument 'slack'"):
        plan_placement(sizes, loads, 4, slack=0.1)


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


def test_compute_mode_trades_memory_for_compute():
    sizes = widths_from_ratios(MODSE, 256)
    loads = [1, 30, 1, 1, 1, 1, 1, 1]  # the small expert 1 is hot
    paired = plan_placement(sizes, loads, 4)
    free = plan_placement(sizes, loads, 4, balance="compute")
    assert paired.paired and paired.memory_balanced
    assert not free.paired and not free.memory_balanced  # memory is given up ...
    assert free.max_compute < paired.max_compute  # ... for strictly less compute
    assert (paired.max_compute, free.max_compute) == (4992.0, 4096.0)
    assert free.optimal and paired.optimal  # both exact for their own problem (k = 2)


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
    """From a random previous placement the fresh plan is best but moves 46 experts; descent
    from the previous placement stops 0.2% worse after moving 28.  Slack 0 takes the fresh
    plan, slack 5% the one that moves less."""
    rng = np.random.default_rng(11)
    sizes = [1.0] * 64
    loads = rng.lognormal(size=64)
    previous = rng.permutation(np.repeat(np.arange(8), 8))
    strict = plan_placement(sizes, loads, 8, previous=previous)
    loose = plan_placement(sizes, loads, 8, previous=previous, move_slack=0.05)
    assert (strict.moved_bytes, loose.moved_bytes) == (46.0, 28.0)
    assert (strict.method, loose.method) == ("heuristic", "previous")
    assert strict.max_compute < loose.max_compute <= strict.max_compute * 1.05
    assert loose.rank_of_expert != strict.rank_of_expert
    tight = plan_placement(sizes, loads, 8, previous=previous, move_slack=1e-4)
    assert tight == strict  # the slack must cover the 0.2%


def test_move_budget_caps_the_bytes_a_plan_moves():
    """max_move_fraction is a hard budget: from a plan made for other loads, the plan for new
    loads moves at most that share of the bytes, is still paired (equal memory), improves on
    staying put when the budget allows a move, and 1 is the unbudgeted plan."""
    rng = np.random.default_rng(5)
    sizes = widths_from_ratios(MODSE, 256, repeat=16)  # 128 experts, 16 ranks
    old = plan_placement(sizes, rng.lognormal(size=128), 16)
    loads = rng.lognormal(size=128) * rng.zipf(2.0, size=128)
    stay = max(np.bincount(old.rank_of_expert, weights=np.array(sizes) * loads, minlength=16))
    free = plan_placement(sizes, loads, 16, previous=old.rank_of_expert, bytes_per_param=2)
    assert free == plan_placement(sizes, loads, 16, previous=old.rank_of_expert, bytes_per_param=2,
                                  max_move_fraction=1.0)
    total = 2 * sum(sizes)
    assert free.moved_bytes > 0.3 * total  # unbudgeted, this re-plan moves a lot
    last = free.max_compute
    for fraction in (0.2, 0.1, 0.05, 0.0):
        plan = plan_placement(sizes, loads, 16, previous=old.rank_of_expert, bytes_per_param=2,
                              max_move_fraction=fraction)
        assert plan.moved_bytes <= fraction * total
        assert plan.paired and plan.memory_balanced
        assert plan.max_compute <= stay
        assert plan.max_compute >= last * (1 - 1e-12)  # less budget, never a better plan here
        last = plan.max_compute
        if fraction > 0:
            assert plan.max_compute < 0.95 * stay and plan.method == "previous"
    assert plan.rank_of_expert == old.rank_of_expert  # budget 0: nothing moves
    with pytest.raises(ValueError, match=r"max_move_fraction=1.5 must be a number in \[0, 1\]"):
        PlanOptions(max_move_fraction=1.5)


def test_hierarchy_balances_nodes_without_hurting_compute():
    rng = np.random.default_rng(4)
    sizes = widths_from_ratios(MODSE, 256, repeat=16)  # 128 experts
    loads = rng.lognormal(size=128) * rng.zipf(2.0, size=128)
    flat = plan_placement(sizes, loads, 32)
    hier = plan_placement(sizes, loads, 32, ranks_per_node=8)
    assert hier.max_compute <= flat.max_compute * (1 + 1e-12)
    flat_nodes = np.bincount(np.array(flat.rank_of_expert) // 8, weights=loads, minlength=4)
    assert max(hier.node_inflow) < 0.75 * flat_nodes.max()  # the busiest node gets lighter
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


def test_many_layers():
    """61 layers x 256 experts x 64 ranks, the benchmark's batch shape (its speed is measured
    by benchmarks/planner.py): every layer paired, memory equal, gaps valid."""
    rng = np.random.default_rng(6)
    sizes = widths_from_ratios(MODSE, 256, repeat=32)
    loads = rng.lognormal(size=(61, 256)) * rng.zipf(1.5, size=(61, 256))
    batch = plan_placement_batch(sizes, loads, 64)
    assert len(batch) == 61 and batch.paired.all() and (batch.gap >= 0).all()
    assert (batch.memory_per_rank == batch.memory_per_rank[:, :1]).all()


def test_package_is_torch_free():
    """The planner must not need torch: importing the package, its CLI and the config that
    uses it loads no torch (checked in a fresh interpreter), and no file imports it."""
    code = ("import sys, modse_megatron.placement, modse_megatron.placement.cli, "
            "modse_megatron.config; assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for path in list(PACKAGE.glob("*.py")) + list(PACKAGE.glob("*.pyi")):
        text = path.read_text()
        assert not re.search(r"^\s*(import torch|from torch)", text, re.M), path
