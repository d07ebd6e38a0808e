"""The probe job kind: batched row gradients vs a naive autograd loop, spectra on known matrices, Exp 2 on
planted directions, global buckets over shards, shard + merge == unsharded, errors, the analyses."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from backend.analysis.probe import direction, spectrum
from backend.jobs.probe import VECTORS_FILE, ProbeConfig, parse_shard, shard_prompts
from backend.probe.select import boundaries, rebucket

ADAPTER = "demo-sft-position"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and much faster on a shared, busy CPU (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    from backend.lm.models import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer("default", device="cpu")
    model.requires_grad_(False)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def tiny64(tiny):
    """The tiny model in float64, for comparisons with the naive loop at 1e-5: in float32 a vector whose norm is
    1e-4 of its neighbours' (cancellation in the attention's softmax backward) already differs by ~1e-2 between
    two summation orders (e.g. chunk sizes), whichever method computes it. The probe returns float32."""
    import copy
    return copy.deepcopy(tiny[0]).double()


def naive_row_grad(model, ids: torch.Tensor, t: int, weight: torch.nn.Parameter, row: int, temp: float) -> torch.Tensor:
    """d log p(ids[t+1] | ids[:t+1]) / d W[row]: a full forward and backward of the whole model for one position."""
    weight.requires_grad_(True)
    try:
        logits = model(input_ids=ids[None]).logits[0, t]                       # (V,)
        lp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temp, -1)[ids[t + 1]]
        (g,) = torch.autograd.grad(lp, weight)
    finally:
        weight.requires_grad_(False)
    return g[row]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


# the last layer's per-position weights take the one-backward "diagonal" path; k/v (their output reaches later
# positions through the attention) and every earlier layer the batched "vmap" path
@pytest.mark.parametrize("layer,param,row,temp,path", [
    (-1, "mlp.down_proj.weight", 5, 1.0, "diagonal"), (3, "mlp.gate_proj.weight", 40, 0.8, "diagonal"),
    (-1, "mlp.up_proj.weight", 3, 1.0, "diagonal"), (-1, "self_attn.q_proj.weight", 9, 1.0, "diagonal"),
    (-1, "self_attn.o_proj.weight", 2, 1.3, "diagonal"), (-1, "self_attn.k_proj.weight", 7, 1.0, "vmap"),
    (-1, "self_attn.v_proj.weight", 1, 1.0, "vmap"), (0, "self_attn.q_proj.weight", 17, 0.7, "vmap"),
    (2, "mlp.down_proj.weight", 5, 1.0, "vmap")])
def test_batched_row_gradients_match_naive_loop(tiny64, layer, param, row, temp, path):
    from backend.probe.grads import resolve_site, row_gradients, row_gradients_loop
    model = tiny64
    site = resolve_site(model, layer, param, row)
    assert site.path == path
    ids = torch.randint(3, 400, (40,), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([3, 7, 8, 20, 21, 22, 30, 38])
    ref = torch.stack([naive_row_grad(model, ids, int(t), site.module.weight, row, temp) for t in positions])
    ref = ref.float()
    assert ref.norm(dim=1).min() > 0                      # not a vacuous comparison of zeros
    for p in ("auto", "vmap") if path == "diagonal" else ("auto",):
        vecs, _ = row_gradients(model, site, ids, positions, temperature=temp, chunk=3, path=p)   # 3 chunks
        assert vecs.shape == (8, site.row_dim) and vecs.dtype == torch.float32
        assert _rel(vecs, ref) < 1e-5, (p, _rel(vecs, ref))
    loop, _ = row_gradients_loop(model, site, ids, positions, temperature=temp)
    assert _rel(loop, ref) < 1e-5


def test_diagonal_path_is_refused_where_it_would_be_wrong(tiny64):
    """At k_proj of the last layer and at an earlier layer's MLP, the one-backward shortcut drops the
    cross-position terms (it differs from the reference), so it is never taken there and is refused if asked."""
    from backend.probe.grads import resolve_site, row_gradients
    model = tiny64
    ids = torch.randint(3, 400, (40,), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([5, 12, 30, 31])
    for layer, param in ((-1, "self_attn.k_proj.weight"), (1, "mlp.down_proj.weight")):
        site = resolve_site(model, layer, param, 4)
        assert site.path == "vmap" and not site.diagonal
        with pytest.raises(ValueError, match="path 'diagonal' is wrong .* use 'vmap'"):
            row_gradients(model, site, ids, positions, path="diagonal")
        ref = torch.stack([naive_row_grad(model, ids, int(t), site.module.weight, 4, 1.0) for t in positions]).float()
        forced, _ = row_gradients(model, dataclasses.replace(site, diagonal=True), ids, positions)
        assert _rel(forced, ref) > 1e-2                   # the shortcut would be wrong here
    site = resolve_site(model, -1, "mlp.down_proj.weight", 0)
    with pytest.raises(ValueError, match="path 'fast' is not allowed"):
        row_gradients(model, site, ids, positions, path="fast")
    # a position listed twice gets the same vector twice (the one backward sums over distinct positions)
    twice = torch.tensor([12, 5, 12, 30])
    got, lp = row_gradients(model, site, ids, twice)
    ref = torch.stack([naive_row_grad(model, ids, int(t), site.module.weight, 0, 1.0) for t in twice]).float()
    assert _rel(got, ref) < 1e-5 and lp[0] == lp[2]


def test_bad_layer_param_row_and_shard_name_the_choices(tiny):
    from backend.probe.grads import resolve_site
    model, _ = tiny
    with pytest.raises(ValueError, match=r"layer 4 is out of range.*0\.\.3 or -4\.\.-1"):
        resolve_site(model, 4, "mlp.down_proj.weight", 0)
    with pytest.raises(ValueError, match=r"not a Linear weight of layer 3; choose one of:.*mlp\.down_proj\.weight"):
        resolve_site(model, -1, "mlp.nope.weight", 0)
    with pytest.raises(ValueError, match=r"row 128 is out of range .*allowed rows 0\.\.127"):
        resolve_site(model, -1, "mlp.down_proj.weight", 128)
    for bad in ("2/2", "a/b", "1", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="shard"):
        ProbeConfig(shard="3/2")
    with pytest.raises(ValueError, match="param"):
        ProbeConfig(param="mlp.down_proj")
    assert parse_shard("") == (0, 1) and parse_shard("1/3") == (1, 3)
    assert sorted(shard_prompts(10, "0/3") + shard_prompts(10, "1/3") + shard_prompts(10, "2/3")) == list(range(10))


def _with_spectrum(s: np.ndarray, n: int = 20, d: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
    V, _ = np.linalg.qr(rng.normal(size=(d, len(s))))
    return U @ np.diag(s) @ V.T


def test_spectrum_on_known_singular_values():
    out = spectrum(_with_spectrum(np.array([3.0, 2.0, 1.0])))
    # lambda = 9, 4, 1: PR = 14^2 / (81 + 16 + 1) = 2; energy 9/14, 13/14, 1 -> rank95 = 3
    assert out["pr"] == pytest.approx(2.0, rel=1e-9)
    assert out["rank95"] == 3
    np.testing.assert_allclose(out["energy"][:3], [9 / 14, 13 / 14, 1.0], rtol=1e-9)
    flat = spectrum(_with_spectrum(np.ones(10)))          # 10 equal values: PR 10, rank95 = ceil(9.5) = 10
    assert flat["pr"] == pytest.approx(10.0, rel=1e-9) and flat["rank95"] == 10
    one = spectrum(_with_spectrum(np.array([5.0])))
    assert one["pr"] == pytest.approx(1.0) and one["rank95"] == 1
    # 20 values with 96% of the energy in the first: rank95 = 1
    s = np.sqrt(np.array([96.0] + [4.0 / 11] * 11))
    assert spectrum(_with_spectrum(s, d=15))["rank95"] == 1


@pytest.mark.parametrize("n,d", [(20, 12), (5, 12)])       # both sides of the Gram shortcut (N >= d, N < d)
def test_spectrum_top_vector_and_energy_match_the_svd(n, d):
    rng = np.random.default_rng(n)
    V, _ = np.linalg.qr(rng.normal(size=(d, 4)))
    U, _ = np.linalg.qr(rng.normal(size=(n, 4)))
    X = U @ np.diag([4.0, 2.0, 1.0, 0.5]) @ V.T
    out = spectrum(X)
    assert abs(out["top"] @ V[:, 0]) == pytest.approx(1.0, abs=1e-9)
    lam = np.array([16.0, 4.0, 1.0, 0.25])
    np.testing.assert_allclose(out["energy"][:4], np.cumsum(lam) / lam.sum(), rtol=1e-9)
    assert out["pr"] == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-9)


def _synthetic_direction(planted: bool, n_prompts: int = 30, per_side: int = 8, d: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows, vecs = [], []
    for p in range(n_prompts):
        common = rng.normal(size=d)
        plant = rng.normal(size=d) * 1.5 if planted else np.zeros(d)
        for correct, sign in ((True, 1.0), (False, -1.0)):
            for _ in range(per_side):
                vecs.append(common + sign * plant + rng.normal(size=d) * 0.5)
                rows.append({"model": "base", "prompt_idx": p, "bucket": 4, "correct": correct})
    # one prompt with a single incorrect token: counted and listed, not dropped silently
    for correct in (True, True, True, False):
        vecs.append(rng.normal(size=d))
        rows.append({"model": "base", "prompt_idx": n_prompts, "bucket": 4, "correct": correct})
    df = pd.DataFrame(rows)
    return df.assign(vector_idx=np.arange(len(df))), np.array(vecs)


def test_direction_finds_a_planted_direction_and_not_one_that_is_absent():
    rows, V = _synthetic_direction(planted=True)
    res = direction(rows, V, top_bucket=4)
    s = res["summary"].iloc[0]
    assert s["n_prompts"] == 30 and s["n_skipped"] == 1
    assert res["skipped"]["prompt_idx"].tolist() == [30] and res["skipped"]["n_incorrect"].tolist() == [1]
    assert s["mean_cos"] < 0.0 and s["mean_noise_floor"] > 0.8
    assert s["gap_ci_lo"] > 0.5                               # the interval of floor - cos is far from 0
    assert s["cos_ci_lo"] <= s["mean_cos"] <= s["cos_ci_hi"]

    rows, V = _synthetic_direction(planted=False)
    s = direction(rows, V, top_bucket=4)["summary"].iloc[0]
    assert abs(s["mean_cos"] - s["mean_noise_floor"]) < 0.05   # at the noise floor
    assert s["gap_ci_lo"] < 0.05


def test_direction_reference_on_one_prompt():
    # hand-made: correct tokens (1,0), (1,0); incorrect (0,1), (0,1): cos(m_c, m_i) = 0; halves identical -> 1
    rows = pd.DataFrame({"model": "base", "prompt_idx": 0, "bucket": 1, "correct": [True, True, False, False],
                         "vector_idx": [0, 1, 2, 3]})
    V = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    res = direction(rows, V, top_bucket=1)
    assert res["prompts"]["cos"].iloc[0] == pytest.approx(0.0)
    assert res["prompts"]["noise_floor"].iloc[0] == pytest.approx(1.0)


def test_global_buckets_over_shards_equal_buckets_over_the_merged_set():
    rng = np.random.default_rng(3)
    n = 600
    tokens = pd.DataFrame({"model": rng.choice(["base", "trained"], n), "prompt_idx": rng.integers(0, 9, n),
                           "sample_idx": rng.integers(0, 3, n), "entropy": rng.gamma(0.5, 1.0, n)})
    tokens["position"] = tokens.groupby(["model", "prompt_idx", "sample_idx"]).cumcount()
    whole, bounds = rebucket(tokens, n_buckets=5, per_bucket=2, seed=0)
    shards = [tokens[tokens["prompt_idx"] % 3 == i] for i in range(3)]
    merged, mbounds = rebucket(pd.concat(shards[::-1], ignore_index=True), n_buckets=5, per_bucket=2, seed=0)
    key = ["model", "prompt_idx", "sample_idx", "position"]
    a, b = whole.sort_values(key).reset_index(drop=True), merged.sort_values(key).reset_index(drop=True)
    assert (a["bucket"] == b["bucket"]).all() and (a["picked"] == b["picked"]).all()
    for m in ("base", "trained"):
        np.testing.assert_array_equal(bounds[m], mbounds[m])
        e = np.sort(tokens.loc[tokens["model"] == m, "entropy"].to_numpy())
        for k, q in enumerate(bounds[m], start=1):           # textbook linear-interpolated quantile k/5
            h = (len(e) - 1) * k / 5
            assert q == pytest.approx(e[int(h)] + (h - int(h)) * (e[min(int(h) + 1, len(e) - 1)] - e[int(h)]))
        sub = a[a["model"] == m]
        assert (sub.groupby("bucket").size().to_numpy() >= len(sub) // 5 - 1).all()
        per = sub.groupby(["prompt_idx", "sample_idx", "bucket"])
        assert (per["picked"].sum() == np.minimum(per.size(), 2)).all()
    assert boundaries(np.arange(10.0), 2).tolist() == [4.5]


# ----------------------------------------------------------------------------------- end to end (tiny model)
def _cfg(root, run_id: str, shard: str = "") -> ProbeConfig:
    return ProbeConfig(adapter=ADAPTER, num_prompts=3, num_samples=3, max_new_tokens=20, per_bucket=2,
                       temperature=1.2, shard=shard, runs_root=str(root), run_id=run_id, device="cpu")


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory):
    from backend.probe.merge import merge
    from backend.probe.run import probe
    root = tmp_path_factory.mktemp("probe_runs")
    whole = probe(_cfg(root, "whole"), progress=False)
    shards = [probe(_cfg(root, f"s{i}", f"{i}/2"), progress=False) for i in range(2)]
    merged = merge(shards, run_id="merged", runs_root=root)
    return whole, shards, merged


def test_shard_and_merge_equal_one_unsharded_run(probe_runs):
    whole, shards, merged = probe_runs
    for table in ("rollouts", "tokens", "vectors", "buckets"):
        a = pq.read_table(whole / f"probe/{table}.parquet").to_pandas().drop(columns="run_id")
        b = pq.read_table(merged / f"probe/{table}.parquet").to_pandas().drop(columns="run_id")
        assert len(a) and list(a.columns) == list(b.columns)
        floats = [c for c in a.columns if a[c].dtype.kind == "f"]
        pd.testing.assert_frame_equal(a.drop(columns=floats), b.drop(columns=floats))
        for c in floats:
            np.testing.assert_allclose(a[c], b[c], rtol=1e-5, atol=1e-6, err_msg=f"{table}.{c}")
    keys = ("site", "row", "layer", "grad_path")
    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (whole, merged))
    assert [ma[k] for k in keys] == [mb[k] for k in keys]
    va, vb = np.load(whole / VECTORS_FILE), np.load(merged / VECTORS_FILE)
    assert va.dtype == np.float32 and va.shape == vb.shape and va.shape[1] == 512
    np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-6 * np.abs(va).max())
    # every shard probed its own prompts only, and kept a vector for each generated token
    t0 = pq.read_table(shards[0] / "probe/tokens.parquet").to_pandas()
    assert set(t0["prompt_idx"]) == {0, 2} and (t0["vector_idx"] >= 0).all()
    assert len(np.load(shards[0] / VECTORS_FILE)) == len(t0)


def test_probe_run_contents(probe_runs):
    whole, _, _ = probe_runs
    rollouts = pq.read_table(whole / "probe/rollouts.parquet").to_pandas()
    tokens = pq.read_table(whole / "probe/tokens.parquet").to_pandas()
    vecs = pq.read_table(whole / "probe/vectors.parquet").to_pandas()
    assert set(rollouts["model"]) == {"base", "trained"} and len(rollouts) == 2 * 3 * 3
    n_tok = rollouts.set_index(["model", "prompt_idx", "sample_idx"])["n_tokens"]
    assert (tokens.groupby(["model", "prompt_idx", "sample_idx"]).size() == n_tok.sort_index()).all()
    assert (tokens["entropy"] >= 0).all() and tokens["entropy"].dtype == np.float32
    assert (tokens["picked"] == (tokens["vector_idx"] >= 0)).all()
    assert vecs["vector_idx"].tolist() == list(range(len(vecs)))
    from backend.lm.tasks import get_task
    task = get_task("arith")
    assert all(task.is_correct(r.text, r.answer) == r.correct for r in rollouts.itertuples())
    V = np.load(whole / VECTORS_FILE)
    np.testing.assert_allclose(np.linalg.norm(V, axis=1), vecs["norm"], rtol=1e-5)
    man = json.loads((whole / "manifest.json").read_text())
    # the default weight (last layer's mlp.down_proj) takes the one-backward path, and the manifest says so
    assert man["site"] == "model.layers.3.mlp.down_proj.weight" and man["grad_path"] == "diagonal"


def test_merge_refuses_incomplete_or_mismatched_shards(probe_runs, tmp_path):
    from backend.probe.merge import merge
    whole, shards, _ = probe_runs
    with pytest.raises(ValueError, match="shards must be 0/2 .. 1/2"):
        merge([shards[0]], runs_root=tmp_path)
    with pytest.raises(ValueError, match="unsharded"):
        merge([whole, shards[0]], runs_root=tmp_path)


def test_analyses_on_an_indexed_probe(probe_runs, tmp_path):
    from backend.analysis import analyses, probe_figures
    from backend.index import db, ingest
    whole, _, _ = probe_runs
    con = db.connect(tmp_path / "idx.duckdb")
    res = ingest.ingest_run(con, whole)
    assert res.action == "ingested", res.error
    frames = analyses.run_all("whole", con=con)
    assert set(frames) == {"probe_spectra", "probe_direction", "probe_pca"}
    spec = frames["probe_spectra"]["spectra"]
    rows = pq.read_table(whole / "probe/vectors.parquet").to_pandas()
    V = np.load(whole / VECTORS_FILE).astype(np.float64)
    for r in spec[spec["n"] > 0].itertuples():                 # PR and rank95 from the textbook SVD
        X = V[rows.loc[(rows["model"] == r.model) & (rows["bucket"] == r.bucket), "vector_idx"]]
        lam = np.linalg.svd(X, compute_uv=False) ** 2
        assert r.pr == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-6)
        assert r.rank95 == 1 + int(np.argmax(np.cumsum(lam) / lam.sum() >= 0.95))
    for name, f in frames.items():
        assert analyses.get(name).figure(f).data is not None
    probe_figures.energy_curves(frames["probe_spectra"]["energy"])
    probe_figures.cosine_heatmap(frames["probe_spectra"]["cosine"])
    probe_figures.direction_bars(frames["probe_direction"]["prompts"])
    pts = frames["probe_pca"]["points"]
    assert len(pts) == len(rows) and pts["context"].notna().all()
    for c in ("bucket", "correct", "model"):
        probe_figures.pca_scatter(pts, c)
    with pytest.raises(ValueError, match="choose one of"):
        probe_figures.pca_scatter(pts, "nope")
    con.close()


def test_rollout_view_escapes_token_text():
    from tokviz.probe_view import rollout_html
    head = {"prompt": "<b>p</b>", "answer": "3", "extracted": "<i>", "correct": False}
    toks = pd.DataFrame({"position": [0, 1, 2], "token": ["<script>x</script>", "a\nb", '" onmouseover="y'],
                         "entropy": [0.0, 0.5, 2.0], "bucket": [0, 2, 4], "picked": [True, False, True]})
    for by in ("entropy", "bucket"):
        out = rollout_html(head, toks, by)
        assert "<script>" not in out and "&lt;script&gt;x&lt;/script&gt;" in out
        assert "<b>p</b>" not in out and "<i>" not in out
        assert 'onmouseover="y' not in out and out.count("<span class='t") == 3
        assert out.count("class='t p'") == 2
    marked = rollout_html(head, toks, "entropy", highlight=1)        # the clicked PCA point's token
    assert marked.count(" h'") == 1 and "class='t h'" in marked and "class='t p'" in marked


def test_pca_click_key_from_event_data():
    from tokviz.tabs.probes import point_key
    key = point_key({"model": "trained", "prompt_idx": 4, "sample_idx": 5.0, "position": "24"})
    assert key == ["trained", 4, 5, 24]
    assert point_key({"model": "base", "prompt_idx": 1, "sample_idx": 2}) is None        # not on a point
    assert point_key(None) is None and point_key("x") is None
    with pytest.raises(ValueError, match="position must be a whole number"):
        point_key({"model": "base", "prompt_idx": 1, "sample_idx": 2, "position": 2.5})


def test_a_runs_adapter_is_refused_on_another_model_or_on_its_training_prompts():
    """A train run's adapter on another base model loaded with missing keys and a warning only; prompts beyond its
    eval split are its training prompts. Both are refused before any work."""
    from backend.probe.run import probe
    with pytest.raises(ValueError, match="was trained on model 'tiny-modadd', not 'default': pass --model tiny-modadd"):
        probe(ProbeConfig(adapter="demo-embgrad-modadd", num_prompts=2), progress=False)
    with pytest.raises(ValueError, match=r"num_prompts=101 asks for more held-out examples than the run kept \(100"):
        probe(ProbeConfig(adapter=ADAPTER, num_prompts=101), progress=False)
