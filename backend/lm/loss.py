"""Per-token statistics and the scheme-weighted loss, shared by training and the tracer.

    out = forward_loss(model, batch, get_scheme("dft"), params)   # runs the reference pass if the scheme needs it
    out.total.backward()
    out.loss, out.weights, out.mask                               # (B, T-1): position t predicts x_{t+1}

``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (B, T) in the Hugging Face convention
(labels unshifted, -100 where no loss is taken).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backend.lm.schemes import Scheme, SchemeInputs

IGNORE = -100


@dataclass
class LossOutput:
    total: torch.Tensor               # scalar L = (sum w l + sum extra) / N, differentiable
    loss: torch.Tensor                # (B, T-1) l_t, differentiable, 0 outside the mask
    mask: torch.Tensor                # (B, T-1) bool, response tokens
    weights: torch.Tensor             # (B, T-1) detached scheme weights
    normaliser: torch.Tensor          # scalar N
    entropy: torch.Tensor | None      # (B, T-1) detached, when computed
    ref_loss: torch.Tensor | None     # (B, T-1) detached reference l_t, when the scheme needs it
    extra: torch.Tensor | None        # (B, T-1) differentiable extra term (asft's KL), when any
    logits: torch.Tensor | None = None

    @property
    def ce(self) -> torch.Tensor:
        """Plain mean cross-entropy over response tokens (detached)."""
        n = self.mask.sum().clamp_min(1)
        return (self.loss.detach() * self.mask).sum() / n


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V), (B, T) -> l_t (B, T-1) float32 (0 where masked) and the mask (B, T-1)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    lg = logits[:, :-1]
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="none").view(targets.shape)
    return loss, mask


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """Entropy H_t = -sum_j p_j log p_j of softmax(z_t / temperature), float32, (B, T, V) -> (B, T-1)."""
    lg = logits[:, :-1]
    B, T, V = lg.shape
    flat = lg.reshape(-1, V)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, flat.shape[0], chunk):      # chunks bound the float32 copy of a large vocabulary
        z = flat[i:i + chunk].float() / temperature
        logp = F.log_softmax(z, dim=-1)
        out[i:i + chunk] = -(logp.exp() * logp).sum(-1)
    return out.view(B, T)


def scheme_loss(logits: torch.Tensor, labels: torch.Tensor, scheme: Scheme, params: dict,
                ref_logits: torch.Tensor | None = None, want_entropy: bool = False) -> LossOutput:
    """The scheme's weighted loss from the model's logits (and the reference's, when the scheme needs them)."""
    loss, mask = per_token_ce(logits, labels)
    if scheme.needs_ref != "none" and ref_logits is None:
        raise ValueError(f"scheme {scheme.name!r} needs reference logits (the base model with the adapter off)")
    ref_loss = per_token_ce(ref_logits, labels)[0].detach() if ref_logits is not None else None
    entropy = entropy_from_logits(logits) if (want_entropy or scheme.needs_entropy) else None
    weights = scheme.compute(SchemeInputs(loss=loss.detach(), mask=mask, ref_loss=ref_loss, entropy=entropy),
                             params)
    extra = None
    if scheme.extra is not None:
        extra = scheme.extra(logits[:, :-1], ref_logits[:, :-1], params) * mask
    if scheme.normaliser == "response":
        n = mask.sum()
    elif scheme.normaliser == "kept":
        n = (weights > 0).sum()
    else:
        raise AssertionError(f"scheme {scheme.name}: unknown normaliser {scheme.normaliser!r}")
    n = n.clamp_min(1).to(torch.float32)
    total = (weights * loss).sum()
    if extra is not None:
        total = total + extra.sum()
    return LossOutput(total=total / n, loss=loss * mask, mask=mask, weights=weights, normaliser=n,
                      entropy=entropy, ref_loss=ref_loss, extra=extra, logits=logits)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper, if any."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextmanager
def adapter_disabled(model: torch.nn.Module):
    """The base model: peft's ``disable_adapter()``, not a second copy of the weights."""
    m = unwrap(model)
    if not hasattr(m, "disable_adapter"):
        raise ValueError("this scheme needs a reference model: the model must be a peft model with an adapter")
    with m.disable_adapter():
        yield m


def forward_loss(model: torch.nn.Module, batch: dict, scheme: Scheme, params: dict,
                 want_entropy: bool = False) -> LossOutput:
    """Forward pass (plus the reference pass if the scheme needs one) and the scheme loss."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ref_logits = None
    if scheme.needs_ref != "none":
        with torch.no_grad(), adapter_disabled(model) as base:
            ref_logits = base(**inputs).logits
    logits = model(**inputs).logits                                       # (B, T, V)
    return scheme_loss(logits, batch["labels"], scheme, params, ref_logits=ref_logits,
                       want_entropy=want_entropy)
