"""Index speed on a synthetic trace of realistic shape (28 layers x 7 modules x 2 LoRA parts, samples of a
few hundred tokens, 10 traced steps): ingest rate, inspector latency, the analyses of a traced run.

    python bench/index_speed.py                        # ~10M token_modules rows; a table against the targets
    python bench/index_speed.py --json                 # one JSON object (for CI / the README)
    python bench/index_speed.py --baseline old.json    # side by side with an earlier --json result

Targets (issue 4, on 2 CPU cores): ingest >= 1M token_modules rows/s; with 10M rows indexed, one sample's
tokens + module breakdown (what the inspector loads) p95 <= 50 ms; all analyses of a run <= 10 s.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend import index
from backend.analysis import analyses, figures  # noqa: E402
from backend.dev.synth import SynthConfig, make_run  # noqa: E402
from backend.index import queries

TARGETS = {"ingest_rows_per_s": (1_000_000, "min"), "inspector_p95_ms": (50.0, "max"),
           "analyses_total_s": (10.0, "max")}
MEAN_TOKENS = 305          # tokens per sample of SynthConfig's defaults, about (an estimate to start from)


def generate(root: Path, rows: int, steps: int) -> tuple[Path, float]:
    """A synthetic run with at least ``rows`` token_modules rows (more samples until it has)."""
    per_sample = steps * MEAN_TOKENS * 28 * 7 * 2
    n_samples = max(1, math.ceil(rows / per_sample))
    traced = tuple(int(s) for s in np.linspace(10, 450, steps).round())
    t0 = time.perf_counter()
    while True:
        shutil.rmtree(root / "runs", ignore_errors=True)
        run = make_run(SynthConfig(n_samples=n_samples, traced_steps=traced, seed=0), root / "runs", run_id="bench")
        n = sum(pq.read_metadata(f).num_rows for f in (run / "trace" / "token_modules").glob("*.parquet"))
        if n >= rows:
            return run, time.perf_counter() - t0
        n_samples += max(1, math.ceil(n_samples * (rows - n) / n))


def inspector_latency(con, run_id: str, repeats: int, seed: int = 0) -> np.ndarray:
    """Seconds per inspector load: a sample's tokens, its layer x token profile, and one token's modules."""
    rng = np.random.default_rng(seed)
    steps = queries.traced_steps(run_id, con)
    samples = {s: queries.step_samples(run_id, s, con, preview_chars=0)["sample_idx"].tolist() for s in steps}
    times = []
    for i in range(repeats + 5):
        step = int(rng.choice(steps))
        sample = int(rng.choice(samples[step]))
        t0 = time.perf_counter()
        toks = queries.sample_tokens(run_id, step, sample, con)
        queries.sample_layer_profile(run_id, step, sample, con)
        queries.token_breakdown(run_id, step, sample, int(rng.choice(toks["position"])), con)
        if i >= 5:                   # the first few warm the caches
            times.append(time.perf_counter() - t0)
    return np.array(times)


def run_bench(rows: int, steps: int, repeats: int, workdir: Path, threads: int | None = None) -> dict:
    run, gen_s = generate(workdir, rows, steps)
    con = index.connect(workdir / "bench.duckdb", threads=threads)
    t0 = time.perf_counter()
    res = index.ingest_run(con, run)
    ingest_s = time.perf_counter() - t0
    lat = inspector_latency(con, res.run_id, repeats)
    per = {}
    t0 = time.perf_counter()
    for name in analyses.names(kind="train", run_id=res.run_id, con=con):      # a synthetic run: no influence
        t1 = time.perf_counter()
        analyses.run(name, res.run_id, con=con)
        per[name] = round(time.perf_counter() - t1, 4)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, frames in analyses.run_all(res.run_id, con=con).items():
        figures.build(name, frames)
    fig_s = time.perf_counter() - t0
    con.close()
    n_mod = res.rows["token_modules"]
    return {
        "token_modules_rows": n_mod, "tokens_rows": res.rows["tokens"], "traced_steps": steps,
        "duckdb_threads": threads or "default",
        "generate_s": round(gen_s, 3), "ingest_s": round(ingest_s, 3),
        "ingest_rows_per_s": round(n_mod / ingest_s),
        "inspector_p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
        "inspector_p95_ms": round(float(np.percentile(lat, 95)) * 1e3, 2),
        "inspector_loads": len(lat), "analyses_total_s": round(total, 3), "analyses_s": per,
        "analyses_and_figures_s": round(fig_s, 3),
        "index_mb": round((workdir / "bench.duckdb").stat().st_size / 1e6, 1),
    }


def report(result: dict, baseline: dict | None) -> str:
    lines = [f"synthetic trace: {result['token_modules_rows']:,} token_modules rows, {result['tokens_rows']:,} "
             f"tokens, {result['traced_steps']} traced steps (generated in {result['generate_s']:.1f} s; "
             f"index {result['index_mb']} MB; DuckDB threads: {result['duckdb_threads']})", ""]
    head = f"{'metric':<22}{'measured':>14}{'target':>12}{'vs target':>11}"
    lines.append(head + (f"{'baseline':>14}{'ratio':>8}" if baseline else ""))
    for key, (target, kind) in TARGETS.items():
        v = result[key]
        ratio = v / target if kind == "min" else target / v    # > 1: better than the target
        row = f"{key:<22}{v:>14,.2f}{target:>12,.0f}{ratio:>10.2f}x"
        if baseline and key in baseline:
            b = baseline[key]
            row += f"{b:>14,.2f}{(v / b if kind == 'min' else b / v):>7.2f}x"
        lines.append(row)
    lines += ["", "(vs target / ratio: > 1 is better)", "",
              f"analyses + building their {len(result['analyses_s'])} figures: "
              f"{result['analyses_and_figures_s']:.2f} s",
              "per analysis (s): " + ", ".join(f"{k} {v:.3f}" for k, v in result["analyses_s"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="token_modules rows to generate (about)")
    ap.add_argument("--steps", type=int, default=10, help="traced steps")
    ap.add_argument("--repeats", type=int, default=100, help="inspector loads timed")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier --json output to compare with")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run and index in this folder")
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: one per core)")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.steps < 1 or args.repeats < 1:
        raise SystemExit("--rows, --steps and --repeats must be >= 1")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tokviz-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_bench(args.rows, args.steps, args.repeats, workdir, args.threads)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    print(json.dumps(result) if args.json else report(result, baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
