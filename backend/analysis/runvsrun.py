"""Run against run on one sample: two runs trained on the same data (other schemes, other seeds), token by token
at the same traced step and sample, and B - A.

    pairs = common_samples("demo-sft-position", "demo-antiop-position")      # (step, sample_idx) both traced
    df = compare_sample("demo-sft-position", "demo-antiop-position", step=20, sample_idx=3, metric="weight")
    df[["position", "token_a", "a", "b", "diff"]]                            # diff = b - a, per position

The two runs must have traced that step and that sample, and the sample must hold the same token ids at every
position in both (the same data); otherwise ValueError says what differs and what is allowed. The SQL is here
(a module of its own, like ``backend.analysis.sketches``): values are bound as parameters; the metric's column
is picked from ``COLUMNS`` (a fixed mapping), never taken from the caller's text. Torch-free: the app imports it.
"""
from __future__ import annotations

import duckdb
import pandas as pd

from backend.index import queries

# metric -> the SQL expression of its column (t: tokens, i: influence); influence only where both runs have it
COLUMNS: dict[str, str] = {
    "weight": "t.weight", "alignment": "t.alignment", "dot": "t.dot", "share": "t.share",
    "magnitude": "t.magnitude", "loss": "t.loss", "prob": "t.prob", "entropy": "t.entropy",
    "influence": "i.influence",
}
METRICS = tuple(COLUMNS)
_LIST_MAX = 20

# per (step, sample) of a run: token count and a hash of its token ids in order (the sample's data)
_SIGNATURES = """SELECT step, sample_idx, count(*) AS n_tokens, hash(list(token_id ORDER BY position)) AS ids_hash
FROM tokens WHERE run_id = ? GROUP BY step, sample_idx"""
COMMON_SAMPLES = f"""WITH a AS ({_SIGNATURES}), b AS ({_SIGNATURES})
SELECT a.step, a.sample_idx, a.n_tokens AS n_tokens_a, b.n_tokens AS n_tokens_b,
    (a.n_tokens = b.n_tokens AND a.ids_hash = b.ids_hash) AS same_tokens
FROM a JOIN b USING (step, sample_idx) ORDER BY a.step, a.sample_idx"""
# every other run that traced one of run A's (step, sample) pairs with the same token ids: Run B's candidates
PARTNERS = f"""WITH a AS ({_SIGNATURES}),
b AS (SELECT run_id, step, sample_idx, count(*) AS n_tokens, hash(list(token_id ORDER BY position)) AS ids_hash
      FROM tokens WHERE run_id <> ? AND (step, sample_idx) IN (SELECT step, sample_idx FROM a)
      GROUP BY run_id, step, sample_idx)
SELECT b.run_id, count(*) AS n_common, min(b.step) AS first_step
FROM a JOIN b USING (step, sample_idx) WHERE a.n_tokens = b.n_tokens AND a.ids_hash = b.ids_hash
GROUP BY b.run_id ORDER BY n_common DESC, b.run_id"""
HAS_INFLUENCE = "SELECT count(*) > 0 FROM influence WHERE run_id = ? AND step = ?"
MODES = "SELECT DISTINCT mode FROM tokens WHERE run_id = ? AND step = ? AND mode IS NOT NULL ORDER BY 1"


def _side(column: str) -> str:
    """One run's tokens of one sample with the metric's value as ``v`` (the influence join only when needed)."""
    join = ("LEFT JOIN influence i ON i.run_id = t.run_id AND i.step = t.step AND i.sample_idx = t.sample_idx "
            "AND i.position = t.position AND i.rank IS NOT DISTINCT FROM t.rank " if column.startswith("i.") else "")
    return (f"SELECT t.position, t.token_id, t.token, t.is_response, t.resp_pos, t.category, t.mode, "
            f"CAST({column} AS DOUBLE) AS v FROM tokens t {join}"
            "WHERE t.run_id = ? AND t.step = ? AND t.sample_idx = ?")


def _pair_sql(metric: str) -> str:
    side = _side(COLUMNS[metric])
    return f"""WITH a AS ({side}), b AS ({side})
SELECT coalesce(a.position, b.position) AS position, a.token_id AS token_id_a, b.token_id AS token_id_b,
    a.token AS token_a, b.token AS token_b, a.is_response AS is_response_a, b.is_response AS is_response_b,
    a.resp_pos, a.category, a.mode AS mode_a, b.mode AS mode_b, a.v AS a, b.v AS b, b.v - a.v AS diff
FROM a FULL OUTER JOIN b ON a.position = b.position ORDER BY position"""


def _some(values: list) -> str:
    head = ", ".join(str(v) for v in values[:_LIST_MAX])
    return (head + (f", ... ({len(values)} in all)" if len(values) > _LIST_MAX else "")) if values else "none"


def _pairs(df: pd.DataFrame) -> list[str]:
    return [f"step {int(s)} sample {int(k)}" for s, k in zip(df["step"], df["sample_idx"])]


def common_samples(run_a: str, run_b: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """The (step, sample_idx) pairs both runs traced, by step: ``n_tokens_a``, ``n_tokens_b`` and ``same_tokens``
    (the sample holds the same token ids at every position in both: only those can be compared). ValueError for
    a run that is not in the index."""
    for r in (run_a, run_b):
        queries.require_run(r, con)
    with queries.cursor(con) as cur:
        df = cur.execute(COMMON_SAMPLES, [run_a, run_b]).df()
    df["same_tokens"] = df["same_tokens"].astype(bool)
    return df


def comparable(run_a: str, run_b: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """``common_samples`` restricted to the pairs with the same token ids: (step, sample_idx, n_tokens)."""
    df = common_samples(run_a, run_b, con)
    return (df[df["same_tokens"]].rename(columns={"n_tokens_a": "n_tokens"})[["step", "sample_idx", "n_tokens"]]
            .reset_index(drop=True))


def partners(run_a: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """The other runs that traced at least one of ``run_a``'s (step, sample) pairs with the same token ids:
    ``run_id``, ``n_common`` (such pairs), ``first_step``; most pairs in common first."""
    queries.require_run(run_a, con)
    with queries.cursor(con) as cur:
        return cur.execute(PARTNERS, [run_a, run_a]).df()


def available_metrics(run_a: str, run_b: str, step: int, con: duckdb.DuckDBPyConnection | None = None
                      ) -> list[str]:
    """The metrics both runs have at ``step``: every column of ``tokens``, and ``influence`` when both runs
    recorded it there."""
    with queries.cursor(con) as cur:
        both = all(cur.execute(HAS_INFLUENCE, [r, step]).fetchall()[0][0] for r in (run_a, run_b))
    return [m for m in METRICS if m != "influence" or both]


def modes(run_id: str, step: int, con: duckdb.DuckDBPyConnection | None = None) -> list[str]:
    """The trace modes (``position``/``token``) of a run's token records at ``step``."""
    with queries.cursor(con) as cur:
        return [r[0] for r in cur.execute(MODES, [run_id, step]).fetchall()]


def compare_sample(run_a: str, run_b: str, step: int, sample_idx: int, metric: str = "weight",
                   con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """Every position of sample ``sample_idx`` at traced ``step`` in both runs: ``position``, ``token_id_a``,
    ``token_id_b`` (equal), ``token_a``, ``token_b``, ``is_response_a``, ``is_response_b``, ``resp_pos``,
    ``category`` (A's), ``mode_a``, ``mode_b``, the metric's value in each run (``a``, ``b``; float, NaN where
    a run has none) and ``diff`` = b - a.

    ValueError, naming what differs and what is allowed, when ``metric`` is unknown (or influence is missing
    in either run at that step), when either run did not trace the step or the sample, or when the sample's
    token ids differ between the runs (they were not trained on the same data)."""
    if metric not in COLUMNS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    step, sample_idx = int(step), int(sample_idx)

    def allowed() -> str:         # only for an error message: it hashes every sample of both runs
        ok = comparable(run_a, run_b, con)
        return f"pairs both runs traced with the same tokens: {_some(_pairs(ok))}"

    for r in (run_a, run_b):
        steps = queries.traced_steps(r, con)
        if step not in steps:
            raise ValueError(f"run {r!r} did not trace step {step} (its traced steps: {_some(steps)}); {allowed()}")
        samples = queries.step_samples(r, step, con, preview_chars=0)["sample_idx"].tolist()
        if sample_idx not in samples:
            raise ValueError(f"run {r!r} did not trace sample {sample_idx} at step {step} (its samples there: "
                             f"{_some(samples)}); {allowed()}")
    if metric == "influence" and "influence" not in available_metrics(run_a, run_b, step, con):
        raise ValueError(f"influence is not recorded at step {step} in both {run_a!r} and {run_b!r}; allowed "
                         f"metrics: {', '.join(available_metrics(run_a, run_b, step, con))}")
    with queries.cursor(con) as cur:
        df = cur.execute(_pair_sql(metric), [run_a, step, sample_idx, run_b, step, sample_idx]).df()
    differ = df[~(df["token_id_a"] == df["token_id_b"]).fillna(False).astype(bool)]
    if not differ.empty:
        r = differ.iloc[0]
        raise ValueError(
            f"sample {sample_idx} at step {step} holds different tokens in {run_a!r} and {run_b!r} (they were "
            f"not trained on the same data): {len(differ)} of {len(df)} positions differ, the first at position "
            f"{int(r['position'])} (A: {_tok(r['token_a'], r['token_id_a'])}, "
            f"B: {_tok(r['token_b'], r['token_id_b'])}); Run vs run compares runs on the same data: {allowed()}")
    for c in ("a", "b", "diff"):
        df[c] = df[c].astype("float64")
    df["is_response_a"] = df["is_response_a"].astype(bool)
    df["is_response_b"] = df["is_response_b"].astype(bool)
    return df


def _tok(text: object, token_id: object) -> str:
    if token_id is None or pd.isna(token_id):
        return "no token"
    return f"{str(text)!r} (id {int(token_id)})"


def summary(df: pd.DataFrame, top: int = 3) -> dict:
    """Over the response tokens (A's ``is_response``) of a ``compare_sample`` frame with a difference:
    ``n`` (such tokens), ``mean_abs_diff`` (mean |B - A|), ``gained`` and ``lost`` (the ``top`` rows with the
    largest and smallest B - A, largest first / smallest first)."""
    r = df[df["is_response_a"] & df["diff"].notna()]
    return {"n": len(r), "mean_abs_diff": float(r["diff"].abs().mean()) if len(r) else float("nan"),
            "gained": r[r["diff"] > 0].nlargest(top, "diff"), "lost": r[r["diff"] < 0].nsmallest(top, "diff")}
