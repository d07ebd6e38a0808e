"""Exact attention with a hand-written forward-mode rule, computed blockwise over query rows: token mode's JVP
pass in memory linear in the sequence length.

    from backend.trace.attention_jvp import NAME, token_attention
    attn = token_attention(model)           # "tokviz_jvp", or "eager" for models it does not cover (and why)
    model.set_attn_implementation(attn)     # core.traced_network does this for the token-mode passes only

SDPA has no forward-mode derivative and eager attention keeps B x H x T^2 scores and their tangents. ``BlockAttention``
is a ``torch.autograd.Function`` whose forward is SDPA's fused kernel (blockwise for an additive float mask or a
half dtype) and whose ``jvp`` and ``backward`` loop over blocks of query rows; per block (queries b, keys Tk,
compute dtype float32 or wider):

    S = Q_b K^T * scale, masked          P = softmax(S)              O_b = P V
    dS = (dQ_b K^T + Q_b dK^T) * scale   dP = P * (dS - rowsum(P * dS))   dO_b = dP V + P dV          (jvp)
    dV += P^T dO_b   dP = dO_b V^T   dS = P * (dP - rowsum(P * dP)) * scale   dQ_b = dS K   dK += dS^T Q_b (backward)

so what lives at a time is O(B x H x b x Tk), ``b`` from a budget of ``BLOCK_ELEMENTS`` score entries. The
backward stays blockwise: SDPA's backward re-run by ``autograd.grad`` inside it gives wrong per-token gradients
under ``is_grads_batched``, without an error. It works under ``torch.func.jvp`` and ``vmap(jvp)``
(``generate_vmap_rule``) and under ``autograd.grad(..., is_grads_batched=True)``. GQA: query head h reads
key/value head h // (H / Hkv), as ``repeat_kv``, without copying K and V. Masks are those transformers builds
for SDPA (boolean, True = attend; None = causal), registered for ``NAME`` in ``AttentionMaskInterface``; an
additive float mask is added as eager adds it.

Rows with every key masked (left padding's padding queries) follow eager exactly: eager adds finfo.min to every
score, which rounds them all to the same value, so P is uniform over the keys (a finite value, not NaN), while the
tangent is that of softmax(S) over all keys (the mask is a constant). Masked entries of other rows have P = 0, so
no tangent flows through them either way.

Not covered (``token_attention`` answers "eager" for these models; the attention function raises ValueError if
called with them anyway): attention dropout active (token mode runs in eval mode: ``TraceConfig`` refuses dropout
there), logit soft-capping, attention sinks, relative position bias, layer types other than full and sliding
attention. Sliding windows are covered as SDPA covers them: transformers puts the window into the boolean mask.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "tokviz_jvp"
BLOCK_ELEMENTS = 1 << 22          # score entries (B x H x b x Tk) per block: 16 MB in float32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (eager's softmax runs in float32 too), the input's own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def block_rows(B: int, H: int, Tq: int, Tk: int, block: int | None = None) -> int:
    """Query rows per block: ``block`` if given, else as many as ``BLOCK_ELEMENTS`` score entries allow."""
    if block is not None:
        if block < 1:
            raise ValueError(f"block={block} must be a positive number of query rows")
        return min(block, Tq)
    return max(1, min(Tq, BLOCK_ELEMENTS // max(1, B * H * Tk)))


class _Layout:
    """Shapes of one call: q (B, H, Tq, D), k/v (B, Hkv, Tk, D), G = H // Hkv query heads per key head."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, block: int | None,
                 causal: bool):
        self.B, self.H, self.Tq, self.D = q.shape
        self.Hkv, self.Tk = k.shape[1], k.shape[2]
        assert self.H % self.Hkv == 0, f"{self.H} query heads over {self.Hkv} key/value heads"
        self.G = self.H // self.Hkv
        self.scale, self.causal, self.mask = scale, causal, mask
        self.rows = block_rows(self.B, self.H, self.Tq, self.Tk, block)

    def blocks(self):
        for i0 in range(0, self.Tq, self.rows):
            yield i0, min(i0 + self.rows, self.Tq)

    def grouped(self, x: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
        """Query-side rows i0:i1 of x (B, H, Tq, D) as (B, Hkv, G*b, D): the G heads sharing a key head stacked."""
        x = x.reshape(self.B, self.Hkv, self.G, self.Tq, -1)
        if (i0, i1) != (0, self.Tq):          # a full slice is an alias, which functorch cannot batch (backward
            x = x[:, :, :, i0:i1]             # under is_grads_batched)
        return x.reshape(self.B, self.Hkv, self.G * (i1 - i0), -1)

    def probs(self, q: torch.Tensor, kT: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
        """P of query rows i0:i1, (B, Hkv, G*b, Tk), in the compute dtype."""
        b = i1 - i0
        S = (self.grouped(q, i0, i1) @ kT) * self.scale                              # (B, Hkv, G*b, Tk)
        S = S.reshape(self.B, self.Hkv, self.G, b, self.Tk)
        m = self.mask
        if m is not None:
            m = m[..., i0:i1, :]                                                     # (Bm, Hm, b, Tk)
            m = m.unsqueeze(2) if m.shape[1] == 1 else m.reshape(m.shape[0], self.Hkv, self.G, b, self.Tk)
            if m.dtype == torch.bool:
                S = S.masked_fill(~m, torch.finfo(S.dtype).min)
            else:
                S = S + m.to(S.dtype)                                                # additive, as eager
        elif self.causal:                                # key j is visible to query i when j <= i + (Tk - Tq)
            qi = torch.arange(i0, i1, device=S.device)[:, None] + (self.Tk - self.Tq)
            S = S.masked_fill(torch.arange(self.Tk, device=S.device)[None, :] > qi, torch.finfo(S.dtype).min)
        return torch.softmax(S, dim=-1).reshape(self.B, self.Hkv, self.G * b, self.Tk)

    def ungroup(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Per-block (B, Hkv, G*b, D) results back to (B, H, Tq, D)."""
        parts = [x.reshape(self.B, self.Hkv, self.G, -1, self.D) for x in blocks]
        return torch.cat(parts, dim=3).reshape(self.B, self.H, self.Tq, self.D)


def _fused_ok(lay: _Layout, dtype: torch.dtype) -> bool:
    """SDPA computes the same attention: a boolean mask, or none with causal alignment it shares (Tq == Tk), in
    float32 or float64. Half types take the blockwise path in float32, as eager's softmax: a fused half kernel
    rounds a sequence's rows differently from those of its prefix (the exact magnitudes' passes), which put the
    tracer 1-4% off its own reference in bfloat16 (eager and the float32 path: 0)."""
    m = lay.mask
    return _compute_dtype(dtype) == dtype and (
        (m is None and (not lay.causal or lay.Tq == lay.Tk)) or (m is not None and m.dtype == torch.bool))


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """The attention by SDPA's fused kernel; rows with no visible key get eager's value, the mean of V (SDPA
    gives 0 there)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=lay.mask, is_causal=lay.mask is None and lay.causal, scale=lay.scale,
        enable_gqa=lay.G > 1)                                                      # (B, H, Tq, D)
    if lay.mask is not None:            # no data-dependent branch: this may run under vmap
        dead = ~lay.mask.any(-1, keepdim=True)                                     # (Bm, Hm, Tq, 1)
        out = torch.where(dead, v.mean(2, keepdim=True).repeat_interleave(lay.G, 1), out)
    return out


class BlockAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + mask) V over (B, H, Tq, D) queries and (B, Hkv, Tk, D) keys/values, with a
    blockwise ``jvp`` and ``backward``. ``apply(q, k, v, mask, scale, block, causal)``; ``block`` None: from the
    ``BLOCK_ELEMENTS`` budget."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                block: int | None, causal: bool) -> torch.Tensor:
        lay = _Layout(q, k, mask, scale, block, causal)
        if _fused_ok(lay, q.dtype):
            return _fused(q, k, v, lay)
        cd = _compute_dtype(q.dtype)
        qc, kT, vc = q.to(cd), k.to(cd).transpose(-1, -2), v.to(cd)                  # kT (B, Hkv, D, Tk)
        out = [lay.probs(qc, kT, i0, i1) @ vc for i0, i1 in lay.blocks()]          # (B, Hkv, G*b, D) each
        return lay.ungroup(out).to(q.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        q, k, v, mask, scale, block, causal = inputs
        ctx.save_for_backward(q, k, v, mask)
        ctx.save_for_forward(q, k, v, mask)
        ctx.scale, ctx.block, ctx.causal = scale, block, causal
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx: Any, dq: torch.Tensor | None, dk: torch.Tensor | None, dv: torch.Tensor | None, *_: Any
            ) -> torch.Tensor:
        q, k, v, mask = ctx.saved_tensors
        lay = _Layout(q, k, mask, ctx.scale, ctx.block, ctx.causal)
        cd = _compute_dtype(q.dtype)
        qc, kT, vc = q.to(cd), k.to(cd).transpose(-1, -2), v.to(cd)
        dkT = dk.to(cd).transpose(-1, -2) if dk is not None else None                # (B, Hkv, D, Tk)
        dvc = dv.to(cd) if dv is not None else None
        dqc = dq.to(cd) if dq is not None else None
        out = []
        for i0, i1 in lay.blocks():
            P = lay.probs(qc, kT, i0, i1)                                            # (B, Hkv, G*b, Tk)
            dS = None                                                                # (B, Hkv, G*b, Tk)
            if dqc is not None:
                dS = lay.grouped(dqc, i0, i1) @ kT
            if dkT is not None:
                t = lay.grouped(qc, i0, i1) @ dkT
                dS = t if dS is None else dS + t
            dO = None
            if dS is not None:
                dS = dS * lay.scale
                dP = P * (dS - (P * dS).sum(-1, keepdim=True))     # zero where P is: masked keys carry none
                dO = dP @ vc
            if dvc is not None:
                t = P @ dvc
                dO = t if dO is None else dO + t
            if dO is None:
                dO = torch.zeros(lay.B, lay.Hkv, lay.G * (i1 - i0), lay.D, dtype=cd, device=q.device)
            out.append(dO)
        return lay.ungroup(out).to(q.dtype)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None) -> tuple:
        q, k, v, mask = ctx.saved_tensors
        none = (None,) * 4
        if dout is None:
            return (None, None, None) + none
        lay = _Layout(q, k, mask, ctx.scale, ctx.block, ctx.causal)
        cd = _compute_dtype(q.dtype)
        qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
        kT, vT = kc.transpose(-1, -2), vc.transpose(-1, -2)
        do = dout.to(cd)
        dq, dk, dv = [], None, None
        # accumulated out of place: under is_grads_batched the gradients are batched tensors
        for i0, i1 in lay.blocks():
            P = lay.probs(qc, kT, i0, i1)                                            # (B, Hkv, G*b, Tk)
            dOb = lay.grouped(do, i0, i1)                                            # (B, Hkv, G*b, D)
            t = P.transpose(-1, -2) @ dOb                                            # (B, Hkv, Tk, D)
            dv = t if dv is None else dv + t
            dP = dOb @ vT
            dS = P * (dP - (P * dP).sum(-1, keepdim=True)) * lay.scale
            dq.append(dS @ kc)
            t = dS.transpose(-1, -2) @ lay.grouped(qc, i0, i1)
            dk = t if dk is None else dk + t
        return lay.ungroup(dq).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *none


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, is_causal: bool | None = None, block: int | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature (as ``eager_attention_forward``): query (B, H, Tq, D), key and
    value (B, Hkv, Tk, D) -> ((B, Tq, H, D), None). A sliding window is in the mask, as for SDPA (``sliding_window``
    is not read). Raises ValueError for what it does not compute."""
    if dropout and module.training:
        raise ValueError(f"{NAME} attention computes no dropout (p={dropout}): trace in eval mode or use eager")
    if softcap:
        raise ValueError(f"{NAME} attention has no logit soft-capping (softcap={softcap}): use eager")
    for what in ("s_aux", "position_bias"):
        if kwargs.get(what) is not None:
            raise ValueError(f"{NAME} attention takes no {what} (attention sinks, relative position bias): use eager")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    causal = attention_mask is None and query.shape[2] > 1 and causal                # as SDPA's integration
    out = BlockAttention.apply(query, key, value, attention_mask, float(scale), block, causal)   # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """SDPA's boolean mask (None for a plain causal one, which the attention builds per block)."""
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, _mask)


def unsupported(model: torch.nn.Module) -> str | None:
    """Why ``NAME`` cannot run ``model``'s attention (None: it can)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "the model has no config"
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is not None and not can():
        return f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface"
    if getattr(cfg, "attn_logit_softcapping", None):
        return f"attention logit soft-capping ({cfg.attn_logit_softcapping})"
    other = sorted(set(getattr(cfg, "layer_types", None) or []) - {"full_attention", "sliding_attention"})
    if other:                        # sliding windows come in SDPA's mask; other patterns are not checked here
        return f"layer types {other}"
    return None


def token_attention(model: torch.nn.Module) -> str:
    """The attention implementation for token mode's passes: ``NAME`` where it computes the model's attention,
    else "eager" (a forward-mode derivative, memory quadratic in T)."""
    return "eager" if unsupported(model) is not None else NAME
