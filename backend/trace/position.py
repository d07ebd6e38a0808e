"""Position mode: per-position pieces of the batch gradient, from one forward+backward with hooks.

    out = run_position(model, tb, sites, loss_fn, cfg, world_size, replay)
    out["site_dot"], out["site_sq"]          # (M, n, T) float32: <P_{s,m}, G_m> and ||P_{s,m}||^2

One micro-batch (the default): a single pass; the hooks (see ``hooks``) compute every product as the backward
reaches each LoRA matrix, and check on the lowest traced layer (every layer with ``full_check``) that the pieces
sum to autograd's gradient. Several micro-batches: pass 1 computes G = grad of the mean micro-batch loss over
every micro-batch of the step, pass 2 runs the hooks against it on the micro-batches that hold traced sequences,
replayed from the RNG state pass 1 started from, so dropout masks (when on) agree; their pieces are checked against
autograd's gradient of the same micro-batches.
"""
from __future__ import annotations

from typing import Callable

import torch

from backend.trace.batch import TracedBatch, token_stats
from backend.trace.config import TraceConfig
from backend.trace.hooks import PositionHooks, all_reduce_mean, attached, rel_err
from backend.trace.sites import LoraSite
from backend.trace.sketch import Sketcher

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
    """G per site (float32): gradient of the mean micro-batch loss, averaged over ranks. ``.grad`` untouched.
    ``on_chunk(k, out)`` runs after micro-batch k's backward."""
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
    return all_reduce_flat(G, world_size)


def all_reduce_flat(G: list[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """Mean over ranks of a list of tensors, in one all-reduce (a no-op on one process)."""
    if world_size == 1:
        return G
    flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in G]), world_size)
    return [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in G]), G)]


def collect_stats(stats: dict[str, list], out, chunk: dict, cfg: TraceConfig) -> None:
    loss, prob, ent = token_stats(out.logits.detach(), chunk["input_ids"], cfg.stats_chunk)
    stats["loss"].append(loss)
    stats["prob"].append(prob)
    stats["entropy"].append(ent)
    stats["weight"].append(out.weights.detach().float())
    stats["total"].append(out.total.detach().float())


def run_position(model: torch.nn.Module, tb: TracedBatch, sites: list[LoraSite], loss_fn: LossFn,
                 cfg: TraceConfig, world_size: int, replay: Callable[[], None],
                 extra: list[torch.Tensor] | None = None) -> dict:
    """Pieces of every position of the micro-batches that hold traced sequences (rows of the others are zero).

    Returns site_dot, site_sq (M, n, T); g_sq (M,); G (per site, the weight's shape); ``proc_dot`` =
    <G_proc, G> with G_proc the gradient of the processed micro-batches' share of the loss (= ||G||^2 when every
    micro-batch was processed), so that the processed pieces' dots sum to it (the ``share_sum`` check); checks;
    stats of every sequence. The processed micro-batches are a prefix (the traced sequences come first), so pass 2,
    replayed from pass 1's RNG state, draws the same dropout masks for them. ``extra`` (G_eval per site): also
    ``site_infl`` (M, n, T) = <P_{s,m}, extra_m> and ``proc_infl`` = <G_proc, extra>, what they sum to.
    """
    chunks = tb.chunks()
    K = len(chunks)
    check = check_indices(sites, cfg.full_check)
    stats: dict[str, list] = {k: [] for k in ("loss", "prob", "entropy", "weight", "total")}
    checks: dict = {"micro_batches": K, "pieces_checked_modules": len(check)}

    n, T = tb.input_ids.shape
    # sketches of the traced sequences only (a prefix of every processed micro-batch's rows)
    starts = [sum(tb.chunk_sizes[:k]) for k in range(K)]
    sk_rows = [max(0, min(s, tb.n_traced - a)) * T for s, a in zip(tb.chunk_sizes, starts)]
    sk = (Sketcher(sites, cfg.sketch_dim, cfg.seed, 1.0 / (K * world_size), sk_rows, kind=cfg.sketch_kind)
          if cfg.sketch_dim else None)
    if K == 1:
        hooks = PositionHooks(sites, G=None, piece_scale=1.0 / world_size, world_size=world_size,
                              check=set(check), extra=extra, sketch=sk)
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
        G = hooks.gradient()
        proc_dot = g_sq.double().sum()
        G_proc = G
        checks["micro_batches_traced"] = 1
    else:
        replay()
        G = batch_gradient(sites, chunks, loss_fn, world_size,
                           on_chunk=lambda k, out: collect_stats(stats, out, chunks[k], cfg))
        hooks = PositionHooks(sites, G=G, piece_scale=1.0 / (K * world_size), world_size=world_size,
                              check=set(check), extra=extra, sketch=sk)
        todo = tb.traced_chunks()                  # a prefix: the traced sequences come first
        assert todo == list(range(len(todo))), f"traced micro-batches {todo} are not a prefix"
        params = [s.param for s in sites]
        G_proc = [torch.zeros_like(g) for g in G]
        replay()
        for k in todo:
            hooks.reset_calls()
            with attached(hooks.forward_hooks()):
                out = loss_fn(chunks[k])
                hooks.check_one_call()
                grads = torch.autograd.grad(out.total, params)                  # runs the whole backward
            for Gp, g in zip(G_proc, grads):
                Gp += g.float() / K
            del out, grads
        G_proc = all_reduce_flat(G_proc, world_size)
        errs = []
        for i in check:
            s = hooks.piece_sum[i]
            if world_size > 1:
                s = all_reduce_mean(s, world_size) * world_size                  # sum over ranks
            errs.append(rel_err(s, G_proc[i]))
        site_dot, site_sq, _ = hooks.finish(calls=len(todo))
        rows = sum(tb.chunk_sizes[k] for k in todo)
        if rows < n:                                                             # the rest: no pieces computed
            pad = torch.zeros(len(sites), (n - rows) * T, dtype=site_dot.dtype, device=site_dot.device)
            site_dot, site_sq = torch.cat([site_dot, pad], 1), torch.cat([site_sq, pad], 1)
            if hooks.extra_dot is not None:
                hooks.extra_dot = torch.cat([hooks.extra_dot, pad], 1)
        g_sq = torch.stack([g.square().sum() for g in G])
        proc_dot = sum((gp.double() * g.double()).sum() for gp, g in zip(G_proc, G))
        checks["micro_batches_traced"] = len(todo)
    site_dot = site_dot.view(len(sites), n, T)                                   # (M, n, T)
    site_sq = site_sq.view(len(sites), n, T)
    checks["pieces_sum_max_rel_err"] = max(errs)
    site_infl = proc_infl = None
    if extra is not None:
        site_infl = hooks.extra_dot.view(len(sites), n, T)
        proc_infl = sum((gp.double() * e.double()).sum() for gp, e in zip(G_proc, extra))
    return {"site_dot": site_dot, "site_sq": site_sq, "g_sq": g_sq, "G": G, "proc_dot": proc_dot,
            "site_infl": site_infl, "proc_infl": proc_infl, "checks": checks,
            "sketch": sk.result() if sk is not None else None,                  # (k, n_traced * T)
            "stats": {k: torch.cat(v) if k != "total" else torch.stack(v).mean() for k, v in stats.items()}}
