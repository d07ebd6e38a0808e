"""The DuckDB index file: the one connection factory, its schema (created, migrated, or refused), and
transactions.

    con = connect()                      # creates / migrates the index; IndexLockedError if another process has it
    cur = shared()                       # a cursor on this process's long-lived writer connection (the app's)
    with transaction(con):               # commit, or roll back and re-raise
        ...

DuckDB allows one writer process: the web app holds the index while it runs (``shared()``), and a CLI that
cannot take the lock says so (``IndexLockedError``). An index of an older schema version is migrated
(``sql.MIGRATIONS``) or rebuilt from the run directories; one of a newer version is refused, never misread.
The tables of every registered job kind (backend.jobs.registry) are created when missing.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import duckdb

from backend.index import sql
from backend.jobs import registry
from backend.store import paths, schema

MEMORY = ":memory:"


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
    connection, which also serves the SQL console). A locked-down or read-only connection's settings are then
    locked (``lock_configuration``): no later SET or PRAGMA can widen them. ``threads``: DuckDB worker
    threads (default: one per core); 1 gives steadier interactive latency on a machine whose cores are busy
    with other work.
    Raises IndexLockedError if another process holds it.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    target = MEMORY if str(path) == MEMORY else str(Path(path) if path is not None else paths.index_path())
    if target != MEMORY:
        if read_only and not Path(target).exists():
            raise ValueError(f"no index at {target}: build it with `python -m backend index`")
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    # a read-only connection is locked down at open, unless it gets allowed directories: those can only be
    # set on a running database, before external access is disabled (just below, before any query)
    config = {"enable_external_access": False} if read_only and allowed_dirs is None else {}
    try:
        con = duckdb.connect(target, read_only=read_only, config=config)
    except duckdb.ConnectionException as e:
        raise TokvizIndexError(f"cannot open {target}: {first_line(e)} (this process already has it open "
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
        if allowed_dirs is not None or read_only:
            con.execute(sql.SET_LOCK_CONFIGURATION)
    except BaseException:
        con.close()          # never keep the file locked behind an error
        raise
    return con


def _lock_holder(message: str) -> str:
    m = re.search(r"held in (.+?) \(PID (\d+)\)", message)
    return f"pid {m.group(2)}, {m.group(1)}" if m else message


_shared: dict[str, duckdb.DuckDBPyConnection] = {}
_shared_lock = threading.Lock()
_generation = [0]          # bumped after every committed write of this process and when a shared connection opens
_generation_lock = threading.Lock()


def generation() -> int:
    """A number that changes whenever what this process reads from the index may have changed: after every
    committed ``transaction`` (ingest, prune, rebuild, migration) and whenever a shared connection is opened or
    closed. DuckDB lets one process write the index file, so in the process that holds it (the app) a read
    made at one generation stays true until the number moves (``backend.index.memo`` keys on it)."""
    return _generation[0]


def _bump() -> None:
    with _generation_lock:
        _generation[0] += 1


def shared(path: str | Path | None = None) -> duckdb.DuckDBPyConnection:
    """A cursor on this process's long-lived writer connection (the app's), opened on first use.

    The connection is locked down to the runs folder (ingest reads the runs' Parquet files; the SQL console,
    which runs on it in read-only transactions, can read no job log, upload or other file) and uses
    half the cores, leaving the rest to the jobs the app launches (on a busy 2-core machine one DuckDB thread
    halves the inspector's tail latency); each call returns a new cursor, which is what DuckDB needs for
    use from several threads.
    """
    key = str(Path(path) if path is not None else paths.index_path())
    with _shared_lock:
        if key not in _shared:
            _shared[key] = connect(key, allowed_dirs=[paths.runs_dir()], threads=max(1, (os.cpu_count() or 2) // 2))
            _bump()
        return _shared[key].cursor()


def shared_path_held(path: str | Path | None = None) -> bool:
    """Whether this process holds the writer connection on ``path`` (see ``shared``)."""
    return str(Path(path) if path is not None else paths.index_path()) in _shared


CLOSE_WAIT_S = 60.0       # close_shared: how long a call still running on a cursor may hold its connection open


def close_shared() -> None:
    """Close the shared connections (app shutdown, tests). DuckDB refuses to close a connection while one of its
    cursors is running a call (a request the server was still finishing when it stopped): the close is retried
    until that call has returned, for up to ``CLOSE_WAIT_S``."""
    with _shared_lock:
        for con in _shared.values():
            deadline = time.monotonic() + CLOSE_WAIT_S
            while True:
                try:
                    con.close()
                    break
                except duckdb.ResourceInUseException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)           # polls the call's end; the deadline bounds a call that never ends
        _shared.clear()
        _bump()


# ------------------------------------------------------------------------------------------------ schema
def _ensure_schema(con: duckdb.DuckDBPyConnection, target: str, read_only: bool) -> None:
    tables = {r[0] for r in con.execute(sql.LIST_TABLES).fetchall()}
    if not tables:
        if read_only:
            raise IndexVersionError(f"{target} is not a tokviz index (it has no tables)")
        create_tables(con)
        return
    version = _version(con, tables)
    if version == sql.INDEX_VERSION:
        if not read_only:
            with transaction(con):
                ensure_kind_tables(con)
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
        from backend.index.ingest import rebuild  # ingest builds on this module
        rebuild(con)


def _version(con: duckdb.DuckDBPyConnection, tables: set[str]) -> int:
    """The index's schema version; 0 for an index older than the meta table."""
    if "meta" not in tables:
        return 0
    row = con.execute(sql.GET_META, ["schema_version"]).fetchone()
    return int(row[0]) if row else 0


def ensure_kind_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the tables of every registered job kind that the index lacks, and their runs count columns
    (a kind added since the index was built)."""
    for t in registry.tables().values():
        con.execute(sql.create_table(t))
        con.execute(sql.add_count_column(t.name))
    for d in registry.derived_tables().values():
        con.execute(d.create)


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    with transaction(con):
        for stmt in sql.CREATE_BASE:
            con.execute(stmt)
        ensure_kind_tables(con)
        con.execute(sql.SET_META, ["schema_version", str(sql.INDEX_VERSION)])
        con.execute(sql.SET_META, ["parquet_schema_version", str(schema.SCHEMA_VERSION)])


def _migrate(con: duckdb.DuckDBPyConnection, version: int) -> None:
    """Apply sql.MIGRATIONS from ``version`` up to the current one, all in one transaction."""
    with transaction(con):
        for v in range(version, sql.INDEX_VERSION):
            for stmt in sql.MIGRATIONS[v]:
                con.execute(stmt)
        con.execute(sql.SET_META, ["schema_version", str(sql.INDEX_VERSION)])


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """``con`` inside one transaction: committed when the block ends, rolled back (and the error re-raised)
    when it raises, whatever it raises."""
    con.begin()
    try:
        yield con
    except BaseException:
        con.rollback()
        raise
    con.commit()
    _bump()


def drop_all(con: duckdb.DuckDBPyConnection) -> None:
    """Drop every table of the index (a rebuild starts from nothing), in one transaction."""
    with transaction(con):
        for (t,) in con.execute(sql.LIST_TABLES).fetchall():
            con.execute(sql.drop_table(t))


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
