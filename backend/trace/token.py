"""Token mode: the gradient of each token's own loss, g_t = grad_theta l_t, against the batch gradient G.

    out = run_token(model, tb, sites, loss_fn, cfg, world_size, record, sketch_seed)

- ``dot`` = <g_t, G> for every token at once: one forward-mode pass, the JVP of the per-token loss vector
  along G (exact). Needs attention with a forward-mode derivative: the caller switches to
  ``backend.trace.attention_jvp`` (blockwise, memory linear in T), or to eager for models it does not cover.
- ``magnitude`` exact: per sequence, batched backward passes over one-hot cotangents (``is_grads_batched``: a
  vmap over the backward), ``grad_chunk`` tokens at a time, each on a forward of the prefix the chunk needs;
  per-module dots and norms come with it. Sketch: ||g_t||^2 ~ mean_i <g_t, v_i>^2 over k standard normal
  directions v_i, from vmapped JVPs (relative error of the norm about sqrt(1/(2k))).
- module rows without exact magnitudes: one JVP per LoRA matrix (its part of G as the tangent), vmapped in
  groups of ``jvp_chunk``.
- ``extra`` (G_eval, ``backend.trace.influence``): ``influence`` = <g_t, G_eval> from one more JVP, along G_eval;
  per module from the exact per-token gradients, or one more JVP per LoRA matrix (its part of G_eval).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.func import functional_call, jvp, vmap

from backend.lm.loss import token_loss
from backend.trace.batch import TracedBatch, token_stats
from backend.trace.config import TraceConfig
from backend.trace.position import batch_gradient
from backend.trace.sites import LoraSite, sketch_direction


def per_token_loss(model: torch.nn.Module, params: dict[str, torch.Tensor] | None, chunk: dict) -> torch.Tensor:
    """l_t = -log p(x_{t+1} | x_<=t) at every position, float32 (n, T-1); ``params`` swapped in if given."""
    inputs = {"input_ids": chunk["input_ids"], "attention_mask": chunk["attention_mask"]}
    if params is None:
        logits = model(**inputs).logits                                               # (n, T, V)
    else:
        logits = functional_call(model, params, (), inputs).logits
    return token_loss(logits[:, :-1], chunk["input_ids"][:, 1:])


def _jvps(model: torch.nn.Module, primals: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor],
          chunk: dict) -> torch.Tensor:
    """Batched JVPs: tangents carry a leading dim C -> (C, n, T-1)."""
    def one(t: dict) -> torch.Tensor:
        return jvp(lambda p: per_token_loss(model, p, chunk), (primals,), (t,))[1]
    return vmap(one)(tangents)


def run_token(model: torch.nn.Module, tb: TracedBatch, sites: list[LoraSite], loss_fn: Callable,
              cfg: TraceConfig, world_size: int, record: torch.Tensor, sketch_seed: int,
              extra: list[torch.Tensor] | None = None) -> dict:
    """G from every micro-batch of the step; per-token values for the traced sequences (rows of the others zero).
    With ``extra``: ``influence`` (n, T-1) and ``site_infl`` (M, n, T-1) (None without module rows).

    ``traced_loss_dot`` = sum over the traced sequences' loss terms of (w_t / N) <g_t, G> / K (this rank's):
    the traced sequences' part of <G, G> (None when the scheme adds a term that is not a weighted token loss).
    """
    chunks = tb.chunks()
    K = len(chunks)
    M = len(sites)
    stats: dict[str, list] = {k: [] for k in ("loss", "prob", "entropy", "weight", "total")}
    norms: list[torch.Tensor] = []
    has_extra = False

    def on_chunk(k: int, out) -> None:
        nonlocal has_extra
        loss, prob, ent = token_stats(out.logits.detach(), chunks[k]["input_ids"], cfg.stats_chunk)
        for key, v in (("loss", loss), ("prob", prob), ("entropy", ent), ("weight", out.weights.float()),
                       ("total", out.total.detach().float())):
            stats[key].append(v)
        norms.append(out.normaliser.detach().float().expand(chunks[k]["input_ids"].shape[0]))
        has_extra = has_extra or out.extra is not None

    G = batch_gradient(sites, chunks, loss_fn, world_size, on_chunk=on_chunk)       # M x (out, in) float32
    g_sq = torch.stack([g.square().sum() for g in G])
    names = [s.param_name for s in sites]
    primals = {nm: s.param.detach() for nm, s in zip(names, sites)}
    dtype = sites[0].param.dtype
    n, T = tb.input_ids.shape
    dev = tb.input_ids.device
    head = tb.head(tb.n_traced)                       # per-token values: only the traced sequences are run
    hchunks = head.chunks()
    nt = head.n

    def full(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """(.., nt, T-1) -> (.., n, T-1), zeros for the sequences that are not traced."""
        if nt == n:
            return x
        shape = list(x.shape)
        shape[dim] = n - nt
        return torch.cat([x, torch.zeros(shape, dtype=x.dtype, device=x.device)], dim=dim)

    def along(direction: list[torch.Tensor]) -> torch.Tensor:
        """<g_t, direction> of every traced token: one JVP per micro-batch, (n, T-1)."""
        tang = {nm: g.to(dtype) for nm, g in zip(names, direction)}
        return full(torch.cat([jvp(lambda p: per_token_loss(model, p, ch), (primals,), (tang,))[1]
                               for ch in hchunks]))

    def per_module(direction: list[torch.Tensor]) -> torch.Tensor:
        """<g_t,m, direction_m> per LoRA matrix: one JVP each, vmapped ``jvp_chunk`` at a time, (M, n, T-1)."""
        out = torch.zeros(M, nt, T - 1, dtype=torch.float32, device=dev)
        for j0 in range(0, M, cfg.jvp_chunk):
            grp = list(range(j0, min(j0 + cfg.jvp_chunk, M)))
            prim = {names[j]: primals[names[j]] for j in grp}
            tangents = {}
            for c, j in enumerate(grp):
                t = torch.zeros((len(grp),) + tuple(direction[j].shape), dtype=dtype, device=dev)
                t[c] = direction[j]
                tangents[names[j]] = t
            out[grp] = torch.cat([_jvps(model, prim, tangents, ch) for ch in hchunks], dim=1).float()
        return full(out, dim=1)

    influence = site_infl = None
    with torch.no_grad():
        dot = along(G)                                                              # (n, T-1)
        if extra is not None:
            influence = along(extra)
        magnitude = site_dot = site_mag = None

        if cfg.magnitude == "sketch":
            acc = torch.zeros(nt, T - 1, dtype=torch.float64, device=dev)
            shapes = [s.param.shape for s in sites]
            for i0 in range(0, cfg.sketch_k, cfg.jvp_chunk):
                idx = range(i0, min(i0 + cfg.jvp_chunk, cfg.sketch_k))
                dirs = [sketch_direction(shapes, sketch_seed, i, dev) for i in idx]
                tangents = {nm: torch.stack([d[j] for d in dirs]).to(dtype) for j, nm in enumerate(names)}
                jv = torch.cat([_jvps(model, primals, tangents, ch) for ch in hchunks], dim=1)   # (C, nt, T-1)
                acc += jv.double().square().sum(0)
            magnitude = full((acc / cfg.sketch_k).sqrt().float())

        if cfg.module_rows and cfg.magnitude != "exact":
            site_dot = per_module(G)
            if extra is not None:
                site_infl = per_module(extra)

    checks: dict = {"micro_batches": K, "micro_batches_traced": len(tb.traced_chunks())}
    if cfg.magnitude == "exact":
        site_dot, site_sq, site_x = per_token_exact(model, tb, sites, G, record, cfg.grad_chunk, extra)
        if extra is not None and cfg.module_rows:
            site_infl = site_x
        site_mag = site_sq.sqrt()
        magnitude = site_sq.sum(0).sqrt()
        # dot from the JVP against dot from the per-token gradients, relative to |g_t| |G|
        scale = (magnitude * g_sq.sum().sqrt()).clamp_min(1e-30)
        diff = ((site_dot.sum(0) - dot).abs() / scale)[record]
        checks["token_dot_jvp_vs_backward_max_rel_err"] = float(diff.max()) if diff.numel() else 0.0
    weights = torch.cat(stats["weight"])
    traced_loss_dot = None
    if not has_extra:
        w = (weights.double() * tb.response().double())[:nt] / torch.cat(norms).double()[:nt, None]
        traced_loss_dot = (w * dot[:nt].double()).sum() / K
    return {"dot": dot, "magnitude": magnitude, "site_dot": site_dot, "site_mag": site_mag, "g_sq": g_sq,
            "G": G, "traced_loss_dot": traced_loss_dot, "influence": influence, "site_infl": site_infl,
            "normaliser": torch.cat(norms),
            "checks": checks,
            "stats": {k: torch.cat(v) if k != "total" else torch.stack(v).mean() for k, v in stats.items()}}


def per_token_exact(model: torch.nn.Module, tb: TracedBatch, sites: list[LoraSite], G: list[torch.Tensor],
                    record: torch.Tensor, grad_chunk: int, extra: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-module <g_t, G_m> and ||g_t,m||^2 for the recorded tokens, (M, n, T-1) float32 each, and
    <g_t, extra_m> when ``extra`` is given (else None).

    Per sequence, the recorded positions go in chunks of ``grad_chunk`` (ascending); a chunk whose last position
    is p runs a forward on the prefix x_0..x_{p+1} only (attention is causal, so the values are those of the full
    sequence) and one batched backward over one-hot cotangents of its per-token losses: the backward costs grow
    with p, not with the sequence length.
    """
    M = len(sites)
    n, T = tb.input_ids.shape
    dev = tb.input_ids.device
    site_dot = torch.zeros(M, n, T - 1, dtype=torch.float32, device=dev)
    site_sq = torch.zeros(M, n, T - 1, dtype=torch.float32, device=dev)
    site_x = torch.zeros_like(site_sq) if extra is not None else None
    params = [s.param for s in sites]
    for b in range(n):
        pos = record[b].nonzero().flatten()                                        # ascending
        for c0 in range(0, pos.numel(), grad_chunk):
            p = pos[c0:c0 + grad_chunk]
            end = int(p[-1]) + 2                                                   # inputs x_0 .. x_{p+1}
            seq = {"input_ids": tb.input_ids[b:b + 1, :end], "attention_mask": tb.attention_mask[b:b + 1, :end]}
            with torch.enable_grad():
                losses = per_token_loss(model, None, seq)[0]                       # (end-1,)
                E = torch.zeros(p.numel(), losses.shape[0], dtype=losses.dtype, device=dev)
                E[torch.arange(p.numel(), device=dev), p] = 1.0                    # (C, end-1) one-hot rows
                grads = torch.autograd.grad(losses, params, grad_outputs=E, is_grads_batched=True)   # M x (C, o, i)
            for m, (g, Gm) in enumerate(zip(grads, G)):
                gf = g.float().flatten(1)                                          # (C, out*in)
                site_dot[m, b, p] = gf @ Gm.reshape(-1)
                site_sq[m, b, p] = gf.square().sum(1)
                if site_x is not None:
                    site_x[m, b, p] = gf @ extra[m].float().reshape(-1)
            del losses, grads
    return site_dot, site_sq, site_x
