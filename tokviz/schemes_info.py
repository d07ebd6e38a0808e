"""What the app shows about the token-weighting schemes, without importing torch at start.

``backend.schemes`` (the registry the training loop uses) imports torch, which would make the app start in
tens of seconds instead of a few; this table repeats the names, parameter defaults and one-line docs, and
``tests/test_ui_units.py`` checks it against the registry so the two cannot drift apart. The weights
themselves always come from the registry (``what_if_weights``), imported on first use.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SchemeInfo:
    name: str
    doc: str
    defaults: dict
    needs_ref: str = "none"       # "none", "loss", "logits": as backend.schemes.Scheme.needs_ref


SCHEMES: dict[str, SchemeInfo] = {s.name: s for s in [
    SchemeInfo("sft", "plain cross-entropy: w = 1", {}),
    SchemeInfo("dft", "dynamic fine-tuning: w = p_t (probability of the target, detached)", {}),
    SchemeInfo("asft", "dft weight plus kl_lambda * KL per token against the reference (adapter disabled)",
               {"kl_lambda": 0.05, "reverse_kl": False}, "logits"),
    SchemeInfo("topk", "w = 1 for the lowest-loss keep_ratio of response tokens, else 0", {"keep_ratio": 0.7}),
    SchemeInfo("antiop", "w = 1 if l_t <= c else c / l_t, c = clip_mult * median loss of the batch",
               {"clip_mult": 3.0}),
    SchemeInfo("lr", "w = clamp(1 + alpha * clamp(p_ref - p_t, -1, 1), min 0.1): up-weight tokens that got worse",
               {"alpha": 1.0}, "loss"),
    SchemeInfo("rho1", "w = 1 for the top keep_ratio of response tokens by excess loss l_t - l_ref_t",
               {"keep_ratio": 0.6}, "loss"),
    SchemeInfo("entropy", "w = 1 for the top rho of response tokens by entropy, else 0", {"rho": 0.2}),
]}

# schemes whose weights a trace can recompute (the others need the reference model's per-token loss)
WHAT_IF: tuple[str, ...] = tuple(n for n, s in SCHEMES.items() if s.needs_ref != "loss")


def what_if_weights(step_tokens: pd.DataFrame, scheme: str, params: dict | None = None) -> pd.Series:
    """The weight ``scheme`` would give each token of a traced step, from its recorded loss and entropy.

    ``step_tokens``: ``queries.step_token_stats`` (every traced sequence of the step: the batch whose
    statistics, e.g. the median loss or the top-k cut, the scheme takes). Returns a Series indexed like
    ``step_tokens`` (0 for prompt tokens). Schemes that need the reference model's loss raise ValueError.
    Imports torch (through ``backend.schemes``) on first use.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; available: {', '.join(SCHEMES)}")
    if scheme not in WHAT_IF:
        raise ValueError(f"scheme {scheme!r} needs the reference model's per-token loss, which a trace does not "
                         f"record; schemes a trace can weigh: {', '.join(WHAT_IF)}")
    import torch

    from backend.schemes import SchemeInputs, get_scheme
    s = get_scheme(scheme)
    loss = torch.tensor(step_tokens["loss"].to_numpy(dtype=np.float32, na_value=np.nan))[None, :]   # (1, N)
    mask = torch.tensor(step_tokens["is_response"].to_numpy(dtype=bool))[None, :] & ~torch.isnan(loss)
    ent = torch.tensor(step_tokens["entropy"].to_numpy(dtype=np.float32, na_value=np.nan))[None, :]
    x = SchemeInputs(loss=torch.nan_to_num(loss, nan=0.0), mask=mask,
                     entropy=torch.nan_to_num(ent, nan=0.0) if s.needs_entropy else None)
    w = s.compute(x, s.resolve_params(params))
    return pd.Series(w[0].numpy().astype(np.float64), index=step_tokens.index, name=f"what_if_{scheme}")
