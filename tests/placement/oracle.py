"""Readable reference implementations the fast planner is checked against (test oracles).

Plain Python, no cleverness: enumerate every partition, or pack greedily as the published
EPLB description says.  Slow on purpose — only used for small instances.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence


def partitions(n: int, k: int) -> Iterator[list[tuple[int, ...]]]:
    """All partitions of range(n) into unlabelled groups of exactly k items."""

    def rec(rest: tuple[int, ...]) -> Iterator[list[tuple[int, ...]]]:
        if not rest:
            yield []
            return
        first, others = rest[0], rest[1:]
        for mates in itertools.combinations(others, k - 1):
            group = (first, *mates)
            left = tuple(x for x in others if x not in mates)
            for tail in rec(left):
                yield [group, *tail]

    yield from rec(tuple(range(n)))


def is_pair_group(sizes: Sequence[float], group: Sequence[int], pair_sum: float) -> bool:
    """A group whose sizes match into complementary pairs (each pair sums to pair_sum)."""
    s = sorted(sizes[e] for e in group)
    return len(s) % 2 == 0 and all(
        abs(s[i] + s[-1 - i] - pair_sum) <= 1e-9 * pair_sum for i in range(len(s) // 2)
    )


def brute_force(
    weights: Sequence[float], num_ranks: int, sizes: Sequence[float] | None = None
) -> float:
    """Optimal max group weight over all partitions into num_ranks groups of n/num_ranks.

    With ``sizes``: only partitions whose every group is a union of complementary pairs
    (the paired problem, where memory per rank is exactly equal).
    """
    n = len(weights)
    k = n // num_ranks
    pair_sum = None if sizes is None else min(sizes) + max(sizes)
    best = float("inf")
    for groups in partitions(n, k):
        if pair_sum is not None and not all(is_pair_group(sizes, g, pair_sum) for g in groups):
            continue
        best = min(best, max(sum(weights[e] for e in g) for g in groups))
    return best


def is_pair_structured(sizes: Sequence[float]) -> bool:
    """Sorted, s[i] + s[n-1-i] is constant (MoDSE complementary pairs)."""
    s = sorted(sizes)
    c = s[0] + s[-1]
    half = range(len(s) // 2)
    return len(s) % 2 == 0 and all(abs(s[i] + s[-1 - i] - c) <= 1e-9 * c for i in half)


def lpt_with_cardinality(weights: Sequence[float], num_ranks: int) -> list[int]:
    """Greedy baseline: heaviest first into the lightest rank that still has room."""
    k = len(weights) // num_ranks
    load = [0.0] * num_ranks
    count = [0] * num_ranks
    rank = [0] * len(weights)
    for e in sorted(range(len(weights)), key=lambda i: -weights[i]):
        r = min((r for r in range(num_ranks) if count[r] < k), key=load.__getitem__)
        rank[e] = r
        load[r] += weights[e]
        count[r] += 1
    return rank
