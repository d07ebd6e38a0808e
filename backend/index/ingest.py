"""Ingest run directories into the index: every table a run's job kind declares (backend.jobs.registry), in
one transaction per run.

    python -m backend index              # ingest new or changed runs under <data root>/runs
    python -m backend index --rebuild    # drop everything and ingest all runs again

    con = db.connect()
    ingest_run(con, Path("data/runs/<run_id>"))   # one transaction: all of the run or none of it
    ingest_all(con)                               # every new or changed run; drops runs whose directory is gone

A run's kind (``config.json``) says which tables it has, where their shards are, which shards of an
unfinished run count, and which aggregates to fill; nothing here is specific to one kind.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import duckdb

from backend.index import db, sql
from backend.index.db import IngestError, TokvizIndexError, first_line, transaction
from backend.jobs import registry
from backend.store import paths, schema
from backend.store.rundir import CONFIG, MANIFEST, process_alive, read_events

STALE_S = 600.0     # a run on another host with no event (heartbeat included) for this long counts as interrupted


def rebuild(con: duckdb.DuckDBPyConnection, runs_root: Path | None = None) -> list["IngestResult"]:
    """Drop every index table, create the current schema, and ingest all runs again: those under
    ``runs_root`` (default ``paths.runs_dir()``) and those the old index knew elsewhere that still exist."""
    tables = {r[0] for r in con.execute(sql.LIST_TABLES).fetchall()}
    known: list[Path] = []
    if "runs" in tables:
        try:
            known = [Path(path) for _run_id, path in con.execute(sql.RUN_PATHS).fetchall()]
        except duckdb.BinderException:
            known = []      # an index so old its runs table has no path column: the runs root is all we have
    db.drop_all(con)
    db.create_tables(con)
    return ingest_all(con, runs_root, extra=[p for p in known if (p / CONFIG).exists()])



@dataclass
class IngestResult:
    run_id: str
    path: Path
    action: str                      # "ingested", "unchanged", "removed" or "failed"
    status: str = ""                 # the run's status: RUN_STATUSES
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    def line(self) -> str:
        if self.action == "failed":
            return f"FAILED     {self.path}: {self.error}"
        if self.action == "removed":
            return f"removed    {self.run_id} (its directory {self.path} is gone)"
        rows = ", ".join(f"{k} {v:,}" for k, v in self.rows.items() if v)
        extra = f" ({rows}; {self.seconds:.2f}s)" if self.action == "ingested" else ""
        return f"{self.action:<10} {self.run_id} [{self.status}]{extra}"


@dataclass
class _RunFiles:
    spec: registry.JobSpec
    config: dict
    manifest: dict | None
    status: str
    files: dict[str, list[Path]]     # table -> shards to ingest, in order
    fingerprint: str


def _read_json(f: Path, what: str) -> dict:
    try:
        obj = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise IngestError(f"{f}: the {what} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise IngestError(f"{f}: the {what} must be a JSON object, found {type(obj).__name__}")
    return obj


def _check_version(obj: dict, f: Path) -> None:
    v = obj.get("schema_version")
    if v != schema.SCHEMA_VERSION:
        raise IngestError(f"{f}: schema_version {v!r}, but this tokviz reads schema version "
                          f"{schema.SCHEMA_VERSION} (a run written by another tokviz version)")


RUN_STATUSES = ("queued", "running", "finished", "failed", "interrupted")


def run_status(events: list[dict], now: float | None = None) -> str:
    """The status of a run without manifest from its events: what happened since its last ``start`` (or
    ``queued``) event. ``failed``: an ``error`` event; ``interrupted``: its process is gone without one
    (``kill -9``, a reboot: same host and the pid is gone or is another process now; another host: no
    event, heartbeats included, for STALE_S seconds); ``queued``: the queue has not started it yet (and the
    queue's process lives); else ``running``. A run from before pids were recorded stays ``running``."""
    now = time.time() if now is None else now
    last = max((i for i, e in enumerate(events) if e.get("type") in ("start", "queued")), default=0)
    tail = events[last:]
    if any(e.get("type") == "error" for e in tail):
        return "failed"
    if not tail or "pid" not in tail[0]:
        return "queued" if tail and tail[0].get("type") == "queued" else "running"
    alive = process_alive(tail[0])
    if tail[0].get("type") == "queued":         # no heartbeat before the job starts: only the pid can tell
        return "interrupted" if alive is False else "queued"
    if alive is None:                           # another host: the heartbeat decides
        alive = now - max(float(e.get("time", 0)) for e in tail) < STALE_S
    return "running" if alive else "interrupted"


def status_of(run_path: Path) -> str:
    """A run directory's status (RUN_STATUSES): ``finished`` once its manifest is there, else ``run_status``."""
    return "finished" if (Path(run_path) / MANIFEST).exists() else run_status(read_events(run_path))


def _scan_run(run_path: Path) -> _RunFiles:
    """What a run directory holds and which shards are complete. A run without manifest (still running, or
    crashed) contributes only the traced steps whose tokens and token_modules shards are both there."""
    if not (run_path / CONFIG).exists():
        raise IngestError(f"{run_path}: no {CONFIG}, so this is not a run directory")
    config = _read_json(run_path / CONFIG, CONFIG)
    _check_version(config, run_path / CONFIG)
    for key in ("run_id", "kind"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise IngestError(f"{run_path / CONFIG}: missing {key!r} (a string)")
    manifest = None
    if (run_path / MANIFEST).exists():
        manifest = _read_json(run_path / MANIFEST, MANIFEST)
        _check_version(manifest, run_path / MANIFEST)
        status = "finished"
    else:
        status = run_status(read_events(run_path))
    try:
        spec = registry.get(config["kind"])
    except ValueError as e:
        raise IngestError(f"{run_path / CONFIG}: {e}") from e
    files = {t.name: sorted(p for p in run_path.glob(t.glob) if not p.name.startswith(".")) for t in spec.tables}
    try:
        if manifest is None and spec.complete is not None:
            files = spec.complete(files)
        for t in spec.tables:
            if t.order is not None:
                files[t.name].sort(key=t.order)
    except ValueError as e:          # a misnamed shard
        raise IngestError(str(e)) from e
    h = hashlib.sha256(f"{status}\n".encode())
    for f in [run_path / CONFIG, run_path / MANIFEST] + [p for t in files for p in files[t]]:
        if f.exists():
            st = f.stat()
            h.update(f"{f.relative_to(run_path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return _RunFiles(spec, config, manifest, status, files, h.hexdigest())


def _check_parquet_meta(con: duckdb.DuckDBPyConnection, run_path: Path, table: str, files: list[Path]) -> None:
    """Every shard declares the table it holds and the schema version we read (footers only)."""
    names = [str(f) for f in files]
    try:
        versions = dict(con.execute(sql.PARQUET_KV, [names, schema.VERSION_KEY.decode()]).fetchall())
        tables = dict(con.execute(sql.PARQUET_KV, [names, schema.TABLE_KEY.decode()]).fetchall())
    except duckdb.Error as e:
        raise IngestError(f"{run_path}: cannot read the {table} shards: {first_line(e)}") from e
    for f in names:
        rel = Path(f).relative_to(run_path)
        if f not in versions:
            raise IngestError(f"{run_path}: {rel} has no {schema.VERSION_KEY.decode()} metadata: not written "
                              "with backend.store.schema")
        if versions[f] != str(schema.SCHEMA_VERSION):
            raise IngestError(f"{run_path}: {rel} has schema version {versions[f]}, but this tokviz reads "
                              f"version {schema.SCHEMA_VERSION}")
        if tables.get(f, table) != table:
            raise IngestError(f"{run_path}: {rel} holds table {tables[f]!r}, expected {table!r}")


def _name(v: object) -> str | None:
    """A config entry as a short name: strings as they are, objects by their name/id field."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict):
        for k in ("name", "name_or_path", "id", "path"):
            if isinstance(v.get(k), str):
                return v[k]
    return json.dumps(v, sort_keys=True)


def ingest_run(con: duckdb.DuckDBPyConnection, run_path: str | Path, *, force: bool = False) -> IngestResult:
    """Ingest one run directory in one transaction (all of it or nothing); skip it when its files have not
    changed since the last ingest, unless ``force``. Raises IngestError naming the file at fault."""
    run_path = Path(run_path).resolve()
    t0 = time.perf_counter()
    rf = _scan_run(run_path)
    run_id = rf.config["run_id"]
    row = con.execute(sql.RUN_FINGERPRINT, [run_id]).fetchone()
    if row and row[1] != str(run_path) and (Path(row[1]) / CONFIG).exists():
        raise IngestError(f"{run_path}: run id {run_id!r} is already indexed from {row[1]} (a copied run "
                          "directory?); give the copy its own run_id in config.json, or remove one of them")
    if row and row[0] == rf.fingerprint and not force:
        return IngestResult(run_id, run_path, "unchanged", rf.status)
    for table, files in rf.files.items():
        if files:
            _check_parquet_meta(con, run_path, table, files)
    tables = registry.tables()
    rows: dict[str, int] = {}
    with transaction(con):
        for t in list(tables) + list(registry.derived_tables()) + ["files", "runs"]:
            con.execute(sql.delete_run_rows(t), [run_id])
        for table, files in rf.files.items():
            rows[table] = 0
            if files:
                try:
                    rows[table] = con.execute(sql.insert_from_parquet(tables[table]),
                                              [run_id, [str(f) for f in files]]).fetchone()[0]
                except duckdb.Error as e:
                    raise IngestError(f"{run_path}: cannot ingest the {table} shards: {first_line(e)}") from e
            for f in files:
                st = f.stat()
                con.execute(sql.INSERT_FILE, [run_id, str(f.relative_to(run_path)), table, st.st_size,
                                              st.st_mtime_ns])
        for d in rf.spec.derived:
            con.execute(d.fill, [run_id] * d.fill.count("?"))
        for check, message in rf.spec.ingest_checks:
            bad = con.execute(check, [run_id] * check.count("?")).fetchall()
            if bad:
                raise IngestError(f"{run_path}: {message}: {bad[:3]}")
        cfg = rf.config.get("config") if isinstance(rf.config.get("config"), dict) else {}
        steps = rf.spec.steps_table
        run = {
            "run_id": run_id, "kind": rf.config.get("kind"), "name": rf.config.get("name"), "status": rf.status,
            "model": _name(cfg.get("model")), "dataset": _name(cfg.get("dataset", cfg.get("task"))),
            "scheme": _name(cfg.get("scheme")), "created_at": rf.config.get("created_at"),
            "finished_at": (rf.manifest or {}).get("finished_at"), "path": str(run_path),
            "schema_version": rf.config.get("schema_version"), "fingerprint": rf.fingerprint,
            "ingested_at": datetime.now(timezone.utc).isoformat(),
            "n_traced_steps": con.execute(sql.count_steps(steps), [run_id]).fetchone()[0] if steps else 0,
            "config_json": json.dumps(rf.config, sort_keys=True),
            "manifest_json": json.dumps(rf.manifest, sort_keys=True) if rf.manifest is not None else None,
            **{f"n_{t}": n for t, n in rows.items()}}
        con.execute(sql.insert_run(list(run)), list(run.values()))
    return IngestResult(run_id, run_path, "ingested", rf.status, rows, time.perf_counter() - t0)


def find_runs(runs_root: Path | None = None) -> list[Path]:
    """Run directories (folders with a config.json) directly under ``runs_root``."""
    root = Path(runs_root) if runs_root is not None else paths.runs_dir()
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / CONFIG).exists())


def prune_missing(con: duckdb.DuckDBPyConnection) -> list[IngestResult]:
    """Remove the runs whose directory no longer exists (one transaction per run)."""
    results = []
    for run_id, path in con.execute(sql.RUN_PATHS).fetchall():
        if (Path(path) / CONFIG).exists():
            continue
        with transaction(con):
            for t in list(registry.tables()) + list(registry.derived_tables()) + ["files", "runs"]:
                con.execute(sql.delete_run_rows(t), [run_id])
        results.append(IngestResult(run_id, Path(path), "removed"))
    return results


def ingest_all(con: duckdb.DuckDBPyConnection, runs_root: Path | None = None, *, force: bool = False,
               extra: Sequence[Path] = ()) -> list[IngestResult]:
    """Ingest every run under ``runs_root`` (and ``extra`` run directories), and drop the runs whose
    directory is gone; a run that fails is reported in its result and leaves the index as it was, the
    others go on."""
    results = prune_missing(con)
    seen: set[Path] = set()
    for p in list(find_runs(runs_root)) + list(extra):
        p = Path(p).resolve()
        if p in seen:
            continue
        seen.add(p)
        try:
            results.append(ingest_run(con, p, force=force))
        except IngestError as e:
            results.append(IngestResult("", p, "failed", error=str(e)))
    return results


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str]) -> int:
    """``python -m backend index [--rebuild] [--runs DIR] [--index FILE]`` (argv: what follows ``index``)."""
    ap = argparse.ArgumentParser(prog="python -m backend index",
                                 description="Ingest new or changed run directories into the DuckDB index.")
    ap.add_argument("--rebuild", action="store_true", help="drop the index and ingest every run again")
    ap.add_argument("--runs", type=Path, default=None, help="folder of run directories (default: data root/runs)")
    ap.add_argument("--index", type=Path, default=None, help="index file (default: data root/tokviz.duckdb)")
    args = ap.parse_args(argv)
    if args.runs is not None and not args.runs.is_dir():
        print(f"error: --runs {str(args.runs)!r} is not a folder of run directories", file=sys.stderr)
        return 2
    try:
        con = db.connect(args.index)
    except TokvizIndexError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        results = rebuild(con, args.runs) if args.rebuild else ingest_all(con, args.runs)
    finally:
        con.close()
    for r in results:
        print(r.line())
    count = {a: sum(r.action == a for r in results) for a in ("ingested", "unchanged", "removed", "failed")}
    print(", ".join(f"{n} {a}" for a, n in count.items()))
    failed = count["failed"]
    return 1 if failed else 0
