"""Figure builders of the influence analyses (``backend.analysis.influence``): pure DataFrame -> plotly Figure.

    fig = influence_figures.influence_quadrants(frames["points"], frames["quadrants"])

Sign convention on every axis: influence = <piece or g_t, G_eval>; a plain SGD step changes the eval loss by
-lr x influence to first order, so influence > 0 **helps** (lowers the eval loss) and < 0 hurts.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from backend.analysis.figures import ALIGN, HEIGHT, STEP, _color, _empty, _layout, _show, percent_axis

INFLUENCE = "influence <piece, G_eval> (> 0 helps: lowers the eval loss)"
INFLUENCE_ALIGN = "influence alignment: cosine with G_eval (> 0 helps the eval loss)"
BATCH_ALIGN = f"{ALIGN} with the batch gradient G"
HELPS, HURTS = "#2ca02c", "#d62728"
QUADRANT_COLORS = {"aligned & helps": HELPS, "aligned but hurts eval": HURTS, "opposing & helps": "#1f77b4",
                   "opposing & hurts": "#ff7f0e"}
# where each quadrant's count is written: (x, y) in paper coordinates, right/left by alignment, top/bottom by sign
_CORNERS = {"aligned & helps": (0.98, 0.98, "right", "top"), "aligned but hurts eval": (0.98, 0.02, "right", "bottom"),
            "opposing & helps": (0.02, 0.98, "left", "top"), "opposing & hurts": (0.02, 0.02, "left", "bottom")}


def influence_tokens(tokens: pd.DataFrame) -> go.Figure:
    """The tokens that help most and hurt most as horizontal bars of their influence, labelled by the predicted
    token (sample:position); hover: the context, influence alignment, alignment with G, loss, category."""
    title = "Tokens that help and hurt the eval loss most"
    if tokens.empty:
        return _empty(title, "no response token with a non-zero influence at this step")
    fig = go.Figure()
    for kind, color in (("helps", HELPS), ("hurts", HURTS)):
        g = tokens[tokens["kind"] == kind]
        labels = [f"{_show(t)} s{s}:{p}" for t, s, p in zip(g["token"], g["sample_idx"], g["position"])]
        cd = np.stack([g["context_before"].map(_show), g["token"].map(_show), g["context_after"].map(_show),
                       g["influence_alignment"], g["alignment"], g["loss"], g["category"]], axis=-1) if len(g) else None
        fig.add_trace(go.Bar(y=labels, x=g["influence"], orientation="h", name=kind, marker_color=color,
                             customdata=cd,
                             hovertemplate=("%{customdata[0]} [%{customdata[1]}] %{customdata[2]}<br>influence "
                                            "%{x:.4g}<br>influence alignment %{customdata[3]:.4f}<br>alignment with "
                                            "G %{customdata[4]:.4f}<br>loss %{customdata[5]:.3f}<br>category "
                                            "%{customdata[6]}<extra></extra>")))
    _layout(fig, title, INFLUENCE, "predicted token, sample:position", height=max(HEIGHT, 22 * len(tokens) + 150))
    fig.add_vline(x=0, line=dict(color="#999", width=1))
    fig.update_yaxes(autorange="reversed")
    return fig


def influence_by_category(categories: pd.DataFrame) -> go.Figure:
    """Summed influence per token category (bars, green where the category helps on balance) and the mean
    influence per token (markers, right axis); hover: count, mean influence alignment, fraction that hurts."""
    title = "Influence on the eval loss by token category"
    if categories.empty:
        return _empty(title, "no response token with an influence at this step")
    g = categories.sort_values("influence_sum")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    cd = np.stack([g["n"], g["mean_influence_alignment"], g["frac_hurts"], g["mean_influence"]], axis=-1)
    fig.add_trace(go.Bar(x=g["category"], y=g["influence_sum"], name="summed influence", customdata=cd,
                         marker_color=[HELPS if v > 0 else HURTS for v in g["influence_sum"]],
                         hovertemplate=("%{x}<br>summed influence %{y:.4g}<br>mean %{customdata[3]:.4g}<br>n "
                                        "%{customdata[0]}<br>mean influence alignment %{customdata[1]:.4f}<br>hurts "
                                        "%{customdata[2]:.1%}<extra></extra>")))
    fig.add_trace(go.Scatter(x=g["category"], y=g["mean_influence"], mode="markers", name="mean per token",
                             marker=dict(color="#333", size=9, symbol="diamond"),
                             hovertemplate="%{x}<br>mean influence %{y:.4g}<extra></extra>"), secondary_y=True)
    fig.add_hline(y=0, line=dict(color="#999", width=1))
    _layout(fig, title, "token category (response tokens)", f"summed {INFLUENCE}")
    # both axes symmetric about 0, so a marker above the zero line is a positive mean on either scale
    for col, sec in (("influence_sum", False), ("mean_influence", True)):
        m = float(np.nanmax(np.abs(g[col].to_numpy(dtype=np.float64)))) * 1.1 or 1.0
        fig.update_yaxes(range=[-m, m], secondary_y=sec)
    fig.update_yaxes(title_text="mean influence per token", secondary_y=True, showgrid=False, tickformat="~s")
    return fig


def influence_quadrants(points: pd.DataFrame, quadrants: pd.DataFrame) -> go.Figure:
    """Scatter of alignment with G (x) against influence alignment (y), one point per response token coloured by
    quadrant, each quadrant's count (and its share of the summed |influence|) written in its corner."""
    title = "Aligned with the batch vs helpful to the eval set"
    if quadrants.empty or int(quadrants["n"].sum()) == 0:
        return _empty(title, "no response token with both an alignment and an influence at this step")
    fig = go.Figure()
    for q, color in QUADRANT_COLORS.items():
        g = points[points["quadrant"] == q]
        cd = np.stack([g["token"].map(_show), g["sample_idx"], g["position"], g["influence"], g["category"]],
                      axis=-1) if len(g) else None
        fig.add_trace(go.Scattergl(x=g["alignment"], y=g["influence_alignment"], mode="markers", name=q,
                                   marker=dict(color=color, size=5, opacity=0.7), customdata=cd,
                                   hovertemplate=("%{customdata[0]} s%{customdata[1]}:%{customdata[2]}<br>alignment "
                                                  "%{x:.4f}<br>influence alignment %{y:.4f}<br>influence "
                                                  "%{customdata[3]:.4g}<br>%{customdata[4]}<extra></extra>")))
    for r in quadrants.itertuples(index=False):
        x, y, xa, ya = _CORNERS[r.quadrant]
        share = "" if pd.isna(r.share_of_abs) else f", {r.share_of_abs:.0%} of |influence|"
        fig.add_annotation(text=f"<b>{r.quadrant}</b><br>{int(r.n)} tokens{share}", align=xa, xref="paper", yref="paper", x=x, y=y,
                           xanchor=xa, yanchor=ya, showarrow=False, bgcolor="rgba(255,255,255,0.8)",
                           font=dict(size=12, color=QUADRANT_COLORS[r.quadrant]))
    fig.add_hline(y=0, line=dict(color="#999", width=1))
    fig.add_vline(x=0, line=dict(color="#999", width=1))
    return _layout(fig, title, BATCH_ALIGN, INFLUENCE_ALIGN)


def influence_over_training(steps: pd.DataFrame) -> go.Figure:
    """cos(G, G_eval) per traced step (left axis; > 0: the whole update lowers the eval loss to first order) and
    the fraction of response tokens that hurt (influence < 0, right axis); hover: <G, G_eval>, the eval loss,
    ||G_eval|| and the "aligned but hurts eval" count."""
    title = "Does the update help the eval set? (over training)"
    if steps.empty:
        return _empty(title, "no traced step with influence")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    cd = np.stack([steps["g_dot_eval"], steps["eval_loss"], steps["eval_grad_norm"]], axis=-1)
    fig.add_trace(go.Scatter(x=steps["step"], y=steps["eval_cosine"], mode="lines+markers", name="cos(G, G_eval)",
                             line=dict(color=_color(0)), customdata=cd,
                             hovertemplate=("step %{x}<br>cos(G, G_eval) %{y:.4f}<br>&lt;G, G_eval&gt; "
                                            "%{customdata[0]:.4g}<br>eval loss %{customdata[1]:.4f}<br>||G_eval|| "
                                            "%{customdata[2]:.4g}<extra></extra>")))
    fig.add_trace(go.Scatter(x=steps["step"], y=steps["frac_hurts"], mode="lines+markers",
                             name="fraction of response tokens that hurt", line=dict(color=HURTS, dash="dot"),
                             customdata=np.stack([steps["n_aligned_hurts"], steps["n_response"]], axis=-1),
                             hovertemplate=("step %{x}<br>hurt %{y:.1%} of %{customdata[1]} tokens<br>aligned with "
                                            "G but hurt: %{customdata[0]}<extra></extra>")), secondary_y=True)
    fig.add_hline(y=0, line=dict(color="#999", width=1))
    _layout(fig, title, STEP, "cos(G, G_eval)  (> 0: the update helps the eval loss)")
    fig.update_yaxes(title_text="fraction of response tokens that hurt", secondary_y=True, showgrid=False,
                     **percent_axis(steps["frac_hurts"], tozero=True))
    return fig
