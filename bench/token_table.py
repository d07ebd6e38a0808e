"""Token table paging speed (the Tokens tab's table, ``backend.index.token_table``) on ~10M response tokens at
one (run, step): a page's keys, rows and context, as the server computes them, against the plain query (the
set's count, then ``ORDER BY .. LIMIT .. OFFSET``: what a table would do without the module's deep-page paths),
side by side.

    python bench/token_table.py                  # ~10M response-token rows; a table against the target
    python bench/token_table.py --json           # one JSON object (token_table_page_ms: the slowest scenario)
    python bench/token_table.py --rows 1000000   # a smaller index

Target (issue 14): every page <= 300 ms: the first page, a middle page, sorted by a metric (first and middle
page), filtered (first and middle page). Every timing is cold: the module's caches (per-query counts, value
samples) are emptied before each, as after a user changes the sort or a filter ("next, warm": the page after,
the caches kept, as when paging on). The index is a synthetic run
(backend.dev.synth: one layer and module, so the token_modules table stays small) ingested once and copied in
SQL under new sample ids until the step holds ``--rows`` response tokens, stored in (sample, position) order as
ingest stores it. DuckDB threads: half the cores, as the app's connection (``index.shared``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend import index  # noqa: E402
from backend.dev.synth import SynthConfig, make_run  # noqa: E402
from backend.index import token_table as tt  # noqa: E402
from tokviz.token_table import page_html  # noqa: E402

TARGET_MS = 300.0
RUN, STEP = "bench-table", 10
SCENARIOS = {       # name -> (query, page as a fraction of the pages: 0 first, 0.5 middle)
    "first_page": (dict(), 0.0),
    "middle_page": (dict(), 0.5),
    "sorted_first_page": (dict(sort="loss", descending=True), 0.0),
    "sorted_middle_page": (dict(sort="alignment"), 0.5),
    "sorted_deep_page_magnitude": (dict(sort="magnitude", descending=True), 0.8),
    "filtered_first_page": (dict(sort="alignment", categories=("number", "operator"),
                                 ranges={"loss": (0.5, 3.0)}), 0.0),
    "filtered_middle_page": (dict(sort="alignment", categories=("number", "operator"),
                                  ranges={"loss": (0.5, 3.0)}), 0.5),
    "text_filtered_middle_page": (dict(text="1"), 0.5),
}
PLAIN = "SELECT sample_idx, position FROM tokens WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?"


def build(workdir: Path, rows: int, threads: int):
    """An index whose (RUN, STEP) holds at least ``rows`` response tokens."""
    run = make_run(SynthConfig(n_layers=1, modules=("q_proj",), n_samples=200, traced_steps=(STEP,), seed=0),
                   workdir / "runs", run_id=RUN)
    con = index.connect(workdir / "bench.duckdb", threads=threads)
    index.ingest_run(con, run)
    base, n_resp = con.execute("SELECT max(sample_idx) + 1, count(*) FILTER (WHERE is_response) FROM tokens"
                               ).fetchone()
    copies = math.ceil(rows / n_resp)
    con.execute("CREATE TEMP TABLE one AS SELECT * FROM tokens")
    con.execute("INSERT INTO tokens SELECT o.* REPLACE (o.sample_idx + r.range * ? AS sample_idx) FROM one o, "
                "range(1, ?) r ORDER BY r.range, o.sample_idx, o.position", [base, copies])
    con.execute("DROP TABLE one")
    con.execute("CHECKPOINT")
    return con


def time_ms(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        tt._cache.data.clear()               # cold: as after a change of sort or filter
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def run_bench(rows: int, repeats: int, workdir: Path, threads: int, baseline: bool) -> dict:
    t0 = time.perf_counter()
    con = build(workdir, rows, threads)
    build_s = time.perf_counter() - t0
    total_rows = con.execute("SELECT count(*) FROM tokens WHERE run_id = ? AND step = ? AND is_response",
                             [RUN, STEP]).fetchone()[0]
    result: dict = {"response_rows": int(total_rows), "duckdb_threads": threads, "build_s": round(build_s, 1),
                    "page_size": 50, "repeats": repeats, "scenarios": {}}
    for name, (kw, frac) in SCENARIOS.items():
        q0 = tt.TableQuery(**kw)
        pages = tt.token_page(RUN, STEP, q0, con).pages
        q = tt.TableQuery(**{**kw, "page": int(frac * (pages - 1))})

        def ours():
            return page_html(tt.token_page(RUN, STEP, q, con))

        ms = time_ms(ours, repeats)
        # the next page, the caches kept (counts, value sample): paging on with the same sort and filters
        nxt = tt.TableQuery(**{**kw, "page": min(q.page + 1, pages - 1)})
        tt.token_page(RUN, STEP, q, con)
        warm = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            page_html(tt.token_page(RUN, STEP, nxt, con))
            warm.append((time.perf_counter() - t0) * 1e3)
        row = {"page": q.page, "pages": pages, "median_ms": round(statistics.median(ms), 1),
               "max_ms": round(max(ms), 1), "next_page_warm_ms": round(statistics.median(warm), 1)}
        if baseline:
            where, fparams = q.where()
            offset = q.page * q.page_size

            def plain():      # the set's count (for the page count), the page's keys, its rows: as ours
                con.execute(tt.COUNT.format(col="sample_idx", where=where), [RUN, STEP, *fparams]).fetchone()
                keys = tt._keys(con, PLAIN.format(where=where, order=tt._order(q)),
                                [RUN, STEP, *fparams, q.page_size, offset])
                tt._rows(con, RUN, STEP, keys)

            b = time_ms(plain, max(1, repeats // 2))
            row["plain_offset_median_ms"] = round(statistics.median(b), 1)
            row["speedup"] = round(row["plain_offset_median_ms"] / row["median_ms"], 2)
        result["scenarios"][name] = row
    con.close()
    result["token_table_page_ms"] = max(r["median_ms"] for r in result["scenarios"].values())
    result["token_table_page_ms_max"] = max(r["max_ms"] for r in result["scenarios"].values())
    return result


def report(r: dict) -> str:
    lines = [f"token table: {r['response_rows']:,} response tokens at one step, pages of {r['page_size']}, "
             f"DuckDB threads {r['duckdb_threads']}, {r['repeats']} cold timings each (index built in "
             f"{r['build_s']} s)", "",
             f"{'scenario':<28}{'page':>16}{'ours ms':>10}{'max ms':>9}{'plain ms':>10}{'speedup':>9}"
             f"{'next, warm':>12}"]
    for name, s in r["scenarios"].items():
        lines.append(f"{name:<28}{s['page']:>8,}/{s['pages']:<7,}{s['median_ms']:>10.1f}{s['max_ms']:>9.1f}"
                     f"{s.get('plain_offset_median_ms', float('nan')):>10.1f}{s.get('speedup', float('nan')):>8.2f}x"
                     f"{s['next_page_warm_ms']:>12.1f}")
    worst = r["token_table_page_ms"]
    lines += ["", f"token_table_page_ms (slowest scenario's median): {worst:.1f} ms; target <= {TARGET_MS:.0f} ms "
              f"({TARGET_MS / worst:.2f}x vs target, > 1 is better)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="response-token rows at the step (about)")
    ap.add_argument("--repeats", type=int, default=5, help="cold timings per scenario")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="DuckDB threads")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain-OFFSET baseline (slow)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--keep", type=Path, default=None, help="build the index in this folder and keep it")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        raise SystemExit("--rows and --repeats must be >= 1")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="tokviz-tt-bench-"))
    if args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_bench(args.rows, args.repeats, workdir, args.threads, not args.no_baseline)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
