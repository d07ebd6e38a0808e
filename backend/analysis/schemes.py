"""Scheme comparisons in the index: queries (DataFrames) and their figures, for the Schemes tab.

    from backend.analysis import schemes
    schemes.comparisons()                      # every compare-schemes run, newest first
    res = schemes.results(cmp_id)              # per scheme and metric: mean, interval, delta, verdict
    schemes.loss_figure(schemes.loss_curves(cmp_id))          # seeds thin, the mean over seeds bold
    schemes.accuracy_figure(schemes.accuracy_points(cmp_id))  # before (if evaluated), --eval-every steps, after
    schemes.weights_figure(schemes.weights_by_category(cmp_id))

A comparison's children are its ``compare_runs`` rows (backend.jobs.compare_schemes), joined here with the
children's own tables (train_steps, eval, tokens) as the index holds them. No gradio, no torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import plotly.graph_objects as go

from backend.analysis.figures import PALETTE, STEP, _empty, _layout, _rgba
from backend.index.queries import _df, require_run
from backend.store.rundir import read_events

COMPARISONS = """SELECT run_id, name, status, created_at, finished_at, config_json FROM runs
WHERE kind = 'compare-schemes' ORDER BY created_at DESC, run_id"""
RESULTS = """SELECT scheme, metric, mean, ci_low, ci_high, delta, delta_low, delta_high, verdict, n_seeds, n_items
FROM compare_results WHERE run_id = ?"""
CHILDREN = """SELECT c.child_run_id, c.scheme, c.seed, c.status AS planned_status, r.status, c.device,
c.greedy_accuracy, c.sampled_accuracy, c.seconds FROM compare_runs c LEFT JOIN runs r ON r.run_id = c.child_run_id
WHERE c.run_id = ? ORDER BY c.seed, c.scheme"""
LOSS_CURVES = """SELECT c.scheme, c.seed, t.step, t.loss, t.ce_loss FROM compare_runs c
JOIN train_steps t ON t.run_id = c.child_run_id WHERE c.run_id = ? ORDER BY c.scheme, c.seed, t.step"""
CHILD_MANIFESTS = """SELECT c.scheme, c.seed, r.manifest_json FROM compare_runs c JOIN runs r
ON r.run_id = c.child_run_id WHERE c.run_id = ? AND r.manifest_json IS NOT NULL ORDER BY c.scheme, c.seed"""
# weights of response tokens at each child's last traced step (every child is traced at the same steps)
WEIGHTS_BY_CATEGORY = """WITH last AS (
  SELECT k.run_id, max(k.step) AS step FROM tokens k JOIN compare_runs c ON c.child_run_id = k.run_id
  WHERE c.run_id = ? GROUP BY k.run_id)
SELECT c.scheme, k.category, count(*) AS n, avg(k.weight) AS mean,
  quantile_cont(k.weight, 0.05) AS q05, quantile_cont(k.weight, 0.25) AS q25, quantile_cont(k.weight, 0.5) AS median,
  quantile_cont(k.weight, 0.75) AS q75, quantile_cont(k.weight, 0.95) AS q95, any_value(k.step) AS step
FROM tokens k JOIN last l ON l.run_id = k.run_id AND l.step = k.step
JOIN compare_runs c ON c.child_run_id = k.run_id AND c.run_id = ?
WHERE k.is_response GROUP BY c.scheme, k.category ORDER BY k.category, c.scheme"""
# every traced (step, sample) of every child, with the start of its response: what Inspect can open per scheme
TRACED_SAMPLES = """SELECT c.scheme, c.seed, c.child_run_id, k.step, k.sample_idx,
  left(string_agg(k.token, '' ORDER BY k.position) FILTER (WHERE k.is_response), ?) AS preview
FROM compare_runs c JOIN tokens k ON k.run_id = c.child_run_id WHERE c.run_id = ?
GROUP BY c.scheme, c.seed, c.child_run_id, k.step, k.sample_idx ORDER BY c.seed, k.step, k.sample_idx"""


def comparisons(con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """Every compare-schemes run in the index (run_id, name, status, times, config_json), newest first."""
    return _df(con, COMPARISONS)


def _order(df: pd.DataFrame, cmp_id: str, con) -> pd.DataFrame:
    """Rows in the comparison's scheme order (its config), baseline first."""
    cfg = json.loads(_df(con, "SELECT config_json FROM runs WHERE run_id = ?", [cmp_id]).iloc[0, 0])["config"]
    order = [cfg["baseline"]] + [s for s in cfg["schemes"] if s != cfg["baseline"]]
    return df.assign(_o=df["scheme"].map({s: i for i, s in enumerate(order)})).sort_values(
        ["_o"] + [c for c in ("metric", "seed", "step", "category") if c in df]).drop(columns="_o").reset_index(drop=True)


def results(cmp_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """The comparison's results (one row per scheme and metric); empty while it runs."""
    require_run(cmp_id, con)
    return _order(_df(con, RESULTS, [cmp_id]), cmp_id, con)


def children(cmp_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """The comparison's child runs with their status in the index and their accuracies."""
    require_run(cmp_id, con)
    return _order(_df(con, CHILDREN, [cmp_id]), cmp_id, con)


def loss_curves(cmp_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """(scheme, seed, step, loss, ce_loss) of every child run."""
    require_run(cmp_id, con)
    return _order(_df(con, LOSS_CURVES, [cmp_id]), cmp_id, con)


def accuracy_points(cmp_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """(scheme, seed, step, greedy, sampled): each finished child's accuracy before training (step 0, when it
    was evaluated: eval_before), at the intermediate steps it was evaluated at (``--eval-every``) and after its
    last step, from its manifest."""
    require_run(cmp_id, con)
    rows = []
    for r in _df(con, CHILD_MANIFESTS, [cmp_id]).itertuples():
        m = json.loads(r.manifest_json)
        during = [(ev.get("step"), ev) for ev in m.get("eval_steps") or [] if isinstance(ev, dict)]
        for step, ev in ((0, m.get("eval_before")), *during, (m.get("steps"), m.get("eval"))):
            if isinstance(ev, dict) and "accuracy" in ev:
                rows.append({"scheme": r.scheme, "seed": int(r.seed), "step": int(step), "greedy": ev["accuracy"],
                             "sampled": ev.get("sampled_accuracy")})
    df = pd.DataFrame(rows, columns=["scheme", "seed", "step", "greedy", "sampled"])
    return _order(df, cmp_id, con) if len(df) else df


def traced_samples(cmp_id: str, con: duckdb.DuckDBPyConnection | None = None, preview_chars: int = 60
                   ) -> pd.DataFrame:
    """(scheme, seed, child_run_id, step, sample_idx, preview) of every sample a child traced: the runs of one
    seed (same data order and trace steps) trace the same samples at the same steps, so Inspect can show one
    sample under every scheme. Empty when the runs were not traced."""
    require_run(cmp_id, con)
    df = _df(con, TRACED_SAMPLES, [preview_chars, cmp_id])
    return _order(df, cmp_id, con) if len(df) else df


def weights_by_category(cmp_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """Per scheme and token category: the distribution (n, mean, 5/25/50/75/95th percentiles) of the scheme
    weights of response tokens at each child's last traced step; empty when the runs were not traced."""
    require_run(cmp_id, con)
    df = _df(con, WEIGHTS_BY_CATEGORY, [cmp_id, cmp_id])
    return _order(df, cmp_id, con) if len(df) else df


# ------------------------------------------------------------------------------------------------ figures
def _scheme_colors(schemes: list[str]) -> dict[str, str]:
    return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(schemes)}


def _seeds_and_mean(fig: go.Figure, df: pd.DataFrame, y: str, hover: str) -> None:
    colors = _scheme_colors(list(dict.fromkeys(df["scheme"])))
    for s, g in df.groupby("scheme", sort=False):
        for seed, gs in g.groupby("seed"):
            fig.add_trace(go.Scatter(x=gs["step"], y=gs[y], mode="lines" if len(gs) > 2 else "lines+markers",
                                     legendgroup=s, showlegend=False, marker=dict(size=5, color=_rgba(colors[s], 0.5)),
                                     line=dict(color=_rgba(colors[s], 0.35), width=1), name=f"{s} seed {seed}",
                                     hovertemplate=f"{s} seed {seed}<br>step %{{x}}<br>{hover} %{{y:.4f}}<extra></extra>"))
        mean = g.groupby("step", as_index=False)[y].mean()
        fig.add_trace(go.Scatter(x=mean["step"], y=mean[y], mode="lines+markers" if len(mean) < 12 else "lines",
                                 legendgroup=s, name=f"{s} (mean of {g['seed'].nunique()} seed{'s' if g['seed'].nunique() > 1 else ''})",
                                 line=dict(color=colors[s], width=3),
                                 hovertemplate=f"{s} mean<br>step %{{x}}<br>{hover} %{{y:.4f}}<extra></extra>"))


def loss_figure(curves: pd.DataFrame) -> go.Figure:
    """Cross-entropy over training for every child run: seeds as thin lines, the mean over seeds bold (the
    weighted loss differs by scheme by construction, so the comparable curve is the plain cross-entropy)."""
    if curves.empty:
        return _empty("Training loss", "no training steps indexed yet")
    fig = go.Figure()
    _seeds_and_mean(fig, curves, "ce_loss", "cross-entropy")
    return _layout(fig, "Training cross-entropy (thin: seeds, bold: mean)", STEP,
                   "cross-entropy on response tokens (nats)")


def accuracy_figure(points: pd.DataFrame, metric: str = "greedy") -> go.Figure:
    """Accuracy over training for every child run (before it if evaluated, at the ``--eval-every`` steps, after
    it): seeds thin, the mean over seeds bold."""
    if points.empty or points[metric].isna().all():
        return _empty("Accuracy", "no finished runs with eval results yet")
    fig = go.Figure()
    _seeds_and_mean(fig, points.dropna(subset=[metric]), metric, f"{metric} accuracy")
    what = "greedy exact match" if metric == "greedy" else "mean accuracy over k samples"
    return _layout(fig, f"Held-out accuracy, {what} (thin: seeds, bold: mean)", STEP,
                   f"{metric} accuracy (fraction of items)")


def results_figure(res: pd.DataFrame) -> go.Figure:
    """Per scheme: accuracy (greedy and sampled) with its 95% interval."""
    if res.empty:
        return _empty("Results", "the comparison has no results yet (still running, or failed)")
    fig = go.Figure()
    for i, (metric, g) in enumerate(res.groupby("metric", sort=False)):
        fig.add_trace(go.Scatter(
            x=g["scheme"], y=g["mean"], mode="markers", name=metric, marker=dict(size=11, color=PALETTE[i]),
            error_y=dict(type="data", symmetric=False, array=g["ci_high"] - g["mean"],
                         arrayminus=g["mean"] - g["ci_low"]),
            customdata=g[["ci_low", "ci_high", "verdict"]].to_numpy(),
            hovertemplate="%{x}<br>" + metric + " %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                          "<br>%{customdata[2]}<extra></extra>"))
    return _layout(fig, "Accuracy by scheme (95% paired-bootstrap interval)", "scheme",
                   "accuracy (fraction of items)")


def weights_figure(w: pd.DataFrame) -> go.Figure:
    """Distribution of scheme weights of response tokens by token category, one box per scheme (whiskers: 5th
    and 95th percentiles), at each run's last traced step."""
    if w.empty:
        return _empty("Weights by category", "no traced steps: launch the comparison with trace_every > 0")
    fig = go.Figure()
    colors = _scheme_colors(list(dict.fromkeys(w["scheme"])))
    for s, g in w.groupby("scheme", sort=False):
        fig.add_trace(go.Box(
            x=g["category"], q1=g["q25"], median=g["median"], q3=g["q75"], lowerfence=g["q05"], upperfence=g["q95"],
            mean=g["mean"], name=s, marker_color=colors[s], boxpoints=False,
            customdata=g[["n", "step"]].to_numpy(),
            hovertemplate=f"{s} · %{{x}}<br>median %{{median:.3f}}, mean %{{mean:.3f}}<br>"
                          "%{customdata[0]} tokens at step %{customdata[1]}<extra></extra>"))
    fig.update_layout(boxmode="group")
    return _layout(fig, "Weights of response tokens by category (whiskers: 5-95%)",
                   "token category", "weight w_t")


# ------------------------------------------------------------------------------------------------ progress
RUN_PATH = "SELECT path, manifest_json FROM runs WHERE run_id = ?"


def manifest(cmp_id: str, con: duckdb.DuckDBPyConnection | None = None) -> dict:
    """The comparison's manifest as indexed ({} while it runs)."""
    df = _df(con, RUN_PATH, [cmp_id])
    if df.empty:
        raise ValueError(f"run {cmp_id!r} is not in the index")
    m = df.iloc[0]["manifest_json"]
    return json.loads(m) if isinstance(m, str) else {}


def progress(cmp_id: str, con: duckdb.DuckDBPyConnection | None = None) -> dict:
    """What the comparison's run directory says now (not the index, which is updated when it ends): its status
    (backend.index.ingest.status_of) and its last progress event (runs_done, runs_total, current, eta_s)."""
    from backend.index.ingest import status_of
    df = _df(con, RUN_PATH, [cmp_id])
    if df.empty:
        raise ValueError(f"run {cmp_id!r} is not in the index")
    path = Path(df.iloc[0]["path"])
    if not path.is_dir():
        return {}
    last = next((e for e in reversed(read_events(path)) if e.get("type") == "progress"), {})
    return {**{k: last.get(k) for k in ("runs_done", "runs_total", "current", "eta_s")}, "status": status_of(path)}


# ------------------------------------------------------------------------------------------------ trace statistics
TRACE_STATS = ("mean_alignment", "opposing_fraction", "gini", "tokens_for_80pct")


def trace_stats(cmp_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """How each scheme moved the trace statistics against the baseline: per scheme and statistic (TRACE_STATS,
    the train summary's keys, backend.analysis.trace), the mean over seeds and its difference to the
    baseline's, at the last step every finished child traced, and the children's trace mode. Only runs
    traced at that same step and in one mode are compared (a comparison's children are, by construction);
    ValueError if their modes differ. Empty when the runs were not traced."""
    from backend.analysis import analyses, report
    from backend.index.queries import cursor, traced_steps
    kids = children(cmp_id, con)
    kids = kids[kids["status"] == "finished"]
    cols = ["scheme", "stat", "mean", "delta_vs_baseline", "n_seeds", "step", "mode"]
    if kids.empty:
        return pd.DataFrame(columns=cols)
    cfg = json.loads(_df(con, "SELECT config_json FROM runs WHERE run_id = ?", [cmp_id]).iloc[0, 0])["config"]
    with cursor(con) as cur:
        common = set.intersection(*(set(traced_steps(r, cur)) for r in kids["child_run_id"]))
        if not common:
            return pd.DataFrame(columns=cols)
        step = max(common)
        needs = list(analyses.summary("train").needs)
        rows = []
        for r in kids.itertuples():
            s = report.summarize(r.child_run_id, step, analyses.run_all(r.child_run_id, step, con=cur, only=needs))
            rows.append({"scheme": r.scheme, "seed": r.seed, "mode": s.get("mode"), **{k: s.get(k) for k in TRACE_STATS}})
    df = pd.DataFrame(rows)
    if df["mode"].nunique() != 1:
        raise ValueError(f"the runs of {cmp_id} were traced in different modes ({sorted(df['mode'].unique())}); "
                         "their trace statistics are not comparable")
    per = df.groupby("scheme", sort=False)[list(TRACE_STATS)].mean()
    base = per.loc[cfg["baseline"]] if cfg["baseline"] in per.index else None
    out = [{"scheme": sch, "stat": k, "mean": float(per.loc[sch, k]),
            "delta_vs_baseline": float(per.loc[sch, k] - base[k]) if base is not None else float("nan"),
            "n_seeds": int((df["scheme"] == sch).sum()), "step": step, "mode": df["mode"].iloc[0]}
           for sch in per.index for k in TRACE_STATS]
    return _order(pd.DataFrame(out, columns=cols), cmp_id, con)
