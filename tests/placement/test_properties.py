"""Property tests: the planner against brute force and the greedy baseline (oracle.py).

Small instances (n <= 12) are solved exactly by enumeration, so "optimal" can be checked, not
trusted.  The paired problem (complementary pairs kept together) is compared with the brute
force optimum of the same paired problem.
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from modse_megatron.placement import _planner, plan_placement, plan_placement_batch, widths_from_ratios

from .oracle import brute_force, is_pair_group, is_pair_structured, lpt_with_cardinality

REL = 1e-9
# MODSE_PLANNER_EXAMPLES=5000 for a longer hunt; the default keeps the suite at a few seconds.
EXAMPLES = int(os.environ.get("MODSE_PLANNER_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
# Complementary width pairs of a unit (sum 10): the MoDSE ratios 4.5:0.5 ... 2.5:2.5, doubled.
PAIRS = [(9, 1), (8, 2), (6, 4), (5, 5)]


@st.composite
def instances(draw, max_n: int = 12, paired: bool | None = None):
    """(sizes, loads, num_ranks): divisible n, ties and zero loads on purpose."""
    use_pairs = draw(st.booleans()) if paired is None else paired
    if use_pairs:
        half = draw(st.integers(1, max_n // 2))
        sizes = [float(x) for _ in range(half) for x in draw(st.sampled_from(PAIRS))]
        sizes = draw(st.permutations(sizes))
    else:
        n = draw(st.integers(1, max_n))
        sizes = draw(st.lists(st.integers(1, 6).map(float), min_size=n, max_size=n))
    n = len(sizes)
    num_ranks = draw(st.sampled_from([r for r in range(1, n + 1) if n % r == 0]))
    load = st.one_of(st.just(0.0), st.integers(1, 20).map(float),
                     st.floats(0.01, 100, allow_nan=False))
    loads = draw(st.lists(load, min_size=n, max_size=n))
    return list(sizes), loads, num_ranks


def _check_valid(plan, n: int, num_ranks: int) -> None:
    k = n // num_ranks
    assert len(plan.rank_of_expert) == n
    assert np.bincount(plan.rank_of_expert, minlength=num_ranks).tolist() == [k] * num_ranks
    assert plan.experts_per_rank == k


@SETTINGS
@given(instances(), st.sampled_from(["memory_then_compute", "compute"]))
def test_matches_brute_force(inst, balance):
    sizes, loads, R = inst
    plan = plan_placement(sizes, loads, R, balance=balance)
    _check_valid(plan, len(sizes), R)
    w = [s * t for s, t in zip(sizes, loads)]
    opt = brute_force(w, R, sizes if plan.paired else None)
    assert plan.max_compute == pytest.approx(opt, rel=REL, abs=1e-12)
    assert plan.optimal
    assert plan.lower_bound <= opt * (1 + REL) + 1e-12
    assert plan.max_compute == pytest.approx(max(plan.compute_per_rank), rel=REL)


@SETTINGS
@given(instances())
def test_paired_mode_is_detected_and_memory_equal(inst):
    sizes, loads, R = inst
    k = len(sizes) // R
    plan = plan_placement(sizes, loads, R)
    expect = k % 2 == 0 and is_pair_structured(sizes) and len(set(sizes)) > 1
    assert plan.paired == expect
    if plan.paired:
        assert plan.memory_balanced
        assert max(plan.memory_per_rank) == min(plan.memory_per_rank)


@SETTINGS
@given(instances(), st.sampled_from(["memory_then_compute", "compute"]))
def test_lower_bounds_are_valid(inst, balance):
    """The combinatorial bounds alone (no exact search) never exceed the optimum."""
    sizes, loads, R = inst
    plan = plan_placement(sizes, loads, R, balance=balance, exact_max_experts=0)
    w = [s * t for s, t in zip(sizes, loads)]
    opt = brute_force(w, R, sizes if plan.paired else None)
    assert plan.lower_bound <= opt * (1 + REL) + 1e-12
    assert _planner.cardinality_lower_bound(np.array(w), R, len(w) // R) <= opt * (1 + REL) + 1e-12
    assert plan.max_compute >= opt * (1 - REL) - 1e-12


@settings(max_examples=max(60, EXAMPLES // 5), deadline=None)
@given(
    st.integers(1, 48).flatmap(
        lambda n: st.tuples(
            st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=n, max_size=n),
            st.sampled_from([r for r in range(1, n + 1) if n % r == 0]),
        )
    )
)
def test_never_worse_than_greedy_baseline(case):
    loads, R = case
    sizes = [1.0] * len(loads)
    plan = plan_placement(sizes, loads, R, balance="compute", exact_max_experts=0)
    greedy = lpt_with_cardinality(loads, R)
    greedy_max = max(np.bincount(greedy, weights=loads, minlength=R))
    assert plan.max_compute <= greedy_max * (1 + REL) + 1e-12
    # The C++ LPT is the same greedy, tie-break included.
    assert list(_planner.balanced_packing(np.array(loads), R, len(loads) // R)) == greedy


@settings(max_examples=max(40, EXAMPLES // 5), deadline=None)
@given(instances(max_n=40, paired=True), st.integers(0, 2**32 - 1))
def test_paired_never_worse_than_greedy_over_pairs(inst, seed):
    """Paired plans against LPT over size-sorted pairs (the EPLB-style paired baseline)."""
    sizes, _, R = inst
    loads = np.random.default_rng(seed).lognormal(size=len(sizes)).tolist()
    k = len(sizes) // R
    if k % 2:
        return
    order = sorted(range(len(sizes)), key=lambda e: (sizes[e], e))
    units = [(order[i], order[-1 - i]) for i in range(len(sizes) // 2)]
    unit_w = [sizes[a] * loads[a] + sizes[b] * loads[b] for a, b in units]
    greedy_max = max(np.bincount(lpt_with_cardinality(unit_w, R), weights=unit_w, minlength=R))
    plan = plan_placement(sizes, loads, R)
    if plan.paired:
        assert plan.max_compute <= greedy_max * (1 + REL)


def test_k2_pairs_largest_with_smallest():
    w = [9.0, 1.0, 7.0, 4.0, 3.0, 8.0]
    plan = plan_placement([1.0] * 6, w, 3, balance="compute")
    assert plan.method == "exact-pairing" and plan.optimal
    assert sorted(sorted(g) for g in plan.experts_of_rank) == [[0, 1], [2, 3], [4, 5]]
    assert plan.max_compute == 11.0  # 9+1, 7+4, 8+3


def test_modse_ratios_give_equal_memory_at_scale():
    from modse_megatron.placement import widths_from_ratios

    sizes = widths_from_ratios("4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5", 256, repeat=32)
    rng = np.random.default_rng(0)
    for R in (2, 4, 8, 16, 32, 64):
        loads = rng.zipf(1.5, size=len(sizes)).astype(float)
        plan = plan_placement(sizes, loads, R)
        assert plan.paired and plan.memory_balanced
        assert set(plan.memory_per_rank) == {1280 * len(sizes) / (2 * R)}
        assert plan.max_compute >= plan.lower_bound


@settings(max_examples=max(30, EXAMPLES // 10), deadline=None)
@given(st.integers(1, 6), st.sampled_from([(32, 8), (48, 6), (64, 16)]), st.integers(0, 99))
def test_batch_equals_per_layer(num_layers, shape, seed):
    n, R = shape
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=n).astype(float)
    loads = rng.lognormal(size=(num_layers, n))
    batch = plan_placement_batch(sizes, loads, R, num_threads=2)
    assert len(batch) == num_layers
    for i in range(num_layers):
        single = plan_placement(sizes, loads[i], R)
        assert batch[i].rank_of_expert == single.rank_of_expert
        assert batch[i].max_compute == single.max_compute
        assert batch[i].lower_bound == single.lower_bound


def _paired_optimum_three_ranks(w, sizes) -> float:
    """Optimal paired max over 3 ranks of 4 (pair-valid groups only; fast enough for hypothesis)."""
    pair_sum = min(sizes) + max(sizes)
    valid = {g for g in itertools.combinations(range(12), 4) if is_pair_group(sizes, g, pair_sum)}
    best = float("inf")
    for g1 in (g for g in valid if g[0] == 0):
        rest = [i for i in range(12) if i not in g1]
        for mates in itertools.combinations(rest[1:], 3):
            g2 = (rest[0], *mates)
            g3 = tuple(i for i in rest if i not in g2)
            if g2 in valid and g3 in valid:
                best = min(best, max(sum(w[e] for e in g) for g in (g1, g2, g3)))
    return best


@settings(max_examples=max(60, EXAMPLES // 5), deadline=None)
@given(st.lists(st.sampled_from(PAIRS), min_size=6, max_size=6),
       st.lists(st.floats(0.01, 100, allow_nan=False), min_size=12, max_size=12))
def test_paired_k4_heuristic_is_optimal_on_three_ranks(pairs, loads):
    """Without branch and bound, paired k = 4 on 3 ranks is still optimal (up to the search's
    0.01% stopping rule): the three-bin re-split searches every split of the three ranks,
    which is the whole problem here."""
    sizes = [float(x) for pair in pairs for x in pair]
    plan = plan_placement(sizes, loads, 3, exact_max_experts=0)
    assume(plan.paired)  # equal sizes need no pairs: plain swap descent, not exact
    w = [s * t for s, t in zip(sizes, loads)]
    assert plan.max_compute == pytest.approx(_paired_optimum_three_ranks(w, sizes), rel=1.01e-4)


def test_paired_outlier_gets_its_cheapest_bin():
    """A layer whose heaviest expert needs complementary pairs gathered from several ranks
    (no two-rank exchange reaches it): the plan meets the lower bound, i.e. is proven optimal.
    Instance from the benchmark protocol (n=64, k=4, flat loads), where the planner used to
    stop 3.3% above the optimum (checked with a MILP solver)."""
    n = 64
    rng = np.random.default_rng([n, 4, 0, 6])
    loads = (1.0 + rng.permutation(n)) ** -0.0 * rng.lognormal(0.0, 0.5, n)
    sizes = widths_from_ratios("4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5", 256, n // 8)
    plan = plan_placement(sizes, loads, n // 4)
    assert plan.paired and plan.optimal
    assert plan.max_compute == pytest.approx(plan.lower_bound, rel=1e-9)
    assert len(set(plan.memory_per_rank)) == 1


@SETTINGS
@given(instances(max_n=16), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0), st.booleans())
def test_move_budget_is_kept_and_never_worse_than_staying(inst, seed, fraction, nodes):
    """From any valid plan, a budgeted re-plan moves at most max_move_fraction of the bytes,
    keeps the expert counts (and pairs, when the old plan has them) and is never worse than
    staying, also with a node hierarchy (whose stage may not spend the budget)."""
    sizes, loads, R = inst
    rng = np.random.default_rng(seed)
    g = R // 2 if nodes and R % 2 == 0 and R >= 4 else None
    old = plan_placement(sizes, rng.lognormal(size=len(sizes)).tolist(), R)
    plan = plan_placement(sizes, loads, R, g, previous=old.rank_of_expert, bytes_per_param=3,
                          max_move_fraction=fraction)
    _check_valid(plan, len(sizes), R)
    assert plan.moved_bytes <= fraction * 3 * sum(sizes) * (1 + 1e-12)
    if old.paired:
        assert plan.paired and max(plan.memory_per_rank) == min(plan.memory_per_rank)
    w = np.array(sizes) * np.array(loads)
    stay = max(np.bincount(old.rank_of_expert, weights=w, minlength=R))
    assert plan.max_compute <= stay * (1 + REL) + 1e-12
