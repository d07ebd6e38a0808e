"""The fourteen analyses of a trace run: one registry, each a function of (run, step) returning DataFrames.

    from backend.analysis import analyses
    frames = analyses.run("concentration", run_id, step=None, con=con)   # {"lorenz": df, "stats": df}
    everything = analyses.run_all(run_id, con=con)                      # {name: {frame: df}}
    analyses.names()                                                    # registry order

Every entry has one signature, ``fn(con, run_id, step, params) -> dict[str, DataFrame]``. Run-scoped
analyses look at every traced step; step-scoped ones at one traced step: ``step`` given, else the last one.
Token-level statistics are over response tokens; the module shares of the update (layer_module_contribution)
use every traced position, since the pieces of all positions add up to the batch gradient.
Adding an analysis: one function and one ``@register`` line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import duckdb
import numpy as np
import pandas as pd

from backend.analysis import metrics
from backend.index import queries, sql

Frames = dict[str, pd.DataFrame]


@dataclass(frozen=True)
class AnalysisParams:
    n_bins: int = field(default=20, metadata={"help": "position bins (positional decay, heatmaps)"})
    top_k: int = field(default=15, metadata={"help": "tokens per side in surprising_tokens"})
    context_tokens: int = field(default=8, metadata={"help": "tokens of context shown before a token"})
    max_lag: int = field(default=30, metadata={"help": "largest lag of the autocorrelation"})
    module: str | None = field(default=None, metadata={"help": "layer_position_heatmap: one module type"})
    scatter_points: int = field(default=4000, metadata={"help": "points kept for the scatter (all in r)"})
    lorenz_points: int = field(default=1001, metadata={"help": "points kept of the Lorenz curve"})
    n_extremes: int = field(default=5, metadata={"help": "top and bottom modules listed per stage"})

    def __post_init__(self) -> None:
        for name, lo, hi in (("n_bins", 1, 1000), ("top_k", 1, 1000), ("context_tokens", 0, 200),
                             ("max_lag", 1, 1000), ("scatter_points", 10, 10**6), ("lorenz_points", 3, 10**6),
                             ("n_extremes", 1, 1000)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")


AnalysisFn = Callable[[duckdb.DuckDBPyConnection, str, int, AnalysisParams], Frames]


@dataclass(frozen=True)
class Analysis:
    name: str
    title: str
    scope: str          # "run": all traced steps; "step": one traced step
    fn: AnalysisFn
    description: str


ANALYSES: dict[str, Analysis] = {}


def register(name: str, title: str, scope: str) -> Callable[[AnalysisFn], AnalysisFn]:
    assert scope in ("run", "step"), f"scope must be 'run' or 'step', got {scope!r}"

    def deco(fn: AnalysisFn) -> AnalysisFn:
        assert name not in ANALYSES, f"analysis {name!r} registered twice"
        ANALYSES[name] = Analysis(name, title, scope, fn, (fn.__doc__ or "").strip())
        return fn
    return deco


def names() -> list[str]:
    """Registered analysis names, in registry order."""
    return list(ANALYSES)


def get(name: str) -> Analysis:
    """The analysis called ``name``; ValueError listing the names otherwise."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; available: {', '.join(ANALYSES)}")
    return ANALYSES[name]


def resolve_step(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None) -> int:
    """``step`` checked against the run's traced steps, or the last traced step when None."""
    steps = queries.traced_steps(run_id, con)
    if not steps:
        raise ValueError(f"run {run_id!r} has no traced steps in the index (no trace/tokens shards)")
    if step is None:
        return steps[-1]
    queries.require_step(run_id, step, con)
    return step


def run(name: str, run_id: str, step: int | None = None, params: AnalysisParams | None = None,
        con: duckdb.DuckDBPyConnection | None = None) -> Frames:
    """Run one analysis on a run (at ``step``, default: the last traced step)."""
    analysis = get(name)
    with queries.cursor(con) as cur:
        return analysis.fn(cur, run_id, resolve_step(cur, run_id, step), params or AnalysisParams())


def run_all(run_id: str, step: int | None = None, params: AnalysisParams | None = None,
            con: duckdb.DuckDBPyConnection | None = None, only: list[str] | None = None) -> dict[str, Frames]:
    """Run every analysis (or those named in ``only``), in registry order."""
    selected = [get(n).name for n in only] if only is not None else names()
    params = params or AnalysisParams()
    with queries.cursor(con) as cur:
        s = resolve_step(cur, run_id, step)
        return {n: ANALYSES[n].fn(cur, run_id, s, params) for n in selected}


def _q(con: duckdb.DuckDBPyConnection, query: str, params: list[object]) -> pd.DataFrame:
    """Run an analysis query; float32 columns (as stored) come back as float64 for the numpy work."""
    df = con.execute(query, params).df()
    f32 = [c for c in df.columns if df[c].dtype == np.float32]
    return df.astype({c: np.float64 for c in f32}) if f32 else df


def _bin_width(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None, n_bins: int) -> int:
    max_pos = con.execute(sql.MAX_RESP_POS, [run_id, step, step]).fetchone()[0]
    return max(1, math.ceil((int(max_pos or 0) + 1) / n_bins))


# ------------------------------------------------------------------------------------------------ 1
@register("alignment_evolution", "Alignment over training", "run")
def alignment_evolution(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Per traced step, over response tokens: mean, std (n-1), 10/50/90th percentiles (linear interpolation)
    and the fraction with negative alignment; ``trend``: least-squares slope of the mean per optimizer step."""
    ev = _q(con, sql.ALIGNMENT_EVOLUTION, [run_id])
    trend = pd.DataFrame([{"slope_per_step": metrics.ols_slope(ev["step"], ev["mean"]) if len(ev) > 1 else np.nan,
                           "first_mean": ev["mean"].iloc[0] if len(ev) else np.nan,
                           "last_mean": ev["mean"].iloc[-1] if len(ev) else np.nan, "n_steps": len(ev)}])
    return {"evolution": ev, "trend": trend}


# ------------------------------------------------------------------------------------------------ 2
@register("prompt_vs_response", "Prompt vs response tokens", "step")
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


@register("layer_module_contribution", "Per-layer and per-module contribution", "run")
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
@register("gradient_magnitude", "Gradient magnitude over training", "run")
def gradient_magnitude(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """``traced``: per traced step, response-token magnitude (mean, median, 90th pct, root of the sum of
    squares) and the batch gradient norm ||G|| (position mode: sqrt of the summed dots of all positions);
    ``train``: the optimizer's grad_norm, loss and lr at every step."""
    traced = _q(con, sql.MAGNITUDE_TRACED, [run_id])
    g = _q(con, sql.BATCH_GRAD_NORM, [run_id])
    traced = traced.merge(g, on="step", how="left") if len(g) else traced.assign(batch_grad_norm=np.nan)
    return {"traced": traced, "train": queries.train_steps(run_id, con)}


# ------------------------------------------------------------------------------------------------ 5
@register("positional_decay", "Alignment vs response position", "step")
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
@register("surprising_tokens", "Most opposing and most aligned tokens", "step")
def surprising_tokens(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """The ``top_k`` response tokens with the lowest (opposing) and highest (aligned) alignment, labelled by
    the predicted token, with the text before it (``context_tokens`` records) and the next 3 tokens."""
    t = _q(con, sql.ALL_TOKENS_AT_STEP, [run_id, step])
    resp = t[t["is_response"] & t["alignment"].notna()]
    picks = [("opposing", resp.nsmallest(p.top_k, "alignment")), ("aligned", resp.nlargest(p.top_k, "alignment"))]
    rows = []
    by_sample = {s: g.reset_index(drop=True) for s, g in t.groupby("sample_idx")}
    for kind, sel in picks:
        for rank, (_, r) in enumerate(sel.iterrows(), start=1):
            g = by_sample[r["sample_idx"]]
            i = int(np.searchsorted(g["position"].to_numpy(), r["position"]))
            rows.append({"kind": kind, "rank": rank, "sample_idx": int(r["sample_idx"]),
                         "position": int(r["position"]), "resp_pos": r["resp_pos"], "token": r["token"],
                         "category": r["category"], "alignment": r["alignment"], "magnitude": r["magnitude"],
                         "loss": r["loss"], "prob": r["prob"],
                         "context_before": "".join(g["token"].iloc[max(0, i - p.context_tokens):i]),
                         "context_after": "".join(g["token"].iloc[i + 1:i + 4])})
    return {"tokens": pd.DataFrame(rows, columns=[
        "kind", "rank", "sample_idx", "position", "resp_pos", "token", "category", "alignment", "magnitude",
        "loss", "prob", "context_before", "context_after"])}


# ------------------------------------------------------------------------------------------------ 7
@register("step_position_heatmap", "Step x response position", "run")
def step_position_heatmap(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Mean response-token alignment per (traced step, response-position bin)."""
    width = _bin_width(con, run_id, None, p.n_bins)
    cells = _q(con, sql.STEP_POSITION, [width, width, run_id])
    cells["bin_width"] = width
    return {"cells": cells}


# ------------------------------------------------------------------------------------------------ 8
@register("lora_ab", "LoRA A vs B gradient magnitudes", "step")
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
@register("category_breakdown", "Alignment by token category", "step")
def category_breakdown(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Per token category (backend.lm.categories) of response tokens: count, alignment (mean, std, fraction
    negative), mean magnitude, summed share, mean loss."""
    return {"categories": _q(con, sql.CATEGORY_AT_STEP, [run_id, step])}


# ------------------------------------------------------------------------------------------------ 10
@register("magnitude_alignment", "Magnitude vs alignment", "step")
def magnitude_alignment(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Response tokens' alignment against log1p(magnitude); ``stats``: Pearson r over all of them and the
    least-squares slope. ``points`` keeps at most ``scatter_points`` tokens (a fixed random subset)."""
    t = _q(con, sql.RESPONSE_TOKENS_AT_STEP, [run_id, step]).dropna(subset=["alignment", "magnitude"])
    t["log1p_magnitude"] = np.log1p(t["magnitude"].to_numpy(dtype=np.float64))
    x, y = t["log1p_magnitude"].to_numpy(), t["alignment"].to_numpy(dtype=np.float64)
    stats = pd.DataFrame([{"pearson_r": metrics.pearson(x, y) if len(t) > 1 else np.nan,
                           "slope": metrics.ols_slope(x, y) if len(t) > 1 else np.nan, "n": len(t)}])
    pts = t.sample(n=p.scatter_points, random_state=0) if len(t) > p.scatter_points else t
    return {"points": pts[["sample_idx", "position", "token", "category", "magnitude", "log1p_magnitude",
                           "alignment"]].reset_index(drop=True), "stats": stats}


# ------------------------------------------------------------------------------------------------ 11
@register("module_types", "Module types (q/k/v/o/MLP x A/B)", "step")
def module_types(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Per (module type, LoRA part), over all layers and response tokens: per-module alignment (mean, std,
    fraction negative), mean magnitude, summed dot and its share of the total."""
    df = _q(con, sql.MODULE_TYPES, [run_id, step])
    total = df["dot_sum"].sum()
    df["share"] = df["dot_sum"] / total if total != 0 else np.nan
    return {"modules": df}


# ------------------------------------------------------------------------------------------------ 12
@register("concentration", "Concentration of gradient magnitude", "step")
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
@register("autocorrelation", "Autocorrelation of alignment along the sequence", "step")
def autocorrelation(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """r_k of the response tokens' alignment of each sequence, k = 1..max_lag, averaged over sequences with
    N > 2k; ``band``: the 95% white-noise band +-1.96 sqrt(sum 1/N_i)/M (Bartlett), not a shuffle."""
    t = _q(con, sql.RESPONSE_SEQUENCES_AT_STEP, [run_id, step]).dropna(subset=["alignment"])
    seqs = [g["alignment"].to_numpy(dtype=np.float64) for _, g in t.groupby("sample_idx", sort=True)]
    r, n, band = metrics.mean_autocorr(seqs, p.max_lag)
    return {"lags": pd.DataFrame({"lag": np.arange(1, p.max_lag + 1), "r": r, "n_sequences": n, "band": band})}


# ------------------------------------------------------------------------------------------------ 14
@register("layer_position_heatmap", "Layer x response position", "step")
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
