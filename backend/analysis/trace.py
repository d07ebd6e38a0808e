"""The analyses of a traced ``train`` run, each registered with its figure, and the run's summary.

    from backend.analysis import analyses
    frames = analyses.run("concentration", run_id, step=None, con=con)   # {"lorenz": df, "stats": df}
    fig = analyses.get("concentration").figure(frames)                  # = figures.build("concentration", frames)

They read the ``tokens`` and ``token_modules`` rows a traced run writes (and the ``agg_*`` aggregates of the
latter). Run-scoped analyses look at every traced step; step-scoped ones at one traced step (the registry
passes ``step``: the one asked for, else the last). Token-level statistics are over response tokens; the module
shares of the update (layer_module_contribution) use every traced position, since the pieces of all positions
add up to the batch gradient. ``compare=True`` marks the figures ``compare`` overlays across runs (their
builders read the ``run`` column). ``summary`` gives the headline numbers ``analyze`` and ``compare`` report.

Adding a trace analysis: one function below with its ``@register(name, title, scope, figure=...)`` line.
"""
from __future__ import annotations

import math
from functools import wraps
from typing import Callable

import duckdb
import numpy as np
import pandas as pd

from backend.analysis import analyses, figures, metrics
from backend.analysis.analyses import AnalysisParams, Frames
from backend.index import queries, sql

KIND = "train"      # the job kind whose runs these analyses read (backend.jobs.train lists this module)


def _modes(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None) -> pd.DataFrame:
    """(step, mode) of the run's traced steps (``step`` None) or of one step: the ``mode`` frame."""
    # fetchall, not .df(): a few rows, and every analysis reads them (half the time of the pandas conversion)
    return pd.DataFrame(con.execute(sql.TRACE_MODES, [run_id, step, step]).fetchall(), columns=["step", "mode"])


def register(name: str, title: str, scope: str, *, figure: analyses.FigureFn, compare: bool = False
             ) -> Callable[[analyses.AnalysisFn], analyses.AnalysisFn]:
    """``analyses.register`` for train runs. Each analysis's frames also get ``mode``: the trace mode (tokens.mode)
    of the steps it read (every traced step for scope "run"); its figure's title names it
    (``figures.with_mode``), since alignment means a different thing in position and in token mode."""
    def deco(fn: analyses.AnalysisFn) -> analyses.AnalysisFn:
        @wraps(fn)
        def with_mode(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None, p: AnalysisParams) -> Frames:
            return {**fn(con, run_id, step, p), "mode": _modes(con, run_id, None if scope == "run" else step)}
        return analyses.register(name, title, scope, kind=KIND, figure=figures.with_mode(figure),
                                 compare=compare)(with_mode)
    return deco


def _q(con: duckdb.DuckDBPyConnection, query: str, params: list[object]) -> pd.DataFrame:
    """Run an analysis query; float32 columns (as stored) come back as float64 for the numpy work."""
    df = con.execute(query, params).df()
    f32 = [c for c in df.columns if df[c].dtype == np.float32]
    return df.astype({c: np.float64 for c in f32}) if f32 else df


def _bin_width(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None, n_bins: int) -> int:
    max_pos = con.execute(sql.MAX_RESP_POS, [run_id, step, step]).fetchone()[0]
    return max(1, math.ceil((int(max_pos or 0) + 1) / n_bins))


# ------------------------------------------------------------------------------------------------ 1
@register("alignment_evolution", "Alignment over training", "run",
          figure=lambda f: figures.alignment_evolution(f["evolution"]), compare=True)
def alignment_evolution(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Per traced step, over response tokens: mean, std (n-1), 10/50/90th percentiles (linear interpolation)
    and the fraction with negative alignment; ``trend``: least-squares slope of the mean per optimizer step."""
    ev = _q(con, sql.ALIGNMENT_EVOLUTION, [run_id])
    trend = pd.DataFrame([{"slope_per_step": metrics.ols_slope(ev["step"], ev["mean"]) if len(ev) > 1 else np.nan,
                           "first_mean": ev["mean"].iloc[0] if len(ev) else np.nan,
                           "last_mean": ev["mean"].iloc[-1] if len(ev) else np.nan, "n_steps": len(ev)}])
    return {"evolution": ev, "trend": trend}


# ------------------------------------------------------------------------------------------------ 2
@register("prompt_vs_response", "Prompt vs response tokens", "step",
          figure=lambda f: figures.prompt_vs_response(f["groups"]))
def prompt_vs_response(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Prompt positions (label masked) against response positions at one step: count, alignment (mean, std,
    fraction negative), mean magnitude, and the summed share of the batch update. Both groups always listed."""
    df = _q(con, sql.PROMPT_VS_RESPONSE, [run_id, step]).set_index("group")
    df = df.reindex(["prompt", "response"]).reset_index()
    df["n"] = df["n"].fillna(0).astype("int64")
    return {"groups": df}


# ------------------------------------------------------------------------------------------------ 3
def _stages(steps: list[int], selected: int) -> dict[int, str]:
    stages: dict[int, list[str]] = {}
    for label, s in (("early", steps[0]), ("middle", steps[(len(steps) - 1) // 2]), ("late", steps[-1]),
                     ("selected", selected)):
        if label not in stages.get(s, []):
            stages.setdefault(s, []).append(label)
    return {s: "/".join(labels) for s, labels in sorted(stages.items())}


@register("layer_module_contribution", "Per-layer and per-module contribution", "run",
          figure=lambda f: figures.layer_module_contribution(f["modules"]))
def layer_module_contribution(con: duckdb.DuckDBPyConnection, run_id: str, step: int,
                              p: AnalysisParams) -> Frames:
    """Per (layer, module), both LoRA parts together, at the early, middle and late traced steps (and the
    selected step): summed dot over every traced position and its share of the total (in position mode
    the module's ||G_m||^2 / ||G||^2), mean alignment and magnitude; ``extremes``: top and bottom modules
    by share per stage."""
    frames = []
    for s, label in _stages(queries.traced_steps(run_id, con), step).items():
        df = _q(con, sql.LAYER_MODULE_AT_STEP, [run_id, s])
        total = df["dot_sum"].sum()
        df["share"] = df["dot_sum"] / total if total != 0 else np.nan
        df.insert(0, "step", s)
        df.insert(0, "stage", label)
        frames.append(df)
    mods = pd.concat(frames, ignore_index=True)
    ext = []
    for (label, s), g in mods.groupby(["stage", "step"], sort=False):
        ranked = g.sort_values("share", ascending=False)
        for kind, part in (("top", ranked.head(p.n_extremes)), ("bottom", ranked.tail(p.n_extremes)[::-1])):
            ext.append(part.assign(kind=kind, rank=range(1, len(part) + 1)))
    cols = ["stage", "step", "kind", "rank", "layer", "module", "share", "mean_alignment", "dot_sum"]
    extremes = pd.concat(ext, ignore_index=True)[cols] if ext else pd.DataFrame(columns=cols)
    return {"modules": mods, "extremes": extremes}


# ------------------------------------------------------------------------------------------------ 4
@register("gradient_magnitude", "Gradient magnitude over training", "run",
          figure=lambda f: figures.gradient_magnitude(f["traced"], f["train"]))
def gradient_magnitude(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """``traced``: per traced step, response-token magnitude (mean, median, 90th pct, root of the sum of
    squares) and the batch gradient norm ||G|| (position mode: sqrt of the summed dots of all positions);
    ``train``: the optimizer's grad_norm, loss and lr at every step."""
    traced = _q(con, sql.MAGNITUDE_TRACED, [run_id])
    g = _q(con, sql.BATCH_GRAD_NORM, [run_id])
    traced = traced.merge(g, on="step", how="left") if len(g) else traced.assign(batch_grad_norm=np.nan)
    return {"traced": traced, "train": queries.train_steps(run_id, con)}


# ------------------------------------------------------------------------------------------------ 5
@register("positional_decay", "Alignment vs response position", "step",
          figure=lambda f: figures.positional_decay(f["bins"], f.get("fit")), compare=True)
def positional_decay(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Response tokens binned by position in the response (0 = first response token; ``n_bins`` equal
    bins): mean, std, standard error of the alignment, mean magnitude; ``fit``: least-squares slope of
    alignment on response position over all tokens (alignment per token)."""
    t = _q(con, sql.RESPONSE_POSITIONS_AT_STEP, [run_id, step]).dropna(subset=["alignment"])
    width = _bin_width(con, run_id, step, p.n_bins)
    t["bin_start"] = (t["resp_pos"] // width) * width
    b = t.groupby("bin_start").agg(n=("alignment", "size"), mean_alignment=("alignment", "mean"),
                                   std_alignment=("alignment", "std"), mean_magnitude=("magnitude", "mean"))
    b = b.reset_index()
    b["bin_end"] = b["bin_start"] + width - 1
    b["bin_center"] = b["bin_start"] + (width - 1) / 2
    b["sem"] = b["std_alignment"] / np.sqrt(b["n"])
    slope = metrics.ols_slope(t["resp_pos"], t["alignment"]) if len(t) > 1 else np.nan
    fit = pd.DataFrame([{"slope_per_token": slope, "intercept": t["alignment"].mean() - slope * t["resp_pos"].mean(),
                         "n": len(t), "bin_width": width, "step": step}])
    return {"bins": b, "fit": fit}


# ------------------------------------------------------------------------------------------------ 6
@register("surprising_tokens", "Most opposing and most aligned tokens", "step",
          figure=lambda f: figures.surprising_tokens(f["tokens"]))
def surprising_tokens(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """The ``top_k`` response tokens with the lowest (opposing) and highest (aligned) alignment, labelled by
    the predicted token, with the text before it (``context_tokens`` records) and the next 3 tokens."""
    t = _q(con, sql.ALL_TOKENS_AT_STEP, [run_id, step])
    resp = t[t["is_response"] & t["alignment"].notna()]
    picks = [("opposing", resp.nsmallest(p.top_k, "alignment")), ("aligned", resp.nlargest(p.top_k, "alignment"))]
    return {"tokens": in_context(t, picks, ["alignment", "magnitude", "loss", "prob"], p.context_tokens)}


def in_context(t: pd.DataFrame, picks: list[tuple[str, pd.DataFrame]], values: list[str],
               context_tokens: int) -> pd.DataFrame:
    """Listed tokens with their context: per (kind, rows) of ``picks``, each row ranked from 1 with its sample,
    position, resp_pos, token, category, the ``values`` columns, the text of the ``context_tokens`` records before
    it and of the next 3 (from ``t``: every token of the step)."""
    cols = ["sample_idx", "position", "resp_pos", "token", "category", *values]
    by_sample = {s: g.reset_index(drop=True) for s, g in t.groupby("sample_idx")}
    rows = []
    for kind, sel in picks:
        for rank, (_, r) in enumerate(sel.iterrows(), start=1):
            g = by_sample[r["sample_idx"]]
            i = int(np.searchsorted(g["position"].to_numpy(), r["position"]))
            rows.append({"kind": kind, "rank": rank, **{c: r[c] for c in cols},
                         "sample_idx": int(r["sample_idx"]), "position": int(r["position"]),
                         "context_before": "".join(g["token"].iloc[max(0, i - context_tokens):i]),
                         "context_after": "".join(g["token"].iloc[i + 1:i + 4])})
    return pd.DataFrame(rows, columns=["kind", "rank", *cols, "context_before", "context_after"])


# ------------------------------------------------------------------------------------------------ 7
@register("step_position_heatmap", "Step x response position", "run",
          figure=lambda f: figures.step_position_heatmap(f["cells"]))
def step_position_heatmap(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Mean response-token alignment per (traced step, response-position bin)."""
    width = _bin_width(con, run_id, None, p.n_bins)
    cells = _q(con, sql.STEP_POSITION, [width, width, run_id])
    cells["bin_width"] = width
    return {"cells": cells}


# ------------------------------------------------------------------------------------------------ 8
@register("lora_ab", "LoRA A vs B gradient magnitudes", "step",
          figure=lambda f: figures.lora_ab(f["layers"]))
def lora_ab(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Per layer: the norm of a response token's lora_A piece and lora_B piece in that layer (over the
    layer's modules), averaged over tokens, and their ratio B/A; ``overall``: the same over all layers."""
    df = _q(con, sql.LORA_AB, [run_id, step])
    wide = df.pivot(index="layer", columns="part", values="mean_magnitude") if len(df) else pd.DataFrame()
    wide = wide.reindex(columns=["lora_A", "lora_B"]).rename_axis(index="layer", columns=None).reset_index()
    wide["ratio_b_over_a"] = wide["lora_B"] / wide["lora_A"]
    overall = wide[wide["layer"] == "all"].drop(columns="layer").reset_index(drop=True)
    layers = wide[wide["layer"] != "all"].copy()
    layers["layer"] = layers["layer"].astype(int)
    return {"layers": layers.sort_values("layer").reset_index(drop=True), "overall": overall}


# ------------------------------------------------------------------------------------------------ 9
@register("category_breakdown", "Alignment by token category", "step",
          figure=lambda f: figures.category_breakdown(f["categories"]), compare=True)
def category_breakdown(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Per token category (backend.lm.categories) of response tokens: count, alignment (mean, std, fraction
    negative), mean magnitude, summed share, mean loss."""
    return {"categories": _q(con, sql.CATEGORY_AT_STEP, [run_id, step])}


# ------------------------------------------------------------------------------------------------ 10
@register("magnitude_alignment", "Magnitude vs alignment", "step",
          figure=lambda f: figures.magnitude_alignment(f["points"], f["stats"]))
def magnitude_alignment(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Response tokens' alignment against their magnitude; ``stats``: Pearson r and the least-squares slope
    of alignment on the raw magnitude, and Spearman's rank correlation (which no monotone rescaling of the
    magnitude changes), over all of them. ``points`` keeps at most ``scatter_points`` tokens (a fixed random
    subset), with log1p(magnitude) for the scatter's axis."""
    t = _q(con, sql.RESPONSE_TOKENS_AT_STEP, [run_id, step]).dropna(subset=["alignment", "magnitude"])
    t["log1p_magnitude"] = np.log1p(t["magnitude"].to_numpy(dtype=np.float64))
    x, y = t["magnitude"].to_numpy(dtype=np.float64), t["alignment"].to_numpy(dtype=np.float64)
    enough = len(t) > 1
    stats = pd.DataFrame([{"pearson_r": metrics.pearson(x, y) if enough else np.nan,
                           "spearman_r": metrics.spearman(x, y) if enough else np.nan,
                           "slope": metrics.ols_slope(x, y) if enough else np.nan, "n": len(t)}])
    pts = t.sample(n=p.scatter_points, random_state=0) if len(t) > p.scatter_points else t
    return {"points": pts[["sample_idx", "position", "token", "category", "magnitude", "log1p_magnitude",
                           "alignment"]].reset_index(drop=True), "stats": stats}


# ------------------------------------------------------------------------------------------------ 11
@register("module_types", "Module types (q/k/v/o/MLP x A/B)", "step",
          figure=lambda f: figures.module_types(f["modules"]), compare=True)
def module_types(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Per (module type, LoRA part), over all layers and response tokens: per-module alignment (mean, std,
    fraction negative), mean magnitude, summed dot and its share of the total. ``layer_modules``: per
    (layer, module, LoRA part) over response tokens, mean alignment and magnitude, summed dot (what the
    summary's dominant and opposing modules are picked from)."""
    df = _q(con, sql.MODULE_TYPES, [run_id, step])
    total = df["dot_sum"].sum()
    df["share"] = df["dot_sum"] / total if total != 0 else np.nan
    return {"modules": df, "layer_modules": _q(con, sql.LAYER_MODULE_PARTS_AT_STEP, [run_id, step])}


# ------------------------------------------------------------------------------------------------ 12
@register("concentration", "Concentration of gradient magnitude", "step",
          figure=lambda f: figures.lorenz_curve(f["lorenz"], f["stats"]), compare=True)
def concentration(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Over response-token magnitudes at one step: Lorenz curve (ascending, from (0, 0); at most
    ``lorenz_points`` of its exact vertices), Gini, and the fraction of tokens (largest first) holding 50,
    80 and 90% of the total."""
    v = _q(con, sql.RESPONSE_MAGNITUDES_AT_STEP, [run_id, step])["magnitude"].dropna().to_numpy(dtype=np.float64)
    if v.size == 0 or v.sum() <= 0:     # nothing to distribute: say so instead of failing the whole report
        return {"lorenz": pd.DataFrame({"token_fraction": [], "mass_fraction": []}),
                "stats": pd.DataFrame([{"value": "magnitude", "n": int(v.size), "gini": np.nan,
                                        "tokens_for_50pct": np.nan, "tokens_for_80pct": np.nan,
                                        "tokens_for_90pct": np.nan,
                                        "note": "no response tokens with a positive magnitude at this step"}])}
    x, y = metrics.lorenz(v)
    keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), p.lorenz_points)).round().astype(int))
    stats = pd.DataFrame([{"value": "magnitude", "n": len(v), "gini": metrics.gini(v),
                           "tokens_for_50pct": metrics.tokens_for_p(v, 0.5),
                           "tokens_for_80pct": metrics.tokens_for_p(v, 0.8),
                           "tokens_for_90pct": metrics.tokens_for_p(v, 0.9)}])
    return {"lorenz": pd.DataFrame({"token_fraction": x[keep], "mass_fraction": y[keep]}), "stats": stats}


# ------------------------------------------------------------------------------------------------ 13
@register("autocorrelation", "Autocorrelation of alignment along the sequence", "step",
          figure=lambda f: figures.autocorrelation(f["lags"]), compare=True)
def autocorrelation(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """r_k of the response tokens' alignment of each sequence, k = 1..max_lag, averaged over sequences with
    N > 2k; ``band``: the 95% white-noise band +-1.96 sqrt(sum 1/N_i)/M (Bartlett), not a shuffle."""
    t = _q(con, sql.RESPONSE_SEQUENCES_AT_STEP, [run_id, step]).dropna(subset=["alignment"])
    seqs = [g["alignment"].to_numpy(dtype=np.float64) for _, g in t.groupby("sample_idx", sort=True)]
    r, n, band = metrics.mean_autocorr(seqs, p.max_lag)
    return {"lags": pd.DataFrame({"lag": np.arange(1, p.max_lag + 1), "r": r, "n_sequences": n, "band": band})}


# ------------------------------------------------------------------------------------------------ 14
@register("layer_position_heatmap", "Layer x response position", "step",
          figure=lambda f: figures.layer_position_heatmap(f["cells"]))
def layer_position_heatmap(con: duckdb.DuckDBPyConnection, run_id: str, step: int,
                           p: AnalysisParams) -> Frames:
    """Mean per-module alignment (and magnitude) per (layer, response-position bin) at one step, over all
    module types or the one named in ``params.module``."""
    if p.module is not None:
        mods = [r[0] for r in con.execute(sql.MODULE_NAMES, [run_id, step]).fetchall()]
        if p.module not in mods:
            raise ValueError(f"module {p.module!r} is not traced in run {run_id!r} at step {step}; "
                             f"modules: {', '.join(mods) or 'none'}")
    width = _bin_width(con, run_id, step, p.n_bins)
    cells = _q(con, sql.LAYER_POSITION, [width, width, run_id, step, run_id, step, p.module, p.module])
    cells["bin_width"] = width
    cells["module"] = p.module or "all"
    return {"cells": cells}


# ------------------------------------------------------------------------------------------------ summary
DEFINITIONS = {
    "mode": "trace mode of the run's traced steps (tokens.mode): position (alignment of the piece a position "
            "supplies to the batch gradient, including later tokens' losses through attention) or token (of the "
            "token's own loss gradient); mixed when steps differ",
    "mean_alignment": "mean alignment (cosine with the batch gradient) of response tokens at `step`",
    "opposing_fraction": "fraction of response tokens at `step` with alignment < 0",
    "alignment_trend": "least-squares slope of the per-step mean alignment against optimizer step (per step)",
    "positional_decay_slope": "least-squares slope of alignment on position in the response (per token)",
    "gini": "Gini of response-token magnitudes at `step` (0 equal, 1 - 1/n all on one token)",
    "tokens_for_80pct": "smallest fraction of response tokens, largest magnitude first, holding 80% of the total",
    "category_alignment": "mean alignment of response tokens per token category at `step`",
    "magnitude_alignment_r": "Pearson r of alignment with the raw magnitude over response tokens at `step`",
    "magnitude_alignment_spearman": "Spearman rank correlation (Pearson of average ranks, ties averaged) of "
                                    "alignment with magnitude over response tokens at `step`; unlike Pearson, "
                                    "unchanged by any monotone rescaling of the magnitude",
    "lora_ba_ratio": "mean per-token norm of the lora_B pieces over that of the lora_A pieces (all layers)",
    "dominant_module": "layer.module.part (LoRA A or B) with the largest mean per-module alignment over response "
                       "tokens at `step`",
    "opposing_module": "layer.module.part with the lowest mean per-module alignment over response tokens at "
                       "`step`, if that mean is negative; null when no module opposes the update on average",
    "dominant_module_type": "module.part (over all layers) with the largest mean per-module alignment over "
                            "response tokens at `step`",
    "largest_share_module": "layer.module (both LoRA parts, every traced position) with the largest share of the "
                            "update (its summed dot over the total, = ||G_m||^2 / ||G||^2) at `step`; "
                            "null in token mode, where the dots of the tokens do not add up to the update",
    "largest_share_module_type": "module.part (all layers, response tokens) with the largest summed-dot share at "
                                 "`step`; null in token mode (see largest_share_module)",
    "prompt_share": "share of the update from prompt positions (summed share) at `step`; null in token mode "
                    "(see largest_share_module)",
    "lag1_autocorr": "lag-1 autocorrelation of alignment along each response, averaged over sequences",
}


def _num(v: object) -> float | int | None:
    """A JSON-safe number: NaN and missing become None."""
    if v is None:
        return None
    f = float(v)  # type: ignore[arg-type]
    return None if math.isnan(f) else (int(f) if isinstance(v, int) else f)


def _pick(df: pd.DataFrame, col: str, *, largest: bool) -> pd.Series | None:
    """The row with the largest (smallest) non-null ``col``; None when there is none."""
    if not len(df) or not df[col].notna().any():
        return None
    return df.loc[df[col].idxmax() if largest else df[col].idxmin()]


def _part_name(row: pd.Series | None) -> str | None:
    return f"L{int(row['layer'])}.{row['module']}.{row['part']}" if row is not None else None


@analyses.register_summary(KIND, definitions=DEFINITIONS, needs=(
    "alignment_evolution", "prompt_vs_response", "layer_module_contribution", "positional_decay", "lora_ab",
    "category_breakdown", "magnitude_alignment", "module_types", "concentration", "autocorrelation"))
def summary(step: int, results: dict[str, Frames]) -> dict[str, object]:
    """The headline numbers of a traced run at ``step`` (JSON-safe; NaN as None)."""
    ev = results["alignment_evolution"]["evolution"]
    at = ev[ev["step"] == step]
    conc = results["concentration"]["stats"].iloc[0]
    # shares (summed dots over the total) decompose the update only in position mode, where the pieces of all
    # positions add up to the batch gradient; in token mode a share-based key would name a non-quantity
    mt = results["module_types"]
    shares_ok = set(mt["mode"]["mode"]) == {"position"}       # the mode frame of a step-scoped analysis
    mods = results["layer_module_contribution"]["modules"]
    mods = mods[mods["step"] == step]
    top_share = _pick(mods, "share", largest=True) if shares_ok else None
    parts = mt["layer_modules"]
    dom = _pick(parts, "mean_alignment", largest=True)
    opp = _pick(parts[parts["mean_alignment"] < 0], "mean_alignment", largest=False)
    types = mt["modules"]
    dom_type = _pick(types, "mean_alignment", largest=True)
    top_type = _pick(types, "share", largest=True) if shares_ok else None
    lags = results["autocorrelation"]["lags"]
    groups = results["prompt_vs_response"]["groups"].set_index("group")
    overall = results["lora_ab"]["overall"]
    modes = sorted(set(results["alignment_evolution"]["mode"]["mode"]))    # every traced step (scope "run")
    return {
        "mode": modes[0] if len(modes) == 1 else ("mixed" if modes else None),
        "traced_steps": [int(s) for s in ev["step"]],
        "n_response_tokens": int(at["n"].iloc[0]) if len(at) else 0,
        "mean_alignment": _num(at["mean"].iloc[0]) if len(at) else None,
        "median_alignment": _num(at["p50"].iloc[0]) if len(at) else None,
        "opposing_fraction": _num(at["frac_negative"].iloc[0]) if len(at) else None,
        "alignment_trend": _num(results["alignment_evolution"]["trend"]["slope_per_step"].iloc[0]),
        "positional_decay_slope": _num(results["positional_decay"]["fit"]["slope_per_token"].iloc[0]),
        "gini": _num(conc["gini"]),
        "tokens_for_50pct": _num(conc["tokens_for_50pct"]),
        "tokens_for_80pct": _num(conc["tokens_for_80pct"]),
        "tokens_for_90pct": _num(conc["tokens_for_90pct"]),
        "category_alignment": {str(r.category): _num(r.mean_alignment)
                               for r in results["category_breakdown"]["categories"].itertuples()},
        "magnitude_alignment_r": _num(results["magnitude_alignment"]["stats"]["pearson_r"].iloc[0]),
        "magnitude_alignment_spearman": _num(results["magnitude_alignment"]["stats"]["spearman_r"].iloc[0]),
        "lora_ba_ratio": _num(overall["ratio_b_over_a"].iloc[0]) if len(overall) else None,
        "dominant_module": _part_name(dom),
        "dominant_module_alignment": _num(dom["mean_alignment"]) if dom is not None else None,
        "opposing_module": _part_name(opp),
        "opposing_module_alignment": _num(opp["mean_alignment"]) if opp is not None else None,
        "dominant_module_type": f"{dom_type['module']}.{dom_type['part']}" if dom_type is not None else None,
        "largest_share_module": f"L{int(top_share['layer'])}.{top_share['module']}" if top_share is not None else None,
        "largest_share_module_share": _num(top_share["share"]) if top_share is not None else None,
        "largest_share_module_type": f"{top_type['module']}.{top_type['part']}" if top_type is not None else None,
        "lag1_autocorr": _num(lags["r"].iloc[0]) if len(lags) else None,
        "lag1_noise_band": _num(lags["band"].iloc[0]) if len(lags) else None,
        "prompt_alignment": _num(groups.loc["prompt", "mean_alignment"]),
        "response_alignment": _num(groups.loc["response", "mean_alignment"]),
        "prompt_share": _num(groups.loc["prompt", "share_sum"]) if shares_ok else None,
    }
