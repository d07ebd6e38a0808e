"""Figure builders of the probe analyses: pure DataFrame -> plotly Figure (backend.analysis.probe's frames).

    fig = pr_rank95(frames["spectra"]); energy_curves(frames["energy"]); cosine_heatmap(frames["cosine"])
    fig = direction_hist(prompts, summary); direction_bars(prompts); pca_scatter(points, color="bucket")

Base is drawn in blue and trained in red throughout; points carry (model, prompt_idx, sample_idx) as
customdata so a click can open the rollout. Token text in hovers is shown quoted and HTML-escaped.
"""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from backend.analysis.figures import PALETTE, _empty, _layout, _show

MODEL_COLORS = {"base": PALETTE[0], "trained": PALETTE[1]}
COLOR_BY = ("bucket", "correct", "model")


def _models(df: pd.DataFrame) -> list[str]:
    return sorted(df["model"].unique(), key=lambda m: m != "base")


def pr_rank95(spectra: pd.DataFrame) -> go.Figure:
    """Participation ratio and rank95 per entropy bucket, base vs trained side by side."""
    if spectra.empty:
        return _empty("Exp 1: spectra per entropy bucket", "no vectors")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("participation ratio (sum λ)² / sum λ²",
                                                        "rank95: components for 95% of the energy"))
    for model in _models(spectra):
        g = spectra[spectra["model"] == model]
        for col, y in ((1, "pr"), (2, "rank95")):
            fig.add_trace(go.Bar(x=g["bucket"], y=g[y], name=model, legendgroup=model, showlegend=col == 1,
                                 marker_color=MODEL_COLORS.get(model), customdata=g[["n"]],
                                 hovertemplate=f"{model} · bucket %{{x}}<br>{y} %{{y:.3g}}<br>n %{{customdata[0]}}"
                                               "<extra></extra>"), row=1, col=col)
    _layout(fig, "Exp 1: spectra per entropy bucket (0 = lowest entropy)", "entropy bucket", "", barmode="group")
    fig.update_yaxes(title_text="PR", row=1, col=1)
    fig.update_yaxes(title_text="rank95", row=1, col=2)
    fig.update_xaxes(dtick=1)
    return fig


def energy_curves(energy: pd.DataFrame) -> go.Figure:
    """Cumulative energy cumsum(λ)_k / sum λ against k, one curve per (model, bucket)."""
    if energy.empty:
        return _empty("Cumulative energy", "no vectors")
    fig = go.Figure()
    for model in _models(energy):
        for b, g in energy[energy["model"] == model].groupby("bucket"):
            fig.add_trace(go.Scatter(x=g["k"], y=g["energy"], mode="lines", name=f"{model} · bucket {b}",
                                     line=dict(color=MODEL_COLORS.get(model), dash="solid" if model == "base" else "dash",
                                               width=1 + 0.6 * int(b)),
                                     hovertemplate=f"{model} · bucket {b}<br>k %{{x}}<br>energy %{{y:.3f}}<extra></extra>"))
    fig.add_hline(y=0.95, line_dash="dot", line_color="#999")
    return _layout(fig, "Cumulative energy of the singular values (thicker: higher-entropy bucket)",
                   "number of components k (log scale)", "cumsum(λ)_k / sum λ", xaxis_type="log")


def cosine_heatmap(cosine: pd.DataFrame) -> go.Figure:
    """|cos| between the top-1 singular vectors of every two buckets, one panel per model."""
    if cosine.empty:
        return _empty("Cross-bucket |cos| of top singular vectors", "no vectors")
    models = _models(cosine)
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models)
    for k, model in enumerate(models, start=1):
        z = cosine[cosine["model"] == model].pivot(index="bucket_a", columns="bucket_b", values="abs_cos")
        fig.add_trace(go.Heatmap(z=z.to_numpy(), x=list(z.columns), y=list(z.index), zmin=0, zmax=1,
                                 colorscale="Viridis", showscale=k == len(models),
                                 text=np.round(z.to_numpy(), 2), texttemplate="%{text}",
                                 hovertemplate=f"{model}<br>buckets %{{y}} and %{{x}}<br>|cos| %{{z:.3f}}<extra></extra>"),
                      row=1, col=k)
    _layout(fig, "Cross-bucket |cos| of the top-1 singular vectors", "bucket", "bucket")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(dtick=1)
    return fig


def direction_hist(prompts: pd.DataFrame, summary: pd.DataFrame) -> go.Figure:
    """Exp 2: histograms of cos(m_correct, m_incorrect) and of the half-split noise floor, per model."""
    if prompts.empty:
        return _empty("Exp 2: correct vs incorrect direction", "no prompt has 2+ top-bucket tokens on each side")
    fig = go.Figure()
    for model in _models(prompts):
        g = prompts[prompts["model"] == model]
        c = MODEL_COLORS.get(model)
        fig.add_trace(go.Histogram(x=g["cos"], name=f"{model}: cos(m_c, m_i)", marker_color=c, opacity=0.75,
                                   xbins=dict(start=-1, end=1, size=0.05),
                                   hovertemplate="cos %{x}<br>%{y} prompts<extra></extra>"))
        fig.add_trace(go.Histogram(x=g["noise_floor"], name=f"{model}: noise floor (half split)",
                                   marker_color=c, opacity=0.3, xbins=dict(start=-1, end=1, size=0.05),
                                   hovertemplate="half-split cos %{x}<br>%{y} prompts<extra></extra>"))
    lines = [f"{r.model}: mean cos {r.mean_cos:.3f} [{r.cos_ci_lo:.3f}, {r.cos_ci_hi:.3f}] · floor "
             f"{r.mean_noise_floor:.3f} [{r.noise_ci_lo:.3f}, {r.noise_ci_hi:.3f}] · {r.n_prompts} prompts, "
             f"{r.n_skipped} skipped" for r in summary.itertuples()]
    fig.add_annotation(text="<br>".join(lines), showarrow=False, xref="paper", yref="paper", x=0, y=1.0,
                       xanchor="left", yanchor="bottom", align="left", font=dict(size=11))
    return _layout(fig, "Exp 2: cos(mean correct, mean incorrect) at top-entropy tokens, per prompt",
                   "cosine", "prompts", barmode="overlay", margin=dict(l=70, r=40, t=110, b=60))


def direction_bars(prompts: pd.DataFrame) -> go.Figure:
    """Exp 2 per prompt, sorted: cos(m_c, m_i) as bars with the prompt's noise floor as a marker."""
    if prompts.empty:
        return _empty("Exp 2 per prompt", "no prompt has 2+ top-bucket tokens on each side")
    fig = go.Figure()
    for model in _models(prompts):
        g = prompts[prompts["model"] == model].sort_values("cos").reset_index(drop=True)
        x = [f"{model[0]}{p}" for p in g["prompt_idx"]]
        cd = g[["prompt_idx", "n_correct", "n_incorrect", "noise_floor"]]
        fig.add_trace(go.Bar(x=x, y=g["cos"], name=f"{model}: cos(m_c, m_i)", marker_color=MODEL_COLORS.get(model),
                             customdata=cd, hovertemplate="prompt %{customdata[0]}<br>cos %{y:.3f}<br>"
                             "tokens %{customdata[1]} correct / %{customdata[2]} incorrect<br>noise floor "
                             "%{customdata[3]:.3f}<extra></extra>"))
        fig.add_trace(go.Scatter(x=x, y=g["noise_floor"], mode="markers", name=f"{model}: noise floor",
                                 marker=dict(color="black", symbol="line-ew-open", size=12),
                                 hovertemplate="noise floor %{y:.3f}<extra></extra>"))
    return _layout(fig, "Exp 2 per prompt (sorted; b = base, t = trained)", "prompt", "cosine")


def pca_scatter(points: pd.DataFrame, color: str = "bucket") -> go.Figure:
    """The vectors' 2-D PCA, coloured by ``color`` (bucket, correct or model); hover: token and context."""
    if color not in COLOR_BY:
        raise ValueError(f"colour by {color!r} is not available; choose one of: {', '.join(COLOR_BY)}")
    if points.empty:
        return _empty("PCA of the gradient vectors", "no vectors")
    fig = go.Figure()
    for key, g in points.groupby(color, sort=True):
        text = [f"{html.escape(_show(t))}<br>context: {html.escape(_show(c if isinstance(c, str) else ''))}"
                for t, c in zip(g["token"], g["context"])]
        cd = g[["model", "prompt_idx", "sample_idx", "position", "bucket", "correct", "entropy"]]
        fig.add_trace(go.Scattergl(
            x=g["pc1"], y=g["pc2"], mode="markers", name=f"{color} {key}", text=text, customdata=cd,
            marker=dict(size=5, opacity=0.7, color=MODEL_COLORS.get(key) if color == "model" else None),
            hovertemplate="%{text}<br>%{customdata[0]} · prompt %{customdata[1]} · sample %{customdata[2]} · "
                          "position %{customdata[3]}<br>bucket %{customdata[4]} · correct %{customdata[5]} · "
                          "entropy %{customdata[6]:.3g}<extra></extra>"))
    return _layout(fig, f"PCA of the gradient vectors, coloured by {color}", "PC 1", "PC 2")
