"""Per-token influence on held-out loss: the traced update's pieces against the eval-loss gradient.

    ev = eval_gradient(model, sites, eval_batch, micro_batch_size=8)     # G_eval per site, float32
    ev.G, ev.loss, ev.n_tokens

At a traced step, G_eval = grad of the mean eval loss (cross-entropy over the eval examples' response tokens, one
mean over all of them) over the traced LoRA parameters, at the step's weights, with the network in eval mode (no
dropout: the direction is deterministic). The trace then records per row:

- position mode: ``influence`` = <P_s, G_eval> (the hooks' second direction: see ``backend.trace.hooks``); the
  pieces sum to G, so the influences of every position of the step sum to <G, G_eval>;
- token mode: ``influence`` = <g_t, G_eval> with g_t = grad l_t, one forward-mode pass along G_eval;

and ``influence_alignment`` = influence / (||piece or g_t|| ||G_eval||). To first order a plain SGD step of size lr
along G changes the eval loss by -lr <G, G_eval> = -lr sum_s influence_s (position mode), or -lr sum_t (w_t / N)
influence_t over the loss terms (token mode, one micro-batch): a POSITIVE influence is a position (token) whose
part of the update lowers the eval loss (helps), a negative one raises it. Per step: ||G_eval||, cos(G, G_eval),
the eval loss.

``eval_batch`` is the same for every rank (the eval set is small): each rank computes G_eval itself, no
collective needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.lm.loss import IGNORE, forward_loss
from backend.lm.schemes import get_scheme
from backend.trace.sites import LoraSite

REQUIRED = ("input_ids", "attention_mask", "labels")


@dataclass
class EvalGradient:
    G: list[torch.Tensor]      # per site, the weight's shape, float32
    loss: float                # mean eval cross-entropy over the response tokens
    n_tokens: int              # response tokens of the eval set
    n_examples: int

    @property
    def norm(self) -> float:
        return float(torch.stack([g.double().square().sum() for g in self.G]).sum().sqrt())


def check_eval_batch(batch: dict) -> None:
    """ValueError naming what is wrong with an eval batch (it needs response tokens to have a loss)."""
    missing = [k for k in REQUIRED if k not in batch]
    if missing:
        raise ValueError(f"the eval batch lacks {missing}; it needs {', '.join(REQUIRED)} (B, T)")
    ids = batch["input_ids"]
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"the eval batch's input_ids must be (B, T) with B >= 1 and T >= 2, got {tuple(ids.shape)}")
    if not bool((batch["labels"][:, 1:] != IGNORE).any()):
        raise ValueError("the eval batch has no response tokens (every label is -100): no eval loss to differentiate")


def eval_gradient(model: torch.nn.Module, sites: list[LoraSite], batch: dict,
                  micro_batch_size: int | None = None) -> EvalGradient:
    """G_eval of the mean eval cross-entropy over response tokens (see the module docstring), in micro-batches of
    ``micro_batch_size`` rows (None: one pass). The caller sets the network's mode (eval) and RNG; ``.grad`` is
    not touched."""
    check_eval_batch(batch)
    dev = sites[0].param.device
    ids = batch["input_ids"]
    n = ids.shape[0]
    mb = micro_batch_size or n
    n_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    sft = get_scheme("sft")
    params = [s.param for s in sites]
    G = [torch.zeros(s.param.shape, dtype=torch.float32, device=dev) for s in sites]
    loss_sum = 0.0
    for a in range(0, n, mb):
        ch = {k: batch[k][a:a + mb].to(dev) for k in REQUIRED}
        out = forward_loss(model, ch, sft, {})
        part = (out.loss * out.mask).sum() / n_tokens          # this chunk's share of the mean over all tokens
        if out.mask.any():
            for acc, g in zip(G, torch.autograd.grad(part, params)):
                acc += g.float()
        loss_sum += float(part.detach())
        del out, part
    return EvalGradient(G=G, loss=loss_sum, n_tokens=n_tokens, n_examples=n)


def step_values(G: list[torch.Tensor], ev: EvalGradient) -> dict[str, float]:
    """<G, G_eval>, ||G_eval||, cos(G, G_eval) (float64) and the eval loss: the step's influence summary."""
    dot = float(sum((g.double() * e.double()).sum() for g, e in zip(G, ev.G)))
    gn = float(torch.stack([g.double().square().sum() for g in G]).sum().sqrt())
    en = ev.norm
    return {"g_dot_eval": dot, "eval_grad_norm": en, "eval_cosine": dot / (gn * en) if gn > 0 and en > 0 else None,
            "eval_loss": ev.loss, "eval_tokens": ev.n_tokens, "eval_examples": ev.n_examples}


def columns(tb, record: torch.Tensor, influence: torch.Tensor, magnitude: torch.Tensor | None,
            site_infl: torch.Tensor | None, site_mag: torch.Tensor | None, eval_G: list[torch.Tensor],
            sites: list[LoraSite]) -> tuple[dict, dict]:
    """The INFLUENCE and INFLUENCE_MODULES columns (all but run_id, step, rank) of the recorded positions, in the
    row order of ``backend.trace.batch.build_columns``. ``influence``, ``magnitude``: (n, T-1); ``site_infl``,
    ``site_mag``: (M, n, T-1) or None (no module rows). NaN (null) where an alignment is undefined."""
    import numpy as np

    from backend.trace.batch import cosine, module_alignment

    def _np(x: torch.Tensor) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    sel = record.nonzero(as_tuple=True)
    b_idx, t_idx = (x.cpu().numpy() for x in sel)
    n_rows = len(b_idx)
    e_norms = torch.stack([g.double().square().sum() for g in eval_G]).sqrt()          # (M,)
    d = influence[sel]
    mag = magnitude[sel] if magnitude is not None else torch.full_like(d, float("nan"))
    sample_idx = tb.sample_idx.numpy()[b_idx].astype(np.int32)
    tokens = {"sample_idx": sample_idx, "position": t_idx.astype(np.int32), "influence": _np(d),
              "influence_alignment": _np(cosine(d, mag * float(e_norms.square().sum().sqrt())))}
    modules: dict = {k: [] for k in ("sample_idx", "position", "layer", "module", "part", "influence",
                                     "influence_alignment")}
    if site_infl is not None:
        M = len(sites)
        si = site_infl[:, sel[0], sel[1]]                                                # (M, rows)
        sm = site_mag[:, sel[0], sel[1]] if site_mag is not None else torch.full_like(si, float("nan"))
        modules = {
            "sample_idx": np.tile(sample_idx, M),
            "position": np.tile(tokens["position"], M),
            "layer": np.repeat(np.array([s.layer for s in sites], dtype=np.int16), n_rows),
            "module": np.repeat(np.array([s.module for s in sites]), n_rows),
            "part": np.repeat(np.array([s.part for s in sites]), n_rows),
            "influence": _np(si).reshape(-1),
            "influence_alignment": _np(module_alignment(si, sm, e_norms.to(sm), mag)).reshape(-1),
        }
    return tokens, modules
