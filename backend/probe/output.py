"""Write a probe's tables and vectors into its run directory (the job and ``probe-merge`` share this; no torch).

    write_probe(rd, tokens, rollouts, vectors, bounds, n_buckets, keep="picked")

``tokens`` carries ``src_idx``: the row of its gradient in ``vectors`` (-1: none computed). Rows are put in one
canonical order (model, prompt_idx, sample_idx, position) and the kept vectors renumbered in that order, so a
probe run in one process and the same probe run in shards and merged write the same files.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from backend.jobs.probe import (
    PROBE_BUCKETS,
    PROBE_ROLLOUTS,
    PROBE_TOKENS,
    PROBE_VECTORS,
    VECTORS_FILE,
)
from backend.probe.select import MODEL_CODES, bucket_table
from backend.store.rundir import RunDir, atomic_write_bytes, rows_to_table

ROLLOUT_KEY = ["model", "prompt_idx", "sample_idx"]


def _canonical(df: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    order = df.assign(_m=df["model"].map(MODEL_CODES)).sort_values(["_m", "prompt_idx", "sample_idx", *extra],
                                                                     kind="stable")
    return order.drop(columns="_m").reset_index(drop=True)


def _col(df: pd.DataFrame, c: str) -> object:
    """A column for Arrow: text columns with missing values (pandas NaN) as None."""
    s = df[c]
    if pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy()
    return [None if isinstance(v, float) and np.isnan(v) else v for v in s]


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write a float32 array as .npy atomically (temp file, then rename)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    atomic_write_bytes(path, buf.getvalue())


def write_probe(rd: RunDir, tokens: pd.DataFrame, rollouts: pd.DataFrame, vectors: np.ndarray,
                logp: np.ndarray, bounds: dict[str, np.ndarray], n_buckets: int, keep: str = "picked") -> dict:
    """Write probe/{tokens,rollouts,vectors,buckets}.parquet and probe/vectors.npy; return counts for the
    manifest. ``keep``: "picked" keeps the vectors of picked tokens; "all" (a shard) every computed one."""
    assert keep in ("picked", "all"), f"keep must be 'picked' or 'all', got {keep!r}"
    tokens = _canonical(tokens, ["position"])
    rollouts = _canonical(rollouts, [])
    has = tokens["src_idx"].to_numpy() >= 0
    if keep == "picked":
        missing = tokens["picked"].to_numpy() & ~has
        assert not missing.any(), f"{int(missing.sum())} picked tokens have no computed vector"
        has = tokens["picked"].to_numpy()
    src = tokens["src_idx"].to_numpy()[has]
    vidx = np.full(len(tokens), -1, dtype=np.int32)
    vidx[has] = np.arange(int(has.sum()), dtype=np.int32)
    out_vecs = np.asarray(vectors, dtype=np.float32)[src] if len(src) else np.zeros((0, vectors.shape[1]), np.float32)
    out_logp = np.asarray(logp, dtype=np.float32)[src] if len(src) else np.zeros(0, np.float32)
    tok_logp = np.full(len(tokens), np.nan, dtype=np.float32)
    tok_logp[has] = out_logp
    tokens = tokens.assign(vector_idx=vidx, logp=tok_logp)
    run_id = rd.run_id

    tok_cols = [f.name for f in PROBE_TOKENS if f.name != "run_id"]
    rd.write_table("probe/tokens.parquet", rows_to_table(
        {"run_id": [run_id] * len(tokens), **{c: _col(tokens, c) for c in tok_cols}}, PROBE_TOKENS))
    roll_cols = [f.name for f in PROBE_ROLLOUTS if f.name != "run_id"]
    rd.write_table("probe/rollouts.parquet", rows_to_table(
        {"run_id": [run_id] * len(rollouts), **{c: _col(rollouts, c) for c in roll_cols}}, PROBE_ROLLOUTS))

    picked = tokens[tokens["picked"].to_numpy() & (tokens["vector_idx"].to_numpy() >= 0)]
    picked = picked.merge(rollouts[ROLLOUT_KEY + ["correct"]], on=ROLLOUT_KEY, how="left", validate="m:1")
    vi = picked["vector_idx"].to_numpy()
    rd.write_table("probe/vectors.parquet", rows_to_table({
        "run_id": [run_id] * len(picked), "vector_idx": vi, "model": picked["model"].to_numpy(),
        "prompt_idx": picked["prompt_idx"].to_numpy(), "sample_idx": picked["sample_idx"].to_numpy(),
        "position": picked["position"].to_numpy(), "token_id": picked["token_id"].to_numpy(),
        "token": picked["token"].to_numpy(), "bucket": picked["bucket"].to_numpy(),
        "entropy": picked["entropy"].to_numpy(), "correct": picked["correct"].to_numpy().astype(bool),
        "logp": out_logp[vi], "norm": np.linalg.norm(out_vecs[vi], axis=1) if len(vi) else np.zeros(0)},
        PROBE_VECTORS))
    bt = bucket_table(tokens, bounds, n_buckets)
    rd.write_table("probe/buckets.parquet", rows_to_table(
        {"run_id": [run_id] * len(bt), **{c: bt[c].to_numpy() for c in ("model", "bucket", "lo", "hi",
                                                                         "n_tokens", "n_picked")}},
        PROBE_BUCKETS))
    save_npy(rd.path / VECTORS_FILE, out_vecs)
    acc = rollouts.groupby("model")["correct"].mean()
    return {"n_vectors": len(picked), "n_vectors_stored": len(out_vecs), "row_dim": int(out_vecs.shape[1]),
            "n_rollouts": len(rollouts), "n_tokens": len(tokens),
            "boundaries": {m: [float(x) for x in b] for m, b in bounds.items()},
            "accuracy": {m: float(a) for m, a in acc.items()}}
