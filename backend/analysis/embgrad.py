"""Reading and drawing a train run's embedding token gradients (``--embgrad-every N``; backend.grads.embgrad
records them, backend.analysis.embgrad_metrics defines the metrics).

    steps = embgrad_steps(run_id)                 # one row per recorded step: sparsity, Gini, tokens for 50/90% ...
    top = top_tokens(run_id, step=40, k=20)       # the k tokens with the largest n_v at that step, with their text
    metrics_figure(steps); top_tokens_figure(top)
"""
from __future__ import annotations

import html

import duckdb
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from backend.index import queries

STEPS = """SELECT step, n_vocab, n_with_grad, max_norm, gradient_sparsity, gradient_gini, tokens_for_50pct,
  tokens_for_90pct, concentration_ratio, stride, stride_group_variance, stride_group_max_ratio
FROM embgrad_steps WHERE run_id = ? ORDER BY step"""
TOP = """SELECT token_id, token, count, norm FROM embgrad WHERE run_id = ? AND step = ?
ORDER BY norm DESC, token_id LIMIT ?"""


def embgrad_steps(run_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """The run's recorded steps and their metrics (empty when it recorded none)."""
    with queries.cursor(con) as cur:
        df = cur.execute(STEPS, [run_id]).df()
    f32 = [c for c in df.columns if df[c].dtype == np.float32]
    return df.astype({c: np.float64 for c in f32}) if f32 else df


def top_tokens(run_id: str, step: int, k: int = 20, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """The ``k`` tokens with the largest n_v at ``step``; ValueError listing the recorded steps otherwise."""
    steps = list(embgrad_steps(run_id, con)["step"])
    if step not in steps:
        raise ValueError(f"step {step} has no embedding gradients in run {run_id!r}; recorded steps: "
                         f"{', '.join(map(str, steps)) or 'none (train with --embgrad-every N)'}")
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be in 1..1000, got {k}")
    with queries.cursor(con) as cur:
        df = cur.execute(TOP, [run_id, int(step), int(k)]).df()
    df["norm"] = df["norm"].astype(np.float64)
    return df


def metrics_figure(steps: pd.DataFrame) -> go.Figure:
    """Over the recorded steps: sparsity, Gini, concentration ratio (left); tokens for 50/90% of the energy
    (middle); the stride-group variance and max/min ratio when recorded (right)."""
    stride = int(steps["stride"].max()) if len(steps) else 0
    cols = 3 if stride else 2
    titles = ["sparsity, Gini, concentration", "tokens for 50% / 90% of energy"] + \
        ([f"stride-{stride} groups (numbers)"] if stride else [])
    fig = make_subplots(rows=1, cols=cols, subplot_titles=titles,
                        specs=[[{}, {}] + ([{"secondary_y": True}] if stride else [])])
    for i, (col, name) in enumerate((("gradient_sparsity", "sparsity"), ("gradient_gini", "Gini"),
                                     ("concentration_ratio", "concentration ratio"))):
        fig.add_trace(go.Scatter(x=steps["step"], y=steps[col], mode="lines+markers", name=name,
                                 hovertemplate=f"step %{{x}}<br>{name} %{{y:.4f}}<extra></extra>"), row=1, col=1)
    for col, name in (("tokens_for_50pct", "tokens for 50%"), ("tokens_for_90pct", "tokens for 90%")):
        fig.add_trace(go.Scatter(x=steps["step"], y=steps[col], mode="lines+markers", name=name,
                                 hovertemplate=f"step %{{x}}<br>{name} %{{y}}<extra></extra>"), row=1, col=2)
    if stride:
        fig.add_trace(go.Scatter(x=steps["step"], y=steps["stride_group_variance"], mode="lines+markers",
                                 name="group variance", hovertemplate="step %{x}<br>variance %{y:.4g}<extra></extra>"),
                      row=1, col=3)
        fig.add_trace(go.Scatter(x=steps["step"], y=steps["stride_group_max_ratio"], mode="lines+markers",
                                 name="group max/min", line=dict(dash="dot"),
                                 hovertemplate="step %{x}<br>max/min %{y:.3f}<extra></extra>"),
                      row=1, col=3, secondary_y=True)
        fig.update_yaxes(title_text="variance of group mean norms", row=1, col=3)
        fig.update_yaxes(title_text="max / min", row=1, col=3, secondary_y=True)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="fraction", row=1, col=1)
    fig.update_yaxes(title_text="tokens", row=1, col=2)
    fig.update_layout(title=dict(text="Embedding token gradients over training"), width=1200, height=420,
                      legend=dict(orientation="h", y=-0.2))
    return fig


def top_tokens_figure(top: pd.DataFrame, step: int) -> go.Figure:
    """Bar chart of n_v of the top tokens at one step, labelled with their (escaped) text."""
    labels = [f"{html.escape(repr(str(t))[1:-1])} ({i})" for t, i in zip(top["token"], top["token_id"])]
    fig = go.Figure(go.Bar(x=labels, y=top["norm"], customdata=np.stack([top["count"]], axis=-1),
                           hovertemplate="%{x}<br>n_v %{y:.4g}<br>in the batch %{customdata[0]}x<extra></extra>"))
    fig.update_layout(title=dict(text=f"Largest ||dL/dE_v|| at step {step}"), width=1000, height=420)
    fig.update_xaxes(title_text="token (id)", tickangle=-45, type="category")
    fig.update_yaxes(title_text="||dL/dE_v||")
    return fig
