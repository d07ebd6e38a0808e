"""Each analysis of a traced train run on a tiny trace, checked against numpy/pandas computed from the Parquet
shards directly (pyarrow, no DuckDB).

    pytest tests/test_analyses.py
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from backend import index
from backend.analysis import analyses, figures
from backend.dev.synth import SynthConfig, make_run, read_shards

RUN = "tiny"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyses")
    run = make_run(SynthConfig.tiny(world_size=2, n_samples=5), root / "runs", run_id=RUN)
    con = index.connect(index.MEMORY)
    index.ingest_run(con, run)
    tok = read_shards(run, "tokens")
    first = tok[tok.is_response].groupby(["step", "sample_idx"]).position.min().rename("first")
    tok = tok.join(first, on=["step", "sample_idx"])
    tok["resp_pos"] = np.where(tok.is_response, tok.position - tok["first"], -1)
    tok = tok.astype({c: "float64" for c in ("alignment", "magnitude", "dot", "share", "loss")})
    mod = read_shards(run, "token_modules").astype({"alignment": "float64", "dot": "float64", "magnitude": "float64"})
    yield {"con": con, "tok": tok, "mod": mod, "last": int(tok.step.max())}
    con.close()


def resp(env, step=None):
    t = env["tok"]
    t = t[t.is_response]
    return t if step is None else t[t.step == step].sort_values(["sample_idx", "position"])


def response_modules(env, step):
    r = resp(env, step)[["sample_idx", "position", "resp_pos"]]
    m = env["mod"]
    return m[m.step == step].merge(r, on=["sample_idx", "position"])


def test_registry_entries_carry_their_figure_and_kind():
    train = analyses.names(kind="train")
    assert train and set(train) <= set(analyses.names())
    for name in train:
        a = analyses.get(name)
        assert (a.name, a.kind) == (name, "train") and callable(a.figure) and a.description, name
    assert {n for n in train if analyses.get(n).compare} >= {"alignment_evolution", "concentration"}
    assert set(analyses.summary("train").needs) <= set(train)
    with pytest.raises(ValueError, match=r"unknown analysis 'gini'; available: .*alignment_evolution, "
                                         r"prompt_vs_response"):
        analyses.get("gini")
    with pytest.raises(ValueError, match=r"n_bins must be in \[1, 1000\], got 0"):
        analyses.AnalysisParams(n_bins=0)


def test_step_is_checked(env):
    with pytest.raises(ValueError, match="step 7 is not a traced step of run 'tiny'; traced steps: 5, 10, 20"):
        analyses.run("concentration", RUN, step=7, con=env["con"])
    assert analyses.resolve_step(env["con"], RUN, None) == 20


def test_alignment_evolution(env):
    f = analyses.run("alignment_evolution", RUN, con=env["con"])
    ev = f["evolution"].set_index("step")
    for step, g in resp(env).groupby("step"):
        a = g.alignment.to_numpy()
        assert ev.loc[step, "n"] == a.size
        assert ev.loc[step, "mean"] == pytest.approx(a.mean(), rel=1e-9)
        assert ev.loc[step, "std"] == pytest.approx(a.std(ddof=1), rel=1e-9)
        for q in (10, 50, 90):
            assert ev.loc[step, f"p{q}"] == pytest.approx(np.percentile(a, q), rel=1e-6)
        assert ev.loc[step, "frac_negative"] == pytest.approx((a < 0).mean())
    means = resp(env).groupby("step").alignment.mean()
    slope = np.polyfit(means.index.to_numpy(float), means.to_numpy(), 1)[0]
    assert f["trend"]["slope_per_step"].iloc[0] == pytest.approx(slope, rel=1e-9)


def test_prompt_vs_response_is_a_real_split(env):
    g = analyses.run("prompt_vs_response", RUN, step=10, con=env["con"])["groups"].set_index("group")
    t = env["tok"][env["tok"].step == 10]
    for name, sel in (("prompt", ~t.is_response), ("response", t.is_response)):
        assert g.loc[name, "n"] == sel.sum() > 0
        assert g.loc[name, "mean_alignment"] == pytest.approx(t[sel].alignment.mean(), rel=1e-9)
        assert g.loc[name, "share_sum"] == pytest.approx(t[sel].share.sum(), rel=1e-6)
    assert g["share_sum"].sum() == pytest.approx(1.0, rel=1e-4)   # all positions' shares sum to 1


def test_layer_module_contribution(env):
    f = analyses.run("layer_module_contribution", RUN, step=10, con=env["con"])
    mods = f["modules"]
    assert dict(zip(mods.step, mods.stage)) == {5: "early", 10: "middle/selected", 20: "late"}
    m = env["mod"][env["mod"].step == 20]
    share = m.groupby(["layer", "module"])["dot"].sum() / m["dot"].sum()
    got = mods[mods.step == 20].set_index(["layer", "module"])["share"]
    pd.testing.assert_series_equal(got.sort_index(), share.sort_index(), check_names=False, rtol=1e-6)
    ext = f["extremes"]
    top = ext[(ext.step == 20) & (ext.kind == "top") & (ext["rank"] == 1)].iloc[0]
    assert (top.layer, top.module) == share.idxmax()


def test_gradient_magnitude(env):
    f = analyses.run("gradient_magnitude", RUN, con=env["con"])
    tr = f["traced"].set_index("step")
    t = env["tok"]
    for step, g in resp(env).groupby("step"):
        assert tr.loc[step, "mean"] == pytest.approx(g.magnitude.mean(), rel=1e-9)
        assert tr.loc[step, "median"] == pytest.approx(g.magnitude.median(), rel=1e-6)
        # ||G|| two ways: sqrt(sum of all dots) and dot / (alignment * magnitude) of any token
        s = t[t.step == step]
        assert tr.loc[step, "batch_grad_norm"] == pytest.approx(
            float(np.median(s["dot"] / (s.alignment * s.magnitude))), rel=1e-3)
    assert len(f["train"]) == 20


def test_positional_decay(env):
    f = analyses.run("positional_decay", RUN, con=env["con"], params=analyses.AnalysisParams(n_bins=4))
    r = resp(env, env["last"])
    slope = np.polyfit(r.resp_pos.to_numpy(float), r.alignment.to_numpy(), 1)[0]
    assert f["fit"]["slope_per_token"].iloc[0] == pytest.approx(slope, rel=1e-9)
    width = math.ceil((r.resp_pos.max() + 1) / 4)
    assert f["fit"]["bin_width"].iloc[0] == width
    want = r.groupby(r.resp_pos // width * width).alignment.agg(["mean", "size"])
    b = f["bins"].set_index("bin_start")
    np.testing.assert_allclose(b["mean_alignment"], want["mean"], rtol=1e-9)
    assert b["n"].tolist() == want["size"].tolist()


def test_surprising_tokens(env):
    k = 4
    p = analyses.AnalysisParams(top_k=k, context_tokens=3)
    f = analyses.run("surprising_tokens", RUN, con=env["con"], params=p)
    t = f["tokens"]
    r = resp(env, env["last"])
    assert sorted(t[t.kind == "opposing"].alignment) == pytest.approx(sorted(r.alignment.nsmallest(k)))
    assert sorted(t[t.kind == "aligned"].alignment) == pytest.approx(sorted(r.alignment.nlargest(k)))
    row = t.iloc[0]
    tok = env["tok"]
    seq = tok[(tok.step == env["last"]) & (tok.sample_idx == row.sample_idx)].sort_values("position")
    before = seq[(seq.position < row.position) & (seq.position >= row.position - 3)]
    assert row.context_before == "".join(before.token)
    assert row.token == seq[seq.position == row.position].token.iloc[0]


def test_step_position_heatmap(env):
    p = analyses.AnalysisParams(n_bins=5)
    cells = analyses.run("step_position_heatmap", RUN, con=env["con"], params=p)["cells"]
    r = resp(env)
    width = math.ceil((r.resp_pos.max() + 1) / 5)
    want = r.groupby(["step", r.resp_pos // width * width]).alignment.mean()
    got = cells.set_index(["step", "bin_start"])["mean_alignment"]
    np.testing.assert_allclose(got.sort_index().to_numpy(), want.sort_index().to_numpy(), rtol=1e-9)


def test_heatmap_cells_without_data_are_grey_not_the_white_of_zero():
    from backend.analysis import figures
    cells = pd.DataFrame({"step": [10, 10, 20], "bin_start": [0, 8, 0], "mean_alignment": [0.2, -0.1, 0.05],
                          "n": [5, 3, 4], "bin_width": [8, 8, 8]})
    fig = figures.step_position_heatmap(cells)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isnan(z).sum() == 1                               # step 20 has no tokens in the second bin
    assert fig.layout.plot_bgcolor == figures.NO_DATA != "white"  # a NaN cell shows the plot background
    assert any("grey" in a.text for a in fig.layout.annotations)


def test_lora_ab(env):
    f = analyses.run("lora_ab", RUN, con=env["con"])
    m = response_modules(env, env["last"])
    per = m.assign(sq=m.magnitude ** 2).groupby(["sample_idx", "position", "layer", "part"]).sq.sum() ** 0.5
    want = per.groupby(["layer", "part"]).mean().unstack()
    got = f["layers"].set_index("layer")
    np.testing.assert_allclose(got["lora_A"], want["lora_A"], rtol=1e-6)
    np.testing.assert_allclose(got["lora_B"], want["lora_B"], rtol=1e-6)
    np.testing.assert_allclose(got["ratio_b_over_a"], want["lora_B"] / want["lora_A"], rtol=1e-6)
    tot = m.assign(sq=m.magnitude ** 2).groupby(["sample_idx", "position", "part"]).sq.sum() ** 0.5
    overall = tot.groupby("part").mean()
    assert f["overall"]["ratio_b_over_a"].iloc[0] == pytest.approx(overall["lora_B"] / overall["lora_A"], rel=1e-6)


def test_category_breakdown(env):
    c = analyses.run("category_breakdown", RUN, con=env["con"])["categories"].set_index("category")
    want = resp(env, env["last"]).groupby("category").alignment.agg(["mean", "size"])
    assert set(c.index) == set(want.index)
    for cat, row in want.iterrows():
        assert c.loc[cat, "mean_alignment"] == pytest.approx(row["mean"], rel=1e-9)
        assert c.loc[cat, "n"] == row["size"]


def test_magnitude_alignment(env):
    f = analyses.run("magnitude_alignment", RUN, con=env["con"], params=analyses.AnalysisParams(scatter_points=50))
    r = resp(env, env["last"])
    want = np.corrcoef(r.magnitude, r.alignment)[0, 1]                 # raw magnitudes, not the log axis
    assert f["stats"]["pearson_r"].iloc[0] == pytest.approx(want, rel=1e-9)
    assert f["stats"]["slope"].iloc[0] == pytest.approx(np.polyfit(r.magnitude, r.alignment, 1)[0], rel=1e-9)
    ranks = np.corrcoef(r.magnitude.rank(), r.alignment.rank())[0, 1]  # Pearson of average ranks
    assert f["stats"]["spearman_r"].iloc[0] == pytest.approx(ranks, rel=1e-9)
    assert f["stats"]["n"].iloc[0] == len(r) and len(f["points"]) == 50


def test_module_types(env):
    df = analyses.run("module_types", RUN, con=env["con"])["modules"].set_index(["module", "part"])
    m = response_modules(env, env["last"])
    want = m.groupby(["module", "part"]).agg(mean=("alignment", "mean"), dot=("dot", "sum"))
    np.testing.assert_allclose(df["mean_alignment"].sort_index(), want["mean"].sort_index(), rtol=1e-9)
    np.testing.assert_allclose(df["share"].sort_index(), (want["dot"] / want["dot"].sum()).sort_index(), rtol=1e-6)
    assert len(df) == 7 * 2
    # per (layer, module, part) over response tokens, from the agg_layer_module_part aggregate
    lm = analyses.run("module_types", RUN, step=10, con=env["con"])["layer_modules"]
    want = response_modules(env, 10).groupby(["layer", "module", "part"]).agg(
        n=("alignment", "size"), mean=("alignment", "mean"), mag=("magnitude", "mean"), dot=("dot", "sum"))
    got = lm.set_index(["layer", "module", "part"]).sort_index()
    assert got.index.tolist() == want.index.tolist() and got["n"].tolist() == want["n"].tolist()
    for col, ref in (("mean_alignment", "mean"), ("mean_magnitude", "mag"), ("dot_sum", "dot")):
        np.testing.assert_allclose(got[col], want[ref], rtol=1e-6, err_msg=col)


def test_concentration(env):
    f = analyses.run("concentration", RUN, con=env["con"])
    v = resp(env, env["last"]).magnitude.to_numpy()
    st = f["stats"].iloc[0]
    gini_mad = np.abs(v[:, None] - v[None, :]).sum() / (2 * v.size ** 2 * v.mean())
    assert st["gini"] == pytest.approx(gini_mad, rel=1e-9)
    s = np.sort(v)[::-1]
    for p in (50, 80, 90):
        k = next(k for k in range(1, v.size + 1) if s[:k].sum() >= p / 100 * v.sum())
        assert st[f"tokens_for_{p}pct"] == pytest.approx(k / v.size)
    lz = f["lorenz"]
    assert (lz.token_fraction.iloc[0], lz.mass_fraction.iloc[0]) == (0.0, 0.0)
    assert (lz.token_fraction.iloc[-1], lz.mass_fraction.iloc[-1]) == (1.0, 1.0)


def test_autocorrelation(env):
    lags = analyses.run("autocorrelation", RUN, con=env["con"], params=analyses.AnalysisParams(max_lag=12))["lags"]
    seqs = [g.alignment.to_numpy() for _, g in resp(env, env["last"]).groupby("sample_idx")]
    for k in (1, 5, 12):
        rs = []
        for a in seqs:
            if a.size > 2 * k:
                d = a - a.mean()
                rs.append(sum(d[t] * d[t + k] for t in range(a.size - k)) / (d ** 2).sum())
        row = lags[lags.lag == k].iloc[0]
        assert row["r"] == pytest.approx(np.mean(rs), rel=1e-9)
        assert row["n_sequences"] == len(rs)
        assert row["band"] == pytest.approx(1.96 * math.sqrt(sum(1 / a.size for a in seqs if a.size > 2 * k)) / len(rs))


def test_layer_position_heatmap(env):
    p = analyses.AnalysisParams(n_bins=3, module="down_proj")
    cells = analyses.run("layer_position_heatmap", RUN, step=5, con=env["con"], params=p)["cells"]
    m = response_modules(env, 5)
    m = m[m.module == "down_proj"]
    width = math.ceil((resp(env, 5).resp_pos.max() + 1) / 3)
    want = m.groupby(["layer", m.resp_pos // width * width]).alignment.mean()
    np.testing.assert_allclose(cells.set_index(["layer", "bin_start"])["mean_alignment"].sort_index(),
                               want.sort_index(), rtol=1e-9)
    assert (cells.module == "down_proj").all()
    with pytest.raises(ValueError, match="module 'mlp' is not traced.*modules: down_proj, gate_proj"):
        analyses.run("layer_position_heatmap", RUN, con=env["con"], params=analyses.AnalysisParams(module="mlp"))


def test_every_figure_builds_with_titles(env):
    """Every registered analysis of the kind has a figure builder that runs on its own frames."""
    results = analyses.run_all(RUN, con=env["con"])
    assert list(results) == analyses.names(kind="train", run_id=RUN, con=env["con"])
    for name, frames in results.items():
        assert analyses.get(name).figure(frames).layout.title.text, name
        fig = figures.build(name, frames)
        assert fig.layout.title.text, name
        assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text, name
        assert any(getattr(tr, "hovertemplate", None) for tr in fig.data), name


# ------------------------------------------------------------------------------------------------ trace mode
def test_figure_titles_name_the_trace_mode(tmp_path):
    """Alignment means a different thing in position and token mode: every figure's title names the mode of
    the run it draws (tokens.mode), and a figure overlaying runs of both modes names both."""
    con = index.connect(index.MEMORY)
    try:
        for mode in ("position", "token"):
            index.ingest_run(con, make_run(SynthConfig.tiny(mode=mode), tmp_path / "runs", run_id=mode))
        for mode in ("position", "token"):
            results = analyses.run_all(mode, con=con)
            for name, frames in results.items():
                assert set(frames["mode"]["mode"]) == {mode}, name
                title = figures.build(name, frames).layout.title.text
                assert title.endswith(f" ({mode} mode)"), (name, title)
                assert analyses.get(name).figure(frames).layout.title.text == title, name
        both = {k: pd.concat([analyses.run("concentration", m, con=con)[k].assign(run=m)
                              for m in ("token", "position")], ignore_index=True)
                for k in ("lorenz", "stats", "mode")}
        assert figures.build("concentration", both).layout.title.text.endswith(" (position / token mode)")
    finally:
        con.close()
    # frames without a mode frame (a builder fed by hand) keep the plain title
    assert figures.mode_suffix(None) == "" and figures.mode_suffix(pd.DataFrame({"mode": []})) == ""
    with pytest.raises(ValueError, match="mode must be 'position' or 'token', got 'both'"):
        SynthConfig.tiny(mode="both")
