"""The influence analyses of a ``train`` run traced with ``--influence-eval N``: which training tokens help or hurt
the held-out (eval) loss at a traced step, each registered with its figure.

    from backend.analysis import analyses
    frames = analyses.run("influence_quadrants", run_id, step=None, con=con)   # {"points", "quadrants", "mode"}
    fig = analyses.get("influence_quadrants").figure(frames)

They read the ``influence`` rows (one per traced token: same keys as ``tokens``), joined to ``tokens`` on
(run_id, step, sample_idx, position, rank), and ``influence_steps`` (one row per traced step and rank).
Definitions (``backend.trace.influence``): ``influence`` = <P_s, G_eval> (position mode) or <g_t, G_eval> (token
mode), G_eval the gradient of the mean eval loss at the step's weights; ``influence_alignment`` = its cosine.
A plain SGD step of size lr changes the eval loss by -lr x influence to first order, so a **positive influence
helps** (that token's part of the update lowers the eval loss) and a negative one hurts.

Token-level statistics are over response tokens. Every analysis raises a ValueError naming the fix when the
run has no influence rows (at that step): influence is only recorded by ``train --influence-eval N``.
"""
from __future__ import annotations

from functools import wraps
from typing import Callable

import duckdb
import numpy as np
import pandas as pd

from backend.analysis import analyses, figures
from backend.analysis import influence_figures as figs
from backend.analysis.analyses import AnalysisParams, Frames
from backend.analysis.trace import in_context
from backend.index import sql

KIND = "train"      # the job kind whose runs these analyses read (backend.jobs.train lists this module)

HOW = "train with --influence-eval N (and --trace-every M): influence is recorded at traced steps"

# join of a token's trace row and its influence row; `rank` may be NULL in both (a single process)
_JOIN = """tokens t JOIN influence i ON i.run_id = t.run_id AND i.step = t.step AND i.sample_idx = t.sample_idx
    AND i.position = t.position AND i.rank IS NOT DISTINCT FROM t.rank"""
INFLUENCE_STEPS_OF_RUN = "SELECT DISTINCT step FROM influence WHERE run_id = ? ORDER BY step"
# every token of a step (the context of the listed ones), with its influence where recorded
TOKENS_WITH_INFLUENCE = """SELECT t.sample_idx, t.position, t.resp_pos, t.token, t.category, t.is_response,
    t.alignment, t.loss, t.prob, i.influence, i.influence_alignment
FROM tokens t LEFT JOIN influence i ON i.run_id = t.run_id AND i.step = t.step AND i.sample_idx = t.sample_idx
    AND i.position = t.position AND i.rank IS NOT DISTINCT FROM t.rank
WHERE t.run_id = ? AND t.step = ? ORDER BY t.sample_idx, t.position"""
INFLUENCE_BY_CATEGORY = f"""SELECT t.category, count(*) AS n, sum(i.influence) AS influence_sum,
    avg(i.influence) AS mean_influence, stddev_samp(i.influence) AS std_influence,
    avg(i.influence_alignment) AS mean_influence_alignment, avg(CAST(i.influence < 0 AS DOUBLE)) AS frac_hurts
FROM {_JOIN}
WHERE t.run_id = ? AND t.step = ? AND t.is_response AND i.influence IS NOT NULL
GROUP BY t.category ORDER BY mean_influence"""
RESPONSE_INFLUENCE_AT_STEP = f"""SELECT t.sample_idx, t.position, t.token, t.category, t.alignment, i.influence,
    i.influence_alignment
FROM {_JOIN}
WHERE t.run_id = ? AND t.step = ? AND t.is_response AND t.alignment IS NOT NULL AND i.influence IS NOT NULL
    AND i.influence_alignment IS NOT NULL
ORDER BY t.sample_idx, t.position"""
# every rank computes G_eval itself on the same eval set and G is the whole step's: the ranks' rows agree
INFLUENCE_STEPS = """SELECT step, avg(eval_cosine) AS eval_cosine, avg(g_dot_eval) AS g_dot_eval,
    avg(eval_loss) AS eval_loss, avg(eval_grad_norm) AS eval_grad_norm, max(eval_examples) AS eval_examples,
    max(eval_tokens) AS eval_tokens, max(influence_sum_rel_err) AS influence_sum_rel_err
FROM influence_steps WHERE run_id = ? GROUP BY step ORDER BY step"""
HURT_PER_STEP = f"""SELECT t.step, count(*) AS n_response, avg(CAST(i.influence < 0 AS DOUBLE)) AS frac_hurts,
    count(*) FILTER (WHERE t.alignment > 0 AND i.influence < 0) AS n_aligned_hurts,
    sum(i.influence) AS response_influence_sum
FROM {_JOIN}
WHERE t.run_id = ? AND t.is_response AND i.influence IS NOT NULL GROUP BY t.step ORDER BY t.step"""

QUADRANTS = ("aligned & helps", "aligned but hurts eval", "opposing & helps", "opposing & hurts")


def _q(con: duckdb.DuckDBPyConnection, query: str, params: list[object]) -> pd.DataFrame:
    """Run a query; float32 columns (as stored) come back as float64."""
    df = con.execute(query, params).df()
    f32 = [c for c in df.columns if df[c].dtype == np.float32]
    return df.astype({c: np.float64 for c in f32}) if f32 else df


def require_influence(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None) -> None:
    """ValueError saying how to get influence when run ``run_id`` has none (at ``step``; None: at any step)."""
    steps = [int(r[0]) for r in con.execute(INFLUENCE_STEPS_OF_RUN, [run_id]).fetchall()]
    if not steps:
        raise ValueError(f"run {run_id!r} has no influence data: {HOW}")
    if step is not None and step not in steps:
        raise ValueError(f"run {run_id!r} has no influence data at step {step}; its steps with influence: "
                         f"{', '.join(map(str, steps))}")


def has_influence(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None = None) -> bool:
    """Whether run ``run_id`` has influence rows (at ``step``; None: at any step)."""
    steps = {int(r[0]) for r in con.execute(INFLUENCE_STEPS_OF_RUN, [run_id]).fetchall()}
    return bool(steps) if step is None else step in steps


def quadrant_of(alignment: pd.Series, influence: pd.Series) -> pd.Series:
    """The quadrant of each token: sign of its alignment with the batch gradient G (aligned > 0, opposing < 0)
    and of its influence (helps > 0, hurts < 0); None for a token on an axis (either exactly 0)."""
    a, f = alignment.to_numpy(dtype=np.float64), influence.to_numpy(dtype=np.float64)
    out = np.select([(a > 0) & (f > 0), (a > 0) & (f < 0), (a < 0) & (f > 0), (a < 0) & (f < 0)],
                    list(QUADRANTS), default="")
    return pd.Series(out, index=alignment.index).replace("", None)


def register(name: str, title: str, scope: str, *, figure: analyses.FigureFn
             ) -> Callable[[analyses.AnalysisFn], analyses.AnalysisFn]:
    """``analyses.register`` for train runs with influence: available only for runs that recorded it (``run_all``
    and ``analyze`` skip the others), and, as every trace analysis, with a ``mode`` frame its title names."""
    def deco(fn: analyses.AnalysisFn) -> analyses.AnalysisFn:
        @wraps(fn)
        def with_mode(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None, p: AnalysisParams) -> Frames:
            at = None if scope == "run" else step
            modes = pd.DataFrame(con.execute(sql.TRACE_MODES, [run_id, at, at]).fetchall(), columns=["step", "mode"])
            return {**fn(con, run_id, step, p), "mode": modes}
        return analyses.register(name, title, scope, kind=KIND, figure=figures.with_mode(figure),
                                 available=has_influence)(with_mode)
    return deco


# ------------------------------------------------------------------------------------------------ 1
@register("influence_tokens", "Tokens that help and hurt the eval loss most", "step",
          figure=lambda f: figs.influence_tokens(f["tokens"]))
def influence_tokens(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """The ``top_k`` response tokens with the largest positive influence (helps: their part of the update lowers
    the eval loss) and the ``top_k`` most negative (hurts), labelled by the predicted token, with the text before
    it (``context_tokens`` records) and the next 3 tokens, their category, alignment with the batch gradient,
    influence, influence_alignment and loss. A side lists only tokens of its sign."""
    require_influence(con, run_id, step)
    t = _q(con, TOKENS_WITH_INFLUENCE, [run_id, step])
    resp = t[t["is_response"] & t["influence"].notna()]
    picks = [("helps", resp[resp["influence"] > 0].nlargest(p.top_k, "influence")),
             ("hurts", resp[resp["influence"] < 0].nsmallest(p.top_k, "influence"))]
    values = ["alignment", "influence", "influence_alignment", "loss", "prob"]
    return {"tokens": in_context(t, picks, values, p.context_tokens)}


# ------------------------------------------------------------------------------------------------ 2
@register("influence_by_category", "Influence on the eval loss by token category", "step",
          figure=lambda f: figs.influence_by_category(f["categories"]))
def influence_by_category(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Per token category of response tokens: count, summed and mean influence (std, n-1), mean
    influence_alignment, the fraction that hurts (influence < 0), and the category's share of the summed
    influence of all response tokens (signed: shares add up to 1)."""
    require_influence(con, run_id, step)
    cats = _q(con, INFLUENCE_BY_CATEGORY, [run_id, step])
    total = cats["influence_sum"].sum()
    cats["share_of_total"] = cats["influence_sum"] / total if total != 0 else np.nan
    return {"categories": cats}


# ------------------------------------------------------------------------------------------------ 3
@register("influence_quadrants", "Aligned with the batch vs helpful to the eval set", "step",
          figure=lambda f: figs.influence_quadrants(f["points"], f["quadrants"]))
def influence_quadrants(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Response tokens' alignment with the batch gradient G (x) against their influence_alignment, the cosine
    with G_eval (y). ``quadrants``: per quadrant (aligned: alignment > 0; helps: influence > 0), the count, its
    fraction of the tokens, the summed influence, its share of the total over all of them (signed: the four add up
    to 1, and exceed 1 when helping and hurting tokens nearly cancel) and its share of the total |influence|. "aligned
    but hurts eval" are the tokens that push the update along G yet raise the eval loss: what a scheme should
    down-weight. Tokens on an axis (a value exactly 0) fall in no quadrant. ``points`` keeps at most
    ``scatter_points`` tokens (a fixed random subset); the counts use all."""
    require_influence(con, run_id, step)
    t = _q(con, RESPONSE_INFLUENCE_AT_STEP, [run_id, step])
    t["quadrant"] = quadrant_of(t["alignment"], t["influence"])
    total = t["influence"].sum()
    g = t.groupby("quadrant")["influence"].agg(["size", "sum"]).reindex(list(QUADRANTS))
    quads = pd.DataFrame({"quadrant": list(QUADRANTS), "n": g["size"].fillna(0).astype("int64").to_numpy(),
                          "influence_sum": g["sum"].fillna(0.0).to_numpy()})
    quads["frac_tokens"] = quads["n"] / len(t) if len(t) else np.nan
    quads["share_of_total"] = quads["influence_sum"] / total if total != 0 else np.nan
    mass = t["influence"].abs().sum()      # a quadrant's values share one sign: |its sum| is its |influence| mass
    quads["share_of_abs"] = quads["influence_sum"].abs() / mass if mass > 0 else np.nan
    quads["n_tokens"] = len(t)
    pts = t.sample(n=p.scatter_points, random_state=0) if len(t) > p.scatter_points else t
    return {"points": pts.reset_index(drop=True), "quadrants": quads}


# ------------------------------------------------------------------------------------------------ 4
@register("influence_over_training", "Does the update help the eval set? (over training)", "run",
          figure=lambda f: figs.influence_over_training(f["steps"]))
def influence_over_training(con: duckdb.DuckDBPyConnection, run_id: str, step: int, p: AnalysisParams) -> Frames:
    """Per traced step with influence: cos(G, G_eval), <G, G_eval> (-lr x this: the first-order change of the eval
    loss), the eval loss and ||G_eval||, the eval set's size, and over response tokens: the fraction that hurts
    (influence < 0), the "aligned but hurts eval" count (alignment > 0, influence < 0) and the summed influence."""
    require_influence(con, run_id, None)
    steps = _q(con, INFLUENCE_STEPS, [run_id])
    hurt = _q(con, HURT_PER_STEP, [run_id])
    return {"steps": steps.merge(hurt, on="step", how="left")}
