"""The analyses of an ``actgrad`` run (backend.jobs.actgrad), each registered with its figure.

    from backend.analysis import analyses
    frames = analyses.run("actgrad_heatmap", run_id, con=con)        # layers x positions, all samples
    frames = heatmap_frames(con, run_id, sample=3)                    # one sample, its real tokens
    frames = pca_frames(con, run_id, target="last =", layers=[0, 3])  # PCA of the target vectors per layer

- ``actgrad_heatmap``: mean ||dL/dh_{l,t}|| per (layer, position), over samples after writing every digit as
  ``X`` (``12 + 7`` and ``30 + 4`` both read ``XX + X``); each column is labelled with the template token most
  samples have there and the share that agree, so aligned templates (modadd, a fixed prompt format) line up.
  With ``sample`` (``heatmap_frames``): that sample's norms with its real tokens. Colour: log10 of the norm.
- ``actgrad_layer_norms``: per layer, mean and spread (10th, 50th, 90th percentile) of the norms, response and
  prompt positions apart.
- ``actgrad_pca``: per layer, the first two principal components (scikit-learn PCA, centred) of the target
  vectors of one target (the first one found), coloured by the sample's answer or an operand (the integers of
  the prompt, in order), hover showing the sample's text.

The SQL is this module's (the kind's own tables); the figures are pure DataFrame -> Figure functions.
"""
from __future__ import annotations

import html
import re
from functools import partial

import duckdb
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from backend.analysis import analyses
from backend.analysis.analyses import AnalysisParams, Frames

KIND = "actgrad"
register = partial(analyses.register, kind=KIND)
COLOR_BY = ("answer", "operand 1", "operand 2")
MAX_PCA_PANELS = 6
_DIGITS = re.compile(r"\d")
_INTS = re.compile(r"-?\d+")

NORMS_OF_SAMPLE = """SELECT layer, position, token, is_response, norm FROM actgrad
WHERE run_id = ? AND sample_idx = ? ORDER BY layer, position"""
ALL_NORMS = """SELECT sample_idx, layer, position, token, is_response, norm FROM actgrad WHERE run_id = ?"""
# positions whose gradient is exactly 0 (the last token: it predicts nothing) are counted apart, not averaged
LAYER_NORMS = """SELECT layer, CASE WHEN is_response THEN 'response' ELSE 'prompt' END AS part,
  count(*) FILTER (WHERE norm > 0) AS n, count(*) FILTER (WHERE norm = 0) AS n_zero,
  avg(norm) FILTER (WHERE norm > 0) AS mean, stddev_samp(norm) FILTER (WHERE norm > 0) AS std,
  quantile_cont(norm, 0.1) FILTER (WHERE norm > 0) AS p10, quantile_cont(norm, 0.5) FILTER (WHERE norm > 0) AS p50,
  quantile_cont(norm, 0.9) FILTER (WHERE norm > 0) AS p90
FROM actgrad WHERE run_id = ? GROUP BY layer, part ORDER BY part, layer"""
SAMPLES = """SELECT sample_idx, prompt, response, answer, loss, n_tokens FROM actgrad_samples WHERE run_id = ?
ORDER BY sample_idx"""
TARGETS = """SELECT target, count(*) FILTER (WHERE status = 'found') AS found,
  count(*) FILTER (WHERE status = 'skipped') AS skipped, min(rowid) AS first_row
FROM actgrad_targets WHERE run_id = ? GROUP BY target ORDER BY first_row"""
SKIPPED = """SELECT sample_idx, target, reason FROM actgrad_targets WHERE run_id = ? AND status = 'skipped'
ORDER BY sample_idx, target"""
VECTOR_LAYERS = "SELECT DISTINCT layer FROM actgrad_vectors WHERE run_id = ? AND target = ? ORDER BY layer"
VECTORS = """SELECT sample_idx, layer, position, token, norm, vector FROM actgrad_vectors
WHERE run_id = ? AND target = ? AND layer = ? ORDER BY sample_idx"""


def _q(con: duckdb.DuckDBPyConnection, query: str, params: list[object]) -> pd.DataFrame:
    df = con.execute(query, params).df()
    f32 = [c for c in df.columns if df[c].dtype == np.float32]
    return df.astype({c: np.float64 for c in f32}) if f32 else df


def template_token(token: str) -> str:
    """A token with every digit written X: what aligns samples of one template."""
    return _DIGITS.sub("X", token)


def samples(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """The run's samples: prompt, response, answer, loss, tokens."""
    return _q(con, SAMPLES, [run_id])


def targets(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """Per target as written: how many samples it was found in and how many were skipped."""
    return _q(con, TARGETS, [run_id]).drop(columns="first_row")


def skipped(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    """The (sample, target) pairs whose pattern is absent, with the reason."""
    return _q(con, SKIPPED, [run_id])


# ------------------------------------------------------------------------------------------------ heatmap
ALIGN = ("start", "response")


def heatmap_frames(con: duckdb.DuckDBPyConnection, run_id: str, sample: int | None = None,
                   align: str = "start") -> Frames:
    """``cells`` (layer, position, label, norm, agree, n): one sample's norms with its tokens (``sample``), or
    the mean over samples per (layer, position) labelled by the majority template token. ``align``: positions
    counted from the sequence start, or from each sample's first response token (negative: the prompt's end)."""
    if align not in ALIGN:
        raise ValueError(f"align {align!r}: choose one of {', '.join(ALIGN)}")
    if sample is not None:
        df = _q(con, NORMS_OF_SAMPLE, [run_id, int(sample)])
        if df.empty:
            n = len(samples(con, run_id))
            raise ValueError(f"sample {sample} is not in actgrad run {run_id!r}; samples: 0..{n - 1}")
        df["label"] = df["token"]
        df["agree"], df["n"] = 1.0, 1
        return {"cells": df[["layer", "position", "label", "norm", "agree", "n"]],
                "info": pd.DataFrame({"sample": [int(sample)]})}
    df = _q(con, ALL_NORMS, [run_id])
    if df.empty:
        raise ValueError(f"actgrad run {run_id!r} has no norms in the index")
    df["tmpl"] = df["token"].map(template_token)
    if align == "response":     # shift each sample so that its first response token sits at position 0
        start = df[df["is_response"]].groupby("sample_idx")["position"].min()
        df = df[df["sample_idx"].isin(start.index)].copy()
        df["position"] = df["position"] - df["sample_idx"].map(start)
    first = df[df["layer"] == df["layer"].min()]
    counts = first.groupby(["position", "tmpl"]).size().rename("k").reset_index()
    per_pos = counts.groupby("position")["k"].sum().rename("n")
    top = counts.sort_values(["position", "k"], ascending=[True, False]).drop_duplicates("position")
    top = top.set_index("position").join(per_pos)
    cells = df.groupby(["layer", "position"], as_index=False)["norm"].mean()
    cells["label"] = cells["position"].map(top["tmpl"])
    cells["agree"] = cells["position"].map(top["k"] / top["n"])
    cells["n"] = cells["position"].map(top["n"]).astype(int)
    return {"cells": cells[["layer", "position", "label", "norm", "agree", "n"]],
            "info": pd.DataFrame({"sample": [None]})}


def heatmap_figure(frames: Frames) -> go.Figure:
    """Layers (rows) x positions (columns), colour log10 ||dL/dh||, column labels the tokens (escaped)."""
    cells = frames["cells"]
    one = frames["info"]["sample"].iloc[0]
    title = (f"||dL/dh|| per layer and position, sample {int(one)}" if one is not None and pd.notna(one)
             else "Mean ||dL/dh|| per layer and position over samples (digits as X)")
    z = cells.pivot(index="layer", columns="position", values="norm")
    labels = cells.drop_duplicates("position").set_index("position")
    agree = labels["agree"].reindex(z.columns).to_numpy()
    n = labels["n"].reindex(z.columns).to_numpy()
    ticks = [html.escape(str(t).replace("\n", "⏎")) for t in labels["label"].reindex(z.columns)]
    raw = z.to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore"):     # an exact 0 (the last token predicts nothing) is left blank
        logz = np.where(raw > 0, np.log10(np.where(raw > 0, raw, 1.0)), np.nan)
    custom = np.dstack([np.broadcast_to(np.array(ticks, dtype=object), logz.shape), z.to_numpy(),
                        np.broadcast_to(agree, logz.shape), np.broadcast_to(n, logz.shape)])
    fig = go.Figure(go.Heatmap(
        z=logz, x=list(z.columns), y=list(z.index), colorscale="Viridis", customdata=custom,
        colorbar=dict(title="log10 norm"),
        hovertemplate=("layer %{y}, position %{x} «%{customdata[0]}»<br>||dL/dh|| %{customdata[1]:.4g}"
                       "<br>samples with this token here %{customdata[2]:.0%} of %{customdata[3]}<extra></extra>")))
    fig.update_layout(title=dict(text=title), height=max(300, 60 + 28 * len(z.index)), width=1100,
                      margin=dict(l=70, r=40, t=70, b=90))
    step = max(1, len(ticks) // 80)       # at most ~80 labels: long sequences stay readable
    fig.update_xaxes(title_text="position (token)", tickmode="array", tickvals=list(z.columns)[::step],
                     ticktext=ticks[::step], tickangle=-60)
    fig.update_yaxes(title_text="decoder layer", dtick=1)
    return fig


@register("actgrad_heatmap", "Activation-gradient norms: layers x tokens", "run", figure=heatmap_figure)
def actgrad_heatmap(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None, p: AnalysisParams) -> Frames:
    """Mean ||dL/dh_{l,t}|| per layer and position over samples, digits written X (module docstring)."""
    return heatmap_frames(con, run_id)


# ------------------------------------------------------------------------------------------------ by layer
def layer_norms_figure(frames: Frames) -> go.Figure:
    """Mean norm per layer with the 10-90th percentile band and the median, response and prompt apart."""
    df = frames["layers"]
    fig = go.Figure()
    for part, color in (("response", "#1f77b4"), ("prompt", "#ff7f0e")):
        g = df[df["part"] == part]
        if g.empty:
            continue
        fig.add_trace(go.Scatter(x=list(g["layer"]) + list(g["layer"])[::-1], y=list(g["p90"]) + list(g["p10"])[::-1],
                                 fill="toself", line=dict(width=0), fillcolor=color, opacity=0.15, hoverinfo="skip",
                                 name=f"{part}: 10-90th percentile"))
        fig.add_trace(go.Scatter(x=g["layer"], y=g["mean"], mode="lines+markers", line=dict(color=color),
                                 name=f"{part}: mean", customdata=np.stack([g["std"], g["p50"], g["n"]], axis=-1),
                                 hovertemplate=(f"{part} layer %{{x}}<br>mean %{{y:.4g}} (sd %{{customdata[0]:.3g}})"
                                                "<br>median %{customdata[1]:.4g}<br>n %{customdata[2]}"
                                                "<extra></extra>")))
        fig.add_trace(go.Scatter(x=g["layer"], y=g["p50"], mode="lines", line=dict(color=color, dash="dot"),
                                 name=f"{part}: median", hoverinfo="skip"))
    fig.update_layout(title=dict(text="||dL/dh|| by decoder layer (mean, median, 10-90th percentile)"),
                      width=900, height=460, legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(title_text="decoder layer", dtick=1)
    fig.update_yaxes(title_text="||dL/dh|| (log scale)", type="log")
    return fig


@register("actgrad_layer_norms", "Activation-gradient norm by layer", "run", figure=layer_norms_figure)
def actgrad_layer_norms(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None, p: AnalysisParams) -> Frames:
    """Per layer: mean, sd and 10/50/90th percentiles of ||dL/dh_{l,t}|| over the positions with a non-zero
    gradient (``n_zero`` counts the others), response and prompt positions apart."""
    return {"layers": _q(con, LAYER_NORMS, [run_id])}


# ------------------------------------------------------------------------------------------------ PCA
def _operand(prompt: str, i: int) -> float:
    ints = _INTS.findall(str(prompt))
    return float(ints[i]) if len(ints) > i else float("nan")


def _number(text: object) -> float:
    m = _INTS.fullmatch(str(text).strip())
    return float(m.group()) if m else float("nan")


def pca_frames(con: duckdb.DuckDBPyConnection, run_id: str, target: str | None = None,
               layers: list[int] | None = None) -> Frames:
    """``points`` (layer, sample_idx, pc1, pc2, norm, token, answer, operand 1, operand 2, text) and
    ``variance`` (layer, pc, explained ratio) of the PCA of ``target``'s vectors (default: the first target
    found in any sample), per layer (default: all layers that have vectors)."""
    from sklearn.decomposition import PCA  # here: the app imports this module at start
    tg = targets(con, run_id)
    found = tg[tg["found"] > 0]
    if found.empty:
        raise ValueError(f"actgrad run {run_id!r} found none of its targets "
                         f"({', '.join(tg['target']) or 'none'}) in any sample: no vectors for a PCA")
    if target is None:
        target = str(found["target"].iloc[0])
    elif target not in set(found["target"]):
        raise ValueError(f"target {target!r} has no vectors in run {run_id!r}; targets with vectors: "
                         f"{', '.join(found['target'])}")
    have = [int(r[0]) for r in con.execute(VECTOR_LAYERS, [run_id, target]).fetchall()]
    if layers is None:
        layers = have
    bad = [la for la in layers if la not in have]
    if bad:
        raise ValueError(f"layers {bad} have no vectors in run {run_id!r}; layers: {have}")
    smp = samples(con, run_id).set_index("sample_idx")
    points, variance = [], []
    for layer in layers:
        df = con.execute(VECTORS, [run_id, target, layer]).df()
        x = np.stack([np.asarray(v, dtype=np.float64) for v in df["vector"]])        # (n, D)
        k = min(2, x.shape[0], x.shape[1])
        if x.shape[0] < 2:
            raise ValueError(f"target {target!r} was found in {x.shape[0]} sample(s); a PCA needs at least 2")
        # the norms span orders of magnitude across layers: scale each layer to unit mean norm (PCA is centred
        # and directions do not change under a common scale; the numbers stay O(1) for the solver)
        x = x / max(np.linalg.norm(x, axis=1).mean(), 1e-300)
        pca = PCA(n_components=k, svd_solver="full")
        xy = pca.fit_transform(x)
        pc2 = xy[:, 1] if k > 1 else np.zeros(len(xy))
        s = smp.reindex(df["sample_idx"])
        points.append(pd.DataFrame({
            "layer": layer, "sample_idx": df["sample_idx"].to_numpy(), "pc1": xy[:, 0], "pc2": pc2,
            "norm": df["norm"].astype(np.float64).to_numpy(), "token": df["token"].to_numpy(),
            "answer": [_number(a) for a in s["answer"]],
            "operand 1": [_operand(t, 0) for t in s["prompt"]], "operand 2": [_operand(t, 1) for t in s["prompt"]],
            "text": [f"{pr} → {re}" for pr, re in zip(s["prompt"], s["response"])]}))
        variance += [{"layer": layer, "pc": i + 1, "ratio": float(r)}
                     for i, r in enumerate(pca.explained_variance_ratio_)]
    return {"points": pd.concat(points, ignore_index=True), "variance": pd.DataFrame(variance),
            "info": pd.DataFrame({"target": [target], "color": ["answer"]})}


def _short(text: str, n: int = 140) -> str:
    text = str(text).replace("\n", "⏎")
    return html.escape(text if len(text) <= n else text[:n - 1] + "…")


def pca_figure(frames: Frames) -> go.Figure:
    """One scatter per layer (at most MAX_PCA_PANELS, evenly spread), points coloured by ``info.color``."""
    pts, var, info = frames["points"], frames["variance"], frames["info"]
    target, color = str(info["target"].iloc[0]), str(info["color"].iloc[0])
    if color not in COLOR_BY:
        raise ValueError(f"colour by {color!r}: choose one of {', '.join(COLOR_BY)}")
    layers = sorted(pts["layer"].unique())
    if len(layers) > MAX_PCA_PANELS:
        layers = [layers[i] for i in np.linspace(0, len(layers) - 1, MAX_PCA_PANELS).round().astype(int)]
    cols = min(3, len(layers))
    rows = -(-len(layers) // cols)

    def ratio(layer: int, pc: int) -> str:
        r = var[(var["layer"] == layer) & (var["pc"] == pc)]["ratio"]
        return f"{float(r.iloc[0]):.0%}" if len(r) else "-"
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[
        f"layer {la} (PC1 {ratio(la, 1)}, PC2 {ratio(la, 2)})" for la in layers])
    cvals = pts[color]
    cmin, cmax = (float(np.nanmin(cvals)), float(np.nanmax(cvals))) if cvals.notna().any() else (0.0, 1.0)
    for i, layer in enumerate(layers):
        g = pts[pts["layer"] == layer]
        custom = np.stack([g["sample_idx"], [_short(t) for t in g["text"]], g[color], g["norm"]], axis=-1)
        fig.add_trace(go.Scatter(
            x=g["pc1"], y=g["pc2"], mode="markers", showlegend=False, customdata=custom,
            marker=dict(size=8, color=g[color], colorscale="Turbo", cmin=cmin, cmax=cmax,
                        showscale=i == 0, colorbar=dict(title=color)),
            hovertemplate=(f"sample %{{customdata[0]}}<br>%{{customdata[1]}}<br>{color} %{{customdata[2]}}"
                           "<br>||dL/dh|| %{customdata[3]:.4g}<extra></extra>")),
            row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(title=dict(text=f"PCA of dL/dh at target {html.escape(target)!s}, coloured by {color}"),
                      width=1100, height=360 * rows + 80)
    fig.update_xaxes(title_text="PC1")
    fig.update_yaxes(title_text="PC2")
    return fig


@register("actgrad_pca", "PCA of the target-position gradients per layer", "run", figure=pca_figure)
def actgrad_pca(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None, p: AnalysisParams) -> Frames:
    """PCA (2 components) of the first target's vectors per layer, coloured by the answer value."""
    return pca_frames(con, run_id)


# ------------------------------------------------------------------------------------------------ summary
@analyses.register_summary(KIND, needs=("actgrad_layer_norms",), definitions={
    "layers": "decoder layers recorded",
    "response_norm_first_layer": "mean ||dL/dh|| over response positions (non-zero) at the first recorded layer",
    "response_norm_last_layer": "the same at the last recorded layer",
    "depth_ratio": "response_norm_first_layer / response_norm_last_layer (> 1: the signal grows towards the input)",
    "peak_layer": "the layer with the largest mean response-position norm"})
def summary(step: int | None, results: dict[str, Frames]) -> dict[str, object]:
    """The headline numbers of an actgrad run (definitions above)."""
    df = results["actgrad_layer_norms"]["layers"]
    r = df[df["part"] == "response"].sort_values("layer")
    if r.empty:
        return {"layers": int(df["layer"].nunique())}
    first, last = float(r["mean"].iloc[0]), float(r["mean"].iloc[-1])
    return {"layers": int(df["layer"].nunique()), "response_norm_first_layer": first,
            "response_norm_last_layer": last, "depth_ratio": first / last if last > 0 else float("nan"),
            "peak_layer": int(r.loc[r["mean"].idxmax(), "layer"])}
