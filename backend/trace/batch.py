"""The traced batch: which positions are recorded, per-token statistics, and the table columns.

    tb = TracedBatch.from_batch(batch, max_sequences=8, micro_batch_size=None, device=dev)
    tb.record_mask("position")                   # (n, T-1) bool: the rows written (first max_sequences only)
    tb.carry_mask("position")                    # (n, T-1) bool: every position that carries gradient
    loss, prob, entropy = token_stats(logits, tb.input_ids, chunk=1024)      # (n, T-1) float32 each

The batch is the whole step (every sequence the loss, the scheme weights, the normaliser and G come from);
``max_sequences`` only limits which sequences get rows: the first ``n_traced``. Which positions carry gradient
(``carry_mask``; ``record_mask`` = those of the traced sequences), position t predicting x_{t+1}:

- every position needs a real token and a real target: attention_mask[t] = attention_mask[t+1] = 1, so padding
  is never recorded;
- ``position`` mode: P_s = g_s u_s^T is non-zero only if some loss term depends on position s's activations,
  i.e. some response position t >= s exists in the sequence (causal attention). So prompt positions are recorded
  (is_response = False, weight 0), and positions after the sequence's last response token are not (their
  gradient is exactly zero);
- ``token`` mode: g_t = grad l_t exists for every position with a target, prompt tokens included (their own
  loss is defined even though the traced loss leaves it out); ``token_positions="response"`` keeps only
  response tokens.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backend.lm.categories import categorize
from backend.lm.loss import IGNORE

REQUIRED = ("input_ids", "attention_mask", "labels")
# A module's piece (or part of g_t) smaller than this fraction of the token's magnitude has its alignment
# stored as null: at that size it is float32 rounding where the theory says zero (position 0's q_proj pieces,
# whose softmax over one key is constant, measure 1e-11 to 2e-8 of the token's magnitude on the demo runs; real
# pieces of the same token are 1e-3 to 1 of it), and even a real one holds < 1e-12 of the token's ||.||^2.
# Its dot and magnitude are kept (they still sum into the token's); averages of alignment skip the null.
MODULE_ALIGNMENT_MIN_REL = 1e-6


@dataclass
class TracedBatch:
    input_ids: torch.Tensor        # (n, T) long
    attention_mask: torch.Tensor   # (n, T)
    labels: torch.Tensor           # (n, T) long, -100 = no loss
    sample_idx: torch.Tensor       # (n,) long
    chunk_sizes: list[int]         # micro-batches: consecutive rows
    n_traced: int                  # rows are written for sequences 0 .. n_traced-1

    @classmethod
    def from_batch(cls, batch: dict, max_sequences: int | None, micro_batch_size: int | None,
                   device: torch.device, chunk_sizes: list[int] | None = None) -> "TracedBatch":
        """``chunk_sizes``: the micro-batches' sizes when they differ (they must sum to the batch), else every
        ``micro_batch_size`` rows (None: one micro-batch)."""
        missing = [k for k in REQUIRED if k not in batch]
        if missing:
            raise ValueError(f"the batch lacks {missing}; it needs {', '.join(REQUIRED)} (B, T) and optionally "
                             "sample_idx (B,)")
        ids = batch["input_ids"]
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"input_ids must be (B, T) with T >= 2, got shape {tuple(ids.shape)}")
        for k in REQUIRED[1:]:
            if tuple(batch[k].shape) != tuple(ids.shape):
                raise ValueError(f"{k} has shape {tuple(batch[k].shape)}, input_ids {tuple(ids.shape)}")
        n = ids.shape[0]
        if n == 0:
            raise ValueError("the batch holds no sequences")
        sidx = batch.get("sample_idx")
        sidx = torch.arange(ids.shape[0]) if sidx is None else torch.as_tensor(sidx).reshape(-1)
        if sidx.shape[0] != ids.shape[0]:
            raise ValueError(f"sample_idx has {sidx.shape[0]} entries for {ids.shape[0]} sequences")
        if chunk_sizes is not None:
            if sum(chunk_sizes) != n or min(chunk_sizes) < 1:
                raise ValueError(f"micro-batch sizes {chunk_sizes} must be >= 1 and sum to the batch's {n} rows")
            sizes = list(chunk_sizes)
        else:
            mb = micro_batch_size or n
            sizes = [min(mb, n - i) for i in range(0, n, mb)]
        return cls(input_ids=ids.to(device=device, dtype=torch.long),
                   attention_mask=batch["attention_mask"].to(device),
                   labels=batch["labels"].to(device=device, dtype=torch.long),
                   sample_idx=sidx.to(torch.long).cpu(), chunk_sizes=sizes,
                   n_traced=n if max_sequences is None else min(max_sequences, n))

    @property
    def n(self) -> int:
        return self.input_ids.shape[0]

    def traced_chunks(self) -> list[int]:
        """Indices of the micro-batches that hold traced sequences (a prefix: the traced rows come first)."""
        out, i = [], 0
        for k, s in enumerate(self.chunk_sizes):
            if i < self.n_traced:
                out.append(k)
            i += s
        return out

    def head(self, n: int) -> "TracedBatch":
        """The first ``n`` sequences (micro-batches cut at the same row boundaries), all traced."""
        sizes, left = [], n
        for s in self.chunk_sizes:
            if left <= 0:
                break
            sizes.append(min(s, left))
            left -= s
        return TracedBatch(self.input_ids[:n], self.attention_mask[:n], self.labels[:n], self.sample_idx[:n],
                           sizes, n)

    def chunks(self) -> list[dict[str, torch.Tensor]]:
        out, i = [], 0
        for s in self.chunk_sizes:
            out.append({"input_ids": self.input_ids[i:i + s], "attention_mask": self.attention_mask[i:i + s],
                        "labels": self.labels[i:i + s]})
            i += s
        return out

    def valid(self) -> torch.Tensor:
        am = self.attention_mask.bool()
        return am[:, :-1] & am[:, 1:]                                  # (n, T-1)

    def response(self) -> torch.Tensor:
        return self.labels[:, 1:] != IGNORE                            # (n, T-1)

    def record_mask(self, mode: str, token_positions: str = "all", carry: torch.Tensor | None = None) -> torch.Tensor:
        """(n, T-1) bool: the positions whose rows are written: ``carry_mask`` of the traced sequences (``carry``:
        that mask when the caller has it already)."""
        rec = (self.carry_mask(mode, token_positions) if carry is None else carry).clone()
        rec[self.n_traced:] = False
        return rec

    def carry_mask(self, mode: str, token_positions: str = "all") -> torch.Tensor:
        """(n, T-1) bool: the positions that carry gradient, every sequence (see the module docstring)."""
        valid, resp = self.valid(), self.response()
        if mode == "position":
            t = torch.arange(resp.shape[1], device=resp.device)
            last = torch.where(resp, t, torch.full_like(t, -1)).max(dim=1).values          # (n,)
            return valid & (t[None, :] <= last[:, None])
        if token_positions == "response":
            return valid & resp
        return valid


def merge_batches(batches: list[dict], pad_id: int) -> dict:
    """Concatenate right-padded micro-batches along the batch dimension, padding to the longest."""
    T = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    out: dict[str, list] = {k: [] for k in batches[0]}
    for b in batches:
        for k, v in b.items():
            if k in fill and v.shape[1] < T:
                v = torch.nn.functional.pad(v, (0, T - v.shape[1]), value=fill[k])
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def token_stats(logits: torch.Tensor, input_ids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
    """Loss -log p(x_{t+1}), its probability and the entropy at every position, float32, (n, T-1) each.

    Computed for every position (prompt ones too), in row chunks so the float32 copy of a large vocabulary
    stays bounded.
    """
    lg = logits[:, :-1]
    n, T, V = lg.shape
    flat = lg.reshape(-1, V)
    tgt = input_ids[:, 1:].reshape(-1)
    loss = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    ent = torch.empty_like(loss)
    for i in range(0, flat.shape[0], chunk):
        logp = F.log_softmax(flat[i:i + chunk].float(), dim=-1)          # (c, V)
        torch.neg(logp.gather(1, tgt[i:i + chunk, None]).squeeze(1), out=loss[i:i + chunk])
        # p log p in place: one (c, V) temporary instead of two (the same numbers)
        torch.neg(logp.exp().mul_(logp).sum(-1), out=ent[i:i + chunk])
    loss = loss.view(n, T)
    return loss, torch.exp(-loss), ent.view(n, T)


_TEXT_CACHE: "weakref.WeakKeyDictionary[Any, dict[int, tuple[str, str]]]" = weakref.WeakKeyDictionary()


def token_texts(tokenizer: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decoded text and category of every id (object arrays), cached per tokenizer and id."""
    if tokenizer is None:
        texts = np.array([f"<{i}>" for i in ids.tolist()], dtype=object)
        return texts, np.full(len(ids), "other", dtype=object)
    cache = _TEXT_CACHE.setdefault(tokenizer, {})
    uniq, inv = np.unique(ids, return_inverse=True)
    special = None
    for u in uniq.tolist():
        if u not in cache:
            if special is None:
                special = set(getattr(tokenizer, "all_special_ids", []) or [])
            text = tokenizer.decode([u])
            cache[u] = (text, categorize(text, is_special=u in special))
    pairs = [cache[u] for u in uniq.tolist()]
    t = np.array([p[0] for p in pairs], dtype=object)
    c = np.array([p[1] for p in pairs], dtype=object)
    return t[inv], c[inv]


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def cosine(dot: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """dot / norms in float64, NaN where norms == 0 (the cosine of a zero vector is undefined: null)."""
    d, n = dot.double(), norms.double()
    return torch.where(n > 0, d / n.clamp_min(1e-300), torch.full_like(d, float("nan")))


def module_alignment(site_dot: torch.Tensor, site_mag: torch.Tensor, site_g_norm: torch.Tensor,
                     token_mag: torch.Tensor) -> torch.Tensor:
    """(M, rows) cosine of each module's piece with G_m; NaN (null) where the piece is below
    ``MODULE_ALIGNMENT_MIN_REL`` of the token's magnitude (or where either norm is 0)."""
    cos = cosine(site_dot, site_mag * site_g_norm[:, None])
    small = site_mag.double() < MODULE_ALIGNMENT_MIN_REL * token_mag.double()[None, :]
    return torch.where(small, torch.full_like(cos, float("nan")), cos)


def build_columns(mode: str, tb: TracedBatch, record: torch.Tensor, stats: dict[str, torch.Tensor],
                  dot: torch.Tensor, magnitude: torch.Tensor | None, estimated: bool | None,
                  g_norm: float, site_dot: torch.Tensor | None, site_mag: torch.Tensor | None,
                  site_g_norm: torch.Tensor, sites: list, tokenizer: Any) -> tuple[dict, dict]:
    """The TOKENS and TOKEN_MODULES columns (all but run_id, step, rank) of the recorded positions.

    ``dot``, ``magnitude``: (n, T-1); ``site_dot``, ``site_mag``: (M, n, T-1) or None; ``site_g_norm``: (M,).
    NaN marks a value that is not defined (written as null).
    """
    T1 = record.shape[1]
    flat = record.reshape(-1).nonzero().squeeze(1)            # row-major: the order of nonzero(as_tuple=True)
    b_idx, t_idx = (flat // T1).cpu().numpy(), (flat % T1).cpu().numpy()
    n_rows = len(b_idx)

    def pick(x: torch.Tensor) -> torch.Tensor:
        """x[record] of an (n, T-1) tensor: one index_select of the flattened tensor (cheaper than a 2-d mask)."""
        return x.reshape(-1).index_select(0, flat.to(x.device))

    token_id = pick(tb.input_ids[:, 1:]).cpu().numpy()
    text, cat = token_texts(tokenizer, token_id)
    d = pick(dot)
    mag = pick(magnitude) if magnitude is not None else torch.full_like(d, float("nan"))
    tokens = {
        "sample_idx": tb.sample_idx.numpy()[b_idx].astype(np.int32),
        "position": t_idx.astype(np.int32),
        "token_id": token_id.astype(np.int32),
        "token": text,
        "category": cat,
        "is_response": pick(tb.response()).cpu().numpy(),
        "loss": _np(pick(stats["loss"])), "prob": _np(pick(stats["prob"])), "entropy": _np(pick(stats["entropy"])),
        "weight": _np(pick(stats["weight"])),
        "mode": np.full(n_rows, mode),
        "alignment": _np(cosine(d, mag * g_norm)),
        "dot": _np(d),
        "share": _np(d.double() / g_norm ** 2) if mode == "position" and g_norm > 0
        else np.full(n_rows, np.nan, dtype=np.float32),
        "magnitude": _np(mag),
        "magnitude_estimated": (np.full(n_rows, estimated, dtype=object) if estimated is not None
                                else np.full(n_rows, None, dtype=object)),
    }
    modules: dict[str, Any] = {k: [] for k in ("sample_idx", "position", "layer", "module", "part", "alignment",
                                                 "dot", "magnitude")}
    if site_dot is not None:
        M = len(sites)
        sd = site_dot.reshape(M, -1).index_select(1, flat.to(site_dot.device))         # (M, rows)
        sm = (site_mag.reshape(M, -1).index_select(1, flat.to(site_mag.device)) if site_mag is not None
              else torch.full_like(sd, float("nan")))
        modules = {
            "sample_idx": np.tile(tokens["sample_idx"], M),
            "position": np.tile(tokens["position"], M),
            "layer": np.repeat(np.array([s.layer for s in sites], dtype=np.int16), n_rows),
            "module": np.repeat(np.array([s.module for s in sites]), n_rows),         # fixed-width str: fast
            "part": np.repeat(np.array([s.part for s in sites]), n_rows),
            "alignment": _np(module_alignment(sd, sm, site_g_norm.to(sm), mag)).reshape(-1),
            "dot": _np(sd).reshape(-1),
            "magnitude": _np(sm).reshape(-1),
        }
    return tokens, modules
