"""Redundant expert replicas: copy counts, valid placements, bounds and errors.

Small instances are checked against oracle.py: the count rules written out plainly, brute
force over every placement of the chosen copies, and brute force over every choice of counts
(which the lower bound must never exceed).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from modse_megatron.placement import (
    _planner,
    plan_placement,
    plan_placement_batch,
    widths_from_ratios,
)

from .oracle import (
    brute_force_copies,
    count_vectors,
    is_pair_structured,
    paired_replicate_counts,
    replicate_counts,
)

REL = 1e-9
EXAMPLES = int(os.environ.get("MODSE_PLANNER_EXAMPLES", "300"))
SETTINGS = settings(max_examples=max(40, EXAMPLES // 3), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
PAIRS = [(9, 1), (8, 2), (6, 4), (5, 5)]  # complementary widths (sum 10); (5, 5) is the middle
MODSE = "4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5"


@st.composite
def replica_instances(draw, max_n: int = 24, max_ranks: int = 8, max_slots: int | None = None,
                      pairs: list | None = None, stack: bool = False):
    """(sizes, loads, num_ranks, num_replicas, balance): valid slot counts, ties and zeros;
    with ``stack`` also more replicas than distinct ranks allow (copies stacked on a rank)."""
    paired = pairs is not None or draw(st.booleans())
    if paired:
        half = draw(st.integers(1, max_n // 2))
        sizes = [float(x) for _ in range(half) for x in draw(st.sampled_from(pairs or PAIRS))]
        sizes = draw(st.permutations(sizes))
    else:
        n = draw(st.integers(1, max_n))
        sizes = draw(st.lists(st.integers(1, 6).map(float), min_size=n, max_size=n))
    n = len(sizes)
    R = draw(st.integers(2, max_ranks))
    balance = draw(st.sampled_from(["memory_then_compute", "compute"]))
    pairable = is_pair_structured(sizes) and len(set(sizes)) > 1  # any two distinct sizes pair
    step = 2 if balance == "memory_then_compute" and pairable else 1
    most = n * (R - 1) + (2 * R if stack else 0)
    top = most if max_slots is None else min(most, max_slots - n)
    choices = [x for x in range(1, top + 1) if (n + x) % R == 0 and x % step == 0]
    if not choices and step == 2:
        balance, choices = "compute", [x for x in range(1, top + 1) if (n + x) % R == 0]
    assume(choices)
    X = draw(st.sampled_from(choices))
    load = st.one_of(st.just(0.0), st.integers(1, 20).map(float),
                     st.floats(0.01, 100, allow_nan=False))
    loads = draw(st.lists(load, min_size=n, max_size=n))
    return list(sizes), loads, R, X, balance


def check_valid(plan, sizes, loads, R: int, X: int, stacked: bool = False) -> None:
    """Every rank exactly k slots, every expert >= 1 copy, copies on distinct ranks (unless
    ``stacked``), and the reported numbers recomputed from the slots."""
    n, S = len(sizes), len(sizes) + X
    k = S // R
    assert plan.num_replicas == X and plan.experts_per_rank == k
    slots = np.array(plan.slot_expert)
    assert slots.shape == (S,) and slots.min() >= 0 and slots.max() < n
    for r in range(R):
        assert stacked or len(set(plan.slot_expert[r * k:(r + 1) * k])) == k, "two copies on a rank"
    copies = np.bincount(slots, minlength=n)
    assert copies.min() >= 1 and copies.tolist() == plan.copies_per_expert
    assert copies.max() <= (X + 1 if stacked else R)
    rank_of_slot = np.arange(S) // k
    assert plan.ranks_of_expert == [sorted(rank_of_slot[slots == e].tolist()) for e in range(n)]
    assert plan.rank_of_expert == [ranks[0] for ranks in plan.ranks_of_expert]
    assert plan.experts_of_rank == [plan.slot_expert[r * k:(r + 1) * k] for r in range(R)]
    s, t = np.asarray(sizes, float), np.asarray(loads, float)
    per_copy = (s * t / copies)[slots]
    assert np.allclose(np.bincount(rank_of_slot, weights=per_copy, minlength=R),
                       plan.compute_per_rank, rtol=REL, atol=1e-12)
    assert np.allclose(np.bincount(rank_of_slot, weights=s[slots], minlength=R),
                       plan.memory_per_rank, rtol=REL)
    assert sum(plan.node_inflow) == pytest.approx(t.sum(), rel=REL, abs=1e-12)
    assert plan.max_compute == pytest.approx(max(plan.compute_per_rank), rel=REL)
    assert plan.max_compute >= plan.lower_bound * (1 - REL) - 1e-12
    assert plan.moved_bytes == 0.0


# ----------------------------------------------------------------------------- copy counts


@SETTINGS
@given(replica_instances())
def test_counts_follow_eplbs_greedy(inst):
    sizes, loads, R, X, _ = inst
    plan = plan_placement(sizes, loads, R, balance="compute", num_replicas=X, joint_counts=False)
    w = [s * t for s, t in zip(sizes, loads)]
    assert plan.copies_per_expert == replicate_counts(w, R, X)


@SETTINGS
@given(replica_instances(max_n=5, max_ranks=4, max_slots=12))
def test_greedy_counts_minimise_the_heaviest_copy(inst):
    sizes, loads, R, X, _ = inst
    w = [s * t for s, t in zip(sizes, loads)]
    greedy = replicate_counts(w, R, X)
    best = min(max(x / c for x, c in zip(w, cs)) for cs in count_vectors(len(w), R, len(w) + X))
    assert max(x / c for x, c in zip(w, greedy)) == pytest.approx(best, rel=REL, abs=1e-12)


@SETTINGS
@given(replica_instances(pairs=PAIRS[:3]))
def test_paired_counts_add_complementary_pairs(inst):
    sizes, loads, R, X, balance = inst
    plan = plan_placement(sizes, loads, R, balance=balance, num_replicas=X, joint_counts=False)
    if not plan.paired:
        return
    w = [s * t for s, t in zip(sizes, loads)]
    assert plan.copies_per_expert == paired_replicate_counts(w, sizes, R, X)
    assert is_pair_structured([sizes[e] for e in plan.slot_expert])


# ----------------------------------------------------------------------------- placements


@SETTINGS
@given(replica_instances(max_n=40, max_ranks=16), st.sampled_from([None, 1, 2]),
       st.sampled_from([0, 16]))
def test_plans_are_valid(inst, per_node, exact_max_experts):
    sizes, loads, R, X, balance = inst
    g = None if per_node is None or R % per_node else per_node
    plan = plan_placement(sizes, loads, R, g, balance=balance, num_replicas=X,
                          exact_max_experts=exact_max_experts)
    check_valid(plan, sizes, loads, R, X)


@SETTINGS
@given(replica_instances(max_n=40, max_ranks=16, pairs=PAIRS))
def test_paired_memory_is_exactly_equal(inst):
    sizes, loads, R, X, balance = inst
    plan = plan_placement(sizes, loads, R, balance=balance, num_replicas=X)
    check_valid(plan, sizes, loads, R, X)
    k = (len(sizes) + X) // R
    assert plan.paired == (balance == "memory_then_compute" and k % 2 == 0 and len(set(sizes)) > 1)
    if plan.paired:
        assert len(set(plan.memory_per_rank)) == 1


@SETTINGS
@given(replica_instances(max_n=6, max_ranks=4, max_slots=10))
def test_optimal_for_the_chosen_counts(inst):
    """Branch and bound over copies: the plan is the brute-force optimum for its counts."""
    sizes, loads, R, X, balance = inst
    plan = plan_placement(sizes, loads, R, balance=balance, num_replicas=X)
    w = [s * t for s, t in zip(sizes, loads)]
    opt = brute_force_copies(w, plan.copies_per_expert, R, sizes if plan.paired else None)
    assert plan.max_compute == pytest.approx(opt, rel=REL, abs=1e-12)


@SETTINGS
@given(replica_instances(max_n=4, max_ranks=3, max_slots=9))
def test_bound_holds_for_every_count_choice(inst):
    """No choice of counts and placement beats the lower bound (brute force over both)."""
    sizes, loads, R, X, balance = inst
    plan = plan_placement(sizes, loads, R, balance=balance, num_replicas=X, exact_max_experts=0)
    w = [s * t for s, t in zip(sizes, loads)]
    n = len(w)
    best = min(brute_force_copies(w, cs, R) for cs in count_vectors(n, R, n + X))
    assert plan.lower_bound <= best * (1 + REL) + 1e-12
    if plan.optimal:
        assert plan.max_compute == pytest.approx(best, rel=1e-6, abs=1e-12)


def test_middle_class_counts_stay_placeable():
    """Three hot middle-size experts and a cold one on 3 ranks: copying the hot ones onto every
    rank would need 4 middle copies per rank (12 > 10), so the paired counts avoid it."""
    plan = plan_placement([9, 1, 5, 5, 5, 5], [0.1, 0.1, 100, 99, 98, 0.01], 3, num_replicas=6)
    check_valid(plan, [9, 1, 5, 5, 5, 5], [0.1, 0.1, 100, 99, 98, 0.01], 3, 6)
    assert plan.paired and len(set(plan.memory_per_rank)) == 1


def test_replicas_split_a_hot_expert():
    sizes = widths_from_ratios(MODSE, 256, repeat=8)  # 64 experts
    loads = np.ones(64)
    loads[5] = 40.0
    plain = plan_placement(sizes, loads, 16)
    replicated = plan_placement(sizes, loads, 16, num_replicas=32)  # k = 6, paired
    check_valid(replicated, sizes, loads, 16, 32)
    assert replicated.paired and len(set(replicated.memory_per_rank)) == 1
    assert replicated.copies_per_expert[5] > 1
    assert replicated.max_compute < 0.5 * plain.max_compute


# ----------------------------------------------------------------------------- API


def test_zero_replicas_is_the_plain_plan():
    rng = np.random.default_rng(0)
    sizes = widths_from_ratios(MODSE, 256, repeat=4)
    loads = rng.lognormal(size=32)
    plain = plan_placement(sizes, loads, 8)
    assert plan_placement(sizes, loads, 8, num_replicas=0) == plain
    assert plain.num_replicas == 0 and plain.copies_per_expert == [1] * 32
    assert plain.slot_expert == plain.slot_order
    assert plain.slot_expert == [e for r in range(8) for e in range(32)
                                 if plain.rank_of_expert[e] == r]
    assert plain.ranks_of_expert == [[r] for r in plain.rank_of_expert]
    d = plain.to_dict()
    assert {"copies_per_expert", "slot_expert", "ranks_of_expert", "num_replicas"} <= d.keys()


@pytest.mark.parametrize("shape", [(32, 8, 8), (48, 16, 16), (64, 16, 32)])
def test_batch_equals_per_layer(shape):
    n, R, X = shape
    rng = np.random.default_rng(n)
    sizes = rng.integers(1, 5, size=n).astype(float)
    loads = rng.lognormal(size=(4, n)) * rng.zipf(1.5, size=(4, n))
    batch = plan_placement_batch(sizes, loads, R, num_threads=2, num_replicas=X)
    assert batch.slot_expert.shape == (4, n + X) and batch.copies_per_expert.shape == (4, n)
    for i in range(4):
        single = plan_placement(sizes, loads[i], R, num_replicas=X)
        assert batch[i] == single
        check_valid(single, sizes, loads[i], R, X)


def test_hierarchy_with_replicas():
    rng = np.random.default_rng(4)
    sizes = widths_from_ratios(MODSE, 256, repeat=16)  # 128 experts
    loads = rng.lognormal(size=128) * rng.zipf(1.5, size=128)
    flat = plan_placement(sizes, loads, 32, num_replicas=64)
    hier = plan_placement(sizes, loads, 32, ranks_per_node=8, num_replicas=64)
    check_valid(hier, sizes, loads, 32, 64)
    assert hier.max_compute <= flat.max_compute * (1 + 1e-12)
    assert hier.paired and len(set(hier.memory_per_rank)) == 1
    assert len(hier.node_inflow) == 4
    assert max(hier.node_inflow) >= hier.node_inflow_bound * (1 - 1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sizes": [1.0] * 8, "num_ranks": 4, "num_replicas": 2},
         r"num_experts=8 \+ num_replicas=2 = 10 slots is not divisible by num_ranks=4: choose"),
        ({"sizes": [9, 1, 8, 2], "num_ranks": 5, "num_replicas": 1},
         r"num_replicas=1 is odd but the sizes form complementary pairs"),
        ({"sizes": [1.0] * 4, "num_ranks": 2, "num_replicas": 6},
         r"num_replicas=6 exceeds num_experts\*\(num_ranks-1\)=4"),
        ({"sizes": [1.0] * 4, "num_ranks": 2, "num_replicas": -2},
         r"num_replicas=-2 must be an integer"),
        ({"sizes": [1.0] * 4, "num_ranks": 2, "num_replicas": 2.0}, r"num_replicas=2.0 must be"),
        ({"sizes": [1.0] * 4, "num_ranks": 2, "num_replicas": True}, r"num_replicas=True must be"),
        ({"sizes": [1.0] * 4, "num_ranks": 2, "num_replicas": 2, "previous": [0, 0, 1, 1]},
         r"previous cannot be combined with num_replicas > 0"),
    ],
)
def test_bad_replicas_are_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        plan_placement(**kwargs)
    assert "\n" not in str(info.value)


def test_odd_replicas_allowed_without_pairs():
    """balance='compute' or sizes without complementary pairs take any count."""
    plan = plan_placement([9, 1, 8, 2], [5, 1, 1, 1], 5, balance="compute", num_replicas=1)
    assert plan.copies_per_expert == [2, 1, 1, 1]
    plan = plan_placement([1, 2, 4], [5, 1, 1], 2, num_replicas=1, joint_counts=False)
    assert plan.copies_per_expert == [2, 1, 1] and not plan.paired
    # Joint counts: the second copy goes to expert 1, which pairs 5 + 1 and 1 + 4 (6 < 6.5).
    plan = plan_placement([1, 2, 4], [5, 1, 1], 2, num_replicas=1)
    assert plan.copies_per_expert == [1, 2, 1] and plan.max_compute == 6.0 and plan.optimal


def test_core_validates_replicas_too():
    s = np.ones((1, 4))
    with pytest.raises(ValueError, match="slots is not divisible"):
        _planner.plan_batch(s, s, None, 4, 0, 0, 1.0, 0.0, 16, 1000, 1, 1)
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        _planner.plan_batch(s, s, None, 2, 0, 0, 1.0, 0.0, 16, 1000, 1, -2)
    with pytest.raises(ValueError, match="exceeds"):
        _planner.plan_batch(s, s, None, 2, 0, 0, 1.0, 0.0, 16, 1000, 1, 6)
    prev = np.zeros((1, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="previous cannot be combined"):
        _planner.plan_batch(s, s, prev, 2, 0, 0, 1.0, 0.0, 16, 1000, 1, 2)
    pairs = np.array([[9.0, 1.0, 8.0, 2.0]])
    with pytest.raises(ValueError, match="is odd"):
        _planner.plan_batch(pairs, s, None, 5, 0, 0, 1.0, 0.0, 16, 1000, 1, 1)
