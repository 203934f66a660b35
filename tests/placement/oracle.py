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
    weights: Sequence[float],
    num_ranks: int,
    sizes: Sequence[float] | None = None,
    experts: Sequence[int] | None = None,
) -> float:
    """Optimal max group weight over all partitions into num_ranks groups of n/num_ranks.

    With ``sizes``: only partitions whose every group is a union of complementary pairs
    (the paired problem, where memory per rank is exactly equal).  With ``experts`` (the
    expert of each item, for copies): no group holds two items of one expert.
    """
    n = len(weights)
    k = n // num_ranks
    pair_sum = None if sizes is None else min(sizes) + max(sizes)
    best = float("inf")
    for groups in partitions(n, k):
        if pair_sum is not None and not all(is_pair_group(sizes, g, pair_sum) for g in groups):
            continue
        if experts is not None and any(len({experts[e] for e in g}) < k for g in groups):
            continue
        best = min(best, max(sum(weights[e] for e in g) for g in groups))
    return best


# ----------------------------------------------------------------------------- replicas


def replicate_counts(weights: Sequence[float], num_ranks: int, extra: int) -> list[int]:
    """EPLB's replicate_experts: each extra copy to the expert with the largest weight per copy
    (lowest id on ties), at most num_ranks copies per expert."""
    counts = [1] * len(weights)
    for _ in range(extra):
        e = max((e for e in range(len(weights)) if counts[e] < num_ranks),
                key=lambda e: (weights[e] / counts[e], -e))
        counts[e] += 1
    return counts


def paired_replicate_counts(
    weights: Sequence[float], sizes: Sequence[float], num_ranks: int, extra: int
) -> list[int]:
    """The paired rule for sizes without a middle class (no size is half the pair sum): the
    expert with the largest weight per copy plus the expert of the complementary size with the
    largest weight per copy; an expert whose complementary size is full gets no more copies."""
    n = len(weights)
    pair_sum = min(sizes) + max(sizes)
    counts, full = [1] * n, set()

    def key(e: int) -> tuple[float, int]:
        return weights[e] / counts[e], -e

    for _ in range(extra // 2):
        while True:
            e = max((e for e in range(n) if counts[e] < num_ranks and e not in full), key=key)
            partners = [f for f in range(n) if counts[f] < num_ranks
                        and abs(sizes[f] + sizes[e] - pair_sum) <= 1e-9 * pair_sum]
            if partners:
                break
            full.add(e)
        f = max(partners, key=key)
        counts[e] += 1
        counts[f] += 1
    return counts


def count_vectors(n: int, cap: int, slots: int) -> Iterator[tuple[int, ...]]:
    """Every choice of copy counts: 1..cap copies per expert (cap = num_ranks when copies sit on
    distinct ranks), summing to slots."""
    for counts in itertools.product(range(1, cap + 1), repeat=n):
        if sum(counts) == slots:
            yield counts


def brute_force_copies(
    weights: Sequence[float], counts: Sequence[int], num_ranks: int,
    sizes: Sequence[float] | None = None, distinct: bool = True,
) -> float:
    """Optimal max rank weight for these copy counts: each copy of e weighs weights[e] /
    counts[e], copies of one expert on distinct ranks unless not ``distinct`` (with sizes:
    ranks of complementary pairs); inf when no placement exists."""
    experts = [e for e, c in enumerate(counts) for _ in range(c)]
    item_w = [weights[e] / counts[e] for e in experts]
    item_s = None if sizes is None else [sizes[e] for e in experts]
    return brute_force(item_w, num_ranks, item_s, experts if distinct else None)


def best_over_counts(
    weights: Sequence[float], num_ranks: int, extra: int,
    sizes: Sequence[float] | None = None, distinct: bool = True,
) -> float:
    """Optimal max rank weight over every choice of counts and placement (with sizes: counts
    whose copies form complementary pairs, placed on ranks of complementary pairs)."""
    n = len(weights)
    cap = num_ranks if distinct else extra + 1
    best = float("inf")
    for counts in count_vectors(n, cap, n + extra):
        if sizes is not None and not is_pair_structured(
                [sizes[e] for e, c in enumerate(counts) for _ in range(c)]):
            continue
        best = min(best, brute_force_copies(weights, counts, num_ranks, sizes, distinct))
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
