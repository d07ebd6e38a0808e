"""backend.analysis.metrics against hand-computed values and textbook formulas.

    pytest tests/test_metrics.py
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from backend.analysis import metrics


def gini_mean_abs_difference(v: np.ndarray) -> float:
    """Textbook Gini: sum_i sum_j |v_i - v_j| / (2 n^2 mean), independent of the sorted-rank formula."""
    v = np.asarray(v, dtype=np.float64)
    return float(np.abs(v[:, None] - v[None, :]).sum() / (2 * v.size ** 2 * v.mean()))


@pytest.mark.parametrize("values, expected", [
    ([1, 1, 1, 1], 0.0),               # perfect equality
    ([0, 0, 0, 1], 0.75),              # all mass on one of n = 4: 1 - 1/n
    ([1, 2, 3, 4], 0.25),              # 2*30/(4*10) - 5/4
    ([5], 0.0),
    ([0, 3], 0.5),
])
def test_gini_hand_computed(values, expected):
    assert metrics.gini(values) == pytest.approx(expected, abs=1e-12)


def test_gini_matches_mean_abs_difference_and_invariances():
    rng = np.random.default_rng(1)
    v = rng.lognormal(0, 1.2, 257)
    g = metrics.gini(v)
    assert g == pytest.approx(gini_mean_abs_difference(v), rel=1e-12)
    assert metrics.gini(v * 7.5) == pytest.approx(g, rel=1e-12)          # scale invariant
    assert metrics.gini(rng.permutation(v)) == pytest.approx(g, rel=1e-12)
    # lognormal(sigma): Gini = 2 Phi(sigma / sqrt 2) - 1 = erf(sigma / 2); loose for a sample of 20k
    big = rng.lognormal(0, 1.2, 20000)
    assert metrics.gini(big) == pytest.approx(math.erf(1.2 / 2), abs=0.02)


@pytest.mark.parametrize("bad", [[], [1, -1], [0, 0], [1, float("nan")]])
def test_concentration_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        metrics.gini(bad)
    with pytest.raises(ValueError):
        metrics.lorenz(bad)
    with pytest.raises(ValueError):
        metrics.tokens_for_p(bad, 0.5)


def test_lorenz_points_and_endpoints():
    x, y = metrics.lorenz([3, 1, 2])
    np.testing.assert_allclose(x, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(y, [0, 1 / 6, 1 / 2, 1])
    rng = np.random.default_rng(2)
    v = rng.exponential(size=101)
    x, y = metrics.lorenz(v)
    assert (x[0], y[0]) == (0.0, 0.0) and (x[-1], y[-1]) == (1.0, 1.0)
    assert (np.diff(y) >= 0).all() and (y <= x + 1e-12).all()            # rising, below the diagonal
    # Gini = 1 - 2 * (area under the discrete Lorenz curve), trapezoid rule
    area = float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum())
    assert metrics.gini(v) == pytest.approx(1 - 2 * area, rel=1e-10)


@pytest.mark.parametrize("values, p, expected", [
    ([4, 3, 2, 1], 0.4, 0.25),   # 4 alone is exactly 40%
    ([4, 3, 2, 1], 0.5, 0.5),    # 4 + 3 = 70%
    ([4, 3, 2, 1], 0.8, 0.75),   # 4 + 3 + 2 = 90%
    ([4, 3, 2, 1], 0.9, 0.75),   # exactly 90%
    ([4, 3, 2, 1], 1.0, 1.0),
    ([1, 1, 1, 1], 0.5, 0.5),
    ([10, 0, 0, 0, 0], 0.9, 0.2),
])
def test_tokens_for_p_hand_computed(values, p, expected):
    assert metrics.tokens_for_p(values, p) == pytest.approx(expected)


def test_tokens_for_p_brute_force_and_bad_p():
    rng = np.random.default_rng(3)
    v = rng.lognormal(0, 1, 300)
    s = np.sort(v)[::-1]
    for p in (0.5, 0.8, 0.9):
        k = next(k for k in range(1, v.size + 1) if s[:k].sum() >= p * v.sum())
        assert metrics.tokens_for_p(v, p) == pytest.approx(k / v.size)
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="p must be in"):
            metrics.tokens_for_p(v, p)


def test_pearson_against_numpy_and_edges():
    rng = np.random.default_rng(4)
    x = rng.normal(size=500)
    y = 0.3 * x + rng.normal(size=500)
    assert metrics.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal lengths"):
        metrics.pearson([1, 2], [1, 2, 3])


def test_average_ranks_average_ties():
    np.testing.assert_array_equal(metrics.average_ranks([10, 20, 20, 5, 20]), [2, 4, 4, 1, 4])
    np.testing.assert_array_equal(metrics.average_ranks([3.0, 1.0, 2.0]), [3, 1, 2])


def test_spearman_hand_computed():
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); ranks x [3,1,4,2,5], y [2,4,1,5,3], sum d^2 = 32
    assert metrics.spearman([3, 1, 4, 1.5, 9], [2, 7, 1, 8, 2.8]) == pytest.approx(1 - 6 * 32 / (5 * 24), abs=1e-12)
    # ties: ranks x [1, 2.5, 2.5, 4], y [1, 3, 2, 4] -> Pearson of those = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert metrics.spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)


def test_spearman_is_rank_based_and_pearson_is_not():
    rng = np.random.default_rng(0)
    x = rng.lognormal(size=500)
    y = 0.3 * np.log(x) + rng.normal(size=500)
    # a monotone rescaling of x (log1p, as the scatter's axis) leaves Spearman as it is and moves Pearson
    assert metrics.spearman(np.log1p(x), y) == pytest.approx(metrics.spearman(x, y), abs=1e-12)
    assert abs(metrics.pearson(np.log1p(x), y) - metrics.pearson(x, y)) > 0.01
    assert math.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))             # a constant variable
    with pytest.raises(ValueError, match="equal lengths"):
        metrics.spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite values"):
        metrics.spearman([1, np.nan], [1, 2])


def test_ols_slope_against_polyfit():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 300, 400)
    y = -0.002 * x + 0.3 + rng.normal(0, 0.1, 400)
    assert metrics.ols_slope(x, y) == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-10)


def test_autocorr_hand_computed():
    # a = 1..5: mean 3, deviations -2..2, sum of squares 10
    r = metrics.autocorr([1, 2, 3, 4, 5], max_lag=3)
    assert r[0] == pytest.approx((2 + 0 + 0 + 2) / 10)      # lag 1: (-2)(-1) + (-1)(0) + (0)(1) + (1)(2)
    assert r[1] == pytest.approx((0 - 1 + 0) / 10)          # lag 2: (-2)(0) + (-1)(1) + (0)(2)
    assert math.isnan(r[2])                                  # N = 5 is not > 2k = 6
    # alternating +-1, N = 10: r_1 = -(N-1)/N, r_2 = (N-2)/N
    alt = np.array([1, -1] * 5, dtype=float)
    r = metrics.autocorr(alt, 2)
    assert r[0] == pytest.approx(-0.9) and r[1] == pytest.approx(0.8)
    assert np.isnan(metrics.autocorr([2, 2, 2, 2, 2], 1)).all()   # constant: undefined


def test_autocorr_of_ar1_is_phi_to_the_k():
    rng = np.random.default_rng(6)
    phi, n = 0.6, 40000
    e = rng.normal(size=n)
    a = np.empty(n)
    a[0] = e[0]
    for t in range(1, n):
        a[t] = phi * a[t - 1] + e[t]
    r = metrics.autocorr(a, 3)
    np.testing.assert_allclose(r, [phi, phi ** 2, phi ** 3], atol=0.02)


def test_mean_autocorr_averages_over_long_enough_sequences():
    seqs = [np.arange(1, 6, dtype=float), np.array([1, -1, 1, -1], dtype=float)]
    r, n, band = metrics.mean_autocorr(seqs, 2)
    # lag 1: both (5 > 2, 4 > 2): mean of 0.4 and -3/4; lag 2: only the first (4 is not > 4)
    assert r[0] == pytest.approx((0.4 - 0.75) / 2) and n[0] == 2
    assert r[1] == pytest.approx(-0.1) and n[1] == 1
    assert band[0] == pytest.approx(1.96 * math.sqrt(1 / 5 + 1 / 4) / 2)
    assert band[1] == pytest.approx(1.96 * math.sqrt(1 / 5))


def test_mean_autocorr_band_holds_white_noise():
    rng = np.random.default_rng(7)
    seqs = [rng.normal(size=300) for _ in range(40)]
    r, n, band = metrics.mean_autocorr(seqs, 30)
    assert (n == 40).all()
    assert band[0] == pytest.approx(1.96 / math.sqrt(40 * 300), rel=1e-12)
    assert (np.abs(r) < band).mean() >= 0.8        # about 95% expected inside the band
