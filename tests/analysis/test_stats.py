"""modse-analyze's statistics (numpy + math only, no scipy) against closed forms, printed tables
and scipy's documented examples."""
import math

import numpy as np
import pytest

from modse_megatron.analysis.stats import (average_ranks, betai, bootstrap_spearman, entropy,
                                           normalized_mutual_information, spearman, t_two_sided_p)


@pytest.mark.parametrize("x", [0.01, 0.2, 0.5, 0.73, 0.99])
@pytest.mark.parametrize("a, b", [(0.5, 0.5), (1.0, 3.0), (2.5, 1.0), (7.0, 0.5)])
def test_incomplete_beta_closed_forms(a, b, x):
    """I_x(a, 1) = x^a; I_x(1, b) = 1 - (1-x)^b; I_x(1/2, 1/2) = 2/pi asin(sqrt x);
    symmetry I_x(a, b) = 1 - I_{1-x}(b, a) for the rest."""
    if b == 1.0:
        expected = x ** a
    elif a == 1.0:
        expected = 1 - (1 - x) ** b
    elif a == b == 0.5:
        expected = 2 / math.pi * math.asin(math.sqrt(x))
    else:
        expected = 1 - betai(b, a, 1 - x)
    assert betai(a, b, x) == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert betai(a, b, 0.0) == 0.0 and betai(a, b, 1.0) == 1.0


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.0, -4.0])
def test_student_t_two_sided_p_closed_forms(t):
    """df = 1 (Cauchy): 1 - 2/pi atan|t|; df = 2: 1 - |t| / sqrt(2 + t^2)."""
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), abs=1e-12)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-12)


@pytest.mark.parametrize("t, df, p", [
    (2.0, 5, 0.101939),      # printed t tables / scipy.stats.t.sf(2, 5) * 2
    (2.2281, 10, 0.05),      # t_{0.975, 10} = 2.2281
    (2.0423, 30, 0.05),      # t_{0.975, 30} = 2.0423
    (12.706, 1, 0.05),       # t_{0.975, 1}
    (1.959964, 1e7, 0.05),   # -> normal
])
def test_student_t_matches_tables(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-5)
    assert t_two_sided_p(float("inf"), df) == 0.0


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 30, 20]).tolist() == [1, 3, 3, 5, 3]
    assert average_ranks([3.0, 1.0, 2.0]).tolist() == [3, 1, 2]
    assert average_ranks([7, 7, 7, 7]).tolist() == [2.5] * 4
    assert average_ranks([]).tolist() == []


def test_spearman_scipy_documented_example():
    """scipy.stats.spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) = (0.8207826816681233, 0.0885870053135438)."""
    result = spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert result["rho"] == pytest.approx(0.8207826816681233, abs=1e-12)
    assert result["p_value"] == pytest.approx(0.0885870053135438, abs=1e-10)
    assert result["n"] == 5


def test_spearman_by_hand_with_ties():
    """rho = Pearson correlation of the average ranks, computed here from the rank vectors."""
    x = [0.5, 2.0, 1.0, 3.0, 3.0, 9.0]
    y = [1.0, 1.0, 2.0, 2.0, 5.0, 4.0]
    rx = np.array([1, 3, 2, 4.5, 4.5, 6])
    ry = np.array([1.5, 1.5, 3.5, 3.5, 6, 5])
    rho = float(np.corrcoef(rx, ry)[0, 1])
    t = rho * math.sqrt(4 / (1 - rho ** 2))
    result = spearman(x, y)
    assert result["rho"] == pytest.approx(rho, abs=1e-12)
    assert result["p_value"] == pytest.approx(t_two_sided_p(t, 4), abs=1e-12)


def test_spearman_degenerate_inputs():
    assert spearman([1, 2, 3], [4, 4, 4]) == {"rho": None, "p_value": None, "n": 3}
    assert spearman([1, 2], [2, 1])["p_value"] is None  # n < 3
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == {"rho": 1.0, "p_value": 0.0, "n": 4}
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1])["rho"] == -1.0


def test_bootstrap_over_groups():
    x = np.arange(40, dtype=float)
    groups = np.repeat(np.arange(8), 5)
    assert bootstrap_spearman(x, 2 * x + 1, groups) == [1.0, 1.0]
    assert bootstrap_spearman(x, x, np.zeros(40)) is None  # one group: nothing to resample
    rng = np.random.default_rng(3)
    y = x + rng.normal(0, 15, 40)
    low, high = bootstrap_spearman(x, y, groups, seed=1)
    assert low <= spearman(x, y)["rho"] <= high and -1 <= low < high <= 1
    assert bootstrap_spearman(x, y, groups, seed=1) == [low, high]  # deterministic


def test_entropy_nats():
    assert entropy(np.full(4, 0.25)) == pytest.approx(math.log(4))
    assert entropy(np.array([1.0, 0.0, 0.0])) == 0.0
    rows = entropy(np.array([[0.5, 0.5], [0.9, 0.1]]), axis=1)
    assert rows.tolist() == pytest.approx([math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))])


def test_normalized_mutual_information():
    assert normalized_mutual_information([0, 0, 1, 1], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert normalized_mutual_information([0, 0, 1, 1], ["b", "b", "a", "a"]) == pytest.approx(1.0)  # labels are names
    assert normalized_mutual_information([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    assert normalized_mutual_information([5, 5], [1, 1]) is None
    assert normalized_mutual_information([], []) is None
    # A determines B (B = A merged 1,2 -> 1): I = H(B), NMI = H(B) / ((H(A) + H(B)) / 2).
    h_a = math.log(3)
    h_b = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    value = normalized_mutual_information([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1])
    assert value == pytest.approx(h_b / ((h_a + h_b) / 2), abs=1e-12)
