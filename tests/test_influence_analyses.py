"""The influence analyses (backend.analysis.influence) on a real tiny run trained with --influence-eval, each
number recomputed with pandas from the run's raw Parquet shards; a run without influence gets a clear error."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from backend import index
from backend.analysis import analyses
from backend.dev.synth import SynthConfig, make_run
from backend.jobs.train import TrainConfig
from backend.lm.trainer import train

NAMES = ("influence_tokens", "influence_by_category", "influence_quadrants", "influence_over_training")
KEYS = ["step", "sample_idx", "position", "rank"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("influence")
    run = train(TrainConfig(name="infl", n_train=16, n_eval=4, eval_max_new_tokens=4, batch_size=4, steps=2,
                            trace_every=1, trace_sequences=4, influence_eval=4, runs_root=str(root / "runs")),
                progress=False)
    plain = make_run(SynthConfig.tiny(), root / "runs", run_id="plain")
    con = index.connect(index.MEMORY)
    for r in (run, plain):
        assert index.ingest_run(con, r).status == "finished"
    tok = pq.read_table(run / "trace" / "tokens").to_pandas()
    inf = pq.read_table(run / "trace" / "influence").to_pandas()
    both = tok.merge(inf.drop(columns="run_id"), on=KEYS, how="left", validate="one_to_one")
    for c in ("alignment", "dot", "influence", "influence_alignment", "loss"):
        both[c] = both[c].astype("float64")
    steps = pq.read_table(run / "trace" / "influence_steps").to_pandas()
    yield {"con": con, "run": run.name, "both": both, "steps": steps}
    con.close()


def resp(env, step):
    b = env["both"]
    return b[(b.step == step) & b.is_response]


def test_registered_for_train_runs_and_skipped_without_influence(env):
    train_names = analyses.names(kind="train")
    assert set(NAMES) <= set(train_names)
    assert set(NAMES) <= set(analyses.names(kind="train", run_id=env["run"], con=env["con"]))
    assert not set(NAMES) & set(analyses.names(kind="train", run_id="plain", con=env["con"]))
    assert not set(NAMES) & set(analyses.run_all("plain", con=env["con"]))
    for name in NAMES:
        with pytest.raises(ValueError, match=r"run 'plain' has no influence data: train with --influence-eval N"):
            analyses.run(name, "plain", con=env["con"])


def test_influence_tokens_are_the_largest_and_most_negative_in_context(env):
    p = analyses.AnalysisParams(top_k=4, context_tokens=3)
    got = analyses.run("influence_tokens", env["run"], step=1, params=p, con=env["con"])["tokens"]
    r = resp(env, 1).dropna(subset=["influence"])
    want_help = r[r.influence > 0].sort_values("influence", ascending=False).head(4)
    want_hurt = r[r.influence < 0].sort_values("influence").head(4)
    for kind, want in (("helps", want_help), ("hurts", want_hurt)):
        g = got[got.kind == kind]
        assert list(zip(g.sample_idx, g.position)) == list(zip(want.sample_idx, want.position)), kind
        np.testing.assert_allclose(g.influence, want.influence, rtol=1e-6)
        np.testing.assert_allclose(g.influence_alignment, want.influence_alignment, rtol=1e-6)
        np.testing.assert_allclose(g.alignment, want.alignment, rtol=1e-6)
        assert list(g.category) == list(want.category) and list(g["rank"]) == [1, 2, 3, 4]
    assert (got[got.kind == "helps"].influence > 0).all() and (got[got.kind == "hurts"].influence < 0).all()
    row = got.iloc[0]
    seq = env["both"][(env["both"].step == 1) & (env["both"].sample_idx == row.sample_idx)].sort_values("position")
    i = seq.position.tolist().index(row.position)
    assert row.context_before == "".join(seq.token.iloc[max(0, i - 3):i])
    assert row.context_after == "".join(seq.token.iloc[i + 1:i + 4])


def test_influence_by_category_sums_match_the_shards(env):
    got = analyses.run("influence_by_category", env["run"], step=2, con=env["con"])["categories"]
    r = resp(env, 2).dropna(subset=["influence"])
    want = r.groupby("category").agg(n=("influence", "size"), s=("influence", "sum"), m=("influence", "mean"),
                                     ia=("influence_alignment", "mean"))
    want["hurts"] = r.assign(h=r.influence < 0).groupby("category").h.mean()
    got = got.set_index("category").loc[want.index]
    assert (got.n == want.n).all()
    np.testing.assert_allclose(got.influence_sum, want.s, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(got.mean_influence, want.m, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(got.mean_influence_alignment, want.ia, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got.frac_hurts, want.hurts)
    np.testing.assert_allclose(got.share_of_total.sum(), 1.0, rtol=1e-9)


def test_quadrant_counts_and_shares(env):
    frames = analyses.run("influence_quadrants", env["run"], step=1, con=env["con"])
    q = frames["quadrants"].set_index("quadrant")
    r = resp(env, 1).dropna(subset=["alignment", "influence", "influence_alignment"])
    a, f = r.alignment, r.influence
    masks = {"aligned & helps": (a > 0) & (f > 0), "aligned but hurts eval": (a > 0) & (f < 0),
             "opposing & helps": (a < 0) & (f > 0), "opposing & hurts": (a < 0) & (f < 0)}
    for name, m in masks.items():
        assert q.loc[name, "n"] == int(m.sum()), name
        np.testing.assert_allclose(q.loc[name, "influence_sum"], f[m].sum(), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(q.loc[name, "share_of_abs"], f[m].abs().sum() / f.abs().sum(), rtol=1e-5)
    assert q["n"].sum() == sum(int(m.sum()) for m in masks.values()) and (q["n_tokens"] == len(r)).all()
    assert len(frames["points"]) == len(r)       # fewer tokens than scatter_points: every one drawn
    fig = analyses.get("influence_quadrants").figure(frames)
    texts = " ".join(a.text for a in fig.layout.annotations)
    assert f"aligned but hurts eval</b><br>{int(masks['aligned but hurts eval'].sum())} tokens" in texts
    assert "helps" in fig.layout.yaxis.title.text and fig.layout.title.text.endswith("(position mode)")


def test_over_training_matches_the_step_rows_and_the_gradient_norms(env):
    got = analyses.run("influence_over_training", env["run"], con=env["con"])["steps"].set_index("step")
    st = env["steps"].set_index("step").sort_index()
    assert list(got.index) == [1, 2]
    np.testing.assert_allclose(got.eval_cosine, st.eval_cosine.astype("float64"), rtol=1e-6)
    np.testing.assert_allclose(got.g_dot_eval, st.g_dot_eval.astype("float64"), rtol=1e-6)
    b = env["both"]
    for s in (1, 2):
        every = b[b.step == s]
        # position mode, every sequence traced: ||G||^2 = the sum of all positions' dots, <G, G_eval> = that of the
        # influences
        g_norm = np.sqrt(every["dot"].sum())
        np.testing.assert_allclose(got.loc[s, "eval_cosine"], got.loc[s, "g_dot_eval"]
                                   / (g_norm * got.loc[s, "eval_grad_norm"]), rtol=1e-3)
        np.testing.assert_allclose(every.influence.sum(), got.loc[s, "g_dot_eval"], rtol=1e-3)
        r = resp(env, s).dropna(subset=["influence"])
        assert got.loc[s, "frac_hurts"] == pytest.approx(float((r.influence < 0).mean()))
        assert got.loc[s, "n_aligned_hurts"] == int(((r.alignment > 0) & (r.influence < 0)).sum())
        assert got.loc[s, "n_response"] == len(r)


def test_every_figure_says_what_the_sign_means(env):
    for name in NAMES:
        frames = analyses.run(name, env["run"], con=env["con"])
        fig = analyses.get(name).figure(frames)
        assert fig.layout.title.text.endswith("(position mode)"), name
        axes = f"{fig.layout.xaxis.title.text} {fig.layout.yaxis.title.text}"
        assert "help" in axes, (name, axes)
        assert any(getattr(tr, "hovertemplate", None) for tr in fig.data), name
    empty = analyses.get("influence_tokens").figure({"tokens": pd.DataFrame(columns=["kind"])})
    assert "no response token" in empty.layout.annotations[0].text
