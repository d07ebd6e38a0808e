"""Confidence intervals for scheme comparisons: a paired bootstrap over seeds and eval items (pure numpy).

    from backend.analysis.intervals import paired_bootstrap, verdict
    # scores: (S schemes, J seeds, I items), e.g. 1.0/0.0 greedy exact match, or the mean over k samples
    res = paired_bootstrap(scores, baseline=0, n_boot=2000, seed=0)
    res.mean[s], res.ci_low[s], res.ci_high[s]              # each scheme's accuracy, 95% percentile interval
    res.delta[s], res.delta_low[s], res.delta_high[s]      # scheme minus baseline, same resamples (paired)
    verdict(res.delta_low[s], res.delta_high[s])           # "better" / "worse" / "not distinguishable"

Why paired: every run of a comparison is evaluated on the same held-out items, and seed j of every scheme
starts from the same LoRA init and sees the same data order. One bootstrap replicate draws seeds (with
replacement, from the J seeds) and items (with replacement, from the I items) once, and applies that same draw
to every scheme; a scheme's statistic is the mean of its scores over the drawn (seed, item) cells. The
difference to the baseline is taken inside the replicate, so the item difficulty and seed luck every scheme
shares cancel out of the delta's interval. Intervals are percentile intervals of the replicates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VERDICTS = ("better", "worse", "not distinguishable")


@dataclass(frozen=True)
class BootstrapResult:
    """Per scheme (arrays of length S): the point estimate, its interval, and the paired difference to the
    baseline with its interval (0 and [0, 0] for the baseline itself)."""
    mean: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    delta: np.ndarray
    delta_low: np.ndarray
    delta_high: np.ndarray
    n_boot: int
    level: float


def _percentiles(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha], axis=0)
    return lo, hi


def paired_bootstrap(scores: np.ndarray, baseline: int = 0, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95, resample_seeds: bool = True) -> BootstrapResult:
    """Means of ``scores`` (S, J, I) over seeds and items with percentile intervals from a paired bootstrap
    (module docstring). ``resample_seeds=False`` resamples items only (all J seeds in every replicate).
    ValueError for a malformed input."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty (schemes, seeds, items) array, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (a run without eval results?)")
    S, J, I = scores.shape
    if not 0 <= baseline < S:
        raise ValueError(f"baseline index {baseline} is out of range for {S} schemes")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    # the mean over a (seeds x items) draw of cell (j, i) = sum_j sum_i cj_j ci_i x_ji / (J I), with cj, ci the
    # draw counts; computed as counts @ x @ counts so a replicate costs O(S J I), not a gather of J*I cells
    cj = rng.multinomial(J, np.full(J, 1.0 / J), size=n_boot) if resample_seeds else np.ones((n_boot, J))  # (B, J)
    ci = rng.multinomial(I, np.full(I, 1.0 / I), size=n_boot)                                            # (B, I)
    reps = np.einsum("bj,sji,bi->bs", cj, scores, ci) / (J * I)                                          # (B, S)
    diffs = reps - reps[:, [baseline]]                                                                    # (B, S)
    mean = scores.mean(axis=(1, 2))
    lo, hi = _percentiles(reps, level)
    dlo, dhi = _percentiles(diffs, level)
    return BootstrapResult(mean=mean, ci_low=lo, ci_high=hi, delta=mean - mean[baseline], delta_low=dlo,
                           delta_high=dhi, n_boot=n_boot, level=level)


def verdict(delta_low: float, delta_high: float) -> str:
    """"better" when the whole interval of (scheme - baseline) is above 0, "worse" when below, else
    "not distinguishable"."""
    if delta_low > 0:
        return "better"
    if delta_high < 0:
        return "worse"
    return "not distinguishable"
