"""Per-token influence on the eval loss (backend.trace.influence) against naive references: per-position weight
copies (position mode) and one backward per token (token mode), each dotted with an autograd G_eval computed from
the logits by F.cross_entropy; the first-order meaning of the numbers against a real SGD step."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.lm.loss import forward_loss
from backend.lm.schemes import get_scheme
from backend.trace import TraceConfig, discover_lora_modules, trace_batch
from tests._tiny_lora import tiny_batch, tiny_lora_model

TOL = 1e-4
LRS = (0.01, 0.0025, 0.000625)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _eval_batch(seed: int = 11, B: int = 3, T: int = 16) -> dict:
    b = tiny_batch(seed=seed, B=B, T=T)
    return {k: b[k] for k in ("input_ids", "attention_mask", "labels")}


def _lora(model):
    sites = discover_lora_modules(model)
    return sites, [s.param for s in sites]


def naive_eval_grad(model, eval_batch) -> list[torch.Tensor]:
    """grad of the mean cross-entropy over every response token of the eval batch, straight from the logits."""
    _, params = _lora(model)
    logits = model(input_ids=eval_batch["input_ids"], attention_mask=eval_batch["attention_mask"]).logits
    tgt = eval_batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                           ignore_index=-100, reduction="mean")
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def naive_position_pieces(model, batch, scheme: str, params: dict) -> tuple[list, dict]:
    """Every piece P_{b,s,m} of the step's gradient as the gradient of a per-position copy of each LoRA weight:
    the LoRA Linear's output gets + x_{b,s} D_{b,s}^T with D = 0, so dL/dD_{b,s} is position (b, s)'s piece."""
    sites, _ = _lora(model)
    B, T = batch["input_ids"].shape
    deltas, handles = [], []
    for s in sites:
        lin = s.linear
        D = torch.zeros(B, T, lin.out_features, lin.in_features, requires_grad=True)
        deltas.append(D)
        handles.append(lin.register_forward_hook(
            lambda m, i, o, D=D: o + torch.einsum("bti,btoi->bto", i[0], D)))
    try:
        sch = get_scheme(scheme)
        out = forward_loss(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, sch,
                           sch.resolve_params(params))
        pieces = torch.autograd.grad(out.total, deltas)                     # M x (B, T, out, in)
    finally:
        for h in handles:
            h.remove()
    return sites, pieces


def _rows(res) -> dict:
    t = res.tokens
    return {(int(s), int(p)): i for i, (s, p) in enumerate(zip(t["sample_idx"], t["position"]))}


@pytest.mark.parametrize("scheme,params", [("sft", {}), ("antiop", {"clip_mult": 1.0})])
def test_position_influence_matches_per_position_weight_copies(scheme, params):
    model = tiny_lora_model("qwen2")
    model.eval()
    batch, ev = tiny_batch(), _eval_batch()
    res = trace_batch(model, batch, scheme, params, TraceConfig(mode="position"), step=2, eval_batch=ev)
    G_eval = naive_eval_grad(model, ev)
    sites, pieces = naive_position_pieces(model, batch, scheme, params)
    inf = res.influence
    e_norm = float(torch.stack([g.double().norm() for g in G_eval]).norm())
    idx = _rows(res)
    worst = worst_mod = 0.0
    mod = {(int(s), int(p), int(la), str(m), str(pa)): v for s, p, la, m, pa, v in zip(
        inf["modules"]["sample_idx"], inf["modules"]["position"], inf["modules"]["layer"], inf["modules"]["module"],
        inf["modules"]["part"], inf["modules"]["influence"])}
    for (sidx, pos), i in idx.items():
        b = sidx - 100
        per = [float((P[b, pos].double() * E.double()).sum()) for P, E in zip(pieces, G_eval)]
        mag = float(torch.stack([P[b, pos].double().norm() for P in pieces]).norm())
        scale = max(mag * e_norm, 1e-12)
        worst = max(worst, abs(inf["tokens"]["influence"][i] - sum(per)) / scale)
        for s, v in zip(sites, per):
            worst_mod = max(worst_mod, abs(mod[(sidx, pos, s.layer, s.module, s.part)] - v) / scale)
        if mag > 0:
            want = sum(per) / (mag * e_norm)
            assert inf["tokens"]["influence_alignment"][i] == pytest.approx(want, abs=1e-4)
    assert worst < TOL and worst_mod < TOL
    assert len(idx) == len(inf["tokens"]["influence"]) > 20
    # the step's values: cos(G, G_eval), ||G_eval|| and the sum of every position's influence = <G, G_eval>
    G = [res.grad[s.param_name].double() for s in sites]
    g_dot = float(sum((g * e.double()).sum() for g, e in zip(G, G_eval)))
    assert res.influence["step"]["eval_grad_norm"] == pytest.approx(e_norm, rel=1e-5)
    assert res.influence["step"]["g_dot_eval"] == pytest.approx(g_dot, rel=1e-4)
    assert res.checks["influence_sum_rel_err"] < 1e-5


@pytest.mark.parametrize("magnitude,module_rows", [("exact", True), ("none", True), ("sketch", False)])
def test_token_influence_matches_one_backward_per_token(magnitude, module_rows):
    model = tiny_lora_model("qwen2")
    batch, ev = tiny_batch(), _eval_batch()
    cfg = TraceConfig(mode="token", magnitude=magnitude, module_rows=module_rows, sketch_k=8, jvp_chunk=5)
    res = trace_batch(model, batch, "dft", {}, cfg, step=1, eval_batch=ev)
    G_eval = naive_eval_grad(model, ev)
    sites, params = _lora(model)
    model.set_attn_implementation("eager")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lt = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1),
                         reduction="none").view(logits.shape[0], -1)
    e_norm = float(torch.stack([g.double().norm() for g in G_eval]).norm())
    inf = res.influence
    mods = inf["modules"]
    assert (len(mods["influence"]) > 0) == module_rows
    mod = {(int(s), int(p), int(la), str(m), str(pa)): v for s, p, la, m, pa, v in zip(
        mods["sample_idx"], mods["position"], mods["layer"], mods["module"], mods["part"], mods["influence"])}
    worst = 0.0
    for (sidx, pos), i in _rows(res).items():
        g = torch.autograd.grad(lt[sidx - 100, pos], params, retain_graph=True)        # one backward per token
        per = [float((gi.double() * E.double()).sum()) for gi, E in zip(g, G_eval)]
        scale = max(float(torch.stack([gi.double().norm() for gi in g]).norm()) * e_norm, 1e-12)
        worst = max(worst, abs(inf["tokens"]["influence"][i] - sum(per)) / scale)
        if module_rows:
            for s, v in zip(sites, per):
                worst = max(worst, abs(mod[(sidx, pos, s.layer, s.module, s.part)] - v) / scale)
    assert worst < TOL


@pytest.mark.parametrize("mode", ["position", "token"])
def test_an_eval_set_equal_to_the_traced_batch_gives_influence_equal_to_dot(mode):
    model = tiny_lora_model("qwen2")
    batch = tiny_batch()
    ev = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    res = trace_batch(model, batch, "sft", {}, TraceConfig(mode=mode), eval_batch=ev)
    scale = np.abs(res.tokens["dot"]).max()
    np.testing.assert_allclose(res.influence["tokens"]["influence"], res.tokens["dot"], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(res.influence["tokens"]["influence_alignment"], res.tokens["alignment"],
                               rtol=0, atol=1e-5)
    assert res.influence["step"]["eval_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_micro_batched_traced_subset_sums_to_the_processed_part():
    model = tiny_lora_model("qwen2")
    res = trace_batch(model, tiny_batch(), "topk", {"keep_ratio": 0.5},
                      TraceConfig(mode="position", micro_batch_size=2, max_sequences=2), eval_batch=_eval_batch())
    assert res.checks["micro_batches"] == 2 and res.checks["micro_batches_traced"] == 1
    assert res.checks["influence_sum_rel_err"] < 1e-5
    assert set(res.influence["tokens"]["sample_idx"]) == {100, 101}


def _eval_loss(model, ev) -> float:
    with torch.no_grad():
        logits = model(input_ids=ev["input_ids"], attention_mask=ev["attention_mask"]).logits.double()
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ev["labels"][:, 1:].reshape(-1),
                                     ignore_index=-100))


@pytest.mark.parametrize("mode", ["position", "token"])
def test_first_order_change_of_the_eval_loss_under_an_sgd_step(mode):
    """theta' = theta - lr G: the eval loss changes by -lr <G, G_eval> + O(lr^2), i.e. by -lr x the sum of the
    influences (position mode: of every position; token mode: w_t / N weighted over the loss terms). The relative
    error of the first-order prediction is O(lr): measured (float64, both modes) 5.0e-2 at lr 0.01, 1.3e-2 at
    0.0025 and 3.5e-3 at 0.000625 (3.8x smaller per quartering); so it must be under 10% at lr 0.01 and fall by
    more than 3x with each quartering of lr. (Right-padded rows only: transformers' eager attention in float64 turns a left-padded row into NaN.)"""
    model = tiny_lora_model("qwen2").double()
    model.eval()
    head = lambda b, k: {key: v[:k] for key, v in b.items()}            # noqa: E731  (the last row is left-padded)
    batch, ev = head(tiny_batch(), 3), head(_eval_batch(), 2)
    res = trace_batch(model, batch, "sft", {}, TraceConfig(mode=mode), eval_batch=ev)
    if mode == "position":
        total = float(np.sum(res.influence["tokens"]["influence"], dtype=np.float64))
    else:
        out = forward_loss(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
                           get_scheme("sft"), {})
        w = (out.weights * out.mask).double() / out.normaliser.double()
        t = res.influence["tokens"]
        total = float(sum(w[s - 100, p] * v for s, p, v in zip(t["sample_idx"], t["position"], t["influence"])))
    assert total == pytest.approx(res.influence["step"]["g_dot_eval"], rel=1e-4)
    sites, params = _lora(model)
    base = _eval_loss(model, ev)
    errs = []
    for lr in LRS:
        with torch.no_grad():
            for s, p in zip(sites, params):
                p.sub_(lr * res.grad[s.param_name].to(p.dtype))
        measured = _eval_loss(model, ev) - base
        with torch.no_grad():
            for s, p in zip(sites, params):
                p.add_(lr * res.grad[s.param_name].to(p.dtype))
        errs.append(abs(measured - (-lr * total)) / abs(lr * total))
    assert errs[0] < 0.1, errs
    assert errs[1] < errs[0] / 3 and errs[2] < errs[1] / 3, errs


def test_a_bad_eval_batch_is_refused_with_the_reason():
    model = tiny_lora_model("qwen2")
    ev = _eval_batch()
    ev["labels"][:] = -100
    with pytest.raises(ValueError, match="no response tokens"):
        trace_batch(model, tiny_batch(), "sft", {}, TraceConfig(mode="position"), eval_batch=ev)
    with pytest.raises(ValueError, match="lacks"):
        trace_batch(model, tiny_batch(), "sft", {}, TraceConfig(mode="position"),
                    eval_batch={"input_ids": ev["input_ids"]})


@pytest.mark.parametrize("mode", ["position", "token"])
def test_verify_recomputes_influence_from_the_saved_state(mode):
    """backend.trace.verify's reference (materialised pieces / one backward per token, G_eval from the saved eval
    batch) agrees with the recorded influence, tokens and modules; a wrong value is caught."""
    import pandas as pd

    from backend.trace.verify import compare, reference
    model = tiny_lora_model("qwen2")
    res = trace_batch(model, tiny_batch(), "sft", {}, TraceConfig(mode=mode), step=3, eval_batch=_eval_batch())
    ref = reference(model, [res.state])
    key, mkey = ["rank", "sample_idx", "position"], ["rank", "sample_idx", "position", "layer", "module", "part"]
    tokens = pd.DataFrame(res.tokens).assign(rank=0).merge(pd.DataFrame(res.influence["tokens"]).assign(rank=0),
                                                           on=key)
    modules = pd.DataFrame(res.modules).assign(rank=0).merge(
        pd.DataFrame(res.influence["modules"]).assign(rank=0), on=mkey)
    errs = compare(tokens, modules, ref)
    assert errs["influence"] < TOL and errs["influence_alignment"] < TOL and errs["module_influence"] < TOL, errs
    tokens.loc[5, "influence"] += 0.1 * abs(tokens["influence"]).max()
    assert compare(tokens, modules, ref)["influence"] > 1e-3
