"""The analyses of a ``probe`` run, each registered with its figure (docs/design.md, sections Spectra and Direction).

    from backend.analysis import analyses
    frames = analyses.run("probe_spectra", run_id)     # {"spectra", "energy", "cosine"}
    frames = analyses.run("probe_direction", run_id)   # {"prompts", "summary", "skipped"}
    frames = analyses.run("probe_pca", run_id)         # {"points", "variance"}

- **Exp 1, compression** (``spectra``): per model and entropy bucket, the singular values s_i of the
  uncentered (N x d) matrix of gradient vectors, lambda_i = s_i^2: participation ratio
  PR = (sum lambda)^2 / sum lambda^2, rank95 = smallest k with cumsum(lambda)_k / sum lambda >= 0.95, the
  cumulative-energy curve, and the |cosine| between the top-1 right singular vectors of every two buckets.
- **Exp 2, direction** (``direction``): at top-bucket tokens of each prompt with at least ``MIN_SIDE`` tokens
  from correct and from incorrect rollouts, cos(m_c, m_i) of the two mean vectors; noise floor: each group's
  tokens split at random into halves, cos(mean half 1, mean half 2), averaged over the two groups; mean over
  prompts with a bootstrap 95% interval (prompts resampled). Prompts with too few tokens are listed.
- **PCA**: 2-D PCA (scikit-learn) of the vectors of both models together (up to ``scatter_points``).

The vectors are read from the run directory (``probe/vectors.npy``, memory-mapped); rows from the index.
No torch here (the app imports this module).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from backend.analysis import analyses, probe_figures
from backend.analysis.analyses import AnalysisParams, Frames
from backend.index import queries
from backend.jobs.probe import VECTORS_FILE

KIND = "probe"
MIN_SIDE = 2            # tokens needed on each side (correct, incorrect) for a prompt to count in Exp 2
N_BOOT = 2000           # bootstrap resamples
register = partial(analyses.register, kind=KIND)

RUN_PATH = "SELECT path FROM runs WHERE run_id = ?"
VECTOR_ROWS = """SELECT vector_idx, model, prompt_idx, sample_idx, position, token, bucket, entropy, correct, norm
FROM probe_vectors WHERE run_id = ? ORDER BY vector_idx"""
N_BUCKETS = "SELECT max(bucket) + 1 FROM probe_buckets WHERE run_id = ?"
BUCKETS = "SELECT model, bucket, lo, hi, n_tokens, n_picked FROM probe_buckets WHERE run_id = ? ORDER BY model, bucket"
ROLLOUTS = """SELECT model, prompt_idx, sample_idx, correct, n_tokens, mean_entropy, answer, extracted, text
FROM probe_rollouts WHERE run_id = ? ORDER BY model, prompt_idx, sample_idx"""
ROLLOUT = """SELECT prompt, text, answer, extracted, correct FROM probe_rollouts
WHERE run_id = ? AND model = ? AND prompt_idx = ? AND sample_idx = ?"""
ROLLOUT_TOKENS = """SELECT position, token, entropy, bucket, picked FROM probe_tokens
WHERE run_id = ? AND model = ? AND prompt_idx = ? AND sample_idx = ? ORDER BY position"""
CONTEXT = """SELECT t.model, t.prompt_idx, t.sample_idx, t.position,
    string_agg(c.token, '' ORDER BY c.position) AS context
FROM probe_tokens t JOIN probe_tokens c ON c.run_id = t.run_id AND c.model = t.model
    AND c.prompt_idx = t.prompt_idx AND c.sample_idx = t.sample_idx AND c.position BETWEEN t.position - ? AND t.position
WHERE t.run_id = ? AND t.picked GROUP BY ALL"""
PROBE_RUNS = "SELECT run_id, name, status FROM runs WHERE kind = 'probe' ORDER BY created_at DESC, run_id"


# ------------------------------------------------------------------------------------------------ metrics
def spectrum(X: np.ndarray) -> dict:
    """Spectral summary of the uncentered rows of X (N, d): lambda_i = s_i^2 (descending), PR, rank95, the
    cumulative energy cumsum(lambda) / sum(lambda), and the top-1 right singular vector (unit norm)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"spectrum needs a non-empty (N, d) matrix, got shape {X.shape}")
    # lambda_i = s_i^2 are the eigenvalues of the Gram matrix of the smaller side (X^T X or X X^T): an
    # eigendecomposition of min(N, d)^2 entries instead of an SVD that also forms U (N x d): 30x less time at
    # N = 3000, d = 512; the small eigenvalues lose digits, which PR and rank95 (sums of the large) do not see
    if X.shape[0] >= X.shape[1]:
        lam, vecs = np.linalg.eigh(X.T @ X)                       # (d,), (d, d) ascending
        lam, top = np.clip(lam[::-1], 0, None), vecs[:, -1]
    else:
        lam, vecs = np.linalg.eigh(X @ X.T)                       # (N,), (N, N) ascending
        lam = np.clip(lam[::-1], 0, None)
        top = X.T @ vecs[:, -1]                                   # right singular vector, up to its norm
        top = top / np.linalg.norm(top) if np.linalg.norm(top) > 0 else top
    total = lam.sum()
    if total == 0:
        return {"lam": lam, "pr": np.nan, "rank95": 0, "energy": np.zeros_like(lam), "top": top}
    energy = np.cumsum(lam) / total
    rank95 = int(np.searchsorted(energy, 0.95 - 1e-12) + 1)      # first k (1-based) with energy >= 0.95
    return {"lam": lam, "pr": float(total ** 2 / (lam ** 2).sum()), "rank95": min(rank95, len(lam)),
            "energy": energy, "top": top}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else np.nan


def bootstrap_mean_ci(x: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the mean over ``n_boot`` resamples of x with replacement)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return np.nan, np.nan, np.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def half_split_cos(X: np.ndarray, rng: np.random.Generator) -> float:
    """cos(mean of a random half of X's rows, mean of the other half)."""
    perm = rng.permutation(len(X))
    h = len(X) // 2
    return cosine(X[perm[:h]].mean(0), X[perm[h:]].mean(0))


def direction(rows: pd.DataFrame, vectors: np.ndarray, top_bucket: int, seed: int = 0,
              min_side: int = MIN_SIDE) -> dict[str, pd.DataFrame]:
    """Exp 2 over ``rows`` (model, prompt_idx, bucket, correct, vector_idx) and their ``vectors``: per model
    and prompt, cos(m_correct, m_incorrect) at top-bucket tokens, and the half-split noise floor; the mean of
    each over prompts with a bootstrap 95% interval; the prompts left out and why."""
    rng = np.random.default_rng(seed)
    prompts, skipped, summary = [], [], []
    top = rows[rows["bucket"] == top_bucket]
    for model in sorted(rows["model"].unique(), key=lambda m: m != "base"):
        sub = top[top["model"] == model]
        for p in sorted(rows.loc[rows["model"] == model, "prompt_idx"].unique()):
            g = sub[sub["prompt_idx"] == p]
            c = vectors[g.loc[g["correct"], "vector_idx"].to_numpy()]
            i = vectors[g.loc[~g["correct"], "vector_idx"].to_numpy()]
            if len(c) < min_side or len(i) < min_side:
                skipped.append({"model": model, "prompt_idx": int(p), "n_correct": len(c), "n_incorrect": len(i),
                                "why": f"needs at least {min_side} top-bucket tokens on each side"})
                continue
            noise = (half_split_cos(c, rng) + half_split_cos(i, rng)) / 2
            prompts.append({"model": model, "prompt_idx": int(p), "n_correct": len(c), "n_incorrect": len(i),
                            "cos": cosine(c.mean(0), i.mean(0)), "noise_floor": noise})
    pdf = pd.DataFrame(prompts, columns=["model", "prompt_idx", "n_correct", "n_incorrect", "cos", "noise_floor"])
    for model in sorted(rows["model"].unique(), key=lambda m: m != "base"):
        g = pdf[pdf["model"] == model]
        m, lo, hi = bootstrap_mean_ci(g["cos"].to_numpy(), seed=seed)
        nm, nlo, nhi = bootstrap_mean_ci(g["noise_floor"].to_numpy(), seed=seed + 1)
        dm, dlo, dhi = bootstrap_mean_ci((g["noise_floor"] - g["cos"]).to_numpy(), seed=seed + 2)
        summary.append({"model": model, "n_prompts": len(g),
                        "n_skipped": sum(1 for s in skipped if s["model"] == model),
                        "mean_cos": m, "cos_ci_lo": lo, "cos_ci_hi": hi,
                        "mean_noise_floor": nm, "noise_ci_lo": nlo, "noise_ci_hi": nhi,
                        "mean_gap": dm, "gap_ci_lo": dlo, "gap_ci_hi": dhi})
    return {"prompts": pdf, "summary": pd.DataFrame(summary),
            "skipped": pd.DataFrame(skipped, columns=["model", "prompt_idx", "n_correct", "n_incorrect", "why"])}


# ------------------------------------------------------------------------------------------------ reading
def load_vectors(con: duckdb.DuckDBPyConnection, run_id: str) -> np.ndarray:
    """The run's vectors (N, row_dim) float32, memory-mapped from its directory."""
    row = con.execute(RUN_PATH, [run_id]).fetchone()
    if row is None:
        raise ValueError(f"run {run_id!r} is not in the index")
    f = Path(row[0]) / VECTORS_FILE
    if not f.is_file():
        raise ValueError(f"run {run_id!r} has no {VECTORS_FILE} (not a finished probe run?)")
    return np.load(f, mmap_mode="r")


def _rows(con: duckdb.DuckDBPyConnection, run_id: str) -> pd.DataFrame:
    df = con.execute(VECTOR_ROWS, [run_id]).df()
    if df.empty:
        raise ValueError(f"probe run {run_id!r} has no vectors in the index")
    return df


def _n_buckets(con: duckdb.DuckDBPyConnection, run_id: str) -> int:
    return int(con.execute(N_BUCKETS, [run_id]).fetchone()[0])


def _models(df: pd.DataFrame) -> list[str]:
    return sorted(df["model"].unique(), key=lambda m: m != "base")


# ------------------------------------------------------------------------------------------------ analyses
@register("probe_spectra", "Exp 1: spectra of the gradients per entropy bucket", "run",
          figure=lambda f: probe_figures.pr_rank95(f["spectra"]))
def spectra(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None, p: AnalysisParams) -> Frames:
    """Per model and bucket: n, PR, rank95, the cumulative-energy curve (``energy``: k, energy) and the
    cross-bucket |cos| of top-1 singular vectors (``cosine``: model, bucket_a, bucket_b, abs_cos)."""
    rows, V = _rows(con, run_id), load_vectors(con, run_id)
    nb = _n_buckets(con, run_id)
    spec, energy, cos = [], [], []
    for model in _models(rows):
        tops: dict[int, np.ndarray] = {}
        for b in range(nb):
            idx = rows.loc[(rows["model"] == model) & (rows["bucket"] == b), "vector_idx"].to_numpy()
            if len(idx) == 0:
                spec.append({"model": model, "bucket": b, "n": 0, "pr": np.nan, "rank95": np.nan, "dim": V.shape[1]})
                continue
            s = spectrum(V[np.sort(idx)])
            tops[b] = s["top"]
            spec.append({"model": model, "bucket": b, "n": len(idx), "pr": s["pr"], "rank95": s["rank95"],
                         "dim": V.shape[1]})
            energy.append(pd.DataFrame({"model": model, "bucket": b, "k": np.arange(1, len(s["energy"]) + 1),
                                        "energy": s["energy"]}))
        for a in range(nb):
            for b in range(nb):
                v = abs(cosine(tops[a], tops[b])) if a in tops and b in tops else np.nan
                cos.append({"model": model, "bucket_a": a, "bucket_b": b, "abs_cos": v})
    return {"spectra": pd.DataFrame(spec), "energy": pd.concat(energy, ignore_index=True) if energy else
            pd.DataFrame(columns=["model", "bucket", "k", "energy"]), "cosine": pd.DataFrame(cos)}


@register("probe_direction", "Exp 2: correct vs incorrect direction at top-entropy tokens", "run",
          figure=lambda f: probe_figures.direction_hist(f["prompts"], f["summary"]))
def direction_analysis(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None, p: AnalysisParams) -> Frames:
    """Exp 2 (module docstring; ``direction``) at the top entropy bucket."""
    rows = _rows(con, run_id)
    return direction(rows, load_vectors(con, run_id), _n_buckets(con, run_id) - 1)


@register("probe_pca", "PCA of the gradient vectors", "run", figure=lambda f: probe_figures.pca_scatter(f["points"]))
def pca(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None, p: AnalysisParams) -> Frames:
    """2-D PCA (centered, scikit-learn) of up to ``scatter_points`` vectors of both models (seeded subsample),
    with each token's context (``context_tokens`` before it) for the hover."""
    from sklearn.decomposition import PCA
    rows, V = _rows(con, run_id), load_vectors(con, run_id)
    if len(rows) > p.scatter_points:
        rows = rows.iloc[np.sort(np.random.default_rng(0).choice(len(rows), p.scatter_points, replace=False))]
    X = np.asarray(V[rows["vector_idx"].to_numpy()], dtype=np.float64)
    n_comp = min(2, *X.shape)
    model = PCA(n_components=n_comp, random_state=0).fit(X)
    xy = model.transform(X)
    ctx = con.execute(CONTEXT, [p.context_tokens, run_id]).df()
    pts = rows.merge(ctx, on=["model", "prompt_idx", "sample_idx", "position"], how="left")
    pts = pts.assign(pc1=xy[:, 0], pc2=xy[:, 1] if n_comp > 1 else 0.0)
    var = pd.DataFrame({"component": np.arange(1, n_comp + 1), "explained": model.explained_variance_ratio_})
    return {"points": pts, "variance": var}


# ------------------------------------------------------------------------------------------------ queries
def probe_runs(con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """The indexed probe runs (run_id, name, status), newest first."""
    with queries.cursor(con) as cur:
        return cur.execute(PROBE_RUNS).df()


def rollouts(run_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """One row per rollout of a probe run: model, prompt, sample, correct, tokens, mean entropy, answers."""
    with queries.cursor(con) as cur:
        return cur.execute(ROLLOUTS, [run_id]).df()


def buckets(run_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    with queries.cursor(con) as cur:
        return cur.execute(BUCKETS, [run_id]).df()


def rollout(run_id: str, model: str, prompt_idx: int, sample_idx: int,
            con: duckdb.DuckDBPyConnection | None = None) -> tuple[dict, pd.DataFrame]:
    """(prompt, text, answer, extracted, correct) and the generated tokens (position, token, entropy, bucket,
    picked) of one rollout; ValueError if the run has no such rollout."""
    with queries.cursor(con) as cur:
        head = cur.execute(ROLLOUT, [run_id, model, prompt_idx, sample_idx]).df()
        if head.empty:
            raise ValueError(f"probe run {run_id!r} has no rollout model={model!r} prompt={prompt_idx} "
                             f"sample={sample_idx}")
        return head.iloc[0].to_dict(), cur.execute(ROLLOUT_TOKENS, [run_id, model, prompt_idx, sample_idx]).df()


# ------------------------------------------------------------------------------------------------ summary
def _finite(v: object) -> object:
    return None if isinstance(v, float) and not np.isfinite(v) else v


@analyses.register_summary(KIND, needs=("probe_spectra", "probe_direction"), definitions={
    "pr_<model>": "participation ratio (sum lambda)^2 / sum lambda^2 per entropy bucket, lowest entropy first",
    "rank95_<model>": "smallest k with 95% of sum lambda, per bucket",
    "exp2_<model>": "mean over prompts of cos(mean correct, mean incorrect) at top-bucket tokens, its bootstrap "
                    "95% interval, the half-split noise floor, and the prompts counted / left out"})
def summary(step: int | None, results: dict[str, Frames]) -> dict[str, object]:
    """The headline numbers of a probe run (JSON-safe; NaN as None)."""
    out: dict[str, object] = {}
    sp = results["probe_spectra"]["spectra"]
    for model, g in sp.groupby("model", sort=False):
        out[f"pr_{model}"] = [_finite(round(float(v), 4)) for v in g["pr"]]
        out[f"rank95_{model}"] = [_finite(float(v)) for v in g["rank95"]]
    for r in results["probe_direction"]["summary"].itertuples():
        out[f"exp2_{r.model}"] = {"mean_cos": _finite(r.mean_cos), "ci": [_finite(r.cos_ci_lo), _finite(r.cos_ci_hi)],
                                  "noise_floor": _finite(r.mean_noise_floor), "n_prompts": int(r.n_prompts),
                                  "n_skipped": int(r.n_skipped)}
    return out
