"""Concentration, correlation and autocorrelation metrics: pure numpy, definitions as in docs/design.md.

    gini([1, 1, 1, 1])            -> 0.0
    gini([0, 0, 0, 1])            -> 0.75                 (= 1 - 1/n for one non-zero value)
    tokens_for_p([4, 3, 2, 1], 0.5) -> 0.5                (the 2 largest hold 7/10 >= 0.5)
    x, y = lorenz([1, 2, 3])      # x = [0, 1/3, 2/3, 1], y = [0, 1/6, 1/2, 1]
    r, n_seq, band = mean_autocorr([seq_a, seq_b], max_lag=30)
    spearman([1, 2, 3, 4], [1, 4, 9, 16]) -> 1.0        (Pearson of the average ranks; ties averaged)
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _nonneg(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"{what} needs at least one value")
    if not np.isfinite(v).all():
        raise ValueError(f"{what} needs finite values; got NaN or inf")
    if (v < 0).any():
        raise ValueError(f"{what} is defined for non-negative values (e.g. magnitudes); got min {v.min():g}")
    if v.sum() <= 0:
        raise ValueError(f"{what} needs a positive total; all values are zero")
    return v


def gini(values: Sequence[float] | np.ndarray) -> float:
    """Gini = 2 sum_i i v_(i) / (n sum v) - (n+1)/n, v sorted ascending, i from 1. 0: all equal;
    1 - 1/n: everything on one value."""
    v = np.sort(_nonneg(values, "gini"))
    n = v.size
    i = np.arange(1, n + 1)
    return float(2.0 * (i * v).sum() / (n * v.sum()) - (n + 1) / n)


def lorenz(values: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve: (fraction of tokens, cumulative share of the total), values ascending, n + 1 points
    from (0, 0) to (1, 1)."""
    v = np.sort(_nonneg(values, "lorenz"))
    x = np.arange(v.size + 1) / v.size
    y = np.concatenate([[0.0], np.cumsum(v) / v.sum()])
    y[-1] = 1.0    # exact end point despite rounding
    return x, y


def tokens_for_p(values: Sequence[float] | np.ndarray, p: float) -> float:
    """Smallest fraction of tokens, taken largest first, whose values reach ``p`` of the total."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    v = np.sort(_nonneg(values, "tokens_for_p"))[::-1]
    cum = np.cumsum(v)
    # a relative tolerance so that exact ties (e.g. [1, 1, 1, 1] at p = 0.5) are not lost to rounding
    k = int(np.searchsorted(cum, p * cum[-1] * (1 - 1e-12), side="left")) + 1
    return min(k, v.size) / v.size


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN when either variable is constant (the correlation is undefined)."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"pearson needs equal lengths, got {a.size} and {b.size}")
    if a.size < 2:
        raise ValueError(f"pearson needs at least 2 pairs, got {a.size}")
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return float((da * db).sum() / den) if den > 0 else float("nan")


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` ascending; tied values all get the mean of the ranks they span."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="stable")
    sv = v[order]
    # the first index of each run of equal values, and the run's average rank (1-based)
    starts = np.flatnonzero(np.concatenate([[True], sv[1:] != sv[:-1]]))
    ends = np.concatenate([starts[1:], [v.size]])
    ranks = np.empty(v.size)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties averaged); NaN when either variable is
    constant. Unlike Pearson it does not change under a monotone transform of either variable."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"spearman needs equal lengths, got {a.size} and {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("spearman needs finite values; got NaN or inf")
    return pearson(average_ranks(a), average_ranks(b))


def ols_slope(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Least-squares slope of y on x; NaN with fewer than 2 distinct x."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"ols_slope needs equal lengths, got {a.size} and {b.size}")
    da = a - a.mean() if a.size else a
    den = float((da * da).sum())
    return float((da * (b - b.mean())).sum() / den) if den > 0 else float("nan")


def autocorr(series: Sequence[float] | np.ndarray, max_lag: int) -> np.ndarray:
    """r_k = sum_{t=1}^{N-k} (a_t - mean)(a_{t+k} - mean) / sum_t (a_t - mean)^2 for k = 1..max_lag;
    NaN where N <= 2k (too short to count) or the series is constant."""
    if max_lag < 1:
        raise ValueError(f"max_lag must be >= 1, got {max_lag}")
    a = np.asarray(series, dtype=np.float64).ravel()
    out = np.full(max_lag, np.nan)
    if a.size == 0:
        return out
    d = a - a.mean()
    den = float((d * d).sum())
    if den <= 0:
        return out
    for k in range(1, max_lag + 1):
        if a.size > 2 * k:
            out[k - 1] = float((d[:-k] * d[k:]).sum()) / den
    return out


def mean_autocorr(sequences: Sequence[Sequence[float] | np.ndarray], max_lag: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """r_k averaged over the sequences with N > 2k (and not constant), for k = 1..max_lag.

    Returns (r, n_sequences, band). ``band`` is the 95% white-noise band of that average: under no
    autocorrelation r_k of a length-N series has variance about 1/N (Bartlett), so the mean over M
    sequences has sd sqrt(sum_i 1/N_i) / M and the band is +-1.96 times that (= 1.96 / sqrt(N_eff)).
    """
    rs = [autocorr(s, max_lag) for s in sequences]
    lengths = np.array([np.asarray(s).size for s in sequences], dtype=np.float64)
    r = np.full(max_lag, np.nan)
    n = np.zeros(max_lag, dtype=np.int64)
    band = np.full(max_lag, np.nan)
    if not rs:
        return r, n, band
    mat = np.vstack(rs)                                  # (sequences, lags)
    for k in range(max_lag):
        ok = ~np.isnan(mat[:, k])
        n[k] = int(ok.sum())
        if n[k]:
            r[k] = float(mat[ok, k].mean())
            band[k] = 1.96 * math.sqrt(float((1.0 / lengths[ok]).sum())) / n[k]
    return r, n, band
