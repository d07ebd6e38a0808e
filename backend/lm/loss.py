"""Per-token statistics and the scheme-weighted loss, shared by training and the tracer.

    out = forward_loss(model, batch, get_scheme("dft"), params)   # runs the reference pass if the scheme needs it
    out.total.backward()
    out.loss, out.weights, out.mask                               # (B, T-1): position t predicts x_{t+1}

``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (B, T) in the Hugging Face convention
(labels unshifted, -100 where no loss is taken).

Two values of the same l_t: the one backpropagated is ``per_token_ce`` (F.cross_entropy, as always); the one the
scheme weights, ``out.ref_loss`` and ``out.entropy`` are computed from is ``weight_ce`` (detached), in the
cancellation-free form of ``token_loss``. For a confident token float32 log-softmax rounds log(1 + s) with
s = sum_{j != y} p_j < 1e-7 to 0 (l_t = 4e-9 comes out as 0, l_t = 2e-5 ~15% off), and antiop's c / l_t
(c = 3 x median loss, ~6e-5 late in the demo run) was off by up to ~1e-2. ``weight_ce``'s relative error is
~6e-8 x the logit gap |z_j - z_y| of the dominant j, ~1e-6 for gaps up to ~15, at every size of l_t.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

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


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """l = -log p(target) per position, float32, in a form whose value and derivatives stay accurate when p -> 1.

    CE = logsumexp(z) - z_y, differentiated as written, subtracts two nearly equal numbers for a confident token
    (dl/dz_y = p_y - 1): in float32 the derivative of a token with 1 - p = 1e-4 is then off by ~1e-3 relative,
    in forward and in reverse mode alike, and two methods disagree by that much. Here
    l = softplus(logsumexp_{j != y}(z_j - z_y)), the same value, whose derivatives are sums of positive terms:
    dl/dz_j = p_j (j != y), dl/dz_y = -sum_{j != y} p_j. The value itself is relatively accurate too (softplus
    of a very negative x is exp(x), not log(1 + tiny) rounded to 0). Shapes: (..., V), (...) -> (...).
    """
    z = logits.float()
    y = targets.unsqueeze(-1)
    d = (z - z.gather(-1, y)).scatter(-1, y, float("-inf"))                        # z_j - z_y, the target out
    return F.softplus(torch.logsumexp(d, dim=-1), threshold=1000.0)


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V), (B, T) -> l_t (B, T-1) float32 (0 where masked) and the mask (B, T-1)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    lg = logits[:, :-1]
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="none").view(targets.shape)
    return loss, mask


@torch.no_grad()
def weight_ce(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(B, T, V), (B, T) -> detached float32 l_t (B, T-1), 0 where masked: ``token_loss``'s accurate value.

    What scheme weights are computed from (``per_token_ce``'s float32 value of a confident token is off by up to
    100% relative). ``chunk`` rows of the flattened (B * T, V) logits at a time (a view: ``logits[:, :-1]`` is
    never copied whole; each sequence's last row, which predicts nothing, is computed and dropped), so the float32
    copies of a large vocabulary stay bounded.
    """
    B, T1, V = logits.shape
    mask = labels[:, 1:] != IGNORE
    tgt = torch.zeros(B, T1, dtype=torch.long, device=logits.device)
    tgt[:, :-1] = torch.where(mask, labels[:, 1:], torch.zeros_like(labels[:, 1:]))   # any index; zeroed below
    flat, tgt = logits.reshape(B * T1, V), tgt.view(-1)
    out = torch.empty(B * T1, dtype=torch.float32, device=logits.device)
    for i in range(0, B * T1, chunk):
        out[i:i + chunk] = token_loss(flat[i:i + chunk], tgt[i:i + chunk])
    out = out.view(B, T1)[:, :-1]
    return torch.where(mask, out, torch.zeros_like(out))


def _log_softmax_accurate(z: torch.Tensor) -> torch.Tensor:
    """log p_j = (z_j - z_m) - l_m with m the argmax and l_m = -log p_m from ``token_loss``: float32 log_softmax
    rounds l_m = log(1 + s) to 0 for s < 1e-7 (p_m -> 1), which leaves the entropy of a confident position
    off by ~5% relative."""
    m = z.argmax(-1, keepdim=True)
    return (z - z.gather(-1, m)) - token_loss(z, m.squeeze(-1)).unsqueeze(-1)


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """Entropy H_t = -sum_j p_j log p_j of softmax(z_t / temperature), float32, (B, T, V) -> (B, T-1)."""
    lg = logits[:, :-1]
    B, T, V = lg.shape
    flat = lg.reshape(-1, V)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, flat.shape[0], chunk):      # chunks bound the float32 copy of a large vocabulary
        z = flat[i:i + chunk].float() / temperature
        logp = _log_softmax_accurate(z)
        out[i:i + chunk] = -(logp.exp() * logp).sum(-1)
    return out.view(B, T)


def scheme_loss(logits: torch.Tensor, labels: torch.Tensor, scheme: Scheme, params: dict,
                ref_logits: torch.Tensor | None = None, want_entropy: bool = False) -> LossOutput:
    """The scheme's weighted loss from the model's logits (and the reference's, when the scheme needs them).

    ``loss`` (backpropagated) is ``per_token_ce``; the weights see ``weight_ce``'s accurate detached value.
    """
    loss, mask = per_token_ce(logits, labels)
    if scheme.needs_ref != "none" and ref_logits is None:
        raise ValueError(f"scheme {scheme.name!r} needs reference logits (the base model with the adapter off)")
    ref_loss = weight_ce(ref_logits, labels) if ref_logits is not None else None
    entropy = entropy_from_logits(logits) if (want_entropy or scheme.needs_entropy) else None
    # sft and entropy weights do not read the loss values: spare them the extra pass over the logits
    w_loss = weight_ce(logits, labels) if scheme.uses_loss else loss.detach()
    weights = scheme.compute(SchemeInputs(loss=w_loss, mask=mask, ref_loss=ref_loss, entropy=entropy), params)
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


def summed(out: LossOutput, sum_normaliser: float, micro_batches: int) -> LossOutput:
    """``out`` as one of ``micro_batches`` micro-batches whose losses are summed, each sum_t (w_t l_t + extra_t)
    divided by ``sum_normaliser`` (HF's Trainer with ``num_items_in_batch``: the step's label count), written in
    the tracer's form L = (1/K) sum_k L_k: total = K * sum / sum_normaliser, normaliser = sum_normaliser / K."""
    n = torch.as_tensor(float(sum_normaliser) / micro_batches, dtype=torch.float32, device=out.total.device)
    return replace(out, total=out.total * out.normaliser / n, normaliser=n)


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
