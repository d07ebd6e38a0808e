"""backend.trace.attention_jvp against references it does not share code with: a textbook float64 attention
(repeat_kv, additive finfo.min mask, softmax) and transformers' own eager attention, each differentiated by
torch.func / autograd; end to end, token mode with it against token mode with eager and the naive per-token loop."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch.func import jvp, vmap
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from backend.trace import TraceConfig, trace_batch
from backend.trace import core as trace_core
from backend.trace.attention_jvp import NAME, BlockAttention, attention_forward, token_attention, unsupported
from backend.trace.verify import compare, failures, reference
from tests._tiny_lora import tiny_base_model, tiny_batch, tiny_lora_model

B, H, HKV, T, D = 3, 4, 2, 13, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bool_mask(kind: str) -> torch.Tensor | None:
    """(B, 1, T, T) True = attend: causal and left / right / mixed padding; None: plain causal (SDPA's skip)."""
    if kind == "causal":
        return None
    am = torch.ones(B, T, dtype=torch.bool)
    if kind in ("left", "mixed"):
        am[0, :4] = False                     # queries 0..3 of row 0 see no key at all: fully masked rows
    if kind in ("right", "mixed"):
        am[1, -5:] = False
    return (torch.tril(torch.ones(T, T, dtype=torch.bool))[None] & am[:, None, :])[:, None]


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """What transformers' eager_mask makes of it: 0 where attended, finfo.min elsewhere."""
    if mask is None:
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]
    return torch.where(mask, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def textbook(q, k, v, mask):
    """softmax(Q K^T / sqrt(D) + M) V, K and V repeated per query head, every step in the inputs' dtype."""
    kk, vv = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    S = q @ kk.transpose(-1, -2) * D ** -0.5 + additive(mask, q.dtype)
    return torch.softmax(S, dim=-1) @ vv


class _Attn(torch.nn.Module):
    num_key_value_groups = H // HKV
    is_causal = True


def hf_eager(q, k, v, mask):
    """transformers' Qwen2 eager attention, back to (B, H, T, D)."""
    out = eager_attention_forward(_Attn().eval(), q, k, v, additive(mask, q.dtype), scaling=D ** -0.5)[0]
    return out.transpose(1, 2)


def ours(block):
    def f(q, k, v, mask):
        return attention_forward(_Attn().eval(), q, k, v, mask, scaling=D ** -0.5, block=block)[0].transpose(1, 2)
    return f


def inputs(dtype: torch.dtype, seed: int = 0, C: int | None = None):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, HKV, T, D), (B, HKV, T, D)]
    lead = (C,) if C else ()
    primals = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    tangents = [torch.randn(lead + s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    return primals, tangents


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


CASES = [("float64", torch.float64, textbook, 1e-10), ("float32", torch.float32, hf_eager, 1e-5)]


@pytest.mark.parametrize("name,dtype,ref,tol", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("kind", ["causal", "left", "right", "mixed"])
@pytest.mark.parametrize("block", [1, 5, 64, None])        # 5 does not divide T=13; 64 > T: one block
def test_forward_and_jvp_match_the_reference(name, dtype, ref, tol, kind, block):
    (q, k, v), (dq, dk, dv) = inputs(dtype)
    mask = bool_mask(kind)
    o_ref, t_ref = jvp(lambda *a: ref(*a, mask), (q, k, v), (dq, dk, dv))
    o, t = jvp(lambda *a: ours(block)(*a, mask), (q, k, v), (dq, dk, dv))
    assert torch.isfinite(o).all() and torch.isfinite(t).all()
    assert rel(o, o_ref) < tol and rel(t, t_ref) < tol
    if kind in ("left", "mixed"):                 # the fully masked rows: eager's uniform average, not NaN
        np.testing.assert_allclose(o[0, :, :4].double(), v[0].double().mean(1).repeat_interleave(2, 0)[:, None]
                                   .expand(-1, 4, -1), rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("name,dtype,ref,tol", CASES, ids=[c[0] for c in CASES])
def test_vmapped_jvps_and_batched_backward_match_the_reference(name, dtype, ref, tol):
    (q, k, v), (dq, dk, dv) = inputs(dtype, seed=1, C=3)
    mask = bool_mask("mixed")

    def tangents(fn):
        return vmap(lambda a, b, c: jvp(lambda *x: fn(*x, mask), (q, k, v), (a, b, c))[1])(dq, dk, dv)
    assert rel(tangents(ours(5)), tangents(ref)) < tol
    # a tangent on q only (the others None inside the Function) and on v only
    only_q = jvp(lambda x: ours(4)(x, k, v, mask), (q,), (dq[0],))[1]
    assert rel(only_q, jvp(lambda x: ref(x, k, v, mask), (q,), (dq[0],))[1]) < tol
    only_v = jvp(lambda x: ours(4)(q, k, x, mask), (v,), (dv[0],))[1]
    assert rel(only_v, jvp(lambda x: ref(q, k, x, mask), (v,), (dv[0],))[1]) < tol

    # reverse mode, plain and with batched cotangents (token mode's per-token backward uses is_grads_batched)
    g = torch.Generator().manual_seed(2)
    cot = torch.randn(3, B, H, T, D, generator=g, dtype=torch.float64).to(dtype)
    def grads(fn, batched: bool):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        return torch.autograd.grad(fn(*xs, mask), xs, cot if batched else cot[0], is_grads_batched=batched)

    for batched in (False, True):
        want = grads(ref, batched)
        for block in (5, None):                   # None: one block, whose full-range slice must not alias
            for a, b in zip(grads(ours(block), batched), want):
                assert rel(a, b) < tol


def test_models_it_does_not_cover_fall_back_to_eager_and_calls_it_cannot_compute_raise():
    assert token_attention(tiny_lora_model("qwen2")) == NAME
    assert token_attention(tiny_base_model("llama")) == NAME
    chunked = tiny_base_model("qwen2")
    chunked.config.layer_types = ["chunked_attention", "full_attention"]
    assert token_attention(chunked) == "eager" and "chunked_attention" in unsupported(chunked)
    capped = tiny_base_model("qwen2")
    capped.config.attn_logit_softcapping = 50.0
    assert token_attention(capped) == "eager" and "soft-capping" in unsupported(capped)
    (q, k, v), _ = inputs(torch.float32)
    for kw, what in (({"dropout": 0.1}, "dropout"), ({"softcap": 30.0}, "soft-capping"),
                     ({"s_aux": torch.zeros(H)}, "s_aux")):
        with pytest.raises(ValueError, match=what):
            attention_forward(_Attn().train(), q, k, v, None, scaling=D ** -0.5, **kw)
    with pytest.raises(ValueError, match="block"):
        BlockAttention.apply(q, k, v, None, 1.0, 0, True)


def _dot_grid(res) -> pd.DataFrame:
    return pd.DataFrame(res.tokens).set_index(["sample_idx", "position"])[["dot", "magnitude"]]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_token_mode_with_it_matches_eager_token_mode_and_the_naive_loop(arch, monkeypatch):
    model = tiny_lora_model(arch)
    batch = tiny_batch()                                  # right padding and a left-padded row
    cfg = TraceConfig(mode="token", magnitude="exact")
    res = trace_batch(model, batch, "dft", {}, cfg, step=3)
    assert res.checks["attn_implementation_used"] == NAME and res.checks["attn_implementation_model"] == "sdpa"
    assert model.config._attn_implementation == "sdpa"                 # restored
    assert res.checks["token_dot_jvp_vs_backward_max_rel_err"] < 1e-5
    with monkeypatch.context() as m:
        m.setattr(trace_core, "token_attention", lambda model: "eager")
        eager = trace_batch(model, batch, "dft", {}, cfg, step=3)
    assert eager.checks["attn_implementation_used"] == "eager"
    a, b = _dot_grid(res), _dot_grid(eager)
    assert a.index.equals(b.index) and len(a) > 40
    for col in ("dot", "magnitude"):
        assert np.abs(a[col] - b[col]).max() / np.abs(b[col]).max() < 1e-4
    # the naive loop (one backward per token) run with eager attention: independent of this module's code
    state = copy.deepcopy(res.state)
    state["meta"]["attn_implementation"] = "eager"
    ref = reference(model, [state])
    errs = compare(pd.DataFrame(res.tokens).assign(rank=0), pd.DataFrame(res.modules).assign(rank=0), ref)
    bad = failures({"errors": errs, "checks_reference": ref["checks"], "checks_recorded": res.checks}, 1e-4)
    assert not bad, bad
    assert errs["token_rows_unmatched"] == 0 and errs["module_rows_unmatched"] == 0


def _windowed_qwen2(window: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=window, sliding_window=4, max_window_layers=1,
        attn_implementation="sdpa", layer_types=["full_attention", "sliding_attention" if window else "full_attention"]
    )).eval()


def test_a_sliding_window_comes_in_the_mask_and_matches_eager():
    model = _windowed_qwen2(True)
    assert token_attention(model) == NAME
    batch = tiny_batch()
    inp = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    params = dict(model.named_parameters())
    tangent = {k: torch.randn_like(p) for k, p in params.items()}

    def run(m, attn: str):
        m.set_attn_implementation(attn)
        return jvp(lambda p: torch.func.functional_call(m, p, (), inp).logits, (params,), (tangent,))
    (o, t), (o_ref, t_ref) = run(model, NAME), run(model, "eager")
    assert rel(o, o_ref) < 1e-5 and rel(t, t_ref) < 1e-5
    unwindowed = run(_windowed_qwen2(False), NAME)[0]                 # same weights: the window of 4 binds at T=20
    assert rel(unwindowed, o_ref) > 1e-2
