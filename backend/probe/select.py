"""Entropy buckets and picked positions of a probe (numpy only: the job, ``probe-merge`` and tests share it).

    bounds = boundaries(tokens.entropy, n_buckets=5)        # inner quantile boundaries, (4,)
    tokens["bucket"] = assign(tokens.entropy, bounds)       # 0 .. 4
    tokens["picked"] = pick(tokens, per_bucket=8, seed=0)   # up to 8 per (model, prompt, sample, bucket)

Buckets are global: the boundaries come from every generated token of one model over the whole probe (all
shards), so shard-then-merge gives the same buckets as one unsharded run (quantiles do not depend on order).
Picks are decided per rollout by a random key seeded with (seed, model, prompt_idx, sample_idx): which shard
probed the rollout, and in which order, does not change them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

MODEL_CODES = {"base": 0, "trained": 1}


def boundaries(entropy: np.ndarray, n_buckets: int) -> np.ndarray:
    """The ``n_buckets - 1`` inner boundaries: the k/n_buckets quantiles (numpy's linear interpolation)."""
    e = np.asarray(entropy, dtype=np.float64)
    if e.size == 0:
        raise ValueError("no generated tokens to cut into entropy buckets")
    return np.quantile(e, np.arange(1, n_buckets) / n_buckets)


def assign(entropy: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Bucket b of each entropy: bounds[b-1] <= e < bounds[b] (bucket 0 below bounds[0], the last from the
    last boundary up)."""
    return np.searchsorted(np.asarray(bounds, dtype=np.float64), np.asarray(entropy, dtype=np.float64),
                           side="right").astype(np.int16)


def rollout_keys(seed: int, model: str, prompt_idx: int, sample_idx: int, n: int) -> np.ndarray:
    """Random keys of the n generated tokens of one rollout (smallest first are picked): seeded by the rollout."""
    rng = np.random.default_rng([int(seed), MODEL_CODES[model], int(prompt_idx), int(sample_idx)])
    return rng.random(n)


def pick(tokens: pd.DataFrame, per_bucket: int, seed: int) -> np.ndarray:
    """Boolean mask over ``tokens`` (columns model, prompt_idx, sample_idx, position, bucket): per rollout and
    bucket, the ``per_bucket`` tokens with the smallest keys (all of them if there are fewer)."""
    picked = np.zeros(len(tokens), dtype=bool)
    if not len(tokens):
        return picked
    keys = np.empty(len(tokens))
    for (model, p, s), idx in tokens.groupby(["model", "prompt_idx", "sample_idx"], sort=False).indices.items():
        order = np.argsort(tokens["position"].to_numpy()[idx], kind="stable")     # keys follow positions
        k = rollout_keys(seed, model, p, s, len(idx))
        keys[idx[order]] = k
    df = pd.DataFrame({"model": tokens["model"].to_numpy(), "p": tokens["prompt_idx"].to_numpy(),
                       "s": tokens["sample_idx"].to_numpy(), "b": tokens["bucket"].to_numpy(), "k": keys})
    rank = df.groupby(["model", "p", "s", "b"], sort=False)["k"].rank(method="first")
    picked[:] = (rank <= per_bucket).to_numpy()
    return picked


def bucket_table(tokens: pd.DataFrame, bounds: dict[str, np.ndarray], n_buckets: int) -> pd.DataFrame:
    """One row per (model, bucket): lo, hi (the first lo is -inf, the last hi +inf), tokens and picks in it."""
    rows = []
    for model, b in bounds.items():
        edges = np.concatenate([[-np.inf], b, [np.inf]])
        sub = tokens[tokens["model"] == model]
        for k in range(n_buckets):
            inb = sub["bucket"] == k
            rows.append({"model": model, "bucket": k, "lo": edges[k], "hi": edges[k + 1],
                         "n_tokens": int(inb.sum()), "n_picked": int((inb & sub["picked"]).sum())})
    return pd.DataFrame(rows)


def rebucket(tokens: pd.DataFrame, n_buckets: int, per_bucket: int, seed: int
             ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """``tokens`` with ``bucket`` and ``picked`` set from global boundaries per model; and the boundaries."""
    out = tokens.copy()
    bounds: dict[str, np.ndarray] = {}
    out["bucket"] = np.int16(0)
    for model in [m for m in MODEL_CODES if (out["model"] == m).any()]:
        sel = (out["model"] == model).to_numpy()
        bounds[model] = boundaries(out.loc[sel, "entropy"].to_numpy(), n_buckets)
        out.loc[sel, "bucket"] = assign(out.loc[sel, "entropy"].to_numpy(), bounds[model])
    out["bucket"] = out["bucket"].astype(np.int16)
    out["picked"] = pick(out, per_bucket, seed)
    return out, bounds
