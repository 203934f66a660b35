"""The few statistics ``modse-analyze`` reports, in numpy and ``math`` only.

scipy is not a dependency (and is not installed where the tests run), so the rank correlation,
its p-value (Student t through the regularised incomplete beta function, Numerical Recipes'
continued fraction) and the mutual information are written out here. Each function states the
reference formula it implements; tests check them against closed forms (t with 1 and 2 degrees
of freedom) and hand-computed values.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy's ``rankdata(method='average')``)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    if len(x) == 0:
        return ranks
    # Runs of equal values: [start, end) in sorted order share (start + 1 + end) / 2.
    boundaries = np.flatnonzero(np.diff(sorted_x) != 0) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(x)]))
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betai(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom = I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return betai(df / 2.0, 0.5, df / (df + t * t))


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, Optional[float]]:
    """Spearman's rho (Pearson correlation of average ranks) and its two-sided p-value from
    ``t = rho * sqrt((n - 2) / (1 - rho^2))`` on n - 2 degrees of freedom (scipy's
    ``spearmanr``). ``rho`` and ``p_value`` are None when either side is constant or n < 3.

    The p-value assumes independent pairs; tokens of one sequence are not, so callers also
    report an interval that resamples whole sequences (:func:`bootstrap_spearman`)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = int(len(x))
    rho = _rank_corr(x, y)
    if rho is None or n < 3:
        return {"rho": rho, "p_value": None, "n": n}
    if abs(rho) >= 1.0:
        return {"rho": float(np.sign(rho)), "p_value": 0.0, "n": n}
    t = rho * math.sqrt((n - 2) / (1.0 - rho * rho))
    return {"rho": rho, "p_value": t_two_sided_p(t, n - 2), "n": n}


def _rank_corr(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    if denom == 0.0:
        return None
    return float((rx * ry).sum() / denom)


def bootstrap_spearman(x: Sequence[float], y: Sequence[float], groups: Sequence[int], reps: int = 200,
                       seed: int = 0) -> Optional[list[float]]:
    """95% percentile interval of Spearman's rho when whole groups (sequences) are resampled
    with replacement: honest about tokens of one sequence being correlated. None when fewer
    than 2 groups or the resamples are degenerate."""
    x, y, groups = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(groups)
    ids = np.unique(groups)
    if len(ids) < 2:
        return None
    members = [np.flatnonzero(groups == g) for g in ids]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        pick = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        rho = _rank_corr(x[pick], y[pick])
        if rho is not None:
            values.append(rho)
    if len(values) < reps // 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis`` (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def normalized_mutual_information(a: Sequence, b: Sequence) -> Optional[float]:
    """NMI of two labelings: ``I(A;B) / ((H(A) + H(B)) / 2)`` (arithmetic normalisation, as
    scikit-learn's default). 1 = each determines the other, 0 = independent. None when both
    labelings are constant (0/0); 0.0 when only one is."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) == 0:
        return None
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.float64)
    np.add.at(joint, (ai, bi), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    ha, hb = float(entropy(pa)), float(entropy(pb))
    if ha + hb == 0.0:
        return None
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    return max(0.0, mi / ((ha + hb) / 2.0))
