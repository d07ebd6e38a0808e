"""Token-weighting schemes as training computes them: torch weight functions over the specs of
``backend.lm.scheme_specs`` (names, parameters, normalisers; torch-free, shared with the app).

    from backend.lm.schemes import get_scheme
    s = get_scheme("antiop")
    w = s.weights(SchemeInputs(loss=l, mask=m), s.resolve_params({"clip_mult": 2.0}))   # (B, T-1)

All tensors are per predicted position, shape (B, T-1): position t predicts x_{t+1}. ``loss`` is the per-token
cross-entropy l_t = -log p_t, ``mask`` marks response tokens. Weights are 0 outside the mask, detached, float32.

The batch loss is L = (sum_t w_t l_t + sum_t extra_t) / N, where N is the scheme's normaliser:
- ``response``: N = number of response tokens (sft, dft, asft, antiop, lr);
- ``kept``: N = number of tokens with a non-zero weight (topk, rho1, entropy), i.e. the mean over the
  selected tokens, as in Rho-1.
Batch-level statistics (median, top-k) are taken over the response tokens of the micro-batch the loss sees.

Adding a scheme: its spec in ``scheme_specs.SCHEMES`` and its torch function in ``_FUNCTIONS`` (plus a
numpy ``what_if`` in the spec if a trace can recompute it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from backend.lm import scheme_specs
from backend.lm.scheme_specs import SCHEMES as SPECS
from backend.lm.scheme_specs import SchemeSpec


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
    """A scheme as training uses it: its spec (``backend.lm.scheme_specs``: name, parameters, normaliser,
    needs) and its torch weight function (plus, for asft, a differentiable per-token extra term)."""
    spec: SchemeSpec
    weights: Callable[[SchemeInputs, dict], torch.Tensor]
    extra: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor] | None = None
    uses_loss: bool = True       # False: the weights ignore SchemeInputs.loss's values (only its shape is read)

    name = property(lambda self: self.spec.name)
    doc = property(lambda self: self.spec.doc)
    defaults = property(lambda self: self.spec.defaults)
    normaliser = property(lambda self: self.spec.normaliser)
    needs_ref = property(lambda self: self.spec.needs_ref)
    needs_entropy = property(lambda self: self.spec.needs_entropy)
    ranges = property(lambda self: self.spec.ranges)

    def resolve_params(self, params: dict | None) -> dict:
        """Defaults overlaid with ``params``; unknown names and values out of range raise ValueError."""
        return self.spec.resolve_params(params)

    def compute(self, x: SchemeInputs, params: dict) -> torch.Tensor:
        """Detached float32 weights, zero outside the response mask."""
        with torch.no_grad():
            w = self.weights(x, params).float()
        assert w.shape == x.loss.shape, f"scheme {self.name} returned shape {tuple(w.shape)}"
        return torch.where(x.mask, w, torch.zeros_like(w)).detach()


# name -> (weight function, extra term, whether the weights read the loss values); names, docs and parameters
# come from scheme_specs.SCHEMES. A scheme whose weights never read the loss (sft, entropy: a test checks it)
# is spared the accurate-loss pass.
_FUNCTIONS: dict[str, tuple[Callable, Callable | None, bool]] = {
    "sft": (_sft, None, False), "dft": (_dft, None, True), "asft": (_dft, _asft_extra, True),
    "topk": (_topk, None, True), "antiop": (_antiop, None, True), "lr": (_lr, None, True),
    "rho1": (_rho1, None, True), "entropy": (_entropy, None, False),
}
assert set(_FUNCTIONS) == set(SPECS), f"schemes without a torch function or spec: {set(_FUNCTIONS) ^ set(SPECS)}"
SCHEMES: dict[str, Scheme] = {name: Scheme(spec, *_FUNCTIONS[name]) for name, spec in SPECS.items()}


def get_scheme(name: str) -> Scheme:
    """The scheme called ``name``; ValueError listing the schemes otherwise."""
    return SCHEMES[scheme_specs.get(name).name]


# ---- weights given from outside: a Trainer's own weighted loss, or stored weights ---------------------------

CUSTOM = "custom"


def custom_scheme(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], normaliser: str = "response") -> Scheme:
    """A scheme from a user's weight function ``fn(loss, mask) -> weights``, all (B, T-1): ``loss`` the accurate
    detached per-token cross-entropy, ``mask`` the response tokens. Its name is ``custom``; a traced step keeps
    the weights it used, which is what ``verify`` recomputes with (``fixed_weights``)."""
    if not callable(fn):
        raise ValueError(f"weights must be a scheme name or a callable (loss, mask) -> weights, got {fn!r}")
    if normaliser not in ("response", "kept"):
        raise ValueError(f"normaliser={normaliser!r}: choose response or kept")
    spec = scheme_specs.SchemeSpec(name=CUSTOM, doc=f"user weights {getattr(fn, '__name__', repr(fn))}",
                                   normaliser=normaliser)
    return Scheme(spec, lambda x, p: fn(x.loss, x.mask))


def fixed_weights(weights: torch.Tensor, normaliser: str = "response") -> Scheme:
    """A scheme whose weights are the given (B, T-1) tensor (a stored step's ``custom`` weights)."""
    spec = scheme_specs.SchemeSpec(name=CUSTOM, doc="stored weights", normaliser=normaliser)
    return Scheme(spec, lambda x, p: weights.to(x.loss.device), uses_loss=False)

