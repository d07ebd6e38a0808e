"""The SQL console of a hosted app: no write gets through in any position, and it reads only the files its mode
allows (none on a read-only app; the runs folder otherwise, never a job log or an upload), whether the console
opens the index itself or runs on the app's writer connection.

    pytest tests/test_security.py
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from backend import index
from backend.dev.synth import SynthConfig, make_run
from backend.index import queries
from tests.conftest import app_server, make_home

SECRET = "python -m backend train --token s3cret-in-a-command-line"


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A data root with one indexed run, a job log and an uploaded dataset (neither is the console's to read)."""
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path))
    make_run(SynthConfig.tiny(), tmp_path / "runs", run_id="run-a", name="alpha")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "job1-run-a.log").write_text(f"$ {SECRET}\n")
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "data-0123.jsonl").write_text('{"prompt": "private", "response": "data"}\n')
    con = index.connect()
    index.ingest_run(con, tmp_path / "runs" / "run-a")
    con.close()
    yield tmp_path
    index.close_shared()


def _runs(held: bool) -> list[tuple]:
    query = "SELECT run_id, name, status FROM runs ORDER BY run_id"
    if held:
        cur = index.shared()
        try:
            return cur.execute(query).fetchall()
        finally:
            cur.close()
    con = index.connect(read_only=True)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


WRITES = [
    "WITH x AS (DELETE FROM runs RETURNING *) SELECT * FROM x",
    "WITH x AS (UPDATE runs SET name = 'owned' RETURNING *) SELECT * FROM x",
    "WITH x AS (INSERT INTO runs (run_id, kind) VALUES ('evil', 'train') RETURNING *) SELECT * FROM x",
    "WITH x AS (DELETE FROM tokens RETURNING run_id) SELECT count(*) AS n FROM x",
]


@pytest.mark.parametrize("held", [False, True], ids=["console-opens-the-index", "app-holds-the-index"])
def test_writes_inside_a_select_are_refused_by_the_engine(home, held):
    if held:
        index.shared()                      # this process is the app: the console uses its connection
    before = _runs(held)
    assert [r[0] for r in before] == ["run-a"]
    n_tokens = queries.console_query("SELECT count(*) AS n FROM tokens")["n"].tolist()
    for query in WRITES:
        with pytest.raises(ValueError, match="read-only"):
            queries.console_query(query)
    assert _runs(held) == before
    assert queries.console_query("SELECT count(*) AS n FROM tokens")["n"].tolist() == n_tokens
    assert index.shared_path_held() == held


def test_the_apps_connection_settings_are_locked(home):
    cur = index.shared()
    try:
        for stmt in ("SET enable_external_access = true", "SET threads = 1", "PRAGMA threads = 1"):
            with pytest.raises(Exception, match="locked|Cannot change"):
                cur.execute(stmt)
    finally:
        cur.close()


def _files(home: Path) -> dict[str, Path]:
    shard = min((home / "runs" / "run-a").rglob("*.parquet"))
    return {"shard": shard, "log": home / "jobs" / "job1-run-a.log", "upload": home / "uploads" / "data-0123.jsonl"}


@pytest.mark.parametrize("held", [False, True], ids=["console-opens-the-index", "app-holds-the-index"])
def test_a_read_only_app_reads_no_file(home, held):
    if held:
        index.shared()
    f = _files(home)
    for query in (f"SELECT * FROM read_parquet('{f['shard']}')", f"SELECT * FROM '{f['shard']}'",
                  f"SELECT count(*) FROM read_blob('{f['shard']}')",
                  f"SELECT * FROM glob('{home}/runs/**')",
                  f"SELECT * FROM tokens WHERE run_id IN (SELECT content FROM read_text('{f['log']}'))",
                  f"WITH t AS (SELECT * FROM read_csv('{f['upload']}')) SELECT * FROM t",
                  f"SELECT * FROM query('SELECT * FROM read_text(''{f['log']}'')')",
                  f"SELECT * FROM read_json('{f['upload']}')"):
        with pytest.raises(ValueError, match="disabled by configuration"):
            queries.console_query(query)
    # what it may do: the index's tables and the catalog
    assert queries.console_query("SELECT count(*) AS n FROM runs")["n"].tolist() == [1]
    assert "runs" in queries.console_query("SELECT table_name FROM information_schema.tables")["table_name"].tolist()
    assert queries.console_query("SELECT sum(range) AS s FROM range(5)")["s"].tolist() == [10]


@pytest.mark.parametrize("held", [False, True], ids=["console-opens-the-index", "app-holds-the-index"])
def test_an_app_in_normal_mode_reads_only_the_runs_files(home, held):
    if held:
        index.shared()
    f = _files(home)
    df = queries.console_query(f"SELECT count(*) AS n FROM read_parquet('{f['shard']}')", run_files=True)
    assert df["n"].tolist() == [pq.read_metadata(f["shard"]).num_rows]     # the shard itself, read by pyarrow
    for query in (f"SELECT * FROM read_text('{f['log']}')", f"SELECT * FROM read_csv('{f['upload']}')",
                  f"SELECT * FROM read_text('{home}/runs/../jobs/{f['log'].name}')",
                  f"SELECT * FROM glob('{home}/*')", f"SELECT * FROM read_blob('{home}/uploads/*')",
                  "SELECT * FROM read_csv('/etc/passwd')"):
        with pytest.raises(ValueError, match="disabled by configuration") as e:
            queries.console_query(query, run_files=True)
        assert SECRET not in str(e.value)


def test_a_read_only_apps_sql_endpoint_reads_no_file(tmp_path):
    """The tab passes the app's mode on: a hosted Space's /sql endpoint (public) reads the index, no file."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    home = make_home(tmp_path, xss=False)
    shard = min((home / "runs" / "synth-sft" / "trace").rglob("*.parquet"))
    with app_server(home, TOKVIZ_READONLY="1") as (url, ctx):
        assert ctx.settings.readonly
        client = Client(url, verbose=False)
        _, table, _ = client.predict("SELECT count(*) AS n FROM runs", 10, api_name="/sql")
        assert table["data"] == [[2]]
        for query in (f"SELECT count(*) FROM read_parquet('{shard}')", f"SELECT * FROM glob('{home}/**')"):
            with pytest.raises(AppError, match="disabled by configuration"):
                client.predict(query, 10, api_name="/sql")
        with pytest.raises(AppError, match="read-only"):
            client.predict("WITH x AS (DELETE FROM runs RETURNING *) SELECT * FROM x", 10, api_name="/sql")
