"""Read the index: every function returns a pandas DataFrame. The only way ``tokviz/`` reads data.

    from backend.index import queries
    runs = queries.list_runs()                                  # the app's shared connection by default
    toks = queries.sample_tokens(run_id, step=20, sample_idx=3)
    mods = queries.token_breakdown(run_id, 20, 3, position=57)  # one token's (layer, module, part) rows
    df = queries.console_query("SELECT module, avg(alignment) FROM token_modules GROUP BY 1")

Each function takes an optional ``con`` (a DuckDB connection from ``backend.index.connect``); without it, a
cursor on this process's shared connection (``backend.index.shared``) is used. A run, step or sample that is
not in the index raises ValueError naming what exists.
"""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import pandas as pd

from backend import index
from backend.index import sql
from backend.store import paths

CONSOLE_MAX_ROWS = 10_000
_LIST_MAX = 20    # names listed in an error message


@contextmanager
def cursor(con: duckdb.DuckDBPyConnection | None) -> Iterator[duckdb.DuckDBPyConnection]:
    """``con`` itself, or (None) a cursor on the shared connection, closed on exit."""
    if con is not None:
        yield con
        return
    cur = index.shared()
    try:
        yield cur
    finally:
        cur.close()


def _df(con: duckdb.DuckDBPyConnection | None, query: str, params: Sequence[object] = ()) -> pd.DataFrame:
    with cursor(con) as cur:
        return cur.execute(query, list(params)).df()


def _some(values: Sequence[object]) -> str:
    head = ", ".join(str(v) for v in values[:_LIST_MAX])
    return head + (f", ... ({len(values)} in all)" if len(values) > _LIST_MAX else "") if values else "none"


def require_run(run_id: str, con: duckdb.DuckDBPyConnection | None = None) -> None:
    """Raise ValueError, listing the indexed runs, unless ``run_id`` is in the index."""
    with cursor(con) as cur:
        ids = [r[0] for r in cur.execute(sql.RUN_IDS).fetchall()]
    if run_id not in ids:
        raise ValueError(f"run {run_id!r} is not in the index; indexed runs: {_some(ids)}")


def traced_steps(run_id: str, con: duckdb.DuckDBPyConnection | None = None) -> list[int]:
    """The traced steps of a run, ascending (ValueError for an unknown run)."""
    require_run(run_id, con)
    with cursor(con) as cur:
        return [int(r[0]) for r in cur.execute(sql.TRACED_STEPS, [run_id]).fetchall()]


def require_step(run_id: str, step: int, con: duckdb.DuckDBPyConnection | None = None) -> None:
    """Raise ValueError, listing the traced steps, unless ``step`` is one of them."""
    steps = traced_steps(run_id, con)
    if step not in steps:
        raise ValueError(f"step {step} is not a traced step of run {run_id!r}; traced steps: {_some(steps)}")


def list_runs(con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """One row per indexed run: id, name, kind, status (finished/running/failed), model, dataset, scheme,
    times, row counts and the run directory, newest first."""
    return _df(con, sql.LIST_RUNS)


def run_info(run_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """The run's ``runs`` row, with its config and manifest as JSON text."""
    df = _df(con, sql.RUN_INFO, [run_id])
    if df.empty:
        require_run(run_id, con)
    return df


def run_kind(run_id: str, con: duckdb.DuckDBPyConnection | None = None) -> str:
    """The job kind of an indexed run (``runs.kind``); ValueError listing the indexed runs otherwise."""
    with cursor(con) as cur:
        row = cur.execute(sql.RUN_KIND, [run_id]).fetchone()
    if row is None:
        require_run(run_id, con)
    return row[0]


def run_steps(run_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """Per traced step: samples, tokens, response tokens, mean response alignment and loss, sum of shares."""
    df = _df(con, sql.RUN_STEPS, [run_id])
    if df.empty:
        require_run(run_id, con)
    return df


def step_samples(run_id: str, step: int, con: duckdb.DuckDBPyConnection | None = None,
                 preview_chars: int = 120) -> pd.DataFrame:
    """Per sample of a traced step: token counts, mean alignment, opposing fraction, loss, text preview."""
    df = _df(con, sql.STEP_SAMPLES, [preview_chars, run_id, step])
    if df.empty:
        require_step(run_id, step, con)
    return df


def _require_sample(run_id: str, step: int, sample_idx: int, con: duckdb.DuckDBPyConnection | None) -> None:
    require_step(run_id, step, con)
    samples = step_samples(run_id, step, con, preview_chars=0)["sample_idx"].tolist()
    if sample_idx not in samples:
        raise ValueError(f"step {step} of run {run_id!r} has no sample {sample_idx}; samples: {_some(samples)}")


def sample_tokens(run_id: str, step: int, sample_idx: int,
                  con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """Every token record of one sample at one traced step, by position (prompt and response), with its
    ``influence`` and ``influence_alignment`` (null when the run recorded none)."""
    df = _df(con, sql.SAMPLE_TOKENS, [run_id, step, sample_idx] * 2)
    if df.empty:
        _require_sample(run_id, step, sample_idx, con)
    return df


def token_breakdown(run_id: str, step: int, sample_idx: int, position: int,
                    con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """One token's module rows: (layer, module, part, alignment, dot, magnitude). Empty if the trace has
    no module rows for that token; ValueError if the sample is unknown."""
    df = _df(con, sql.TOKEN_BREAKDOWN, [run_id, step, sample_idx, position])
    if df.empty:
        _require_sample(run_id, step, sample_idx, con)
    return df


def module_names(run_id: str, step: int, con: duckdb.DuckDBPyConnection | None = None) -> list[str]:
    """The module types (q_proj, ..., down_proj) with rows at one traced step, sorted; empty if the trace has
    no module rows there. ValueError for a run or step that is not in the index."""
    with cursor(con) as cur:
        names = [str(r[0]) for r in cur.execute(sql.MODULE_NAMES, [run_id, step]).fetchall()]
    if not names:
        require_step(run_id, step, con)
    return names


def sample_layer_profile(run_id: str, step: int, sample_idx: int,
                         con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """Per (position, layer) of one sample: the layer's dot (summed over modules and parts), the norm of the
    layer's piece and the mean module alignment: the data of a layer x token heatmap."""
    df = _df(con, sql.SAMPLE_LAYER_PROFILE, [run_id, step, sample_idx])
    if df.empty:
        _require_sample(run_id, step, sample_idx, con)
    return df


def step_token_stats(run_id: str, step: int, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """Every token of one traced step, all traced sequences: sample_idx, position, is_response, loss,
    entropy (what a token-weighting scheme's batch statistics are taken over)."""
    df = _df(con, sql.STEP_TOKEN_STATS, [run_id, step])
    if df.empty:
        require_step(run_id, step, con)
    return df


def search_samples(run_id: str, text: str, step: int | None = None, limit: int = 50,
                   con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """Samples whose decoded text contains ``text`` (case-insensitive), at one step or all traced steps."""
    if not text:
        raise ValueError("search text must not be empty")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    require_run(run_id, con)
    if step is not None:
        require_step(run_id, step, con)
    return _df(con, sql.SEARCH_SAMPLES, [run_id, step, step, text, limit])


def train_steps(run_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """The run's optimizer steps: loss, ce_loss, lr, grad_norm, tokens, throughput, elapsed time."""
    df = _df(con, sql.TRAIN_STEPS, [run_id])
    if df.empty:
        require_run(run_id, con)
    return df


def eval_rows(run_id: str, con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """The run's per-sample evaluation predictions (empty if it has none)."""
    require_run(run_id, con)
    return _df(con, sql.EVAL_ROWS, [run_id])


def index_columns() -> pd.DataFrame:
    """The index's tables and their columns: (table_name, column_name, data_type), by table then column
    order, read through the console's read-only connection (``console_query``)."""
    return console_query(sql.INDEX_COLUMNS, limit=CONSOLE_MAX_ROWS)


# table functions the console may call when it reads no files: they compute rows or describe the index
_CONSOLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "json_each", "json_tree"})
_CONSOLE_FUNCTION_PREFIXES = ("duckdb_", "pragma_")


def console_query(query: str, path: str | Path | None = None, limit: int = 1000,
                  timeout_s: float = 10.0, *, run_files: bool = False) -> pd.DataFrame:
    """Run one user-written SELECT against the index, read-only, returning at most ``limit`` rows.

    The statement runs in a read-only transaction (``BEGIN TRANSACTION READ ONLY``): the engine refuses any
    write in it, wherever it sits (a ``DELETE ... RETURNING`` inside a CTE, ``nextval``), and a reader never
    conflicts with the app's ingest. Where this process is the app that holds the index (``index.shared``),
    that connection's cursor is used (DuckDB opens a file once per process); else the index is opened
    read-only. Either connection has its configuration locked (no SET or PRAGMA can widen what it reads).

    Files: with ``run_files`` (the app in normal mode) the console may read files below the runs folder only
    (the runs' Parquet shards; the engine refuses job logs, uploads and anything else). Without it (the
    default; a read-only app) it reads no file at all: a table function other than ``range``,
    ``generate_series``, ``unnest``, ``json_each``/``json_tree`` and the ``duckdb_*``/``pragma_*`` catalog
    functions, or a table named like a file (``FROM 'x.parquet'``), is refused before anything runs.
    A query running past ``timeout_s`` is interrupted.
    """
    if not 1 <= limit <= CONSOLE_MAX_ROWS:
        raise ValueError(f"limit must be in [1, {CONSOLE_MAX_ROWS}], got {limit}")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise ValueError(f"the SQL does not parse: {e}") from e
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(s.type.name for s in statements) or "nothing"
        raise ValueError(f"the SQL console runs exactly one SELECT statement; got {kinds}")
    held = index.shared_path_held(path)
    if held:
        con = index.shared(path)
    else:
        con = index.connect(path, read_only=True, allowed_dirs=[paths.runs_dir()] if run_files else None)
    timer = threading.Timer(timeout_s, con.interrupt)
    timer.start()
    try:
        con.execute(sql.BEGIN_READ_ONLY).fetchall()
        try:
            if not run_files:
                _refuse_file_reads(con, statements[0].query)
            return con.sql(statements[0].query).limit(limit).df()
        except duckdb.InterruptException as e:
            raise ValueError(f"the query ran past {timeout_s:g} s and was stopped") from e
        except duckdb.Error as e:
            raise ValueError(f"the query failed: {str(e).strip()}") from e
        finally:
            con.rollback()
    finally:
        timer.cancel()
        con.close()


def _refuse_file_reads(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """ValueError if the SELECT ``query`` names a table function that is not a console one, or a table named
    like a file (a replacement scan: ``FROM 'runs/x.parquet'``); read from DuckDB's own parse tree, so a
    function in a subquery, a CTE or a join is found wherever it is. ``query()``/``query_table()`` (a query
    in a string) are refused with the rest."""
    tree = json.loads(con.execute(sql.SERIALIZE_SQL, [query]).fetchall()[0][0])
    if tree.get("error"):
        raise ValueError(f"the SQL does not parse: {tree.get('error_message', tree)}")
    for node in _nodes(tree):
        kind = node.get("type")
        if kind == "TABLE_FUNCTION":
            name = str(node.get("function", {}).get("function_name", "")).lower()
            if name not in _CONSOLE_FUNCTIONS and not name.startswith(_CONSOLE_FUNCTION_PREFIXES):
                raise ValueError(f"the SQL console cannot call {name}(): file access is disabled by configuration "
                                 "in read-only mode; query the index's tables (runs, tokens, ...)")
        elif kind == "BASE_TABLE" and any(c in str(node.get("table_name", "")) for c in "./\\:"):
            raise ValueError(f"the SQL console cannot read {node['table_name']!r}: file access is disabled by "
                             "configuration in read-only mode; query the index's tables (runs, tokens, ...)")


def _nodes(obj: object) -> Iterator[dict]:
    """Every JSON object in a parse tree, depth first."""
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from _nodes(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _nodes(v)
