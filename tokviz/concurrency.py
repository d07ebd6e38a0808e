"""How many events of each kind the app runs at once: Gradio's queue groups (``concurrency_id``) and their
limits (``concurrency_limit``), passed to every event registration as keyword arguments.

    t.button.click(go, inputs, outputs, api_name="compare_runs", **concurrency.RENDER)

Gradio's default is one running event per event function, whoever sent it: 15 sessions switching samples in
Inspect waited on one another (p95 28 s on a busy 2-core machine), and a long SQL query held back only other
SQL queries while every other view still queued behind itself. Here the read-only views share one group sized
to the cores (DuckDB releases the GIL, so a few run side by side; more only split the cores finer), and what
may take long or writes has a group of its own: SQL console queries, jobs (launch, cancel), ingest (refresh),
exports (figures to PNG). A 10 s SQL query then never holds a render slot.

The fast events that run without the queue (``queue=False``: Inspect's redraws, tab switches, the deep link)
are answered by one HTTP round trip when the browser sends them, outside these limits (Gradio's thread pool,
``max_threads``, bounds them); an API client (gradio_client) sends every event through the queue, where the
group applies. ``tests/test_app_concurrency.py`` checks that every event of the app is in one of these groups.
"""
from __future__ import annotations

import os

CORES = os.cpu_count() or 2


def render_limit_from_env() -> int:
    """``TOKVIZ_RENDER_LIMIT`` (renders running at once, >= 1), default twice the cores: one render per core
    in DuckDB and one in Python (figures, HTML) while it waits."""
    raw = os.environ.get("TOKVIZ_RENDER_LIMIT", "").strip()
    if not raw:
        return 2 * CORES
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"TOKVIZ_RENDER_LIMIT must be a whole number >= 1, got {raw!r}")
    return int(raw)


RENDER_LIMIT = render_limit_from_env()
SQL_LIMIT = CORES             # each console query may use half the cores (index.shared's DuckDB threads)

RENDER = {"concurrency_id": "render", "concurrency_limit": RENDER_LIMIT}   # read-only views of the index
SQL = {"concurrency_id": "sql", "concurrency_limit": SQL_LIMIT}            # the SQL console (up to its timeout)
JOBS = {"concurrency_id": "jobs", "concurrency_limit": 1}                  # launch, cancel: the job queue's state
INGEST = {"concurrency_id": "ingest", "concurrency_limit": 1}              # refresh: writes the index
EXPORT = {"concurrency_id": "export", "concurrency_limit": max(1, CORES // 2)}   # figures to PNG: seconds of CPU
POLL = {"concurrency_id": "poll", "concurrency_limit": RENDER_LIMIT}       # every page's timer, every 1.5 s
UI = {"concurrency_id": "ui", "concurrency_limit": None}                   # no I/O: a visibility, a text

GROUPS = {g["concurrency_id"]: g["concurrency_limit"] for g in (RENDER, SQL, JOBS, INGEST, EXPORT, POLL, UI)}
