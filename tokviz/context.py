"""What the app shares between its tabs: settings from the environment, the index, the job queue.

    ctx = AppContext.from_env()      # read-only mode, admin token, data root, job slots
    ctx.start()                      # open the index (this process becomes its one writer), ingest new runs
    ctx.generation                   # bumps whenever the set of indexed runs may have changed

Read-only mode (a hosted Space, or ``TOKVIZ_READONLY=1``): nothing can be launched unless the owner set
``TOKVIZ_ADMIN_TOKEN`` and the visitor types it on the Launch tab.
"""
from __future__ import annotations

import hmac
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd

from backend import index
from backend.index import queries
from backend.jobs.queue import Job, JobQueue, max_jobs_from_env
from backend.store import paths
from backend.store.rundir import child_runs

TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    data_root: Path
    readonly: bool = False
    admin_token: str = field(default="", repr=False)
    max_jobs: int = 1

    @classmethod
    def from_env(cls) -> "Settings":
        readonly = os.environ.get("TOKVIZ_READONLY", "").strip().lower() in TRUE or bool(os.environ.get("SPACE_ID"))
        return cls(data_root=paths.data_root(), readonly=readonly,
                   admin_token=os.environ.get("TOKVIZ_ADMIN_TOKEN", ""), max_jobs=max_jobs_from_env())

    def may_launch(self, token: str | None) -> bool:
        """Launching is open unless read-only; then only with the owner's admin token."""
        if not self.readonly:
            return True
        if not self.admin_token or not token:
            return False
        return hmac.compare_digest(token.encode(), self.admin_token.encode())


class AppContext:
    """The app's shared state: settings, the index connection (via backend.index.shared), the job queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._gen_lock = threading.Lock()
        self.generation = 0
        self.startup_log: list[str] = []
        self.jobs = JobQueue(max_running=settings.max_jobs, on_exit=self._job_ended,
                             logs_dir=settings.data_root / "jobs")

    @classmethod
    def from_env(cls) -> "AppContext":
        return cls(Settings.from_env())

    def start(self) -> list[str]:
        """Open the index and ingest the runs under the data root; returns one line per run."""
        t0 = time.perf_counter()
        n = len(index.find_runs())
        print(f"tokviz: indexing {n} run director{'y' if n == 1 else 'ies'} under {paths.runs_dir()} ...",
              flush=True)
        lines = self.ingest()
        print(f"tokviz: index ready in {time.perf_counter() - t0:.1f} s", flush=True)
        return lines

    def ingest(self, run_dir: Path | None = None) -> list[str]:
        """Ingest one run directory, or every new or changed run; bump the generation."""
        cur = index.shared()
        try:
            if run_dir is not None:
                results = [index.ingest_run(cur, run_dir)]
            else:
                results = index.ingest_all(cur)
        finally:
            cur.close()
        with self._gen_lock:
            self.generation += 1
        lines = [r.line() for r in results]
        self.startup_log = lines if run_dir is None else self.startup_log
        for ln in lines:
            if ln.startswith("FAILED"):
                print(f"tokviz: {ln}", flush=True)
        return lines

    def _job_ended(self, job: Job) -> None:
        """The queue's ``on_exit``: ingest the job's run. A run that cannot be ingested (a bad file, a DuckDB
        error such as a transaction conflict, a file gone) is reported on the job's message and on stderr,
        and the app goes on: the run can be ingested later (Refresh runs, or the next start)."""
        if (job.run_dir / "config.json").exists():
            try:
                for child in child_runs(job.run_dir):      # the train runs of a scheme comparison
                    self.ingest(child)
                self.ingest(job.run_dir)
            except (index.TokvizIndexError, duckdb.Error, OSError) as e:
                why = f"{type(e).__name__}: {str(e).strip()}"
                job.message = (job.message + "; " if job.message else "") + f"not indexed: {why}"
                print(f"tokviz: could not ingest run {job.run_id} ({job.run_dir}): {why}", file=sys.stderr, flush=True)

    # ---- run lists every tab uses
    def runs(self) -> pd.DataFrame:
        return queries.list_runs()

    def run_choices(self, traced_only: bool = False) -> list[tuple[str, str]]:
        """(label, run_id) for dropdowns, newest first; ``traced_only``: runs with traced steps."""
        df = self.runs()
        if traced_only:
            df = df[df["n_traced_steps"].fillna(0) > 0]
        return [(run_label(r), r.run_id) for r in df.itertuples()]

    def close(self) -> None:
        self.jobs.shutdown()


def run_label(r) -> str:
    """A run as a dropdown shows it: name, scheme, status, traced steps and the id's time stamp."""
    name = r.name or r.run_id
    bits = [str(b) for b in (r.scheme, r.status) if isinstance(b, str) and b]
    steps = int(r.n_traced_steps) if pd.notna(r.n_traced_steps) else 0
    bits.append(f"{steps} traced step{'s' if steps != 1 else ''}")
    return f"{name} · {' · '.join(bits)} · {r.run_id}"
