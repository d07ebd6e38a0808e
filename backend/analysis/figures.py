"""Figure builders: pure functions DataFrame -> plotly Figure, shared by the app and ``analyze``/``compare``.

    from backend.analysis import analyses, figures
    frames = analyses.run("concentration", run_id, con=con)
    fig = figures.build("concentration", frames)           # the figure its registry entry names
    fig = figures.lorenz_curve(frames["lorenz"], frames["stats"])

Which builder draws which analysis is said where the analysis is registered (``@register(..., figure=...)``
in its kind's module, e.g. ``backend.analysis.trace``). Builders of analyses registered with ``compare=True``
overlay several runs when their frames carry a ``run`` column (one trace per run). Every figure has axis
titles with units and hover templates. No I/O here; imports no gradio or torch.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from backend.analysis import analyses

Frames = dict[str, pd.DataFrame]

ALIGN = "alignment (cosine, -1..1)"
MAG = "gradient magnitude (L2 norm)"
STEP = "optimizer step"
RESP_POS = "response position (tokens from response start)"
WIDTH, HEIGHT = 960, 560
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
DIVERGING = "RdBu"
TEMPLATE = "plotly_white"
# Every figure uses TEMPLATE. As plotly's default it is applied when a figure is created, without validation;
# set per figure (layout.template) it is deep-copied and validated each time: ~20 ms a figure, most of the
# time a tab of the app takes to render.
pio.templates.default = TEMPLATE


def _layout(fig: go.Figure, title: str, x: str, y: str, **kw: object) -> go.Figure:
    layout: dict[str, object] = dict(title=dict(text=title), width=WIDTH, height=HEIGHT,
                                     margin=dict(l=70, r=40, t=70, b=60), legend=dict(orientation="h", y=-0.15))
    fig.update_layout(**{**layout, **kw})
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=y)
    return fig


NO_DATA = "#bdbdbd"        # heatmap cells without data: grey, never the white of 0 on a diverging scale


def _grey_gaps(fig: go.Figure, what: str = "no tokens") -> go.Figure:
    """Show a heatmap's empty (NaN) cells grey, not white (plotly leaves them transparent over the plot
    background), and say so under the title."""
    fig.update_layout(plot_bgcolor=NO_DATA)
    fig.update_xaxes(showgrid=False, zeroline=False)
    fig.update_yaxes(showgrid=False, zeroline=False)
    fig.add_annotation(**_gaps_note(what))
    return fig


def _gaps_note(what: str) -> dict:
    """The annotation under a heatmap's title saying what its grey cells are."""
    return dict(text=f"grey: {what}", xref="paper", yref="paper", x=1.0, y=1.0, yanchor="bottom", xanchor="right",
                showarrow=False, font=dict(size=11, color="#555"))


def _nice_step(x: float) -> float:
    """The step of 1, 2 or 5 x 10^k nearest above-ish ``x`` (> 0): the steps plotly's own ticks take."""
    e = 10.0 ** math.floor(math.log10(x))
    m = x / e
    return (1.0 if m < 1.5 else 2.0 if m < 3.5 else 5.0 if m < 7.5 else 10.0) * e


def percent_axis(values: Sequence[float] | pd.Series, *, tozero: bool = False, ticks: int = 5) -> dict:
    """Settings of an axis of fractions shown in percent (``fig.update_yaxes(**percent_axis(v), ...)``): the data's
    range padded by 5% (from 0 with ``tozero``), a tick every 1, 2 or 5 x 10^k giving about ``ticks`` ticks, and as
    many decimals as that step needs, so no two tick labels read the same (a fixed ".0%" on data between 43% and
    45% let plotly put ticks at 0.435 and 0.44, both labelled "44%")."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
    if tozero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = hi - lo
    pad = span * 0.05 if span > 0 else max(abs(hi) * 0.05, 0.005)    # constant data: a band around it
    lo = lo if tozero and lo == 0.0 else lo - pad
    hi = hi + pad
    step = _nice_step((hi - lo) / ticks)
    decimals = max(0, math.ceil(-math.log10(step * 100) - 1e-9))      # the step's last digit, in percent
    return dict(range=[lo, hi], tick0=0.0, dtick=step, tickformat=f".{decimals}%")


def _runs(df: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """(run label, rows) per run when ``df`` has a ``run`` column, else one unnamed group."""
    if "run" in df.columns:
        return [(str(r), g) for r, g in df.groupby("run", sort=False)]
    return [(None, df)]


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


# LoRA's two factors: colours of their own, never the blue / red that alignment (RdBu) and the runs use
LORA_COLORS = {"lora_A": "#66a61e", "lora_B": "#7570b3"}
LORA_PATTERNS = {"lora_A": "", "lora_B": "/"}      # several runs: a run's colour, lora_B hatched


def run_color(df: pd.DataFrame, run: str | None, i: int) -> str:
    """A run's colour: by its place among the ``run`` column's categories when that column is categorical
    (Compare makes it so: a run then has one colour in every panel, also one where an earlier run has no
    rows), else by its place ``i`` among the runs the frame has."""
    if run is not None and isinstance(df["run"].dtype, pd.CategoricalDtype):
        return _color(list(df["run"].cat.categories).index(run))
    return _color(i)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def _show(token: str) -> str:
    """A token made visible: newlines as the return symbol, the text quoted."""
    return repr(str(token).replace("\n", "⏎"))[1:-1].join("«»")


def _empty(title: str, message: str) -> go.Figure:
    """A figure that says why it has nothing to show (e.g. a trace without module rows)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=16))
    _layout(fig, title, "", "")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


NO_MODULES = "no module rows (token_modules) in this trace"


def _diverging_range(z: pd.Series) -> dict[str, object]:
    m = float(np.nanmax(np.abs(z.to_numpy(dtype=np.float64)))) if len(z) else 1.0
    return dict(colorscale=DIVERGING, zmid=0.0, zmin=-m, zmax=m)


# ------------------------------------------------------------------------------------------------ 1
def alignment_evolution(evolution: pd.DataFrame) -> go.Figure:
    """Mean response alignment per traced step with its 10-90th percentile band and median; the fraction of
    opposing tokens on the right axis. Several runs: mean and band per run."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    groups = _runs(evolution)
    for i, (run, g) in enumerate(groups):
        c, name = run_color(evolution, run, i), (run or "mean")
        fig.add_trace(go.Scatter(x=list(g["step"]) + list(g["step"])[::-1], y=list(g["p90"]) + list(g["p10"])[::-1],
                                 fill="toself", fillcolor=_rgba(c, 0.15), line=dict(width=0), hoverinfo="skip",
                                 mode="lines",      # plotly's default adds markers of its own colours under 20 points
                                 name=f"{run + ' ' if run else ''}10-90th pct", showlegend=run is None))
        fig.add_trace(go.Scatter(x=g["step"], y=g["mean"], mode="lines+markers", name=name, line=dict(color=c),
                                 customdata=np.stack([g["std"], g["p10"], g["p90"], g["n"]], axis=-1),
                                 hovertemplate=(f"{name}<br>step %{{x}}<br>mean %{{y:.4f}} ± %{{customdata[0]:.4f}}"
                                                "<br>p10 %{customdata[1]:.4f}, p90 %{customdata[2]:.4f}"
                                                "<br>n %{customdata[3]}<extra></extra>")))
        if run is None:
            fig.add_trace(go.Scatter(x=g["step"], y=g["p50"], mode="lines", name="median",
                                     line=dict(color=c, dash="dash"),
                                     hovertemplate="step %{x}<br>median %{y:.4f}<extra></extra>"))
            fig.add_trace(go.Scatter(x=g["step"], y=g["frac_negative"], mode="lines+markers", name="fraction < 0",
                                     line=dict(color="#7f7f7f", dash="dot"),
                                     hovertemplate="step %{x}<br>opposing %{y:.1%}<extra></extra>"),
                          secondary_y=True)
    _layout(fig, "Alignment of response tokens over training", STEP, ALIGN)
    if len(groups) == 1:
        fig.update_yaxes(title_text="fraction of tokens with alignment < 0", secondary_y=True, showgrid=False,
                         **percent_axis(evolution["frac_negative"]))
    return fig


# ------------------------------------------------------------------------------------------------ 2
def prompt_vs_response(groups: pd.DataFrame) -> go.Figure:
    """Prompt vs response tokens: mean alignment (error bars: std) and summed share of the update."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean alignment", "share of the batch update"))
    g = groups.fillna({"n": 0})
    cd = np.stack([g["n"], g["frac_negative"], g["mean_magnitude"]], axis=-1)
    fig.add_trace(go.Bar(x=g["group"], y=g["mean_alignment"], error_y=dict(type="data", array=g["std_alignment"]),
                         marker_color=[_color(0), _color(1)][:len(g)], customdata=cd, showlegend=False,
                         hovertemplate=("%{x}: mean %{y:.4f}<br>n %{customdata[0]}<br>opposing %{customdata[1]:.1%}"
                                        "<br>mean magnitude %{customdata[2]:.3g}<extra></extra>")), row=1, col=1)
    fig.add_trace(go.Bar(x=g["group"], y=g["share_sum"], marker_color=[_color(0), _color(1)][:len(g)],
                         showlegend=False, hovertemplate="%{x}: share %{y:.1%}<extra></extra>"), row=1, col=2)
    _layout(fig, "Prompt vs response tokens", "token group", ALIGN)
    fig.update_yaxes(title_text="sum of share (fraction of ||G||²)", row=1, col=2,
                     **percent_axis(g["share_sum"], tozero=True))
    return fig


# ------------------------------------------------------------------------------------------------ 3
def layer_module_contribution(modules: pd.DataFrame) -> go.Figure:
    """Heatmaps of each (layer, module)'s share of the update, one panel per stage (early/middle/late)."""
    title = "Contribution per layer and module (share of ||G||², both LoRA parts)"
    if modules.empty:
        return _empty(title, NO_MODULES)
    stages = list(dict.fromkeys(zip(modules["stage"], modules["step"])))
    fig = make_subplots(rows=1, cols=len(stages), shared_yaxes=True,
                        subplot_titles=[f"{label} (step {s})" for label, s in stages])
    vmax = float(modules["share"].abs().max()) if len(modules) else 1.0
    signed = bool((modules["share"] < 0).any())
    for j, (label, s) in enumerate(stages, start=1):
        g = modules[(modules["stage"] == label) & (modules["step"] == s)]
        z = g.pivot(index="layer", columns="module", values="share")
        a = g.pivot(index="layer", columns="module", values="mean_alignment").reindex_like(z)
        fig.add_trace(go.Heatmap(z=z.to_numpy(), x=list(z.columns), y=list(z.index), customdata=a.to_numpy(),
                                 colorscale=DIVERGING if signed else "Viridis", zmin=-vmax if signed else 0,
                                 zmax=vmax, showscale=j == len(stages), colorbar=dict(title="share", tickformat=".1%"),
                                 hovertemplate=("layer %{y} %{x}<br>share %{z:.2%}<br>mean alignment "
                                                "%{customdata:.4f}<extra></extra>")), row=1, col=j)
        fig.update_xaxes(title_text="module", row=1, col=j)
    _layout(fig, title, "module", "layer")
    for j in range(2, len(stages) + 1):
        fig.update_yaxes(title_text=None, row=1, col=j)
    return _grey_gaps(fig, "module not traced in that layer")


# ------------------------------------------------------------------------------------------------ 4
def gradient_magnitude(traced: pd.DataFrame, train: pd.DataFrame) -> go.Figure:
    """Optimizer grad norm at every step (left axis) and the traced steps' mean token magnitude (right)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    if len(train):
        fig.add_trace(go.Scatter(x=train["step"], y=train["grad_norm"], mode="lines", name="grad_norm (optimizer)",
                                 line=dict(color=_color(0)),
                                 hovertemplate="step %{x}<br>grad norm %{y:.4g}<extra></extra>"))
    if "batch_grad_norm" in traced and traced["batch_grad_norm"].notna().any():
        fig.add_trace(go.Scatter(x=traced["step"], y=traced["batch_grad_norm"], mode="markers",
                                 name="||G|| of the traced batch", marker=dict(color=_color(2), symbol="diamond"),
                                 hovertemplate="step %{x}<br>||G|| %{y:.4g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=traced["step"], y=traced["mean"], mode="lines+markers", name="mean token magnitude",
                             line=dict(color=_color(1)), customdata=np.stack([traced["median"], traced["p90"]], -1),
                             hovertemplate=("step %{x}<br>mean %{y:.4g}<br>median %{customdata[0]:.4g}"
                                            "<br>p90 %{customdata[1]:.4g}<extra></extra>")), secondary_y=True)
    _layout(fig, "Gradient magnitude over training", STEP, "gradient norm (L2)")
    fig.update_yaxes(title_text=f"mean response-token {MAG}", secondary_y=True, showgrid=False, tickformat=".3g")
    return fig


# ------------------------------------------------------------------------------------------------ 5
def positional_decay(bins: pd.DataFrame, fit: pd.DataFrame | None = None) -> go.Figure:
    """Mean alignment per response-position bin (error bars: standard error); several runs overlaid."""
    fig = go.Figure()
    for i, (run, g) in enumerate(_runs(bins)):
        name = run or "mean alignment"
        if fit is not None and run is None and len(fit):
            name += f" (slope {fit['slope_per_token'].iloc[0]:.2e} per token)"
        fig.add_trace(go.Scatter(x=g["bin_center"], y=g["mean_alignment"], mode="lines+markers", name=name,
                                 line=dict(color=run_color(bins, run, i)), error_y=dict(type="data", array=g["sem"]),
                                 customdata=np.stack([g["bin_start"], g["bin_end"], g["n"]], axis=-1),
                                 hovertemplate=(f"{run or ''} positions %{{customdata[0]}}-%{{customdata[1]}}"
                                                "<br>mean %{y:.4f}<br>n %{customdata[2]}<extra></extra>")))
    fig.add_hline(y=0, line=dict(color="#999", width=1))
    return _layout(fig, "Alignment vs position in the response", RESP_POS, f"mean {ALIGN}")


# ------------------------------------------------------------------------------------------------ 6
def surprising_tokens(tokens: pd.DataFrame) -> go.Figure:
    """Most opposing and most aligned tokens as bars, labelled by the predicted token; hover: context."""
    fig = go.Figure()
    for i, kind in enumerate(("opposing", "aligned")):
        g = tokens[tokens["kind"] == kind]
        labels = [f"{_show(t)} s{s}:{p}" for t, s, p in zip(g["token"], g["sample_idx"], g["position"])]
        cd = np.stack([g["context_before"].map(_show), g["token"].map(_show), g["context_after"].map(_show),
                       g["loss"], g["category"]], axis=-1) if len(g) else None
        fig.add_trace(go.Bar(y=labels, x=g["alignment"], orientation="h", name=kind,
                             marker_color=_color(1) if kind == "opposing" else _color(0), customdata=cd,
                             hovertemplate=("%{customdata[0]} [%{customdata[1]}] %{customdata[2]}<br>alignment "
                                            "%{x:.4f}<br>loss %{customdata[3]:.3f}<br>category %{customdata[4]}"
                                            "<extra></extra>")))
    _layout(fig, "Most opposing and most aligned tokens (label: predicted token, sample:position)", ALIGN, "token",
            height=max(HEIGHT, 22 * len(tokens) + 150))
    fig.update_yaxes(autorange="reversed")
    return fig


# ------------------------------------------------------------------------------------------------ 7, 14
def _position_heatmap(cells: pd.DataFrame, row: str, title: str, y_title: str) -> go.Figure:
    if cells.empty:
        return _empty(title, NO_MODULES if row == "layer" else "no response tokens with an alignment")
    z = cells.pivot(index=row, columns="bin_start", values="mean_alignment")
    n = cells.pivot(index=row, columns="bin_start", values="n").reindex_like(z)
    width = int(cells["bin_width"].iloc[0]) if len(cells) else 1
    fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=list(z.columns), y=[str(v) for v in z.index], customdata=n.to_numpy(),
                               colorbar=dict(title="mean alignment"), **_diverging_range(cells["mean_alignment"]),
                               hovertemplate=(f"{row} %{{y}}<br>positions %{{x}}-%{{x}}+{width - 1}<br>mean alignment "
                                              "%{z:.4f}<br>n %{customdata}<extra></extra>")))
    _layout(fig, title, f"{RESP_POS}, bin start (bins of {width})", y_title)
    fig.update_yaxes(type="category")
    return _grey_gaps(fig, "no response tokens in that bin")


def step_position_heatmap(cells: pd.DataFrame) -> go.Figure:
    """Mean alignment per (traced step, response-position bin)."""
    return _position_heatmap(cells, "step", "Alignment by training step and response position", STEP)


def layer_position_heatmap(cells: pd.DataFrame) -> go.Figure:
    """Mean per-module alignment per (layer, response-position bin)."""
    module = cells["module"].iloc[0] if len(cells) and "module" in cells else "all"
    return _position_heatmap(cells, "layer", f"Alignment by layer and response position (modules: {module})", "layer")


# ------------------------------------------------------------------------------------------------ 8
def lora_ab(layers: pd.DataFrame) -> go.Figure:
    """Per layer: mean norm of the lora_A and lora_B pieces (bars) and their ratio B/A (right axis)."""
    if layers.empty:
        return _empty("LoRA A vs B gradient magnitude per layer", NO_MODULES)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for i, part in enumerate(("lora_A", "lora_B")):
        fig.add_trace(go.Bar(x=layers["layer"], y=layers[part], name=part, marker_color=LORA_COLORS[part],
                             hovertemplate=f"layer %{{x}}<br>{part} %{{y:.4g}}<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers["layer"], y=layers["ratio_b_over_a"], mode="lines+markers", name="ratio B/A",
                             line=dict(color="#333"), hovertemplate="layer %{x}<br>B/A %{y:.3f}<extra></extra>"),
                  secondary_y=True)
    _layout(fig, "LoRA A vs B gradient magnitude per layer", "layer", f"mean per-token {MAG}", barmode="group")
    fig.update_yaxes(title_text="ratio B / A", secondary_y=True, showgrid=False, tickformat=".3g")
    return fig


# ------------------------------------------------------------------------------------------------ 9
def category_breakdown(categories: pd.DataFrame) -> go.Figure:
    """Mean alignment per token category (error bars: standard error); several runs as grouped bars."""
    fig = go.Figure()
    order = list(dict.fromkeys(categories.sort_values("mean_alignment")["category"]))
    for i, (run, g) in enumerate(_runs(categories)):
        g = g.set_index("category").reindex(order).reset_index()
        sem = g["std_alignment"] / np.sqrt(g["n"])
        fig.add_trace(go.Bar(x=g["category"], y=g["mean_alignment"], name=run or "mean alignment",
                             marker_color=run_color(categories, run, i), error_y=dict(type="data", array=sem),
                             customdata=np.stack([g["n"], g["frac_negative"], g["share_sum"]], axis=-1),
                             hovertemplate=(f"{run or ''} %{{x}}<br>mean %{{y:.4f}}<br>n %{{customdata[0]}}"
                                            "<br>opposing %{customdata[1]:.1%}<br>share %{customdata[2]:.1%}"
                                            "<extra></extra>")))
    return _layout(fig, "Alignment by token category", "token category", f"mean {ALIGN}", barmode="group")


# ------------------------------------------------------------------------------------------------ 10
def magnitude_alignment(points: pd.DataFrame, stats: pd.DataFrame) -> go.Figure:
    """Scatter of alignment against log1p(magnitude), one point per response token; title: Pearson r."""
    r = stats["pearson_r"].iloc[0] if len(stats) else float("nan")
    n = int(stats["n"].iloc[0]) if len(stats) else len(points)
    fig = go.Figure(go.Scatter(     # SVG, not WebGL: static export renders it without a GPU
        # translucency from the fill colour, not marker.opacity: the browser draws it ~1.5x faster
        x=points["log1p_magnitude"], y=points["alignment"], mode="markers",
        marker=dict(size=4, color=_rgba(PALETTE[0], 0.5)),
        customdata=np.stack([points["token"].map(_show), points["sample_idx"], points["position"],
                             points["magnitude"]], axis=-1),
        hovertemplate=("%{customdata[0]} s%{customdata[1]}:%{customdata[2]}<br>magnitude %{customdata[3]:.4g}"
                       "<br>alignment %{y:.4f}<extra></extra>")))
    return _layout(fig, f"Magnitude vs alignment (Pearson r = {r:.3f}, n = {n})", f"log1p({MAG})", ALIGN)


# ------------------------------------------------------------------------------------------------ 11
def module_types(modules: pd.DataFrame) -> go.Figure:
    """Mean per-module alignment per module type, lora_A and lora_B side by side; runs as groups."""
    if modules.empty:
        return _empty("Alignment by module type and LoRA part", NO_MODULES)
    fig = go.Figure()
    for i, (run, g) in enumerate(_runs(modules)):
        groups = [(f"{run} {part}" if run else part, str(part), gg) for part, gg in g.groupby("part")]
        for name, part, gg in groups:
            # one run: the LoRA parts' own colours; several: the run's colour, lora_B hatched
            color = run_color(modules, run, i) if run else LORA_COLORS.get(part, _color(0))
            fig.add_trace(go.Bar(x=gg["module"], y=gg["mean_alignment"], name=name, marker_color=color,
                                 marker_pattern_shape=LORA_PATTERNS.get(part, "") if run else "",
                                 customdata=np.stack([gg["mean_magnitude"], gg["share"], gg["n"]], axis=-1),
                                 hovertemplate=(f"{name} %{{x}}<br>mean alignment %{{y:.4f}}<br>mean magnitude "
                                                "%{customdata[0]:.4g}<br>share %{customdata[1]:.1%}<br>rows "
                                                "%{customdata[2]}<extra></extra>")))
    return _layout(fig, "Alignment by module type and LoRA part", "module type", f"mean per-module {ALIGN}",
                   barmode="group")


# ------------------------------------------------------------------------------------------------ 12
def lorenz_curve(lorenz: pd.DataFrame, stats: pd.DataFrame) -> go.Figure:
    """Lorenz curve of response-token magnitude (cumulative share against fraction of tokens, ascending)
    with the line of equality; legend: Gini per run."""
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="equality", line=dict(color="#999", dash="dash"),
                               hoverinfo="skip"))
    stat_rows = dict(_runs(stats))
    for i, (run, g) in enumerate(_runs(lorenz)):
        s = stat_rows.get(run)
        gini = f" (Gini {s['gini'].iloc[0]:.3f})" if s is not None and len(s) else ""
        fig.add_trace(go.Scatter(x=g["token_fraction"], y=g["mass_fraction"], mode="lines",
                                 name=f"{run or 'Lorenz'}{gini}", line=dict(color=run_color(lorenz, run, i)),
                                 hovertemplate=("lowest %{x:.1%} of tokens hold %{y:.1%} of the magnitude"
                                                "<extra></extra>")))
    _layout(fig, "Concentration of gradient magnitude (Lorenz curve)", "fraction of tokens (ascending magnitude)",
            "cumulative fraction of total magnitude")
    fig.update_xaxes(tickformat=".0%", range=[0, 1])
    fig.update_yaxes(tickformat=".0%", range=[0, 1])
    return fig


# ------------------------------------------------------------------------------------------------ 13
def autocorrelation(lags: pd.DataFrame) -> go.Figure:
    """Mean autocorrelation of alignment per lag with the 95% white-noise band (shaded)."""
    fig = go.Figure()
    for i, (run, g) in enumerate(_runs(lags)):
        c = run_color(lags, run, i)
        g = g.dropna(subset=["r", "band"])      # lags no sequence is long enough for: a gap would tear the band
        fig.add_trace(go.Scatter(x=list(g["lag"]) + list(g["lag"])[::-1], y=list(g["band"]) + list(-g["band"])[::-1],
                                 fill="toself", fillcolor=_rgba(c, 0.12), line=dict(width=0), hoverinfo="skip",
                                 mode="lines", name=f"{run + ' ' if run else ''}95% noise band"))
        fig.add_trace(go.Scatter(x=g["lag"], y=g["r"], mode="lines+markers", name=run or "r_k", line=dict(color=c),
                                 customdata=np.stack([g["n_sequences"], g["band"]], axis=-1),
                                 hovertemplate=(f"{run or ''} lag %{{x}}<br>r %{{y:.4f}}<br>sequences "
                                                "%{customdata[0]}<br>band ±%{customdata[1]:.4f}<extra></extra>")))
    fig.add_hline(y=0, line=dict(color="#999", width=1))
    return _layout(fig, "Autocorrelation of alignment along the response", "lag (tokens)", "autocorrelation r_k")


# ------------------------------------------------------------------------------------------------ compare
def summary_table(table: pd.DataFrame) -> go.Figure:
    """A table figure: one row per summary key, one column per run (values pre-formatted as text)."""
    cols = [table.index.name or "metric"] + [str(c) for c in table.columns]
    cells = [list(table.index)] + [[_fmt(v) for v in table[c]] for c in table.columns]
    fig = go.Figure(go.Table(header=dict(values=cols, align="left"), cells=dict(values=cells, align="left")))
    fig.update_layout(title=dict(text="Summary by run"), width=WIDTH, height=max(HEIGHT, 28 * len(table) + 120))
    return fig


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


# ------------------------------------------------------------------------------------------------ app views
def token_breakdown(rows: pd.DataFrame, value: str = "dot", kind: str = "heatmap", title: str = "") -> go.Figure:
    """One token's module rows (``queries.token_breakdown``): a layer x (module, LoRA part) heatmap of
    ``value`` (dot, alignment or magnitude), or (``kind="bars"``) the token's dot per layer stacked by module."""
    if value not in ("dot", "alignment", "magnitude"):
        raise ValueError(f"value must be dot, alignment or magnitude, got {value!r}")
    if kind not in ("heatmap", "bars"):
        raise ValueError(f"kind must be heatmap or bars, got {kind!r}")
    title = title or "Per-layer and per-module breakdown of the token's gradient"
    if rows.empty:
        return _empty(title, NO_MODULES + " for this token")
    if kind == "bars":
        fig = go.Figure()
        per = rows.groupby(["layer", "module"], sort=True)["dot"].sum().reset_index()
        for i, (module, g) in enumerate(per.groupby("module", sort=False)):
            fig.add_trace(go.Bar(x=g["layer"], y=g["dot"], name=str(module), marker_color=_color(i),
                                 hovertemplate=f"layer %{{x}} {module}<br>dot %{{y:.4g}}<extra></extra>"))
        return _layout(fig, title, "layer", "dot <P, G> (both LoRA parts)", barmode="relative", height=420)
    # the Inspect tab draws this on every token click: the (layer, module part) grid by numpy, and the figure
    # built in one constructor call (plotly validates a layout given whole ~6x faster than the same settings
    # applied by update_layout / update_axes: 1.5 vs 9 ms)
    cols = (rows["module"].astype(str) + " " + rows["part"].str.replace("lora_", "", regex=False)).to_numpy()
    order = list(dict.fromkeys(cols))
    v = rows[value].to_numpy(dtype=np.float64)
    ok = ~np.isnan(v)                                  # a null value (alignment of a module with ~0 gradient) is
    layers = np.unique(rows["layer"].to_numpy())       # a grey cell, not a 0
    li = np.searchsorted(layers, rows["layer"].to_numpy()[ok])
    ci = np.array([order.index(c) for c in cols[ok]], dtype=np.int64)
    total, count = np.zeros((len(layers), len(order))), np.zeros((len(layers), len(order)))
    np.add.at(total, (li, ci), v[ok])
    np.add.at(count, (li, ci), 1.0)
    z = np.where(count > 0, total, np.nan)             # the sum of a cell's rows (one row per cell in a trace)
    if rows[value].dtype == np.float32:                # sent as stored (float32: half the JSON)
        z = z.astype(np.float32)
    rng = _diverging_range(rows[value]) if value != "magnitude" else dict(colorscale="Viridis")
    axis = dict(showgrid=False, zeroline=False)
    return go.Figure(
        go.Heatmap(z=z, x=order, y=[str(x) for x in layers], colorbar=dict(title=value), **rng,
                   hovertemplate=f"layer %{{y}} %{{x}}<br>{value} %{{z:.4g}}<extra></extra>"),
        layout=dict(title=dict(text=title), width=WIDTH, height=max(320, 18 * len(layers) + 160),
                    margin=dict(l=70, r=40, t=70, b=60), legend=dict(orientation="h", y=-0.15),
                    xaxis=dict(title=dict(text="module and LoRA part"), **axis),
                    yaxis=dict(title=dict(text="layer"), type="category", **axis), plot_bgcolor=NO_DATA,
                    annotations=[_gaps_note("module not traced in that layer" if value != "alignment" else
                                            "no value (module not traced, or its gradient ~0)")]))


def concentration_over_training(stats: pd.DataFrame) -> go.Figure:
    """Gini (left axis) and the fraction of tokens holding 50/80/90% of the magnitude (right axis) per
    traced step; ``stats``: rows of the concentration analysis with a ``step`` column (and ``run``)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for i, (run, g) in enumerate(_runs(stats)):
        g = g.sort_values("step")
        c, prefix = run_color(stats, run, i), (f"{run} " if run else "")
        fig.add_trace(go.Scatter(x=g["step"], y=g["gini"], mode="lines+markers", name=f"{prefix}Gini",
                                 line=dict(color=c, width=3), customdata=g["n"],
                                 hovertemplate="step %{x}<br>Gini %{y:.3f}<br>tokens %{customdata}<extra></extra>"))
        for p, dash in ((50, "dot"), (80, "dash"), (90, "dashdot")):
            fig.add_trace(go.Scatter(x=g["step"], y=g[f"tokens_for_{p}pct"], mode="lines",
                                     name=f"{prefix}tokens for {p}%", line=dict(color=c, dash=dash, width=1.5),
                                     hovertemplate=(f"step %{{x}}<br>{p}% of the magnitude in the top %{{y:.1%}} "
                                                    "of tokens<extra></extra>")), secondary_y=True)
    _layout(fig, "Concentration over training", STEP, "Gini of response-token magnitude")
    fig.update_yaxes(range=[0, 1], secondary_y=False)
    fig.update_yaxes(title_text="fraction of tokens (largest first)", tickformat=".0%", range=[0, 1],
                     secondary_y=True, showgrid=False)
    return fig


def loss_curve(train: pd.DataFrame) -> go.Figure:
    """The training loss (the scheme's weighted loss and plain cross-entropy) per optimizer step, learning
    rate on the right axis; several runs (a ``run`` column): one loss line each."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    groups = _runs(train)
    if train.empty:
        return _empty("Training loss", "no train_steps recorded for this run")
    for i, (run, g) in enumerate(groups):
        c, prefix = run_color(train, run, i), (f"{run} " if run else "")
        fig.add_trace(go.Scatter(x=g["step"], y=g["loss"], mode="lines", name=f"{prefix}loss (scheme)",
                                 line=dict(color=c), hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>"))
        if "ce_loss" in g and not np.allclose(g["ce_loss"].to_numpy(dtype=float), g["loss"].to_numpy(dtype=float),
                                              equal_nan=True):
            fig.add_trace(go.Scatter(x=g["step"], y=g["ce_loss"], mode="lines", name=f"{prefix}cross-entropy",
                                     line=dict(color=c, dash="dot"),
                                     hovertemplate="step %{x}<br>cross-entropy %{y:.4f}<extra></extra>"))
        if run is None:
            fig.add_trace(go.Scatter(x=g["step"], y=g["lr"], mode="lines", name="learning rate",
                                     line=dict(color="#7f7f7f", width=1),
                                     hovertemplate="step %{x}<br>lr %{y:.3g}<extra></extra>"), secondary_y=True)
    _layout(fig, "Training loss", STEP, "loss (nats per response token)")
    if len(groups) == 1:
        fig.update_yaxes(title_text="learning rate", secondary_y=True, showgrid=False, tickformat=".1e")
    return fig


def _axis_ref(kind: str, k: int) -> str:
    return kind if k == 1 else f"{kind}{k}"


def _remap_ref(ref: object, axes: dict[str, str]) -> object:
    """'x', 'y2 domain', ... of a source figure as the grid's axis names ('paper' and others unchanged)."""
    if not isinstance(ref, str):
        return ref
    base, _, rest = ref.partition(" ")
    return f"{axes[base]} {rest}".strip() if base in axes else ref


def grid(figs: Sequence[go.Figure], cols: int = 2, row_height: int = 440) -> dict:
    """Several figures as one, as a plotly figure dict: each in its own cell (row-major) with its title, axes
    (titles, ranges, tick formats, a secondary y axis) and shapes; each legend entry shown once (entries of the
    same name toggle together). Built from the figures' JSON without re-validating it: the app draws a
    comparison this way, as one figure of six panels instead of six figures (``go.Figure(grid(...))`` gives
    a validated Figure). Every source figure must use one x and one y axis, plus at most one overlaying y2."""
    if not figs:
        raise ValueError("grid needs at least one figure")
    n, rows = len(figs), math.ceil(len(figs) / cols)
    hgap, vgap = 0.09, 0.32 / rows
    w, h = (1 - hgap * (cols - 1)) / cols, (1 - vgap * (rows - 1)) / rows
    jsons = [f.to_plotly_json() for f in figs]
    layout: dict = {"template": jsons[0]["layout"].get("template", {}), "annotations": [], "shapes": [],
                    "height": row_height * rows, "margin": dict(l=70, r=40, t=60, b=120),
                    "legend": dict(orientation="h", yref="container", y=0.01, yanchor="bottom", x=0)}
    data: list[dict] = []
    shown: set[str] = set()
    extra = n                                   # secondary y axes are numbered after the n primary ones
    for i, fj in enumerate(jsons):
        src = fj["layout"]
        k, r, c = i + 1, i // cols, i % cols
        x0, y1 = c * (w + hgap), 1 - r * (h + vgap)
        axes = {"x": _axis_ref("x", k), "y": _axis_ref("y", k)}
        layout[_axis_ref("xaxis", k)] = {**src.get("xaxis", {}), "domain": [x0, x0 + w], "anchor": axes["y"]}
        layout[_axis_ref("yaxis", k)] = {**src.get("yaxis", {}), "domain": [y1 - h, y1], "anchor": axes["x"]}
        if "yaxis2" in src and any(tr.get("yaxis") == "y2" for tr in fj["data"]):
            extra += 1
            axes["y2"] = f"y{extra}"
            layout[f"yaxis{extra}"] = {**src["yaxis2"], "overlaying": axes["y"], "anchor": axes["x"], "side": "right"}
        for tr in fj["data"]:
            tr = dict(tr, xaxis=axes["x"], yaxis=axes.get(tr.get("yaxis", "y"), axes["y"]))
            name = tr.get("name") or ""
            if tr.get("showlegend") is not False and name:
                tr.update(legendgroup=name, showlegend=name not in shown)
                shown.add(name)
            data.append(tr)
        for shape in src.get("shapes", []):
            layout["shapes"].append({**shape, "xref": _remap_ref(shape.get("xref", "x"), axes),
                                     "yref": _remap_ref(shape.get("yref", "y"), axes)})
        title = (src.get("title") or {}).get("text")
        if title:
            layout["annotations"].append(dict(text=title, x=x0 + w / 2, y=y1, xref="paper", yref="paper",
                                              xanchor="center", yanchor="bottom", showarrow=False,
                                              font=dict(size=15)))
        for a in src.get("annotations", []):      # a message of an empty figure: placed inside its cell
            if a.get("xref") == "paper" and a.get("yref") == "paper":
                a = {**a, "x": x0 + w * a.get("x", 0.5), "y": y1 - h + h * a.get("y", 0.5)}
            layout["annotations"].append({**a, "xref": _remap_ref(a.get("xref", "x"), axes),
                                          "yref": _remap_ref(a.get("yref", "y"), axes)})
        if src.get("barmode"):
            layout["barmode"] = src["barmode"]
    return {"data": data, "layout": layout}


# ------------------------------------------------------------------------------------------------ trace mode
MODE_ORDER = ("position", "token")      # the trace modes (docs/design.md "Definitions"), in the order titles name them


def mode_suffix(modes: pd.DataFrame | None) -> str:
    """The title suffix " (position mode)", " (token mode)" or, when the rows name several (runs or steps of different
    modes), " (position / token mode)": from a frame with a ``mode`` column (an analysis's ``mode`` frame);
    "" when there is none or it has no rows, so figures of hand-made frames keep their plain titles."""
    if modes is None or "mode" not in modes.columns:
        return ""
    found = {str(m) for m in modes["mode"].dropna()}
    if not found:
        return ""
    ordered = [m for m in MODE_ORDER if m in found] + sorted(found - set(MODE_ORDER))
    return f" ({' / '.join(ordered)} mode)"


def with_mode(builder: Callable[[Frames], go.Figure]) -> Callable[[Frames], go.Figure]:
    """``builder`` (frames -> figure) whose figure's title ends with the trace mode of ``frames["mode"]``
    (``mode_suffix``): alignment means a different thing in each mode, so every trace figure says which."""
    def build_titled(frames: Frames) -> go.Figure:
        return name_mode(builder(frames), frames.get("mode"))
    return build_titled


def name_mode(fig: go.Figure, modes: pd.DataFrame | None) -> go.Figure:
    """``fig`` with ``mode_suffix(modes)`` appended to its title (for figures drawn from several analyses'
    frames, e.g. the app's concentration views); returns ``fig``."""
    suffix = mode_suffix(modes)
    if suffix:
        fig.update_layout(title_text=f"{fig.layout.title.text or ''}{suffix}")
    return fig


def build(name: str, frames: Frames) -> go.Figure:
    """The figure of analysis ``name`` from its frames: the ``figure`` of its registry entry
    (``backend.analysis.analyses``); ValueError listing the names otherwise."""
    return analyses.get(name).figure(frames)
