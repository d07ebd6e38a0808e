"""Concentration of the per-vocabulary-token embedding gradient norms n_v = ||dL/dE_v|| of one step: pure numpy,
definitions as in docs/design.md ("Embedding token gradients"), except where issue 11 (which stands) says otherwise.

    n = np.array([0, 0, 3, 4])                       # one norm per vocabulary token, zeros included
    gradient_sparsity(n)          -> 0.5             # tokens with n_v < 0.01 max n
    tokens_for_energy(n, 0.5)     -> 1               # largest energy n_v^2 first: 16 of 25 >= 50%
    concentration_ratio(n)        -> 0.5             # tokens_for_50pct / tokens with gradient (n_v > 0)
    stride_groups(number_norms, s=3)                 # mean norm of groups {k, k+3, k+6, ...}, k = 0..2
    step_metrics(n, number_norms, stride=7)          # all of them, as one dict (a row of embgrad_steps)
"""
from __future__ import annotations

import math

import numpy as np

from backend.analysis.metrics import gini

SPARSE_FRACTION = 0.01        # "below 1% of the max norm"


def _norms(n: np.ndarray | list[float], what: str) -> np.ndarray:
    v = np.asarray(n, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"{what} needs at least one token's norm")
    if not np.isfinite(v).all() or (v < 0).any():
        raise ValueError(f"{what} needs finite non-negative norms")
    return v


def gradient_sparsity(n: np.ndarray | list[float]) -> float:
    """Fraction of vocabulary tokens with n_v < 0.01 * max n (1.0 when every norm is 0)."""
    v = _norms(n, "gradient_sparsity")
    return float((v < SPARSE_FRACTION * v.max()).mean()) if v.max() > 0 else 1.0


def tokens_for_energy(n: np.ndarray | list[float], p: float) -> int:
    """Smallest number of tokens, largest energy e_v = n_v^2 first, whose energy reaches ``p`` of the total."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    e = np.sort(_norms(n, "tokens_for_energy") ** 2)[::-1]
    if e.sum() <= 0:
        raise ValueError("tokens_for_energy: every norm is 0 (no gradient reached the embedding)")
    cum = np.cumsum(e)
    # relative tolerance: exact ties such as [1, 1] at p = 0.5 are not lost to rounding
    return int(min(np.searchsorted(cum, p * cum[-1] * (1 - 1e-12), side="left") + 1, e.size))


def concentration_ratio(n: np.ndarray | list[float]) -> float:
    """tokens_for_50pct / number of tokens with gradient (n_v > 0) (issue 11; docs/design.md divides by the
    vocabulary, which for a large vocabulary is ~0 whatever the batch)."""
    v = _norms(n, "concentration_ratio")
    return tokens_for_energy(v, 0.5) / int((v > 0).sum())


def stride_groups(number_norms: np.ndarray | list[float], stride: int) -> np.ndarray:
    """Mean norm of each stride group {k, k+s, k+2s, ...}, k = 0..s-1, of the number tokens 0..p-1
    (``number_norms[i]`` = n of the token for the number i)."""
    v = _norms(number_norms, "stride_groups")
    if not 1 <= stride <= v.size:
        raise ValueError(f"stride {stride} must be in 1..{v.size} (the number tokens 0..{v.size - 1})")
    return np.array([v[k::stride].mean() for k in range(stride)])


def stride_group_variance(number_norms: np.ndarray | list[float], stride: int) -> float:
    """Population variance (ddof 0) of the stride groups' mean norms."""
    return float(stride_groups(number_norms, stride).var())


def stride_group_max_ratio(number_norms: np.ndarray | list[float], stride: int) -> float:
    """max / min of the stride groups' mean norms (inf when a group has no gradient at all)."""
    g = stride_groups(number_norms, stride)
    return float(g.max() / g.min()) if g.min() > 0 else math.inf


def step_metrics(n: np.ndarray | list[float], number_norms: np.ndarray | list[float] | None = None,
                 stride: int = 0) -> dict[str, float]:
    """Every metric of one step (NaN for the stride ones without number tokens or stride)."""
    v = _norms(n, "step_metrics")
    out = {"n_vocab": int(v.size), "n_with_grad": int((v > 0).sum()), "max_norm": float(v.max()),
           "gradient_sparsity": gradient_sparsity(v)}
    if v.max() > 0:
        out.update(gradient_gini=gini(v), tokens_for_50pct=tokens_for_energy(v, 0.5),
                   tokens_for_90pct=tokens_for_energy(v, 0.9), concentration_ratio=concentration_ratio(v))
    else:
        out.update(gradient_gini=math.nan, tokens_for_50pct=0, tokens_for_90pct=0, concentration_ratio=math.nan)
    if stride and number_norms is not None:
        out.update(stride_group_variance=stride_group_variance(number_norms, stride),
                   stride_group_max_ratio=stride_group_max_ratio(number_norms, stride))
    else:
        out.update(stride_group_variance=math.nan, stride_group_max_ratio=math.nan)
    return out
