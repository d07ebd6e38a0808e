"""What each token-weighting scheme is, without torch: names, parameters with defaults and ranges, the
normaliser, what it needs, and its weights in numpy for the app's what-if overlay.

    from backend.lm import scheme_specs
    spec = scheme_specs.get("antiop")                  # ValueError listing the schemes otherwise
    spec.resolve_params({"clip_mult": 2.0})            # {'clip_mult': 2.0}; unknown names, bad ranges raise
    scheme_specs.what_if_weights(step_tokens, "topk", {"keep_ratio": 0.5})   # pd.Series of weights

The training loop's weights (torch, detached) are ``backend.lm.schemes``, built from these specs; this module
is what the web app and the configs use, so neither imports torch. Both implement docs/design.md's scheme table,
and ``tests/test_schemes.py`` checks the numpy weights against the torch ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from backend.jobs.config import check_range

_RATIO = (0.0, 1.0, True, False)        # (0, 1]
_INF = float("inf")

# (loss, mask, entropy, params) -> weights; float32 arrays of one shape, response tokens where mask is True
WhatIf = Callable[[np.ndarray, np.ndarray, np.ndarray | None, dict], np.ndarray]


@dataclass(frozen=True)
class SchemeSpec:
    name: str
    doc: str
    defaults: dict = field(default_factory=dict)
    normaliser: str = "response"                  # "response" or "kept"
    needs_ref: str = "none"                       # "none", "loss" (reference l_t), "logits" (full distribution)
    needs_entropy: bool = False
    ranges: dict = field(default_factory=dict)    # param -> (low, high, low_open, high_open)
    what_if: WhatIf | None = None                 # numpy weights from a trace's loss (None: needs the reference)

    def resolve_params(self, params: dict | None) -> dict:
        """Defaults overlaid with ``params``; unknown names and values out of range raise ValueError."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"scheme {self.name!r} has no parameter {', '.join(unknown)}; allowed: {allowed}")
        out = {**self.defaults, **params}
        for key, default in self.defaults.items():     # a flag is a bool: the string "false" is not (it is truthy)
            if isinstance(default, bool) and not isinstance(out[key], bool):
                raise ValueError(f"scheme {self.name!r}: {key} must be true or false, got {out[key]!r}")
            if isinstance(default, float) and isinstance(out[key], int) and not isinstance(out[key], bool):
                out[key] = float(out[key])             # {clip_mult: 2} is {clip_mult: 2.0} (one settings hash)
        for key, rng in self.ranges.items():
            v = out[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"scheme {self.name!r}: {key} must be a number, got {v!r}")
            check_range(f"scheme {self.name!r}: {key}", v, rng)
        return out


# ---- numpy weights (the same formulas as backend.lm.schemes, in float32) -----------------------------------

def _ones(loss: np.ndarray, mask: np.ndarray, ent: np.ndarray | None, p: dict) -> np.ndarray:
    return np.ones_like(loss)


def _prob(loss: np.ndarray, mask: np.ndarray, ent: np.ndarray | None, p: dict) -> np.ndarray:
    return np.exp(-loss)


def keep_k(scores: np.ndarray, mask: np.ndarray, ratio: float, largest: bool) -> np.ndarray:
    """1 for the ceil(ratio * n) response tokens with the largest (or smallest) score, else 0; ties broken by
    position (a stable sort)."""
    flat = scores[mask]
    out = np.zeros_like(scores)
    n = flat.size
    if n == 0:
        return out
    k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
    order = np.argsort(-flat if largest else flat, kind="stable")
    keep = np.zeros(n, dtype=scores.dtype)
    keep[order[:k]] = 1.0
    out[mask] = keep
    return out


def _topk(loss: np.ndarray, mask: np.ndarray, ent: np.ndarray | None, p: dict) -> np.ndarray:
    return keep_k(loss, mask, p["keep_ratio"], largest=False)


def _antiop(loss: np.ndarray, mask: np.ndarray, ent: np.ndarray | None, p: dict) -> np.ndarray:
    resp = loss[mask]
    if resp.size == 0:
        return np.ones_like(loss)
    c = np.float32(p["clip_mult"]) * np.quantile(resp, 0.5).astype(np.float32)   # median: mean of the middles
    return np.where(loss <= c, np.float32(1.0), c / np.maximum(loss, np.float32(1e-12))).astype(np.float32)


def _entropy(loss: np.ndarray, mask: np.ndarray, ent: np.ndarray | None, p: dict) -> np.ndarray:
    assert ent is not None, "the entropy scheme needs the entropy of every token"
    return keep_k(ent, mask, p["rho"], largest=True)


SCHEMES: dict[str, SchemeSpec] = {s.name: s for s in [
    SchemeSpec("sft", "plain cross-entropy: w = 1", what_if=_ones),
    SchemeSpec("dft", "dynamic fine-tuning: w = p_t (probability of the target, detached)", what_if=_prob),
    SchemeSpec("asft", "dft weight plus kl_lambda * KL per token against the reference (adapter disabled)",
               defaults={"kl_lambda": 0.05, "reverse_kl": False}, needs_ref="logits",
               ranges={"kl_lambda": (0.0, _INF, False, True)}, what_if=_prob),
    SchemeSpec("topk", "w = 1 for the lowest-loss keep_ratio of response tokens, else 0",
               defaults={"keep_ratio": 0.7}, normaliser="kept", ranges={"keep_ratio": _RATIO}, what_if=_topk),
    SchemeSpec("antiop", "w = 1 if l_t <= c else c / l_t, c = clip_mult * median loss of the batch",
               defaults={"clip_mult": 3.0}, ranges={"clip_mult": (0.0, _INF, True, True)}, what_if=_antiop),
    SchemeSpec("lr", "w = clamp(1 + alpha * clamp(p_ref - p_t, -1, 1), min 0.1): up-weight tokens that got worse",
               defaults={"alpha": 1.0}, needs_ref="loss", ranges={"alpha": (0.0, _INF, False, True)}),
    SchemeSpec("rho1", "w = 1 for the top keep_ratio of response tokens by excess loss l_t - l_ref_t",
               defaults={"keep_ratio": 0.6}, normaliser="kept", needs_ref="loss", ranges={"keep_ratio": _RATIO}),
    SchemeSpec("entropy", "w = 1 for the top rho of response tokens by entropy, else 0",
               defaults={"rho": 0.2}, normaliser="kept", needs_entropy=True, ranges={"rho": _RATIO},
               what_if=_entropy),
]}

# schemes whose weights a trace can recompute (the others need the reference model's per-token loss)
WHAT_IF: tuple[str, ...] = tuple(n for n, s in SCHEMES.items() if s.what_if is not None)


def get(name: str) -> SchemeSpec:
    """The scheme called ``name``; ValueError listing the schemes otherwise."""
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; available: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def what_if_weights(step_tokens: pd.DataFrame, scheme: str, params: dict | None = None) -> pd.Series:
    """The weight ``scheme`` would give each token of a traced step, from its recorded loss and entropy.

    ``step_tokens``: ``queries.step_token_stats`` (every traced sequence of the step: the batch whose
    statistics, e.g. the median loss or the top-k cut, the scheme takes). Returns a Series indexed like
    ``step_tokens`` (0 for prompt tokens). Schemes that need the reference model's loss raise ValueError.
    """
    spec = get(scheme)
    if spec.what_if is None:
        raise ValueError(f"scheme {scheme!r} needs the reference model's per-token loss, which a trace does not "
                         f"record; schemes a trace can weigh: {', '.join(WHAT_IF)}")
    loss = step_tokens["loss"].to_numpy(dtype=np.float32, na_value=np.nan)
    mask = step_tokens["is_response"].to_numpy(dtype=bool) & ~np.isnan(loss)
    ent = step_tokens["entropy"].to_numpy(dtype=np.float32, na_value=np.nan)
    loss = np.nan_to_num(loss, nan=0.0)
    w = spec.what_if(loss, mask, np.nan_to_num(ent, nan=0.0) if spec.needs_entropy else None,
                     spec.resolve_params(params))
    w = np.where(mask, w, np.float32(0.0))
    return pd.Series(w.astype(np.float64), index=step_tokens.index, name=f"what_if_{scheme}")
