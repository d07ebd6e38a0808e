"""Gradient-sketch analyses of a ``train`` run traced with ``--trace-sketch-dim k`` (position mode): which tokens'
pieces of the update point the same way.

    frames = analyses.run("sketch_pca", run_id, step, con=con)      # {"points", "components"}
    near = neighbours(con, run_id, step, sample_idx=3, position=17, top_k=10)

They read ``token_sketches`` (one row per traced position: a unit vector ``sketch`` and its norm ``sketch_norm``,
``backend.trace.sketch``) joined to ``tokens``. The sketch's inner products estimate those of the pieces P_s:
cos(sk, sk') estimates cos(P_s, P_s'), with an error whose standard deviation is at most ``error_bound(kind, k)``
(sqrt(14/k) for the default projection; about 1/sqrt(k) on real traces, spread over many LoRA matrices). PCA is of the unit sketches (directions; magnitudes
are the tokens table's), centred, by numpy's SVD. Everything here is numpy: the app imports it.
"""
from __future__ import annotations

import json
import math

import duckdb
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pyarrow.compute as pc

from backend.analysis import analyses, figures
from backend.analysis.analyses import AnalysisParams, Frames
from backend.index import queries

KIND = "train"
HOW = "train with --trace-sketch-dim K (position mode, with --trace-every M): sketches are kept at traced steps"
COLOR_BY = ("category", "alignment", "sample")

# every traced position of a step with its sketch; rank may be NULL in both (a single process)
SKETCH_ROWS = """SELECT t.sample_idx, t.position, t.token, t.category, t.is_response, t.alignment, t.magnitude,
    s.sketch_norm, s.sketch
FROM tokens t JOIN token_sketches s ON s.run_id = t.run_id AND s.step = t.step AND s.sample_idx = t.sample_idx
    AND s.position = t.position AND s.rank IS NOT DISTINCT FROM t.rank
WHERE t.run_id = ? AND t.step = ? ORDER BY t.sample_idx, t.position"""
HAS_SKETCHES = "SELECT count(*) > 0 FROM token_sketches WHERE run_id = ? AND (? IS NULL OR step = ?)"


def has_sketches(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None = None) -> bool:
    return bool(con.execute(HAS_SKETCHES, [run_id, step, step]).fetchall()[0][0])


def require_sketches(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None) -> None:
    if not has_sketches(con, run_id, step):
        at = "" if step is None else f" at step {step}"
        raise ValueError(f"run {run_id!r} has no gradient sketches{at}: {HOW}")


def load(con: duckdb.DuckDBPyConnection, run_id: str, step: int, context_tokens: int = 8
         ) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows: sample_idx, position, token, category, is_response, alignment, magnitude, sketch_norm,
    context_before; (rows, k) float64 unit sketches, zero rows for a zero piece)."""
    require_sketches(con, run_id, step)
    tab = con.sql(SKETCH_ROWS, params=[run_id, step]).to_arrow_table()
    col = tab.column("sketch").combine_chunks()
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    k = int(pc.max(pc.list_value_length(col)).as_py() or 0)
    unit = np.zeros((tab.num_rows, k))
    if valid.any():
        unit[valid] = col.filter(valid).flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, k)
    rows = tab.drop_columns(["sketch"]).to_pandas()
    for c in ("alignment", "magnitude", "sketch_norm"):
        rows[c] = rows[c].astype(np.float64)
    before = []
    for _, g in rows.groupby("sample_idx", sort=False):              # rows are ordered by sample, position
        toks = g["token"].tolist()
        before += ["".join(toks[max(0, i - context_tokens):i]) for i in range(len(toks))]
    rows["context_before"] = before
    return rows, unit


def pca2(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2) coordinates on the first two principal axes of the centred rows, and their explained variance
    ratios (2,)."""
    if unit.shape[0] < 2:
        return np.zeros((unit.shape[0], 2)), np.zeros(2)
    X = unit - unit.mean(0)
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    var = s ** 2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    coords = X @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        ratio = np.pad(ratio, (0, 2 - len(ratio)))
    return coords, ratio


def pca_figure(frames: Frames, color: str = "category") -> go.Figure:
    """The step's tokens on the first two principal axes of their gradient sketches, coloured by ``color``
    (category, alignment or sample); hover: the token in its context."""
    if color not in COLOR_BY:
        raise ValueError(f"color must be one of {', '.join(COLOR_BY)}, got {color!r}")
    pts, comp = frames["points"], frames["components"]
    fig = go.Figure()
    show = figures._show

    def hover(g: pd.DataFrame) -> np.ndarray:
        return np.stack([g["context_before"].map(show), g["token"].map(show), g["category"],
                         g["sample_idx"], g["position"], g["alignment"]], axis=-1)

    tmpl = ("%{customdata[0]} [%{customdata[1]}]<br>sample %{customdata[3]}, position %{customdata[4]}"
            "<br>category %{customdata[2]}<br>alignment %{customdata[5]:.4f}<extra></extra>")
    if color == "alignment":
        fig.add_trace(go.Scattergl(x=pts["pc1"], y=pts["pc2"], mode="markers", customdata=hover(pts),
                                   hovertemplate=tmpl, marker=dict(color=pts["alignment"], colorscale="RdBu",
                                                                   cmid=0, size=6, colorbar=dict(title="alignment"))))
    else:
        key = "category" if color == "category" else "sample_idx"
        for i, (name, g) in enumerate(pts.groupby(key, sort=True)):
            fig.add_trace(go.Scattergl(x=g["pc1"], y=g["pc2"], mode="markers", name=str(name),
                                       customdata=hover(g), hovertemplate=tmpl,
                                       marker=dict(size=6, color=figures._color(i))))
    r = comp["explained"].tolist() if len(comp) else [0.0, 0.0]
    return figures._layout(fig, "Tokens by the direction of their gradient piece (PCA of the sketches)",
                           f"PC1 ({r[0]:.1%} of the variance)", f"PC2 ({r[1]:.1%})")


@analyses.register("sketch_pca", "Gradient directions: PCA of the tokens' sketches", "step", kind=KIND,
                   figure=pca_figure, available=lambda con, run_id: has_sketches(con, run_id))
def sketch_pca(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Every traced position of the step on the first two principal axes of its unit gradient sketch (the
    direction of its piece of the update; PCA over all of them, ``scatter_points`` drawn, evenly spaced)."""
    rows, unit = load(con, run_id, step, p.context_tokens)
    keep = rows["sketch_norm"].to_numpy() > 0
    coords, ratio = pca2(unit[keep])
    pts = rows[keep].drop(columns=["sketch_norm"]).reset_index(drop=True)
    pts["pc1"], pts["pc2"] = coords[:, 0], coords[:, 1]
    if len(pts) > p.scatter_points:
        pts = pts.iloc[np.linspace(0, len(pts) - 1, p.scatter_points).round().astype(int)].reset_index(drop=True)
    return {"points": pts, "components": pd.DataFrame({"component": ["pc1", "pc2"], "explained": ratio}),
            "info": pd.DataFrame({"k": [unit.shape[1]], "n": [int(keep.sum())]})}


def error_bound(kind: str, k: int) -> float | None:
    """``backend.trace.config.sketch_error_bound`` without importing the tracer (the app never imports torch; a
    test keeps the two equal): the worst-case standard deviation of a sketch cosine's error, sqrt((6 + 2 share)
    / k) with share the sketch rows per hidden-side factor; None for "sparse" (an error floor)."""
    if kind == "sparse":
        return None
    if kind not in ("gaussian", "gaussian-full"):
        raise ValueError(f"sketch kind {kind!r} is not allowed; choose one of: gaussian, gaussian-full, sparse")
    share = 1 if kind == "gaussian-full" else next((s for s in (4, 2) if k % s == 0 and k // s >= 32), 1)
    return math.sqrt((6 + 2 * share) / k)


def run_sketch_kind(con: duckdb.DuckDBPyConnection | None, run_id: str) -> str:
    """The projection a run's sketches were made with (its ``trace_sketch_kind``; "gaussian" if not recorded)."""
    info = queries.run_info(run_id, con).iloc[0]
    cfg = json.loads(info["config_json"]) if isinstance(info.get("config_json"), str) else {}
    return str(cfg.get("trace_sketch_kind") or "gaussian")


def neighbours(con: duckdb.DuckDBPyConnection, run_id: str, step: int, sample_idx: int, position: int,
               top_k: int = 10, context_tokens: int = 8) -> pd.DataFrame:
    """The ``top_k`` traced positions of the step whose sketches have the largest cosine with that of
    (``sample_idx``, ``position``): the tokens whose gradient piece points most like its own (the token itself
    left out). Columns: sample_idx, position, token, category, is_response, alignment, magnitude, cosine,
    context_before. ValueError for a position without a sketch."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 1000:
        raise ValueError(f"top_k={top_k!r} must be an integer in [1, 1000]")
    rows, unit = load(con, run_id, step, context_tokens)
    hit = np.flatnonzero((rows["sample_idx"].to_numpy() == sample_idx) & (rows["position"].to_numpy() == position))
    if len(hit) == 0:
        raise ValueError(f"sample {sample_idx} position {position} has no sketch at step {step} of run {run_id!r} "
                         "(only traced positions of the first --trace-sequences sequences have one)")
    i = int(hit[0])
    if rows["sketch_norm"].iloc[i] <= 0:
        raise ValueError(f"sample {sample_idx} position {position}: its piece is zero (no direction to compare)")
    cos = unit @ unit[i]
    cos[i] = -np.inf
    cos[rows["sketch_norm"].to_numpy() <= 0] = -np.inf
    order = np.argsort(-cos, kind="stable")[:min(top_k, int(np.isfinite(cos).sum()))]
    out = rows.iloc[order].drop(columns=["sketch_norm"]).reset_index(drop=True)
    out.insert(6, "cosine", cos[order])
    return out
