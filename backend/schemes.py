"""Token-weighting schemes: one registry, each entry a small pure function returning detached weights.

    from backend.schemes import get_scheme
    s = get_scheme("antiop")
    w = s.weights(SchemeInputs(loss=l, mask=m), s.resolve_params({"clip_mult": 2.0}))   # (B, T-1)

All tensors are per predicted position, shape (B, T-1): position t predicts x_{t+1}. ``loss`` is the per-token
cross-entropy l_t = -log p_t, ``mask`` marks response tokens. Weights are 0 outside the mask, detached, float32.

The batch loss is L = (sum_t w_t l_t + sum_t extra_t) / N, where N is the scheme's normaliser:
- ``response``: N = number of response tokens (sft, dft, asft, antiop, lr);
- ``kept``: N = number of tokens with a non-zero weight (topk, rho1, entropy), i.e. the mean over the
  selected tokens, as in Rho-1.
Batch-level statistics (median, top-k) are taken over the response tokens of the micro-batch the loss sees.

Adding a scheme is one function and one registry line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from backend.config import check_range


@dataclass
class SchemeInputs:
    loss: torch.Tensor                       # (B, T-1) l_t, float32
    mask: torch.Tensor                       # (B, T-1) bool, response tokens
    ref_loss: torch.Tensor | None = None     # (B, T-1) reference model's l_t (adapter disabled)
    entropy: torch.Tensor | None = None      # (B, T-1) entropy of the model's predictive distribution


# ---- the weight functions: (inputs, params) -> (B, T-1) weights -------------------------------------------

def _sft(x: SchemeInputs, p: dict) -> torch.Tensor:
    return torch.ones_like(x.loss)


def _dft(x: SchemeInputs, p: dict) -> torch.Tensor:
    return torch.exp(-x.loss)                                    # p_t


def _keep_k(scores: torch.Tensor, mask: torch.Tensor, ratio: float, largest: bool) -> torch.Tensor:
    """1 for the ceil(ratio * n) response tokens with the largest (or smallest) score, else 0.

    Ties are broken by position (a stable sort), so the result is deterministic.
    """
    flat_scores = scores[mask]
    n = flat_scores.numel()
    out = torch.zeros_like(scores)
    if n == 0:
        return out
    k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
    order = torch.argsort(-flat_scores if largest else flat_scores, stable=True)
    keep = torch.zeros(n, dtype=scores.dtype, device=scores.device)
    keep[order[:k]] = 1.0
    out[mask] = keep
    return out


def _topk(x: SchemeInputs, p: dict) -> torch.Tensor:
    return _keep_k(x.loss, x.mask, p["keep_ratio"], largest=False)


def _antiop(x: SchemeInputs, p: dict) -> torch.Tensor:
    resp = x.loss[x.mask]
    if resp.numel() == 0:
        return torch.ones_like(x.loss)
    c = p["clip_mult"] * torch.quantile(resp, 0.5)               # median: mean of the two middles if n even
    return torch.where(x.loss <= c, torch.ones_like(x.loss), c / x.loss.clamp_min(1e-12))


def _lr(x: SchemeInputs, p: dict) -> torch.Tensor:
    p_t, p_ref = torch.exp(-x.loss), torch.exp(-x.ref_loss)
    return torch.clamp(1.0 + p["alpha"] * torch.clamp(p_ref - p_t, -1.0, 1.0), min=0.1)


def _rho1(x: SchemeInputs, p: dict) -> torch.Tensor:
    return _keep_k(x.loss - x.ref_loss, x.mask, p["keep_ratio"], largest=True)


def _entropy(x: SchemeInputs, p: dict) -> torch.Tensor:
    return _keep_k(x.entropy, x.mask, p["rho"], largest=True)


# ---- extra per-token loss terms (differentiable), for schemes that add one ------------------------------

def kl_per_token(logits: torch.Tensor, ref_logits: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Per-position KL, (B, T, V) x2 -> (B, T). KL(ref || model) by default, KL(model || ref) if reverse."""
    logq = F.log_softmax(logits.float(), dim=-1)
    logr = F.log_softmax(ref_logits.float(), dim=-1)
    if reverse:
        return (logq.exp() * (logq - logr)).sum(-1)
    return (logr.exp() * (logr - logq)).sum(-1)


def _asft_extra(logits: torch.Tensor, ref_logits: torch.Tensor, p: dict) -> torch.Tensor:
    return p["kl_lambda"] * kl_per_token(logits, ref_logits, reverse=p["reverse_kl"])


# ---- the registry ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scheme:
    name: str
    weights: Callable[[SchemeInputs, dict], torch.Tensor]
    doc: str
    defaults: dict = field(default_factory=dict)
    normaliser: str = "response"                  # "response" or "kept"
    needs_ref: str = "none"                       # "none", "loss" (reference l_t), "logits" (full distribution)
    needs_entropy: bool = False
    extra: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor] | None = None
    ranges: dict = field(default_factory=dict)    # param -> (low, high, low_open, high_open)

    def resolve_params(self, params: dict | None) -> dict:
        """Defaults overlaid with ``params``; unknown names and values out of range raise ValueError."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"scheme {self.name!r} has no parameter {', '.join(unknown)}; allowed: {allowed}")
        out = {**self.defaults, **params}
        for key, (lo, hi, lo_open, hi_open) in self.ranges.items():
            v = out[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"scheme {self.name!r}: {key} must be a number, got {v!r}")
            check_range(f"scheme {self.name!r}: {key}", v, (lo, hi, lo_open, hi_open))
        return out

    def compute(self, x: SchemeInputs, params: dict) -> torch.Tensor:
        """Detached float32 weights, zero outside the response mask."""
        with torch.no_grad():
            w = self.weights(x, params).float()
        assert w.shape == x.loss.shape, f"scheme {self.name} returned shape {tuple(w.shape)}"
        return torch.where(x.mask, w, torch.zeros_like(w)).detach()


_RATIO = (0.0, 1.0, True, False)        # (0, 1]
_INF = float("inf")

SCHEMES: dict[str, Scheme] = {s.name: s for s in [
    Scheme("sft", _sft, "plain cross-entropy: w = 1"),
    Scheme("dft", _dft, "dynamic fine-tuning: w = p_t (probability of the target, detached)"),
    Scheme("asft", _dft, "dft weight plus kl_lambda * KL per token against the reference (adapter disabled)",
           defaults={"kl_lambda": 0.05, "reverse_kl": False}, needs_ref="logits", extra=_asft_extra,
           ranges={"kl_lambda": (0.0, _INF, False, True)}),
    Scheme("topk", _topk, "w = 1 for the lowest-loss keep_ratio of response tokens, else 0",
           defaults={"keep_ratio": 0.7}, normaliser="kept", ranges={"keep_ratio": _RATIO}),
    Scheme("antiop", _antiop, "w = 1 if l_t <= c else c / l_t, c = clip_mult * median loss of the batch",
           defaults={"clip_mult": 3.0}, ranges={"clip_mult": (0.0, _INF, True, True)}),
    Scheme("lr", _lr, "w = clamp(1 + alpha * clamp(p_ref - p_t, -1, 1), min 0.1): up-weight tokens that got worse",
           defaults={"alpha": 1.0}, needs_ref="loss", ranges={"alpha": (0.0, _INF, False, True)}),
    Scheme("rho1", _rho1, "w = 1 for the top keep_ratio of response tokens by excess loss l_t - l_ref_t",
           defaults={"keep_ratio": 0.6}, normaliser="kept", needs_ref="loss", ranges={"keep_ratio": _RATIO}),
    Scheme("entropy", _entropy, "w = 1 for the top rho of response tokens by entropy, else 0",
           defaults={"rho": 0.2}, normaliser="kept", needs_entropy=True, ranges={"rho": _RATIO}),
]}


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; available: {', '.join(SCHEMES)}")
    return SCHEMES[name]
