"""Per-position gradient sketches (backend.trace.sketch) against pieces materialised naively (per-position weight
copies, tests/test_influence.py): the factored sketch equals the projection of the naive piece (every kind, every
hook path: fused lora_A groups, one site at a time, micro-batches, the real training step); over many
projection seeds the sketch inner products are unbiased for the pieces' inner products, with the variance the
module docstring derives (groups sharing a hidden-side projection, rows sharing a hidden-side functional) and an
error within its bound at k=128 and k=512; projections depend on (seed, site) only; sketches off changes nothing
else; the token_sketches shard round-trips through Parquet and the index."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from backend import index
from backend.jobs.train import TrainConfig
from backend.trace import InlineTrace, TraceConfig, discover_lora_modules, trace_batch
from backend.trace import config as trace_config
from backend.trace import sketch as sketch_mod
from backend.trace.sketch import predicted_variance, projection
from tests._sketch_ref import max_rel, naive_sketch
from tests._tiny_lora import tiny_batch, tiny_lora_model
from tests.test_influence import naive_position_pieces

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def traced():
    """A tiny model's pieces at its recorded positions: sites, per-site (n, out, in) float64, the trace."""
    torch.set_num_threads(1)
    model = tiny_lora_model("qwen2")
    model.eval()
    batch = tiny_batch()
    res = trace_batch(model, batch, "sft", {}, TraceConfig(mode="position"), step=3)
    sites, pieces = naive_position_pieces(model, batch, "sft", {})
    b = torch.as_tensor(res.tokens["sample_idx"] - 100, dtype=torch.long)
    s = torch.as_tensor(res.tokens["position"], dtype=torch.long)
    P = [p[b, s].double() for p in pieces]                                   # M x (n, out, in)
    return {"model": model, "batch": batch, "sites": sites, "P": P, "res": res}


def many_sketches(sites, P, seeds: range, k: int, kind: str = "gaussian") -> torch.Tensor:
    """(n, len(seeds) * k) float64: naive sketches for many seeds in one product per site, each site's rows
    a_j (x) b_j laid out as an (out * in, seeds * k) matrix."""
    out = 0
    for site, Pm in zip(sites, P):
        ab = [projection(seed, site, k, kind=kind) for seed in seeds]
        A = torch.cat([a for a, _ in ab]).double()                          # (S k, out)
        B = torch.cat([b for _, b in ab]).double()                          # (S k, in)
        R = (A.T[:, None, :] * B.T[None, :, :]).reshape(-1, A.shape[0])      # (out in, S k)
        out = out + Pm.reshape(Pm.shape[0], -1) @ R
    return out / math.sqrt(k)


# ---- the factored sketch is the projection of the piece ------------------------------------------------------

@pytest.mark.parametrize("scheme,params,kind", [("sft", {}, "gaussian"), ("antiop", {"clip_mult": 1.0}, "gaussian"),
                                                ("sft", {}, "gaussian-full"), ("sft", {}, "sparse"),
                                                ("antiop", {"clip_mult": 1.0}, "sparse")])
def test_factored_sketch_equals_the_projection_of_the_naive_piece(scheme, params, kind):
    model = tiny_lora_model("qwen2")
    model.eval()
    batch = tiny_batch()
    res = trace_batch(model, batch, scheme, params,
                      TraceConfig(mode="position", sketch_dim=32, seed=5, sketch_kind=kind), step=1)
    sites, pieces = naive_position_pieces(model, batch, scheme, params)
    b = torch.as_tensor(res.tokens["sample_idx"] - 100, dtype=torch.long)
    s = torch.as_tensor(res.tokens["position"], dtype=torch.long)
    want = naive_sketch(sites, [p[b, s].double() for p in pieces], seed=5, k=32, kind=kind)
    assert res.sketch.shape == (len(res.tokens["dot"]), 32) and res.sketch.dtype == np.float32
    assert max_rel(res.sketch, want) < 1e-5


def test_micro_batched_subset_and_inline_sketches_equal_the_naive_projection():
    """Given-G path (micro-batches, lora_A one site at a time), only the traced sequences sketched; and the
    real training step's backward (InlineTrace, lora_A sites grouped by input)."""
    model = tiny_lora_model("qwen2")
    model.eval()
    batch = tiny_batch()
    # G is the gradient of the mean of the 2 micro-batch losses: a piece is its micro-batch loss's piece / 2
    halves = [naive_position_pieces(model, {k: v[i:i + 2] for k, v in batch.items()}, "sft", {}) for i in (0, 2)]
    sites = halves[0][0]
    pieces = [torch.cat([h0, h1]) / 2 for h0, h1 in zip(halves[0][1], halves[1][1])]
    for kind in ("gaussian", "gaussian-full"):
        cfg = TraceConfig(mode="position", sketch_dim=16, micro_batch_size=2, max_sequences=3, sketch_kind=kind)
        res = trace_batch(model, batch, "sft", {}, cfg, step=2)
        assert set(res.tokens["sample_idx"]) == {100, 101, 102}
        b = torch.as_tensor(res.tokens["sample_idx"] - 100, dtype=torch.long)
        s = torch.as_tensor(res.tokens["position"], dtype=torch.long)
        assert max_rel(res.sketch, naive_sketch(sites, [p[b, s].double() for p in pieces], 0, 16, kind)) < 1e-5, kind

    sites, pieces = naive_position_pieces(model, batch, "sft", {})

    from backend.lm.loss import forward_loss
    from backend.lm.schemes import get_scheme
    for kind in ("gaussian", "gaussian-full", "sparse"):
        tr = InlineTrace(model, TraceConfig(mode="position", inline=True, sketch_dim=16, sketch_kind=kind), step=2)
        with tr:
            out = forward_loss(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
                               get_scheme("sft"), {})
            out.total.backward()
        res = tr.result(batch, out, "sft", {})
        model.zero_grad(set_to_none=True)
        b = torch.as_tensor(res.tokens["sample_idx"] - 100, dtype=torch.long)
        s = torch.as_tensor(res.tokens["position"], dtype=torch.long)
        want = naive_sketch(sites, [p[b, s].double() for p in pieces], 0, 16, kind=kind)
        assert max_rel(res.sketch, want) < 1e-5, kind


# ---- statistics over projection seeds (fixed seeds: deterministic) --------------------------------------------

@pytest.mark.parametrize("k,n_seeds,kind", [(128, 100, "gaussian"), (512, 25, "gaussian"),
                                             (128, 100, "gaussian-full")])
def test_sketch_inner_products_are_unbiased_with_the_stated_variance(traced, k, n_seeds, kind):
    """Over projection seeds: the mean of <sk(P), sk(P')> is <P, P'> (z-scores against the predicted standard
    error), the empirical variance is the docstring's (q/k/v and gate/up fused, rows sharing hidden-side
    functionals), and the rms relative error (over ||P|| ||P'||) is what the formula predicts and below the
    worst-case bound sqrt((6 + 2 share)/k)."""
    sites, P = traced["sites"], traced["P"]
    n = P[0].shape[0]
    flat = torch.cat([p.reshape(n, -1) for p in P], 1)
    exact = flat @ flat.T                                                    # (n, n) <P, P'>
    norm = flat.norm(dim=1)
    assert bool((norm > 0).all())
    scale = norm[:, None] * norm[None, :]
    sk = many_sketches(sites, P, range(n_seeds), k, kind).view(n, n_seeds, k).transpose(0, 1)   # (S, n, k)
    est = sk @ sk.transpose(1, 2)                                            # (S, n, n)
    var = predicted_variance(P, k, kind, sites)
    bound = math.sqrt((6 + 2 * sketch_mod.row_share(kind, k)) / k)
    iu = torch.triu_indices(n, n)

    def pick(m: torch.Tensor) -> torch.Tensor:                               # the n(n+1)/2 pairs (upper triangle)
        return m[..., iu[0], iu[1]]

    z = pick((est.mean(0) - exact) / (var.sqrt() / math.sqrt(n_seeds)))
    assert abs(float(z.mean())) < 0.15 and 0.8 < float(z.square().mean().sqrt()) < 1.25
    assert float(z.abs().max()) < 6.0
    if n_seeds >= 100:                                                       # enough draws to check the variance
        ratio = pick(est.var(0) / var)
        assert 0.85 < float(ratio.mean()) < 1.15
    rms = float(pick((est - exact) / scale).square().mean().sqrt())
    predicted = float(pick(var / scale.square()).mean().sqrt())
    assert abs(rms / predicted - 1) < 0.1
    assert rms < bound and float(pick(var.sqrt() / scale).max()) <= bound
    # with 28 sites (22 groups) the rank-one and shared-row excess is small: near a dense projection's error
    assert rms < 1.2 * math.sqrt(2 / k)


def test_variance_formula_against_a_hand_computed_single_site_case():
    """One site, P = P' = g u^T: Var ||sk||^2 = (1/k)(1 + 1 + 2 + (1 + share)(1 + 1)) ||P||^4: 8 ||P||^4 / k with
    independent rows (gaussian-full; gaussian below k = 64), 10 / k with a hidden-side functional per 2 rows
    (gaussian, k = 64), 14 / k per 4 rows (gaussian, k = 128); orthogonal g and orthogonal u:
    Var <sk(P), sk(P')> = ||P||^2 ||P'||^2 / k for all."""
    g, u = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 3.0])
    g2, u2 = torch.tensor([0.0, 0.0, 5.0]), torch.tensor([1.0, 0.0])
    P = torch.stack([torch.outer(g, u), torch.outer(g2, u2)])                # (2 positions, 3, 2): one site
    n1, n2 = (5.0 * 9.0), (25.0 * 1.0)                                      # ||P||^2
    for kind, k, c in (("gaussian-full", 4, 8), ("gaussian", 4, 8), ("gaussian", 64, 10), ("gaussian", 128, 14)):
        var = predicted_variance([P], k=k, kind=kind)
        assert torch.allclose(var[0, 0], torch.tensor(c * n1 * n1 / k, dtype=torch.float64)), (kind, k)
        assert torch.allclose(var[0, 1], torch.tensor(n1 * n2 / k, dtype=torch.float64)), (kind, k)
    ks = (16, 32, 64, 96, 100, 128, 130, 512)
    assert [sketch_mod.row_share("gaussian", k) for k in ks] == [1, 1, 2, 2, 2, 4, 2, 4]
    assert {sketch_mod.row_share(kind, k) for kind in ("gaussian-full", "sparse") for k in ks} == {1}


def test_variance_of_a_shared_hidden_projection_against_monte_carlo_on_hand_made_sites(monkeypatch):
    """Three lora_A sites in one group (q/k/v: one b) fed by different inputs (as with dropout), one o_proj
    lora_A and one lora_B, k = 8 (two rows per hidden-side functional): the sketch computed from fresh
    standard normal factors laid out as the module doc says (not through the Sketcher), over 20000 draws, has
    mean <P, P'> and the variance predicted_variance gives for every pair of 3 positions (the share is forced to
    2 here: row_share would use 1 at so small a k)."""
    from types import SimpleNamespace
    gen = torch.Generator().manual_seed(0)
    d, r, n, k, S = 6, 2, 3, 8, 20000
    layout = [("q_proj", "lora_A", (r, d)), ("k_proj", "lora_A", (r, d)), ("v_proj", "lora_A", (r, d)),
              ("o_proj", "lora_A", (r, d)), ("o_proj", "lora_B", (d, r))]
    sites = [SimpleNamespace(layer=0, module=m, part=p, param=torch.empty(shape)) for m, p, shape in layout]
    xs = [torch.randn(n, r, generator=gen, dtype=torch.float64) for _ in layout]          # rank side
    ys = [torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in layout]          # hidden side
    ys[1] = ys[0] + 0.5 * ys[1]                                                            # correlated inputs
    P = [torch.einsum("na,nh->nah", x, y) if p == "lora_A" else torch.einsum("nh,na->nha", y, x)
         for (_, p, _), x, y in zip(layout, xs, ys)]
    kw = 4
    monkeypatch.setattr(trace_config, "SKETCH_MIN_WIDE", 4)
    assert sketch_mod.row_share("gaussian", k) == k // kw
    b_attn = torch.randn(S, kw, d, generator=gen, dtype=torch.float64)                   # shared by q, k, v
    sk = 0
    for m, (x, y) in enumerate(zip(xs, ys)):
        a = torch.randn(S, k, r, generator=gen, dtype=torch.float64)
        b = b_attn if m < 3 else torch.randn(S, kw, d, generator=gen, dtype=torch.float64)
        beta = torch.einsum("swh,nh->swn", b, y).repeat(1, k // kw, 1)                   # row j: b_{j mod kw}
        sk = sk + torch.einsum("sja,na->sjn", a, x) * beta
    sk = sk / math.sqrt(k)                                                                # (S, k, n)
    est = torch.einsum("sjp,sjq->spq", sk, sk)                                            # (S, n, n)
    flat = torch.cat([p.reshape(n, -1) for p in P], 1)
    var = predicted_variance(P, k, "gaussian", sites)
    z = (est.mean(0) - flat @ flat.T) / (var / S).sqrt()
    assert float(z.abs().max()) < 4.5
    assert float((est.var(0) / var - 1).abs().max()) < 0.1
    # sharing matters: the formula without the groups (every site its own b) is measurably off
    alone = predicted_variance(P, k, "gaussian")
    assert float((alone / var - 1).abs().max()) > 0.2


def test_sparse_micro_batched_subset_sketch_equals_the_naive_projection():
    """sketch_kind="sparse" on the given-G path (micro-batches, lora_A sites one at a time), 3 of 4 sequences."""
    model = tiny_lora_model("qwen2")
    model.eval()
    batch = tiny_batch()
    cfg = TraceConfig(mode="position", sketch_dim=16, micro_batch_size=2, max_sequences=3, sketch_kind="sparse")
    res = trace_batch(model, batch, "sft", {}, cfg, step=2)
    halves = [naive_position_pieces(model, {k: v[i:i + 2] for k, v in batch.items()}, "sft", {}) for i in (0, 2)]
    sites = halves[0][0]
    pieces = [torch.cat([h0, h1]) / 2 for h0, h1 in zip(halves[0][1], halves[1][1])]
    b = torch.as_tensor(res.tokens["sample_idx"] - 100, dtype=torch.long)
    s = torch.as_tensor(res.tokens["position"], dtype=torch.long)
    assert max_rel(res.sketch, naive_sketch(sites, [p[b, s].double() for p in pieces], 0, 16, "sparse")) < 1e-5


def test_sparse_projection_is_a_count_sketch_of_the_wide_side():
    """Each wide-side coordinate (in for lora_A, out for lora_B) has exactly one nonzero, +-sqrt(k), across the
    k rows; the narrow side is dense. E over rows of b_j b_j^T / ... is checked by the unbiasedness test."""
    sites = discover_lora_modules(tiny_lora_model("qwen2"))
    for site in (next(s for s in sites if s.part == "lora_A"), next(s for s in sites if s.part == "lora_B")):
        a, b = projection(3, site, 16, kind="sparse")
        out_f, in_f = site.param.shape
        assert a.shape == (16, out_f) and b.shape == (16, in_f)
        wide, narrow = (b, a) if in_f >= out_f else (a, b)
        assert bool(((wide != 0).sum(0) == 1).all())
        assert torch.allclose(wide.abs().sum(0), torch.full((wide.shape[1],), 4.0))             # sqrt(k)
        assert bool((narrow != 0).all())


def test_sparse_dense_product_path_used_on_cuda_equals_the_scatter_add():
    """Off the CPU the sparse Sketcher multiplies by the dense +-1 count-sketch matrix (index_add_ is not
    deterministic on CUDA); forced here on the CPU, it gives the scatter-add's sketches, and both the naive one."""
    from backend.trace.sketch import Sketcher
    sites = discover_lora_modules(tiny_lora_model("qwen2"))
    scatter, dense = Sketcher(sites, 16, 4, kind="sparse"), Sketcher(sites, 16, 4, kind="sparse")
    dense.cdense = [torch.zeros(h.shape[0], 16).index_put_((torch.arange(h.shape[0]), h), sign)
                    for _, h, sign in dense.proj]
    gen = torch.Generator().manual_seed(0)
    pieces = []
    for i, site in enumerate(sites):
        out_f, in_f = site.param.shape
        u, g = torch.randn(6, in_f, generator=gen), torch.randn(6, out_f, generator=gen)
        scatter.add(0, i, u, g)
        dense.add(0, i, u, g)
        pieces.append(torch.einsum("no,ni->noi", g, u).double())                        # (6, out, in)
    assert max_rel(dense.result(), scatter.result()) < 1e-6
    assert max_rel(scatter.result().T, naive_sketch(sites, pieces, 4, 16, "sparse")) < 1e-5


@pytest.mark.parametrize("k,n_seeds", [(128, 100)])
def test_sparse_sketch_inner_products_are_unbiased_with_the_stated_variance(traced, k, n_seeds):
    """As the gaussian test, for sketch_kind="sparse": unbiased, empirical variance = predicted_variance(kind=
    "sparse"), rms relative error as predicted; and the sparse error is at least the gaussian one's (its variance
    adds a non-negative term for k >= 5)."""
    sites, P = traced["sites"], traced["P"]
    n = P[0].shape[0]
    flat = torch.cat([p.reshape(n, -1) for p in P], 1)
    exact = flat @ flat.T
    norm = flat.norm(dim=1)
    scale = norm[:, None] * norm[None, :]
    sk = many_sketches(sites, P, range(n_seeds), k, "sparse").view(n, n_seeds, k).transpose(0, 1)   # (S, n, k)
    est = sk @ sk.transpose(1, 2)
    var = predicted_variance(P, k, "sparse")
    iu = torch.triu_indices(n, n)

    def pick(m: torch.Tensor) -> torch.Tensor:
        return m[..., iu[0], iu[1]]

    z = pick((est.mean(0) - exact) / (var.sqrt() / math.sqrt(n_seeds)))
    assert abs(float(z.mean())) < 0.15 and 0.8 < float(z.square().mean().sqrt()) < 1.25
    assert float(z.abs().max()) < 6.0
    ratio = pick(est.var(0) / var)
    assert 0.85 < float(ratio.mean()) < 1.15
    rms = float(pick((est - exact) / scale).square().mean().sqrt())
    predicted = float(pick(var / scale.square()).mean().sqrt())
    assert abs(rms / predicted - 1) < 0.1
    assert bool((var >= predicted_variance(P, k, "gaussian-full") - 1e-12 * scale.square()).all())


def test_sparse_variance_formula_against_hand_computed_cases():
    """One site, P = P' = g u^T with u on one coordinate: the sketch has one nonzero (a.g) u_0 sign, so
    Var ||sk||^2 = 2 ||P||^4 whatever k. And k = 1 (one bucket: a Rademacher vector on the wide side, a Gaussian
    on the narrow side): Var <sk(P), sk(P')> = (G + 2 gam^2)(U + 2 mu^2 - 2 D) - gam^2 mu^2 by Isserlis and the
    Rademacher 4th moment, G = |g|^2 |g'|^2, gam = g.g', U = |u|^2 |u'|^2, mu = u.u', D = sum_i u_i^2 u'_i^2."""
    g, u = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    P = torch.outer(g, u)[None]                                               # (1, 2, 4): wide side = in
    for k in (4, 64):
        assert torch.allclose(predicted_variance([P], k, "sparse")[0, 0], torch.tensor(2 * 45.0 ** 2,
                                                                                       dtype=torch.float64))
    g2, u2 = torch.tensor([0.5, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    u = torch.tensor([2.0, 3.0, 1.0, -1.0], dtype=torch.float64)
    P = torch.stack([torch.outer(g, u), torch.outer(g2, u2)])
    G, gam = float(g @ g * (g2 @ g2)), float(g @ g2)
    U, mu, D = float(u @ u * (u2 @ u2)), float(u @ u2), float((u ** 2 * u2 ** 2).sum())
    want = (G + 2 * gam ** 2) * (U + 2 * mu ** 2 - 2 * D) - gam ** 2 * mu ** 2
    assert abs(float(predicted_variance([P], 1, "sparse")[0, 1]) - want) < 1e-9 * want
    # the wide side of a lora_B piece is out: the same formula with P transposed
    assert torch.allclose(predicted_variance([P.transpose(1, 2)], 1, "sparse"), predicted_variance([P], 1, "sparse"))


# ---- projections depend on (seed, layer, module, part) only ----------------------------------------------------

def test_same_model_and_seed_give_identical_sketches_across_calls_steps_and_model_objects():
    batch = tiny_batch()
    cfg = TraceConfig(mode="position", sketch_dim=24, seed=7)
    m1 = tiny_lora_model("qwen2")
    m1.eval()
    r1 = trace_batch(m1, batch, "sft", {}, cfg, step=1)
    r2 = trace_batch(m1, batch, "sft", {}, cfg, step=9)                    # another step: same projection
    sketch_mod._CACHE.clear()                                                # regenerated, not cached
    sketch_mod._CACHE_SIZE[0] = 0
    m2 = tiny_lora_model("qwen2")                                            # a fresh object, same weights
    m2.eval()
    r3 = trace_batch(m2, batch, "sft", {}, cfg, step=1)
    assert np.array_equal(r1.sketch, r2.sketch) and np.array_equal(r1.sketch, r3.sketch)
    r4 = trace_batch(m2, batch, "sft", {}, TraceConfig(mode="position", sketch_dim=24, seed=8), step=1)
    assert not np.allclose(r1.sketch, r4.sketch)
    site = discover_lora_modules(m1)[0]
    a1, b1 = projection(7, site, 24)
    a2, b2 = projection(7, site, 24, dtype=torch.float64)
    assert torch.equal(a1.double(), a2) and torch.equal(b1.double(), b2)
    # sparse: the same per (seed, site) after the cache is dropped, and not the gaussian numbers
    sp = [projection(7, site, 24, kind="sparse") for _ in range(2)]
    sketch_mod._CACHE.clear()
    sketch_mod._CACHE_SIZE[0] = 0
    again = projection(7, site, 24, kind="sparse")
    assert all(torch.equal(x, y) for x, y in zip(sp[0], again)) and not torch.equal(sp[0][0], a1[:, :sp[0][0].shape[1]])
    s1 = trace_batch(m2, batch, "sft", {}, TraceConfig(mode="position", sketch_dim=24, seed=7, sketch_kind="sparse"),
                     step=1)
    s2 = trace_batch(m1, batch, "sft", {}, TraceConfig(mode="position", sketch_dim=24, seed=7, sketch_kind="sparse"),
                     step=5)
    assert np.array_equal(s1.sketch, s2.sketch)


def test_sketches_off_leave_every_other_output_bit_identical():
    batch = tiny_batch()
    model = tiny_lora_model("qwen2")
    model.eval()
    off = trace_batch(model, batch, "sft", {}, TraceConfig(mode="position"), step=4)
    on = trace_batch(model, batch, "sft", {}, TraceConfig(mode="position", sketch_dim=64), step=4)
    assert off.sketch is None and on.sketch is not None
    for part in ("tokens", "modules"):
        a, b = getattr(off, part), getattr(on, part)
        assert a.keys() == b.keys()
        for key in a:
            x, y = np.asarray(a[key]), np.asarray(b[key])
            assert x.dtype == y.dtype and (np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f"
                                           else np.array_equal(x, y)), (part, key)
    assert all(torch.equal(off.grad[k], on.grad[k]) for k in off.grad)
    skip = {"seconds"}
    assert {k: v for k, v in off.checks.items() if k not in skip} == {k: v for k, v in on.checks.items()
                                                                       if k not in skip}


def test_sketch_dim_is_refused_outside_position_mode_and_validated():
    with pytest.raises(ValueError, match="sketch_dim > 0 is only supported in position mode"):
        TraceConfig(mode="token", sketch_dim=16)
    with pytest.raises(ValueError, match=r"sketch_dim=-1 must be an integer in \[0, 65536\]"):
        TraceConfig(sketch_dim=-1)
    with pytest.raises(ValueError, match="sketch_kind='dense' is not allowed; choose one of: gaussian, "
                                         "gaussian-full, sparse"):
        TraceConfig(sketch_kind="dense")
    with pytest.raises(ValueError, match="sketch kind 'dense' is not allowed"):
        projection(0, discover_lora_modules(tiny_lora_model("qwen2"))[0], 4, kind="dense")
    with pytest.raises(ValueError, match="trace_sketch_dim > 0 needs trace_mode 'position'"):
        TrainConfig(trace_every=1, trace_mode="token", trace_sketch_dim=16).validate()
    tc = TrainConfig(trace_every=1, trace_sketch_dim=16)
    assert TraceConfig.from_train_config(tc).sketch_dim == 16
    import dataclasses

    from backend.trace.sketch import Sketcher
    sites = discover_lora_modules(tiny_lora_model("qwen2"))
    twin = dataclasses.replace(sites[1], layer=sites[0].layer, module=sites[0].module, part=sites[0].part)
    with pytest.raises(ValueError, match="share the label"):
        Sketcher([sites[0], twin], k=8, seed=0)


# ---- storage -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sketched_run(tmp_path_factory):
    """A tiny train run traced with sketches (k=16) and a run without, both indexed in memory."""
    from backend.lm.trainer import train
    root = tmp_path_factory.mktemp("sketch")
    run = train(TrainConfig(name="sk", n_train=8, n_eval=0, batch_size=4, steps=2, trace_every=1, trace_sequences=2,
                            trace_sketch_dim=16, runs_root=str(root / "runs")), progress=False)
    plain = train(TrainConfig(name="plain", n_train=8, n_eval=0, batch_size=4, steps=1, trace_every=1,
                              trace_sequences=1, runs_root=str(root / "runs")), progress=False)
    con = index.connect(index.MEMORY)
    for r in (run, plain):
        assert index.ingest_run(con, r).status == "finished"
    yield {"run": run, "plain": plain, "con": con}
    con.close()


def _raw(run, step: int):
    """The step's tokens joined to its sketches straight from the Parquet shards: (frame, (rows, k) unit)."""
    keys = ["step", "sample_idx", "position", "rank"]
    tok = pq.read_table(run / "trace" / "tokens").to_pandas()
    sk = pq.read_table(run / "trace" / "token_sketches").to_pandas()
    both = tok.merge(sk.drop(columns="run_id"), on=keys, validate="one_to_one")
    both = both[both.step == step].sort_values(["sample_idx", "position"]).reset_index(drop=True)
    return both, np.stack([np.asarray(v, dtype=np.float64) for v in both["sketch"]])


def test_a_traced_run_writes_token_sketches_that_the_index_reads(sketched_run):
    from backend.trace.store import read_sketches
    run, con = sketched_run["run"], sketched_run["con"]
    tok = pq.read_table(run / "trace" / "tokens").to_pandas()
    shard = pq.read_table(run / "trace" / "token_sketches")
    assert shard.schema.field("sketch").type.value_type == pa.float16()              # 2 bytes a value on disk
    sk = shard.to_pandas()
    keys = ["step", "sample_idx", "position", "rank"]
    assert sorted(map(tuple, sk[keys].values.tolist())) == sorted(map(tuple, tok[keys].values.tolist()))
    both = tok.merge(sk, on=keys, validate="one_to_one")
    # the sketch norm estimates the piece's norm (the exact magnitude): rms relative error ~ sqrt(8/k) at most
    rel = both["sketch_norm"].astype(float) ** 2 / both["magnitude"].astype(float) ** 2 - 1
    assert float(np.sqrt(np.mean(rel ** 2))) < math.sqrt(8 / 16)
    unit = np.stack([np.asarray(v, dtype=np.float64) for v in sk["sketch"]])
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=2e-3)
    table, full = read_sketches(run, 1)
    assert full.shape == (table.num_rows, 16)
    assert np.allclose(np.linalg.norm(full, axis=1), table.column("sketch_norm").to_numpy(), rtol=2e-3)
    n, typ = con.execute("SELECT count(*), any_value(typeof(sketch)) FROM token_sketches WHERE run_id = ?",
                         [run.name]).fetchone()
    assert n == len(tok) and typ == "FLOAT[]"


def test_sketch_pca_matches_an_eigendecomposition_of_the_raw_shards(sketched_run):
    from backend.analysis import analyses
    con, run = sketched_run["con"], sketched_run["run"]
    assert "sketch_pca" in analyses.names("train", run_id=run.name, con=con)
    got = analyses.run("sketch_pca", run.name, 2, con=con)
    both, unit = _raw(run, 2)
    X = unit - unit.mean(0)
    w, v = np.linalg.eigh(X.T @ X)                                           # ascending eigenvalues
    ref = X @ v[:, ::-1][:, :2]
    pts = got["points"]
    assert list(pts["sample_idx"]) == list(both["sample_idx"]) and list(pts["position"]) == list(both["position"])
    for j, c in enumerate(("pc1", "pc2")):                                   # an axis is defined up to its sign
        sign = np.sign(np.dot(pts[c], ref[:, j]))
        assert np.allclose(pts[c] * sign, ref[:, j], atol=1e-5)
    assert np.allclose(got["components"]["explained"], w[::-1][:2] / w.sum(), atol=1e-6)
    fig = analyses.get("sketch_pca").figure(got)
    assert len(fig.data) == pts["category"].nunique()


def test_neighbours_are_the_largest_sketch_cosines(sketched_run):
    from backend.analysis.sketches import neighbours
    con, run = sketched_run["con"], sketched_run["run"]
    both, unit = _raw(run, 1)
    i = len(both) // 2
    s, p = int(both["sample_idx"][i]), int(both["position"][i])
    got = neighbours(con, run.name, 1, s, p, top_k=5)
    cos = unit @ unit[i] / (np.linalg.norm(unit, axis=1) * np.linalg.norm(unit[i]))
    cos[i] = -np.inf
    want = np.argsort(-cos, kind="stable")[:5]
    assert list(zip(got["sample_idx"], got["position"])) == [(int(both["sample_idx"][j]), int(both["position"][j]))
                                                               for j in want]
    assert np.allclose(got["cosine"], cos[want], atol=2e-3)
    with pytest.raises(ValueError, match="has no sketch at step 1"):
        neighbours(con, run.name, 1, 10 ** 6, 0)


def test_a_run_without_sketches_says_how_to_record_them(sketched_run):
    from backend.analysis import analyses
    con, plain = sketched_run["con"], sketched_run["plain"]
    assert "sketch_pca" not in analyses.names("train", run_id=plain.name, con=con)
    with pytest.raises(ValueError, match="has no gradient sketches at step 1: train with --trace-sketch-dim"):
        analyses.run("sketch_pca", plain.name, 1, con=con)


def test_the_sketches_tab_renders_the_pca_and_lists_neighbours_escaped(sketched_run, tmp_path, monkeypatch):
    import shutil

    from tokviz.tabs import sketches as tab
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path))
    run = shutil.copytree(sketched_run["run"], tmp_path / "runs" / sketched_run["run"].name)
    try:
        cur = index.shared()
        assert index.ingest_run(cur, run).status == "finished"
        cur.close()
        (summary, fig, table), _ = tab.render(run.name, 1, "alignment")
        assert "k = 16" in summary and len(fig.data) == 1 and table == ""
        both, _ = _raw(run, 1)
        s, p = int(both["sample_idx"][3]), int(both["position"][3])
        out = tab.find_neighbours(run.name, 1, s, p, 4)
        assert out.count("<tr data-sample=") == 4 and f"sample {s}, position {p}" in out
        with pytest.raises(ValueError, match="enter a sample and a position"):
            tab.find_neighbours(run.name, 1, None, p, 4)
    finally:
        index.close_shared()


def test_the_apps_error_bound_is_the_tracers_and_the_tab_states_the_runs_own():
    """backend.analysis.sketches.error_bound (the app cannot import the tracer) equals the tracer's for every kind
    and dimension, and the Sketches tab's summary states the bound of the run's projection."""
    import pandas as pd

    from backend.analysis import sketches as sketch_analysis
    from tokviz.tabs import sketches as sketches_tab
    for kind in trace_config.SKETCH_KINDS:
        for k in (1, 16, 33, 64, 96, 128, 130, 256, 512):
            assert sketch_analysis.error_bound(kind, k) == trace_config.sketch_error_bound(kind, k)
    assert trace_config.sketch_error_bound("gaussian", 128) == pytest.approx(math.sqrt(14 / 128))
    assert trace_config.sketch_error_bound("gaussian", 64) == pytest.approx(math.sqrt(10 / 64))    # 2 rows a factor
    assert trace_config.sketch_error_bound("gaussian-full", 128) == pytest.approx(math.sqrt(8 / 128))
    frames = {"info": pd.DataFrame({"k": [128], "n": [60]})}
    assert "at most 0.33" in sketches_tab.summary_md(frames, 10, "gaussian")
    assert "at most 0.25" in sketches_tab.summary_md(frames, 10, "gaussian-full")
    assert "floor" in sketches_tab.summary_md(frames, 10, "sparse")
    with pytest.raises(ValueError, match="sketch kind 'dense'"):
        sketch_analysis.error_bound("dense", 128)
