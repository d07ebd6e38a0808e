"""Position mode: per-position pieces of the batch gradient, from one forward+backward with hooks.

    out = run_position(model, tb, sites, loss_fn, cfg, world_size, replay)
    out["site_dot"], out["site_sq"]          # (M, n, T) float32: <P_{s,m}, G_m> and ||P_{s,m}||^2

One micro-batch (the default): a single pass; the hooks (see ``hooks``) compute every product as the backward
reaches each LoRA matrix, and check on the lowest traced layer (every layer with ``full_check``) that the pieces
sum to autograd's gradient. Several micro-batches: pass 1 computes G = grad of the mean micro-batch loss, pass 2 runs
the hooks against it; both passes start from the same RNG state, so dropout masks (when on) agree.
"""
from __future__ import annotations

from typing import Callable

import torch

from backend.trace.batch import TracedBatch, token_stats
from backend.trace.config import TraceConfig
from backend.trace.hooks import PositionHooks, all_reduce_mean, attached, rel_err
from backend.trace.sites import LoraSite

LossFn = Callable[[dict], "object"]     # micro-batch -> backend.lm.loss.LossOutput


def check_indices(sites: list[LoraSite], full: bool) -> list[int]:
    """Sites whose sum of pieces is checked against autograd: all (``full``), or the lowest traced layer's lora_A
    matrices plus its first lora_B (asking autograd for those gradients also drives the whole backward)."""
    if full:
        return list(range(len(sites)))
    low = min(s.layer for s in sites)
    idx = [i for i, s in enumerate(sites) if s.layer == low and s.part == "lora_A"]
    idx += [i for i, s in enumerate(sites) if s.layer == low and s.part == "lora_B"][:1]
    return sorted(idx)


def batch_gradient(sites: list[LoraSite], chunks: list[dict], loss_fn: LossFn, world_size: int,
                   on_chunk: Callable | None = None) -> list[torch.Tensor]:
    """G per site (float32): gradient of the mean micro-batch loss, averaged over ranks. ``.grad`` untouched."""
    K = len(chunks)
    G = [torch.zeros(s.param.shape, dtype=torch.float32, device=s.param.device) for s in sites]
    for k, ch in enumerate(chunks):
        out = loss_fn(ch)
        grads = torch.autograd.grad(out.total / K, [s.param for s in sites])
        for Gi, g in zip(G, grads):
            Gi += g.float()
        if on_chunk is not None:
            on_chunk(k, out)
        del out, grads
    if world_size > 1:
        flat = torch.cat([g.reshape(-1) for g in G])
        all_reduce_mean(flat, world_size)
        G = [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in G]), G)]
    return G


def collect_stats(stats: dict[str, list], out, chunk: dict, cfg: TraceConfig) -> None:
    loss, prob, ent = token_stats(out.logits.detach(), chunk["input_ids"], cfg.stats_chunk)
    stats["loss"].append(loss)
    stats["prob"].append(prob)
    stats["entropy"].append(ent)
    stats["weight"].append(out.weights.detach().float())
    stats["total"].append(out.total.detach().float())


def run_position(model: torch.nn.Module, tb: TracedBatch, sites: list[LoraSite], loss_fn: LossFn,
                 cfg: TraceConfig, world_size: int, replay: Callable[[], None]) -> dict:
    chunks = tb.chunks()
    K = len(chunks)
    check = check_indices(sites, cfg.full_check)
    check_params = [sites[i].param for i in check]
    stats: dict[str, list] = {k: [] for k in ("loss", "prob", "entropy", "weight", "total")}
    checks: dict = {"micro_batches": K, "pieces_checked_modules": len(check)}

    n, T = tb.input_ids.shape
    if K == 1:
        hooks = PositionHooks(sites, G=None, piece_scale=1.0 / world_size, world_size=world_size,
                              check=set(check))
        replay()
        with attached(hooks.forward_hooks(), hooks.grad_hooks()):
            out = loss_fn(chunks[0])
            hooks.check_one_call()
            torch.autograd.grad(out.total, hooks.grad_inputs())
        collect_stats(stats, out, chunks[0], cfg)
        del out
        site_dot, site_sq, g_sq = hooks.finish()
        assert len(hooks.pieces_err) == len(check), "a checked LoRA matrix got no gradient from autograd"
        errs = list(hooks.pieces_err.values())
    else:
        replay()
        G = batch_gradient(sites, chunks, loss_fn, world_size)
        hooks = PositionHooks(sites, G=G, piece_scale=1.0 / (K * world_size), world_size=world_size,
                              check=set(check))
        replay()
        for ch in chunks:
            hooks.reset_calls()
            with attached(hooks.forward_hooks()):
                out = loss_fn(ch)
                hooks.check_one_call()
                torch.autograd.grad(out.total, check_params)               # runs the whole backward
            collect_stats(stats, out, ch, cfg)
            del out
        errs = []
        for i in check:
            s = hooks.piece_sum[i]
            if world_size > 1:
                s = all_reduce_mean(s, world_size) * world_size                  # sum over ranks
            errs.append(rel_err(s, G[i]))
        site_dot, site_sq, _ = hooks.finish(calls=K)
        g_sq = torch.stack([g.square().sum() for g in G])
    site_dot = site_dot.view(len(sites), n, T)                                   # (M, n, T)
    site_sq = site_sq.view(len(sites), n, T)
    checks["pieces_sum_max_rel_err"] = max(errs)
    return {"site_dot": site_dot, "site_sq": site_sq, "g_sq": g_sq, "checks": checks,
            "stats": {k: torch.cat(v) if k != "total" else torch.stack(v).mean() for k, v in stats.items()}}
