"""Recompute a traced step with a naive reference and compare: ``python -m backend verify RUN_DIR --step S``.

    python -m backend verify data/runs/20250101-train-demo-ab12 --step 20          # exit 0: within 1e-4
    python -m backend verify RUN_DIR --step 20 --device cpu --tol 1e-4 --json
    python -m backend verify RUN_DIR --step 20 --all                # every token (default: a seeded sample of 64)

By default a seeded sample of ``--sample-tokens`` recorded tokens (64) is recomputed one by one, named in the
output, so a real model's step verifies in minutes; the rest still take part in ``traced_share`` and in the
position pieces' sum (one summed backward), and every recorded token must have its row. ``--all``: every token.

The reference shares nothing with the tracer's fast paths but the loss definition (``backend.lm.loss``):

- ``position``: every piece P_{s,m} is materialised, one autograd call per (position, LoRA layer): the gradient
  of the LoRA layer's output y_m against lora_A and lora_B with the upstream gradient dL/dy_m kept at position s
  only. dot = sum of <P, G> elementwise, magnitude = Frobenius norm of the materialised pieces, G from a plain
  backward. The pieces of the positions that are not recorded are checked to be zero.
- ``token``: one backward per token on the whole micro-batch (g_t = grad l_t), dotted with G; a sketched
  magnitude is recomputed from the materialised g_t and the same random directions. l_t is written as
  ``backend.trace.token.token_loss`` (cross-entropy in a form whose float32 derivatives stay accurate for
  confident tokens); its value is the cross-entropy.

- influence (a step traced with an eval batch, ``--influence-eval``): G_eval from a plain backward of the mean
  ``token_loss`` over the saved eval batch's response tokens (eval mode), dotted with the same materialised pieces
  (position) or per-token gradients (token); error |a - b| / (|piece or g_t| ||G_eval||), and |a - b| for
  influence_alignment, per token and per module.

Errors (all "relative", each on its natural scale): dot |a - b| / (|g| ||G||) (relative to the Cauchy-Schwarz
bound, so a near-zero dot does not blow up), magnitude |a - b| / b, alignment |a - b| (a cosine), and
loss, prob, entropy, weight |a - b| / (1 + |b|). Per module, b is floored at ``MODULE_ALIGNMENT_MIN_REL`` times
the token's magnitude: a smaller piece is float32 dust in both methods (where the theory says zero), and its
alignment, which the tracer stores as null, is not compared. The step passes when every error is <= ``--tol``
(default 1e-4 for float32 runs; runs in half precision or under autocast, whose dtype the step records and
the reference replays, default to 2e-2). Exit codes: 0 pass,
1 an error above the tolerance, 2 a run or step that cannot be verified.

The model is rebuilt from the run's ``config.json`` (``model``, ``dtype``, ``attn_implementation``, ``lora_*``)
with ``backend.lm.models``, and the step's saved adapter is loaded by parameter name. A dropout trace (a
``--trace-inline`` step or ``dropout=True``) is replayed from the saved RNG state on the same device type.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from backend.lm.loss import forward_loss, summed
from backend.lm.schemes import CUSTOM, fixed_weights, get_scheme
from backend.trace.batch import MODULE_ALIGNMENT_MIN_REL
from backend.trace.sites import module_names

TOL = 1e-4
TOL_HALF = 2e-2     # bf16/fp16 weights or autocast: both methods round every activation to 8 or 11 bits
SAMPLE_TOKENS = 64  # tokens recomputed by default: minutes on a real model (a backward each), --all for every one
TOKEN_KEY = ["rank", "sample_idx", "position"]
MODULE_KEY = ["rank", "sample_idx", "position", "layer", "module", "part"]


# ---- the naive reference -----------------------------------------------------------------------------------

def _sites(model: torch.nn.Module, names: list[str]) -> list[dict]:
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        raise ValueError(f"the rebuilt model lacks the traced modules {missing[:3]}; was it built with the "
                         "run's LoRA targets?")
    out = []
    labels = module_names([n.rsplit(".", 2)[0] for n in names])
    for n in names:
        parent, part, _ = n.rsplit(".", 2)
        layer = [int(x) for x in parent.split(".") if x.isdigit()]
        out.append({"name": n, "parent": parent, "part": part, "module": labels[parent],
                    "layer": layer[0] if layer else -1, "param": mods[n].weight, "lora_layer": mods[parent]})
    return out


def _chunks(t: dict[str, torch.Tensor], sizes: list[int], device: torch.device) -> list[dict]:
    out, i = [], 0
    for s in sizes:
        out.append({k: t[k][i:i + s].to(device) for k in ("input_ids", "attention_mask", "labels", "weights")})
        i += s
    return out


def _loss(model, ch: dict, scheme, params: dict, meta: dict, K: int):
    """The step's loss of one micro-batch as the trace defined it: its scheme (a ``custom`` one: the stored
    weights), under the recorded autocast, summed with the recorded ``sum_normaliser`` if any."""
    if meta["scheme"] == CUSTOM:
        scheme = fixed_weights(ch["weights"], meta.get("scheme_normaliser", "response"))
    amp = meta["trace_config"].get("autocast")
    device = ch["input_ids"].device
    with torch.autocast(device.type, dtype=getattr(torch, amp)) if amp else nullcontext():
        out = forward_loss(model, ch, scheme, params)
    s = meta.get("sum_normaliser")
    return summed(out, s, K) if s is not None else out


def _recorded(t: dict[str, torch.Tensor], meta: dict, mode: str, token_positions: str) -> list[tuple[int, int]]:
    """(row, position) pairs of the traced sequences (the first ``traced_sequences`` rows of the step) that
    carry gradient, by the rule of docs/design.md, written as a plain loop."""
    am, labels = t["attention_mask"].tolist(), t["labels"].tolist()
    out = []
    for b in range(meta.get("traced_sequences", len(am))):     # states before it was recorded: every row
        T = len(am[b])
        resp = [labels[b][t + 1] != -100 for t in range(T - 1)]
        last = max([t for t in range(T - 1) if resp[t]], default=-1)
        for t in range(T - 1):
            if not (am[b][t] and am[b][t + 1]):
                continue
            if mode == "position" and t > last:
                continue
            if mode == "token" and token_positions == "response" and not resp[t]:
                continue
            out.append((b, t))
    return out


def _replay(tensors: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["rng_cpu"])
    if device.type == "cuda" and "rng_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng_cuda"], device)


def _gradient(model, ranks: list[dict], sites: list[dict], scheme, params: dict, device) -> list[torch.Tensor]:
    """G = (1/W) sum_r (1/K_r) sum_k grad L_{r,k}, by plain backward passes."""
    W = len(ranks)
    G = [torch.zeros_like(s["param"], dtype=torch.float32) for s in sites]
    for rk in ranks:
        chunks = _chunks(rk["tensors"], rk["meta"]["chunk_sizes"], device)
        _replay(rk["tensors"], device)
        for ch in chunks:
            out = _loss(model, ch, scheme, params, rk["meta"], len(chunks))
            grads = torch.autograd.grad(out.total, [s["param"] for s in sites])
            for Gi, g in zip(G, grads):
                Gi += g.float() / (len(chunks) * W)
    return G


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), -1)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def _stats_rows(rows: list, out, ch: dict, rank: int, sidx: torch.Tensor, row0: int, recorded) -> None:
    logits = out.logits.detach()
    for (b, t) in recorded:
        lp = torch.log_softmax(logits[b, t].double(), -1)
        tgt = int(ch["input_ids"][b, t + 1])
        rows.append({"rank": rank, "sample_idx": int(sidx[row0 + b]), "position": t, "loss": float(-lp[tgt]),
                     "prob": float(lp[tgt].exp()), "entropy": float(_entropy(logits[b, t])),
                     "weight": float(out.weights[b, t])})


def recorded_tokens(ranks: list[dict]) -> list[tuple[int, int, int]]:
    """(rank, sample_idx, position) of every token the step recorded, by the rule of docs/design.md (``_recorded``)."""
    out = []
    for rank, rk in enumerate(ranks):
        t, meta = rk["tensors"], rk["meta"]
        tp = meta["trace_config"].get("token_positions", "all")
        out += [(rank, int(t["sample_idx"][b]), tt) for b, tt in _recorded(t, meta, meta["mode"], tp)]
    return out


def choose_sample(keys: list[tuple[int, int, int]], n: int | None, seed: int = 0) -> list[tuple] | None:
    """``n`` of the recorded tokens ``keys`` drawn without replacement by ``random.Random(seed)``, sorted; None
    (every token) when ``n`` is None or not smaller than their count."""
    import random
    if n is None or n >= len(keys):
        return None
    if n < 1:
        raise ValueError(f"sample_tokens={n} must be >= 1 (or use --all)")
    return sorted(random.Random(seed).sample(sorted(keys), n))


def reference(model: torch.nn.Module, ranks: list[dict], adapter: dict | None = None,
              sample: list[tuple] | None = None) -> dict[str, pd.DataFrame]:
    """Naive values of one traced step: {"tokens": DataFrame, "modules": DataFrame, "checks": dict}.

    ``ranks``: per rank {"tensors", "meta"} as ``trace_store.load_step_state`` returns (or a TraceResult's
    ``state``). ``model``: the peft model, its adapter already at the step's values. ``sample``: the
    (rank, sample_idx, position) keys to recompute one by one (``choose_sample``; None: every recorded token).
    The other recorded tokens still count in ``traced_share`` and in the position pieces' sum, through one
    summed backward each, so those checks stay whole.
    """
    meta0 = ranks[0]["meta"]
    device = next(model.parameters()).device
    mode, cfg = meta0["mode"], meta0["trace_config"]
    scheme = get_scheme(meta0["scheme"]) if meta0["scheme"] != CUSTOM else None       # custom: per chunk
    params = scheme.resolve_params(meta0["scheme_params"]) if scheme is not None else {}
    sites = _sites(model, meta0["sites"])
    W = len(ranks)
    flags = [(m, m.training) for m in model.modules()]
    before = getattr(model.config, "_attn_implementation", None)
    try:
        model.train(meta0["network"] == "train")
        if meta0["attn_implementation"] and meta0["attn_implementation"] != before:
            model.set_attn_implementation(meta0["attn_implementation"])
        G = _gradient(model, ranks, sites, scheme, params, device)
        E = _eval_gradient(model, ranks[0]["tensors"], sites, device)
        keys = set(sample) if sample is not None else None
        if mode == "position":
            tok, mod, checks = _naive_position(model, ranks, sites, G, scheme, params, device, W, keys, E)
        else:
            tok, mod, checks = _naive_token(model, ranks, sites, G, scheme, params, device, cfg, keys, E)
    finally:
        if meta0["attn_implementation"] and meta0["attn_implementation"] != before and before:
            model.set_attn_implementation(before)
        for m, t in flags:
            m.training = t
    g_norm = float(torch.sqrt(sum(g.double().square().sum() for g in G)))
    site_norm = {(s["layer"], s["module"], s["part"]): float(g.double().norm()) for s, g in zip(sites, G)}
    tok = pd.DataFrame(tok)
    mod = pd.DataFrame(mod)
    tok["alignment"] = tok["dot"] / (tok["magnitude"] * g_norm)
    if mode == "position":
        tok["share"] = tok["dot"] / g_norm ** 2
        checks["traced_share"] = float(tok["share"].sum()) + checks.pop("unsampled_dot") / g_norm ** 2
    mod["g_norm"] = [site_norm[k] for k in zip(mod["layer"], mod["module"], mod["part"])]
    mod["alignment"] = mod["dot"] / (mod["magnitude"] * mod["g_norm"])
    checks["grad_norm"] = g_norm
    if E is not None:
        e_norm = float(torch.sqrt(sum(g.double().square().sum() for g in E)))
        e_site = {(s["layer"], s["module"], s["part"]): float(g.double().norm()) for s, g in zip(sites, E)}
        col = "magnitude_exact" if "magnitude_exact" in tok else "magnitude"
        tok["influence_alignment"] = tok["influence"] / (tok[col] * e_norm)
        mod["e_norm"] = [e_site[k] for k in zip(mod["layer"], mod["module"], mod["part"])]
        mod["influence_alignment"] = mod["influence"] / (mod["magnitude"] * mod["e_norm"])
        checks["eval_grad_norm"] = e_norm
    return {"tokens": tok, "modules": mod, "checks": checks}


def _eval_gradient(model, tensors: dict, sites: list[dict], device) -> list[torch.Tensor] | None:
    """G_eval of a step traced with an eval batch (None without one): the gradient of the mean ``token_loss``
    over the eval batch's response tokens, eval mode (no dropout), one plain backward."""
    from backend.lm.loss import IGNORE, token_loss
    if "eval_input_ids" not in tensors:
        return None
    ids, am, labels = (tensors[f"eval_{k}"].to(device) for k in ("input_ids", "attention_mask", "labels"))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        logits = model(input_ids=ids, attention_mask=am).logits
        mask = labels[:, 1:] != IGNORE
        loss = (token_loss(logits[:, :-1], ids[:, 1:]) * mask).sum() / mask.sum()
        return [g.detach() for g in torch.autograd.grad(loss, [s["param"] for s in sites])]
    finally:
        for m, t in flags:
            m.training = t


def _split(here: list[tuple[int, int]], rank: int, sidx: torch.Tensor, row0: int, sample_keys: set | None):
    """(sampled, the rest) of a chunk's recorded (row, position) pairs; every pair is sampled when there is no
    sample."""
    if sample_keys is None:
        return here, []
    inside = [(rank, int(sidx[row0 + b]), tt) in sample_keys for b, tt in here]
    return [h for h, k in zip(here, inside) if k], [h for h, k in zip(here, inside) if not k]


def _naive_position(model, ranks, sites, G, scheme, params, device, W, sample_keys: set | None = None,
                    E: list[torch.Tensor] | None = None):
    tok, mod, stats = [], [], []
    unsampled_dot = 0.0                   # sum of <P, G> over the recorded positions left out of the sample
    parents = list(dict.fromkeys(s["parent"] for s in sites))
    by_parent = {p: [i for i, s in enumerate(sites) if s["parent"] == p] for p in parents}
    piece_sum = [torch.zeros_like(g) for g in G]
    for rank, rk in enumerate(ranks):
        t, meta = rk["tensors"], rk["meta"]
        chunks = _chunks(t, meta["chunk_sizes"], device)
        rec = _recorded(t, meta, "position", "all")
        _replay(t, device)
        row0 = 0
        for ch in chunks:
            outputs: dict[str, torch.Tensor] = {}
            handles = [sites[by_parent[p][0]]["lora_layer"].register_forward_hook(
                lambda m, i, o, p=p: outputs.__setitem__(p, o)) for p in parents]
            try:
                out = _loss(model, ch, scheme, params, meta, len(chunks))
            finally:
                for h in handles:
                    h.remove()
            ys = [outputs[p] for p in parents]
            gys = torch.autograd.grad(out.total, ys, retain_graph=True)          # dL/dy per LoRA layer
            scale = 1.0 / (len(chunks) * W)
            n_rows = ch["input_ids"].shape[0]
            here = [(b - row0, tt) for (b, tt) in rec if row0 <= b < row0 + n_rows]
            here, others = _split(here, rank, t["sample_idx"], row0, sample_keys)
            _stats_rows(stats, out, ch, rank, t["sample_idx"], row0, here)
            for p, y, gy in zip(parents, ys, gys):
                idx = by_parent[p]
                ws = [sites[i]["param"] for i in idx]
                keep = torch.zeros(gy.shape[:2], dtype=torch.bool, device=device)
                for (b, tt) in here:
                    mask = torch.zeros_like(gy)
                    mask[b, tt] = gy[b, tt]
                    pieces = torch.autograd.grad(y, ws, grad_outputs=mask, retain_graph=True)
                    for i, P in zip(idx, pieces):
                        P = P.float() * scale                                     # the materialised piece
                        piece_sum[i] += P
                        s = sites[i]
                        mod.append({"rank": rank, "sample_idx": int(t["sample_idx"][row0 + b]), "position": tt,
                                    "layer": s["layer"], "module": s["module"], "part": s["part"],
                                    "dot": float((P.double() * G[i].double()).sum()),
                                    "magnitude": float(P.double().norm()),
                                    **({"influence": float((P.double() * E[i].double()).sum())}
                                       if E is not None else {})})
                    keep[b, tt] = True
                if others:                        # the unsampled recorded positions: their pieces summed, at once
                    mask = torch.zeros(gy.shape[:2], dtype=torch.bool, device=device)
                    for (b, tt) in others:
                        mask[b, tt] = True
                    summed_pieces = torch.autograd.grad(y, ws, grad_outputs=gy * mask[..., None], retain_graph=True)
                    for i, P in zip(idx, summed_pieces):
                        P = P.float() * scale
                        piece_sum[i] += P
                        unsampled_dot += float((P.double() * G[i].double()).sum())
                    keep |= mask
                rest = torch.autograd.grad(y, ws, grad_outputs=gy * (~keep)[..., None], retain_graph=True)
                for i, P in zip(idx, rest):       # zero within traced sequences, the rest of the step's others
                    piece_sum[i] += P.float() * scale
            row0 += n_rows
            del out, ys, gys
    tok = _sum_modules(mod, stats)
    errs = [float((ps - g).double().norm() / g.double().norm().clamp_min(1e-300)) for ps, g in zip(piece_sum, G)]
    return tok, mod, {"pieces_sum_max_rel_err": max(errs), "unsampled_dot": unsampled_dot}


def _sum_modules(mod: list[dict], stats: list[dict]) -> list[dict]:
    acc: dict[tuple, list[float]] = {}
    for r in mod:
        a = acc.setdefault((r["rank"], r["sample_idx"], r["position"]), [0.0, 0.0, 0.0])
        a[0] += r["dot"]
        a[1] += r["magnitude"] ** 2
        a[2] += r.get("influence", 0.0)
    out = []
    with_influence = bool(mod) and "influence" in mod[0]
    for s in stats:
        d, sq, inf = acc.get((s["rank"], s["sample_idx"], s["position"]), (0.0, 0.0, 0.0))
        out.append(dict(s, dot=d, magnitude=float(np.sqrt(sq)), **({"influence": inf} if with_influence else {})))
    return out


def _naive_token(model, ranks, sites, G, scheme, params, device, cfg, sample_keys: set | None = None,
                 E: list[torch.Tensor] | None = None):
    from backend.trace.sites import sketch_direction
    from backend.trace.token import token_loss
    tok, mod = [], []
    ws = [s["param"] for s in sites]
    dirs = None
    if cfg["magnitude"] == "sketch":
        seed, shapes = ranks[0]["meta"]["sketch_seed"], [s["param"].shape for s in sites]
        dirs = [torch.cat([v.reshape(-1) for v in sketch_direction(shapes, seed, i, device)]).double()
                for i in range(cfg["sketch_k"])]
    traced_loss_dot, extra = 0.0, False          # sum over traced loss terms of w_t / (N K W) <g_t, G>
    for rank, rk in enumerate(ranks):
        t, meta = rk["tensors"], rk["meta"]
        chunks = _chunks(t, meta["chunk_sizes"], device)
        rec = _recorded(t, meta, "token", cfg["token_positions"])
        row0 = 0
        for ch in chunks:
            out = _loss(model, ch, scheme, params, meta, len(chunks))
            losses = token_loss(out.logits[:, :-1], ch["input_ids"][:, 1:])          # (n, T-1), as the tracer
            n_rows = ch["input_ids"].shape[0]
            here = [(b - row0, tt) for (b, tt) in rec if row0 <= b < row0 + n_rows]
            here, others = _split(here, rank, t["sample_idx"], row0, sample_keys)
            coef = 1.0 / (float(out.normaliser) * len(chunks) * len(ranks))
            terms = [float(out.weights[b, tt]) * coef * losses[b, tt] for (b, tt) in others if out.mask[b, tt]]
            if terms:                      # the unsampled loss terms' part of traced_share: one summed backward
                g = torch.autograd.grad(torch.stack(terms).sum(), ws, retain_graph=True)
                traced_loss_dot += float(sum((gi.double() * Gi.double()).sum() for gi, Gi in zip(g, G)))
            stats: list[dict] = []
            _stats_rows(stats, out, ch, rank, t["sample_idx"], row0, here)
            for (b, tt), st in zip(here, stats):
                g = torch.autograd.grad(losses[b, tt], ws, retain_graph=True)       # one backward per token
                sq = 0.0
                d = 0.0
                inf = 0.0
                for j, (s, gi, Gi) in enumerate(zip(sites, g, G)):
                    gd = gi.double()
                    dm, sm = float((gd * Gi.double()).sum()), float(gd.square().sum())
                    d, sq = d + dm, sq + sm
                    row_m = {"rank": rank, "sample_idx": st["sample_idx"], "position": tt, "layer": s["layer"],
                             "module": s["module"], "part": s["part"], "dot": dm, "magnitude": np.sqrt(sm)}
                    if E is not None:
                        row_m["influence"] = float((gd * E[j].double()).sum())
                        inf += row_m["influence"]
                    mod.append(row_m)
                if out.mask[b, tt]:
                    traced_loss_dot += float(out.weights[b, tt]) * d / (float(out.normaliser) * len(chunks)
                                                                        * len(ranks))
                row = dict(st, dot=d, magnitude=float(np.sqrt(sq)), magnitude_exact=float(np.sqrt(sq)))
                if E is not None:
                    row["influence"] = inf
                if dirs is not None:
                    flat = torch.cat([gi.reshape(-1) for gi in g]).double()
                    row["magnitude"] = float(torch.stack([flat @ v for v in dirs]).square().mean().sqrt())
                tok.append(row)
            extra = extra or out.extra is not None
            row0 += n_rows
            del out, losses
    g_sq = float(sum(g.double().square().sum() for g in G))
    return tok, mod, {"traced_share": None if extra else traced_loss_dot / g_sq}


# ---- comparison -----------------------------------------------------------------------------------------

def compare(ours_tokens: pd.DataFrame, ours_modules: pd.DataFrame | None, ref: dict) -> dict[str, float]:
    """Max errors per column (see the module docstring); ``inf`` where rows are missing or undefined."""
    errs: dict[str, float] = {}
    rt, ot = ref["tokens"], ours_tokens
    m = rt.merge(ot, on=TOKEN_KEY, how="outer", suffixes=("_ref", ""), indicator=True)
    errs["token_rows_unmatched"] = float((m["_merge"] != "both").sum())
    m = m[m["_merge"] == "both"]
    g = ref["checks"]["grad_norm"]
    _errors(errs, "", m, g_norm=g)
    for k in ("loss", "prob", "entropy", "weight"):
        errs[k] = _maxf((m[k] - m[k + "_ref"]).abs() / (1 + m[k + "_ref"].abs()))
    if "influence_ref" in m and "influence" in m:
        col = "magnitude_exact" if "magnitude_exact" in m else "magnitude_ref"
        e = ref["checks"]["eval_grad_norm"]
        errs["influence"] = _maxf(((m["influence"] - m["influence_ref"]).abs()
                                   / (m[col] * e).clip(lower=1e-30)).fillna(np.inf))
        errs["influence_alignment"] = _maxf((m["influence_alignment"] - m["influence_alignment_ref"]).abs()
                                            .where(~(m["influence_alignment"].isna()
                                                     & m["influence_alignment_ref"].isna()), 0.0).fillna(np.inf))
    if ours_modules is not None and len(ours_modules):
        rm = ref["modules"]
        mm = rm.merge(ours_modules, on=MODULE_KEY, how="outer", suffixes=("_ref", ""), indicator=True)
        errs["module_rows_unmatched"] = float((mm["_merge"] != "both").sum())
        mm = mm[mm["_merge"] == "both"]
        # a piece below the null threshold (batch.MODULE_ALIGNMENT_MIN_REL of its token's magnitude) is float32
        # dust in both methods: its errors are measured against that floor, and a null alignment is expected
        # where the reference's piece is below ten times the threshold
        col = "magnitude_exact" if "magnitude_exact" in rt else "magnitude"
        tm = rt[TOKEN_KEY + [col]].rename(columns={col: "token_magnitude_ref"})
        mm = mm.merge(tm, on=TOKEN_KEY, how="left")
        floor = MODULE_ALIGNMENT_MIN_REL * mm["token_magnitude_ref"]
        mm["magnitude_floor"] = np.maximum(mm["magnitude_ref"], floor)
        tiny = mm["magnitude_ref"] < 10 * floor
        mm.loc[tiny & mm["alignment"].isna(), "alignment_ref"] = np.nan
        _errors(errs, "module_", mm, g_norm=mm["g_norm"], mag_ref=mm["magnitude_floor"])
        if "influence_ref" in mm and "influence" in mm:
            errs["module_influence"] = _maxf(((mm["influence"] - mm["influence_ref"]).abs()
                                              / (mm["magnitude_floor"] * mm["e_norm"]).clip(lower=1e-30))
                                             .fillna(np.inf))
    return errs


def _maxf(s: pd.Series) -> float:
    return float(s.max()) if len(s) else 0.0


def _errors(errs: dict, prefix: str, m: pd.DataFrame, g_norm, mag_ref: pd.Series | None = None) -> None:
    """``mag_ref``: the magnitude errors are relative to (default: the reference's exact magnitude)."""
    ref_mag = mag_ref if mag_ref is not None else m["magnitude_exact"] if "magnitude_exact" in m \
        else m["magnitude_ref"]
    scale = (ref_mag * g_norm).clip(lower=1e-30)
    errs[prefix + "dot"] = _maxf((m["dot"] - m["dot_ref"]).abs() / scale)
    if m["magnitude"].notna().any():                     # magnitude="none" (token mode): nothing to compare
        errs[prefix + "magnitude"] = _maxf(((m["magnitude"] - m["magnitude_ref"]).abs()
                                            / (mag_ref if mag_ref is not None else m["magnitude_ref"])
                                            .clip(lower=1e-30)).fillna(np.inf))
        a, b = m["alignment"], m["alignment_ref"]
        both_nan = a.isna() & b.isna()
        errs[prefix + "alignment"] = _maxf((a - b).abs().where(~both_nan, 0.0).fillna(np.inf))


# ---- the command ----------------------------------------------------------------------------------------

def load_run_model(run_path: Path, adapter: dict[str, torch.Tensor], device: str):
    """The run's model (config.json -> backend.lm.models) with the step's adapter tensors loaded by name."""
    from backend.lm.models import apply_lora, load_model_and_tokenizer
    cfg_file = Path(run_path) / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{run_path} has no config.json: not a run directory")
    c = json.loads(cfg_file.read_text()).get("config", {})
    need = ["model", "lora_r", "lora_alpha", "lora_dropout", "lora_targets"]
    missing = [k for k in need if k not in c]
    if missing:
        raise ValueError(f"{cfg_file}: config lacks {missing}; cannot rebuild the model")
    model, tok = load_model_and_tokenizer(c["model"], dtype=c.get("dtype", "auto"), device=device,
                                          attn_implementation=c.get("attn_implementation", "auto"),
                                          trust_remote_code=c.get("trust_remote_code", False))
    model = apply_lora(model, r=c["lora_r"], alpha=c["lora_alpha"], dropout=c["lora_dropout"],
                       targets=c["lora_targets"])
    params = dict(model.named_parameters())
    unknown = [k for k in adapter if k not in params]
    if unknown:
        raise ValueError(f"saved adapter tensors {unknown[:3]} do not exist in the rebuilt model")
    with torch.no_grad():
        for k, v in adapter.items():
            if params[k].shape != v.shape:
                raise ValueError(f"saved adapter tensor {k} has shape {tuple(v.shape)}, the model "
                                 f"{tuple(params[k].shape)}")
            params[k].copy_(v)
    return model, tok


def _read_ours(run_path: Path, step: int, table: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    from backend.trace.store import INFLUENCE_DIR, INFLUENCE_MODULES_DIR, MODULES_DIR, TOKENS_DIR
    sub = {"tokens": TOKENS_DIR, "token_modules": MODULES_DIR, "influence": INFLUENCE_DIR,
           "influence_modules": INFLUENCE_MODULES_DIR}[table]
    files = sorted((Path(run_path) / sub).glob(f"step_{step:06d}.rank*.parquet"))
    if not files:
        raise ValueError(f"{run_path}: no {table} shards for step {step}")
    frames = []
    for f in files:
        df = pq.read_table(f).to_pandas()
        df["rank"] = int(f.name.split(".rank")[1].split(".")[0])
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def verify_step(run_path: Path, step: int, device: str = "cpu", sample_tokens: int | None = None,
                seed: int = 0) -> dict[str, Any]:
    """Recompute ``step`` of the run naively; {"errors", "checks_recorded", "checks_reference", "rows", ...}.

    ``sample_tokens``: recompute that many of the recorded tokens, drawn with ``seed`` (``choose_sample``; the
    report's ``sample`` lists them), instead of every one (None). Every recorded token must still have its
    row (``token_rows_unmatched``), and ``traced_share`` is still checked over all of them.
    """
    from backend.trace.store import load_step_state
    state = load_step_state(run_path, step)
    model, _ = load_run_model(run_path, state["adapter"], device)
    expected = recorded_tokens(state["ranks"])
    sample = choose_sample(expected, sample_tokens, seed)
    ref = reference(model, state["ranks"], sample=sample)
    tokens = _read_ours(run_path, step, "tokens")
    modules = _read_ours(run_path, step, "token_modules")
    if "eval_input_ids" in state["ranks"][0]["tensors"]:         # influence: joined to the rows it belongs to
        infl = _read_ours(run_path, step, "influence").drop(columns=["run_id", "step"])
        tokens = tokens.merge(infl, on=TOKEN_KEY, how="left")
        if len(modules):
            im = _read_ours(run_path, step, "influence_modules").drop(columns=["run_id", "step"])
            modules = modules.merge(im, on=MODULE_KEY, how="left")
    unmatched = 0.0
    if sample is not None:
        ours = set(zip(tokens["rank"], tokens["sample_idx"], tokens["position"]))
        unmatched = float(len(ours ^ set(expected)))          # rows missing or extra, sampled or not
        keys = pd.DataFrame(sample, columns=TOKEN_KEY)
        tokens_s, modules_s = tokens.merge(keys, on=TOKEN_KEY), modules.merge(keys, on=TOKEN_KEY)
    else:
        tokens_s, modules_s = tokens, modules
    errors = compare(tokens_s, modules_s, ref)
    errors["token_rows_unmatched"] = max(errors["token_rows_unmatched"], unmatched)
    meta = state["ranks"][0]["meta"]
    return {"step": step, "mode": meta["mode"], "rows": len(tokens), "module_rows": len(modules),
            "dtype": meta["dtype"], "model_dtype": meta.get("model_dtype", meta["dtype"]),
            "autocast": meta["trace_config"].get("autocast"), "tokens_recorded": len(expected),
            "sample": [list(k) for k in sample] if sample is not None else None, "sample_seed": seed,
            "errors": errors,
            "checks_recorded": meta.get("checks", {}), "checks_reference": ref["checks"]}


def describe_sample(report: dict) -> str:
    """One line naming what was recomputed: every token, or the sample by sequence: 'seq 12 (rank 0): 3 5 9'."""
    n = report["tokens_recorded"]
    if report["sample"] is None:
        return f"checked every one of the {n} recorded tokens"
    by_seq: dict[tuple[int, int], list[int]] = {}
    for rank, sidx, pos in report["sample"]:
        by_seq.setdefault((rank, sidx), []).append(pos)
    multi = len({r for r, _ in by_seq}) > 1
    seqs = "; ".join(f"seq {sidx}{f' (rank {r})' if multi else ''}: {' '.join(map(str, ps))}"
                     for (r, sidx), ps in sorted(by_seq.items()))
    return (f"checked {len(report['sample'])} of {n} recorded tokens, drawn with seed {report['sample_seed']} "
            f"(--all checks every one): {seqs}")


def failures(report: dict, tol: float) -> list[str]:
    bad = [f"{k}={v:.3g}" for k, v in report["errors"].items() if not k.endswith("unmatched") and not v <= tol]
    bad += [f"{k}={int(v)}" for k, v in report["errors"].items() if k.endswith("unmatched") and v]
    rec = report["checks_recorded"]
    # a state saved before traced_share existed holds only the traced rows: they are the whole step (share 1)
    s, r = report["checks_reference"].get("traced_share"), rec.get("traced_share",
                                                                     None if "traced_sequences" in rec else 1.0)
    if s is not None and r is not None and not abs(s - r) <= tol:
        bad.append(f"traced_share recorded {r} vs reference {s}")
    p = report["checks_reference"].get("pieces_sum_max_rel_err")
    if p is not None and not p <= tol:
        bad.append(f"reference pieces_sum_max_rel_err={p:.3g}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend verify", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="a run directory with traced steps")
    ap.add_argument("--step", type=int, required=True, help="the traced step to recompute")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    ap.add_argument("--tol", type=float, default=None, help=f"max allowed error (default {TOL} for float32 runs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--sample-tokens", type=int, default=SAMPLE_TOKENS,
                    help=f"recompute this many recorded tokens, drawn at random (default {SAMPLE_TOKENS}); the "
                         "naive reference costs a backward per token, so every token of a real model's step takes "
                         "hours")
    ap.add_argument("--all", action="store_true", help="recompute every recorded token")
    ap.add_argument("--seed", type=int, default=0, help="seed of the token sample (default 0)")
    args = ap.parse_args(argv)
    if args.sample_tokens < 1:
        print(f"verify: --sample-tokens must be >= 1, got {args.sample_tokens} (--all checks every token)",
              file=sys.stderr)
        return 2
    if args.tol is not None and not args.tol > 0:
        print(f"verify: --tol must be > 0, got {args.tol}", file=sys.stderr)
        return 2
    try:
        report = verify_step(Path(args.run_dir), args.step, args.device,
                             sample_tokens=None if args.all else args.sample_tokens, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"verify: {e}", file=sys.stderr)
        return 2
    full = report["dtype"] == report["model_dtype"] == "float32" and not report["autocast"]
    tol = args.tol if args.tol is not None else (TOL if full else TOL_HALF)
    bad = failures(report, tol)
    report.update(tol=tol, passed=not bad, failures=bad)
    if args.json:
        print(json.dumps(report, default=float))
    else:
        print(f"step {report['step']}  mode {report['mode']}  model dtype {report['model_dtype']}  LoRA dtype "
              f"{report['dtype']}  tolerance {tol:g}  autocast "
              f"{report['autocast'] or 'off'}  rows {report['rows']}  "
              f"module rows {report['module_rows']}")
        print(f"  {describe_sample(report)}")
        for k, v in report["errors"].items():
            print(f"  {k:<28} {v:.3g}")
        for name in ("checks_recorded", "checks_reference"):
            picks = {k: v for k, v in report[name].items()
                     if k in ("share_sum", "traced_share", "pieces_sum_max_rel_err", "attn_implementation_used",
                              "grad_norm", "grad_cosine_applied")}
            print(f"  {name:<28} {picks}")
        print(("PASS" if not bad else "FAIL: " + ", ".join(bad)) + f" (tol {tol:g})")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
