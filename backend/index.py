"""The DuckDB index: one file derived from the run directories, rebuildable at any time.

    python -m backend index              # ingest new or changed runs under <data root>/runs
    python -m backend index --rebuild    # drop everything and ingest all runs again

    con = connect()                      # the one connection factory (creates / migrates the index)
    ingest_run(con, Path("data/runs/<run_id>"))   # one transaction: all of the run or none of it

DuckDB allows one writer process: the web app holds the index while it runs (``shared()``), and a CLI that
cannot take the lock says so (``IndexLockedError``). An index of an older schema version is migrated
(``sql.MIGRATIONS``) or rebuilt from the run directories; one of a newer version is refused, never misread.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import duckdb

from backend import paths, schema, sql
from backend.rundir import CONFIG, MANIFEST, read_events

MEMORY = ":memory:"

# Parquet shards of each table, relative to the run directory (layout: backend.schema)
TABLE_GLOBS = {"tokens": "trace/tokens/*.parquet", "token_modules": "trace/token_modules/*.parquet",
               "train_steps": "train_steps/*.parquet", "eval": "eval/*.parquet"}
_TRACE_SHARD = re.compile(r"^step_(\d+)\.rank(\d+)\.parquet$")


class TokvizIndexError(RuntimeError):
    """Base class of index problems a user can act on (the CLI prints the message, no traceback)."""


class IndexLockedError(TokvizIndexError):
    """Another process holds the index (DuckDB allows one writer)."""


class IndexVersionError(TokvizIndexError):
    """The index has a schema version this code cannot read as it is."""


class IngestError(TokvizIndexError):
    """A run could not be ingested; the index is left as it was. The message names the file at fault."""


# ------------------------------------------------------------------------------------------ connections
def connect(path: str | Path | None = None, *, read_only: bool = False,
            allowed_dirs: Sequence[Path] | None = None, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """Open the index (default ``paths.index_path()``; ``":memory:"`` for a private in-memory index).

    A new file gets the current schema; an older one is migrated or rebuilt; a newer one raises
    IndexVersionError. ``read_only`` opens without taking the writer lock (and never changes the file).
    ``allowed_dirs``: lock the connection down, with file access only below these folders (the app's
    connection, which also serves the SQL console). ``threads``: DuckDB worker threads (default: one per
    core); 1 gives steadier interactive latency on a machine whose cores are busy with other work.
    Raises IndexLockedError if another process holds it.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    target = MEMORY if str(path) == MEMORY else str(Path(path) if path is not None else paths.index_path())
    if target != MEMORY:
        if read_only and not Path(target).exists():
            raise ValueError(f"no index at {target}: build it with `python -m backend index`")
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    config = {"enable_external_access": False} if read_only else {}
    try:
        con = duckdb.connect(target, read_only=read_only, config=config)
    except duckdb.ConnectionException as e:
        raise TokvizIndexError(f"cannot open {target}: {_first_line(e)} (this process already has it open "
                               "with other settings; use that connection)") from e
    except duckdb.IOException as e:
        if "lock" in str(e).lower():
            raise IndexLockedError(
                f"the index {target} is in use by another process ({_lock_holder(str(e))}). The tokviz app "
                "holds it while it runs: ingest from the app, or stop the app and run this again.") from e
        raise
    try:
        con.execute(sql.SET_NO_PROGRESS_BAR)
        if threads is not None:
            con.execute(sql.SET_THREADS, [threads])
        if allowed_dirs is not None:
            con.execute(sql.SET_ALLOWED_DIRECTORIES, [[str(Path(d).resolve()) + "/" for d in allowed_dirs]])
            con.execute(sql.SET_NO_EXTERNAL_ACCESS)
        _ensure_schema(con, target, read_only)
    except BaseException:
        con.close()          # never keep the file locked behind an error
        raise
    return con


def _lock_holder(message: str) -> str:
    m = re.search(r"held in (.+?) \(PID (\d+)\)", message)
    return f"pid {m.group(2)}, {m.group(1)}" if m else message


_shared: dict[str, duckdb.DuckDBPyConnection] = {}
_shared_lock = threading.Lock()


def shared(path: str | Path | None = None) -> duckdb.DuckDBPyConnection:
    """A cursor on this process's long-lived writer connection (the app's), opened on first use.

    The connection is locked down to the data root (so the SQL console can read nothing else) and uses
    half the cores, leaving the rest to the jobs the app launches (on a busy 2-core machine one DuckDB thread
    halves the inspector's tail latency); each call returns a new cursor, which is what DuckDB needs for
    use from several threads.
    """
    key = str(Path(path) if path is not None else paths.index_path())
    with _shared_lock:
        if key not in _shared:
            _shared[key] = connect(key, allowed_dirs=[paths.data_root()], threads=max(1, (os.cpu_count() or 2) // 2))
        return _shared[key].cursor()


def shared_path_held(path: str | Path | None = None) -> bool:
    """Whether this process holds the writer connection on ``path`` (see ``shared``)."""
    return str(Path(path) if path is not None else paths.index_path()) in _shared


def close_shared() -> None:
    """Close the shared connections (app shutdown, tests)."""
    with _shared_lock:
        for con in _shared.values():
            con.close()
        _shared.clear()


# ------------------------------------------------------------------------------------------------ schema
def _ensure_schema(con: duckdb.DuckDBPyConnection, target: str, read_only: bool) -> None:
    tables = {r[0] for r in con.execute(sql.LIST_TABLES).fetchall()}
    if not tables:
        if read_only:
            raise IndexVersionError(f"{target} is not a tokviz index (it has no tables)")
        _create_tables(con)
        return
    version = _version(con, tables)
    if version == sql.INDEX_VERSION:
        return
    if version > sql.INDEX_VERSION:
        raise IndexVersionError(
            f"the index {target} has schema version {version}, newer than this tokviz reads "
            f"({sql.INDEX_VERSION}): upgrade tokviz, or rebuild it with `python -m backend index --rebuild`")
    if read_only:
        raise IndexVersionError(
            f"the index {target} has schema version {version}, older than {sql.INDEX_VERSION}: run "
            "`python -m backend index` once to migrate it")
    if all(v in sql.MIGRATIONS for v in range(version, sql.INDEX_VERSION)):
        _migrate(con, version)
    else:
        print(f"tokviz: index {target} has schema version {version} and no migration to "
              f"{sql.INDEX_VERSION}: rebuilding it from the run directories", file=sys.stderr)
        rebuild(con)


def _version(con: duckdb.DuckDBPyConnection, tables: set[str]) -> int:
    """The index's schema version; 0 for an index older than the meta table."""
    if "meta" not in tables:
        return 0
    row = con.execute(sql.GET_META, ["schema_version"]).fetchone()
    return int(row[0]) if row else 0


def _create_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.begin()
    try:
        for stmt in sql.CREATE_ALL:
            con.execute(stmt)
        con.execute(sql.SET_META, ["schema_version", str(sql.INDEX_VERSION)])
        con.execute(sql.SET_META, ["parquet_schema_version", str(schema.SCHEMA_VERSION)])
        con.commit()
    except BaseException:
        con.rollback()
        raise


def _migrate(con: duckdb.DuckDBPyConnection, version: int) -> None:
    """Apply sql.MIGRATIONS from ``version`` up to the current one, all in one transaction."""
    con.begin()
    try:
        for v in range(version, sql.INDEX_VERSION):
            for stmt in sql.MIGRATIONS[v]:
                con.execute(stmt)
        con.execute(sql.SET_META, ["schema_version", str(sql.INDEX_VERSION)])
        con.commit()
    except BaseException:
        con.rollback()
        raise


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
    con.begin()
    try:
        for t in sql.INDEX_TABLES:
            con.execute(sql.DROP_TABLE[t])
        con.commit()
    except BaseException:
        con.rollback()
        raise
    _create_tables(con)
    return ingest_all(con, runs_root, extra=[p for p in known if (p / CONFIG).exists()])


# ------------------------------------------------------------------------------------------------ ingest
@dataclass
class IngestResult:
    run_id: str
    path: Path
    action: str                      # "ingested", "unchanged", "removed" or "failed"
    status: str = ""                 # the run's status: finished, running or failed
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
        events = read_events(run_path)
        status = "failed" if any(e.get("type") == "error" for e in events) else "running"
    files = {t: sorted(p for p in run_path.glob(g) if not p.name.startswith(".")) for t, g in TABLE_GLOBS.items()}
    if manifest is None:
        # a step is complete when both tables have a shard from the same ranks
        keys = {t: {_trace_key(p) for p in files[t]} for t in ("tokens", "token_modules")}
        partial_steps = {step for step, _rank in keys["tokens"] ^ keys["token_modules"]}
        complete_steps = {step for step, _rank in keys["tokens"]} - partial_steps
        for t in ("tokens", "token_modules"):
            files[t] = [p for p in files[t] if _trace_key(p)[0] in complete_steps]
    for t in ("tokens", "token_modules"):
        files[t].sort(key=_trace_key)
    h = hashlib.sha256(f"{status}\n".encode())
    for f in [run_path / CONFIG, run_path / MANIFEST] + [p for t in files for p in files[t]]:
        if f.exists():
            st = f.stat()
            h.update(f"{f.relative_to(run_path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return _RunFiles(config, manifest, status, files, h.hexdigest())


def _trace_key(p: Path) -> tuple[int, int]:
    m = _TRACE_SHARD.match(p.name)
    if not m:
        raise IngestError(f"{p}: a trace shard must be named step_NNNNNN.rankR.parquet")
    return int(m.group(1)), int(m.group(2))


def _check_parquet_meta(con: duckdb.DuckDBPyConnection, run_path: Path, table: str, files: list[Path]) -> None:
    """Every shard declares the table it holds and the schema version we read (footers only)."""
    names = [str(f) for f in files]
    try:
        versions = dict(con.execute(sql.PARQUET_KV, [names, schema.VERSION_KEY.decode()]).fetchall())
        tables = dict(con.execute(sql.PARQUET_KV, [names, schema.TABLE_KEY.decode()]).fetchall())
    except duckdb.Error as e:
        raise IngestError(f"{run_path}: cannot read the {table} shards: {_first_line(e)}") from e
    for f in names:
        rel = Path(f).relative_to(run_path)
        if f not in versions:
            raise IngestError(f"{run_path}: {rel} has no {schema.VERSION_KEY.decode()} metadata: not written "
                              "with backend.schema")
        if versions[f] != str(schema.SCHEMA_VERSION):
            raise IngestError(f"{run_path}: {rel} has schema version {versions[f]}, but this tokviz reads "
                              f"version {schema.SCHEMA_VERSION}")
        if tables.get(f, table) != table:
            raise IngestError(f"{run_path}: {rel} holds table {tables[f]!r}, expected {table!r}")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
    rows: dict[str, int] = {}
    con.begin()
    try:
        for stmt in sql.DELETE_RUN_ROWS.values():
            con.execute(stmt, [run_id])
        for table, files in rf.files.items():
            rows[table] = 0
            if files:
                try:
                    rows[table] = con.execute(sql.INSERT_FROM_PARQUET[table],
                                              [run_id, [str(f) for f in files]]).fetchone()[0]
                except duckdb.Error as e:
                    raise IngestError(f"{run_path}: cannot ingest the {table} shards: {_first_line(e)}") from e
            for f in files:
                st = f.stat()
                con.execute(sql.INSERT_FILE, [run_id, str(f.relative_to(run_path)), table, st.st_size,
                                              st.st_mtime_ns])
        for stmt in sql.AGG_FILL.values():
            con.execute(stmt, [run_id] * stmt.count("?"))
        cfg = rf.config.get("config") if isinstance(rf.config.get("config"), dict) else {}
        n_steps = con.execute(sql.COUNT_TRACED_STEPS, [run_id]).fetchone()[0]
        con.execute(sql.INSERT_RUN, [
            run_id, rf.config.get("kind"), rf.config.get("name"), rf.status, _name(cfg.get("model")),
            _name(cfg.get("dataset", cfg.get("task"))), _name(cfg.get("scheme")), rf.config.get("created_at"),
            (rf.manifest or {}).get("finished_at"), str(run_path), rf.config.get("schema_version"),
            rf.fingerprint, datetime.now(timezone.utc).isoformat(), n_steps, rows["tokens"],
            rows["token_modules"], rows["train_steps"], rows["eval"], json.dumps(rf.config, sort_keys=True),
            json.dumps(rf.manifest, sort_keys=True) if rf.manifest is not None else None])
        con.commit()
    except BaseException:
        con.rollback()
        raise
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
        con.begin()
        try:
            for stmt in sql.DELETE_RUN_ROWS.values():
                con.execute(stmt, [run_id])
            con.commit()
        except BaseException:
            con.rollback()
            raise
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
    try:
        con = connect(args.index)
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
