"""Node-limited expert groups (num_groups, DeepSeek EPLB's group-limited hierarchy).

Every group of consecutive experts, with all its copies, must sit on one node, every node must
hold as many groups, plans must stay valid (equal memory in paired mode), and the reported
bound must stay below the brute-force optimum of the group-limited problem (oracle.py).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from modse_megatron.placement import PlanOptions, plan_placement, widths_from_ratios

from .oracle import brute_force, is_pair_structured
from .test_replicas import MODSE, PAIRS, REL, SETTINGS, check_valid


@st.composite
def group_instances(draw, max_group: int = 6, max_groups: int = 8, max_ranks: int = 8,
                    replicas: bool = True):
    """(sizes, loads, R, g, G, X, balance, stack): groups of whole complementary pairs or of
    random sizes, at least two nodes, valid group / replica counts."""
    G = draw(st.integers(2, max_groups))
    paired = draw(st.booleans())
    if paired:
        half = draw(st.integers(1, max_group // 2))
        sizes = [float(x) for _ in range(G) for x in draw(st.permutations(
            [s for _ in range(half) for s in draw(st.sampled_from(PAIRS))]))]
    else:
        per = draw(st.integers(1, max_group))
        sizes = draw(st.lists(st.integers(1, 6).map(float), min_size=G * per, max_size=G * per))
    n = len(sizes)
    R = draw(st.sampled_from([r for r in (2, 4, 6, 8) if r <= max_ranks]))
    g = draw(st.sampled_from([d for d in range(1, R) if R % d == 0]))
    N = R // g
    assume(G % N == 0)
    stack = draw(st.booleans())
    balance = draw(st.sampled_from(["memory_then_compute", "compute"]))
    if not paired and is_pair_structured(sizes) and len(set(sizes)) > 1:
        balance = "compute"  # random sizes that pair up by chance need not pair per group
    step = N * (2 if paired and balance == "memory_then_compute" else 1)
    top = (n * (g - 1) if not stack else n * g) if replicas else 0
    choices = [x for x in range(0, top + 1, step) if (n + x) % R == 0]
    assume(choices)
    X = draw(st.sampled_from(choices))
    load = st.one_of(st.just(0.0), st.integers(1, 20).map(float),
                     st.floats(0.01, 100, allow_nan=False))
    loads = draw(st.lists(load, min_size=n, max_size=n))
    return sizes, loads, R, g, G, X, balance, stack


def check_groups(plan, n: int, R: int, g: int, G: int) -> None:
    """All copies of a group on one node; every node holds G / N whole groups."""
    k, per, N = plan.experts_per_rank, n // G, R // g
    node_of_slot = [(slot // k) // g for slot in range(len(plan.slot_expert))]
    node_of_group: dict[int, set[int]] = {}
    for slot, e in enumerate(plan.slot_expert):
        node_of_group.setdefault(e // per, set()).add(node_of_slot[slot])
    assert all(len(nodes) == 1 for nodes in node_of_group.values()), node_of_group
    per_node = np.bincount([next(iter(v)) for v in node_of_group.values()], minlength=N)
    assert per_node.tolist() == [G // N] * N


@SETTINGS
@given(group_instances())
def test_groups_stay_on_one_node(inst):
    sizes, loads, R, g, G, X, balance, stack = inst
    opts = PlanOptions(balance=balance, num_replicas=X, stack_copies=stack, num_groups=G)
    plan = plan_placement(sizes, loads, R, g, options=opts)
    check_valid(plan, sizes, loads, R, X, stacked=stack)
    check_groups(plan, len(sizes), R, g, G)
    assert plan.max_compute >= plan.lower_bound * (1 - REL) - 1e-12
    free = plan_placement(sizes, loads, R, g, options=opts, num_groups=0, exact_max_experts=0)
    assert plan.lower_bound >= free.lower_bound * (1 - REL)  # its bounds, and the group bound
    assert plan.paired == free.paired
    if plan.paired:
        assert len(set(plan.memory_per_rank)) == 1
    per_node = plan.experts_per_rank * g
    inflow = [sum(loads[e] / plan.copies_per_expert[e]
                  for e in plan.slot_expert[q * per_node:(q + 1) * per_node]) for q in range(R // g)]
    assert np.allclose(inflow, plan.node_inflow, rtol=1e-9, atol=1e-12)
    assert max(plan.node_inflow) >= plan.node_inflow_bound * (1 - REL) - 1e-12


def brute_force_groups(w, sizes, R: int, g: int, G: int) -> float:
    """Optimal max rank weight with every group on one node (no replicas): every assignment
    of groups to nodes, every partition of each node's experts (oracle.brute_force)."""
    n, N = len(w), R // g
    per = n // G
    best = float("inf")
    for labels in itertools.product(range(N), repeat=G):
        if any(labels.count(q) != G // N for q in range(N)):
            continue
        value = 0.0
        for q in range(N):
            experts = [e for grp in range(G) if labels[grp] == q
                       for e in range(grp * per, (grp + 1) * per)]
            sub_sizes = None if sizes is None else [sizes[e] for e in experts]
            value = max(value, brute_force([w[e] for e in experts], g, sub_sizes))
        best = min(best, value)
    return best


@SETTINGS
@given(group_instances(max_group=4, max_groups=4, max_ranks=4, replicas=False))
def test_group_bound_below_the_brute_force_optimum(inst):
    sizes, loads, R, g, G, _, balance, _ = inst
    assume(len(sizes) <= 10)
    plan = plan_placement(sizes, loads, R, g, balance=balance, num_groups=G)
    w = [s * t for s, t in zip(sizes, loads)]
    best = brute_force_groups(w, sizes if plan.paired else None, R, g, G)
    assert plan.lower_bound <= best * (1 + REL) + 1e-12
    assert plan.max_compute >= best * (1 - REL) - 1e-12
    if plan.optimal:
        assert plan.max_compute == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_one_node_ignores_groups():
    rng = np.random.default_rng(5)
    sizes, loads = widths_from_ratios(MODSE, 256, repeat=4), rng.lognormal(size=32)
    plain = plan_placement(sizes, loads, 8, num_replicas=8)
    assert plan_placement(sizes, loads, 8, num_replicas=8, num_groups=4) == plain
    assert plan_placement(sizes, loads, 8, 8, num_replicas=8, num_groups=4) == plan_placement(
        sizes, loads, 8, 8, num_replicas=8)


def test_groups_on_a_modse_layer():
    """64 MoDSE experts in 8 groups (whole pair sets) on 4 nodes x 4 ranks with 32 replicas:
    groups stay on their node, memory stays equal, and the hot group's node gets the load."""
    rng = np.random.default_rng(6)
    sizes = widths_from_ratios(MODSE, 256, repeat=8)
    loads = rng.lognormal(size=64)
    loads[:8] *= 6.0  # group 0 is hot
    plan = plan_placement(sizes, loads, 16, 4, num_replicas=32, num_groups=8)
    check_valid(plan, sizes, loads, 16, 32)
    check_groups(plan, 64, 16, 4, 8)
    assert plan.paired and len(set(plan.memory_per_rank)) == 1
    free = plan_placement(sizes, loads, 16, 4, num_replicas=32)
    assert plan.max_compute >= free.lower_bound * (1 - REL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sizes=[1.0] * 8, num_ranks=4, ranks_per_node=2, num_groups=3),
         r"num_groups=3 does not divide num_experts=8"),
        (dict(sizes=[1.0] * 8, num_ranks=4, ranks_per_node=1, num_groups=2),
         r"num_groups=2 is not a multiple of the 4 nodes"),
        (dict(sizes=[1.0] * 8, num_ranks=4, ranks_per_node=1, num_groups=4, num_replicas=4),
         r"num_replicas=4 exceeds num_experts \* \(ranks_per_node - 1\)=0: .* stack_copies"),
        (dict(sizes=[9, 1, 8, 2, 9, 8, 1, 2], num_ranks=4, ranks_per_node=2, num_groups=4),
         r"group 2 \(experts 4..5\) does not hold whole complementary pairs"),
        (dict(sizes=[1.0] * 8, num_ranks=4, ranks_per_node=2, num_groups=2,
              previous=[0, 0, 1, 1, 2, 2, 3, 3]),
         r"previous cannot be combined with num_groups on several nodes yet"),
        (dict(sizes=[1.0] * 8, num_ranks=4, num_groups=-1), r"num_groups=-1 must be an integer"),
    ],
)
def test_bad_groups_are_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        plan_placement(**kwargs)
    assert "\n" not in str(info.value)
