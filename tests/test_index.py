"""The DuckDB index: ingest, idempotence, rollback, status of unfinished runs, versions, lock, queries.

    pytest tests/test_index.py
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backend import index
from backend.dev.synth import SynthConfig, make_run, read_shards
from backend.index import queries, sql
from backend.store import schema
from backend.store.rundir import MANIFEST, RunDir
from tests.conftest import index_held_elsewhere, wait_for


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path))
    yield tmp_path
    index.close_shared()


@pytest.fixture()
def run_a(home) -> Path:
    return make_run(SynthConfig.tiny(world_size=2), home / "runs", run_id="run-a", name="alpha")


@pytest.fixture()
def run_b(home) -> Path:
    return make_run(SynthConfig.tiny(seed=1), home / "runs", run_id="run-b", name="beta")


def snapshot(con: duckdb.DuckDBPyConnection) -> dict:
    """Row counts and column sums of every data table, per run: equal snapshots mean equal contents."""
    out = {}
    for t, cols in (("tokens", "sum(alignment), sum(position), sum(resp_pos)"),
                    ("token_modules", "sum(dot), sum(layer)"), ("train_steps", "sum(loss)"),
                    ("eval", "sum(sample_idx)"), ("agg_layer_module", "sum(n), sum(layer)"),
                    ("agg_module_types", "sum(n)"), ("agg_lora_ab", "sum(n)")):
        # test-only SQL: table names from a fixed tuple
        out[t] = sorted(con.execute(f"SELECT run_id, count(*), {cols} FROM {t} GROUP BY run_id").fetchall())
    out["runs"] = sorted(con.execute("SELECT run_id, status, n_tokens, n_token_modules FROM runs").fetchall())
    return out


def test_ingest_counts_match_parquet(home, run_a):
    con = index.connect()
    res = index.ingest_run(con, run_a)
    assert res.action == "ingested" and res.status == "finished"
    for table in ("tokens", "token_modules", "train_steps", "eval"):
        n = len(read_shards(run_a, table))
        assert res.rows[table] == n
        assert con.execute(f"SELECT count(*) FROM {table} WHERE run_id = 'run-a'").fetchone()[0] == n
    # resp_pos: position minus the first response position of the (step, sample); NULL for prompt rows
    tok = read_shards(run_a, "tokens")
    first = tok[tok.is_response].groupby(["step", "sample_idx"]).position.min().rename("first")
    tok = tok.join(first, on=["step", "sample_idx"])
    expect = {(r.step, r.sample_idx, r.position): (r.position - r.first if r.is_response else None)
              for r in tok.itertuples()}
    got = {(s, i, p): rp for s, i, p, rp in con.execute(
        "SELECT step, sample_idx, position, resp_pos FROM tokens").fetchall()}
    assert got == expect
    info = queries.run_info("run-a", con).iloc[0]
    got = (info["model"], info["dataset"], info["scheme"], info["n_traced_steps"])
    assert got == ("synthetic/2L", "synthetic-math", "sft", 3)


def test_aggregates_cover_every_traced_step(home, run_a):
    """The per-step aggregates hold one row per (step, group) of the run's token_modules rows."""
    con = index.connect()
    index.ingest_run(con, run_a)
    mod = read_shards(run_a, "token_modules")
    got = con.execute("SELECT step, layer, module, n FROM agg_layer_module ORDER BY ALL").fetchall()
    sizes = mod.groupby(["step", "layer", "module"]).size()
    want = sorted((int(s), int(la), m, int(n)) for (s, la, m), n in sizes.items())
    assert got == want
    # every response token is counted once per layer in agg_lora_ab, and once in the 'all' row of each part
    tok = read_shards(run_a, "tokens")
    n_resp = tok[tok.is_response].groupby("step").size()
    for step, part, n in con.execute("SELECT step, part, n FROM agg_lora_ab WHERE layer = 'all'").fetchall():
        assert n == n_resp[step], (step, part)
    assert {r[0] for r in con.execute("SELECT DISTINCT step FROM agg_module_types").fetchall()} == set(n_resp.index)


def test_aggregates_leave_null_module_alignments_out(home):
    """A module piece below the tracer's threshold has a null alignment: means and opposing fractions are over
    the rows that have one (pandas skips NaN the same way), counts still over every row."""
    run = make_run(SynthConfig.tiny(), home / "runs", run_id="run-null")
    rng = np.random.default_rng(0)
    for f in sorted((run / "trace" / "token_modules").glob("*.parquet")):
        t = pq.read_table(f)
        a = t.column("alignment").to_numpy(zero_copy_only=False).copy()
        a[rng.random(len(a)) < 0.3] = np.nan
        t = t.set_column(t.schema.get_field_index("alignment"), "alignment", pa.array(a, pa.float32(),
                                                                                   from_pandas=True))
        pq.write_table(t, f)
    con = index.connect()
    index.ingest_run(con, run)
    mod, tok = read_shards(run, "token_modules"), read_shards(run, "tokens")
    assert mod["alignment"].isna().mean() > 0.2
    want = mod.groupby(["step", "layer", "module"]).agg(mean=("alignment", "mean"), n=("alignment", "size"))
    got = con.execute("SELECT step, layer, module, mean_alignment, n FROM agg_layer_module ORDER BY ALL").df()
    got = got.set_index(["step", "layer", "module"])
    np.testing.assert_allclose(got["mean_alignment"], want["mean"], rtol=1e-6)
    assert (got["n"] == want["n"]).all()
    resp = mod.merge(tok.loc[tok.is_response, ["step", "sample_idx", "position"]])
    resp = resp.assign(neg=np.where(resp["alignment"].isna(), np.nan, (resp["alignment"] < 0).astype(float)))
    want = resp.groupby(["step", "module", "part"]).agg(mean=("alignment", "mean"), neg=("neg", "mean"))
    got = con.execute("SELECT step, module, part, mean_alignment, frac_negative FROM agg_module_types "
                      "ORDER BY ALL").df().set_index(["step", "module", "part"])
    np.testing.assert_allclose(got["mean_alignment"], want["mean"], rtol=1e-6)
    np.testing.assert_allclose(got["frac_negative"], want["neg"], rtol=1e-12)


def test_ingest_refuses_two_modules_under_one_label(home):
    run = make_run(SynthConfig.tiny(), home / "runs", run_id="run-dup")
    f = sorted((run / "trace" / "token_modules").glob("*.parquet"))[0]
    t = pq.read_table(f)
    mod = t.column("module").to_pylist()
    other = sorted(set(mod))[1]
    t = t.set_column(t.schema.get_field_index("module"), t.schema.field("module"),
                     pa.array([sorted(set(mod))[0] if m == other else m for m in mod], t.schema.field("module").type))
    pq.write_table(t, f)
    con = index.connect()
    with pytest.raises(index.IngestError, match="share one"):
        index.ingest_run(con, run)
    assert con.execute("SELECT count(*) FROM token_modules WHERE run_id = 'run-dup'").fetchone()[0] == 0


def test_ingest_twice_equals_once(home, run_a, run_b):
    con = index.connect()
    first = index.ingest_all(con)
    assert [r.action for r in first] == ["ingested", "ingested"]
    once = snapshot(con)
    again = index.ingest_all(con)
    assert [r.action for r in again] == ["unchanged", "unchanged"]
    assert snapshot(con) == once
    forced = index.ingest_all(con, force=True)
    assert [r.action for r in forced] == ["ingested", "ingested"]
    assert snapshot(con) == once
    con.close()
    assert index.main(["--rebuild"]) == 0
    con = index.connect()
    assert snapshot(con) == once


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _corrupt_pages(f: Path) -> None:
    """Overwrite bytes in the data pages, keeping the footer intact (the file still opens)."""
    data = bytearray(f.read_bytes())
    n = len(data)
    data[n // 5: n // 5 + n // 3] = bytes(range(256)) * (n // 3 // 256) + bytes(n // 3 % 256)
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _corrupt_pages])
def test_failed_reingest_rolls_back_and_names_the_file(home, run_a, run_b, damage):
    con = index.connect()
    index.ingest_all(con)
    before = snapshot(con)
    shard = sorted((run_a / "trace" / "token_modules").glob("*.parquet"))[-1]
    damage(shard)
    with pytest.raises(index.IngestError) as e:
        index.ingest_run(con, run_a)
    assert shard.name in str(e.value)
    assert snapshot(con) == before           # run-a's old rows survived the failed delete + insert
    results = index.ingest_all(con)          # the CLI path: reported, the other run unaffected
    assert [r.action for r in results] == ["failed", "unchanged"] and shard.name in results[0].error
    assert snapshot(con) == before


def test_new_corrupt_run_leaves_index_as_it_was(home, run_b):
    con = index.connect()
    index.ingest_run(con, run_b)
    before = snapshot(con)
    bad = make_run(SynthConfig.tiny(), home / "runs", run_id="run-bad")
    _truncate(sorted((bad / "trace" / "tokens").glob("*.parquet"))[0])
    with pytest.raises(index.IngestError, match=r"step_000005\.rank0\.parquet"):
        index.ingest_run(con, bad)
    assert snapshot(con) == before
    assert index.main([]) == 1               # the CLI reports the failure in its exit code


def test_schema_version_mismatch_is_named(home, run_a):
    con = index.connect()
    shard = sorted((run_a / "trace" / "tokens").glob("*.parquet"))[0]
    t = pq.read_table(shard)
    meta = {**t.schema.metadata, schema.VERSION_KEY: b"99"}
    pq.write_table(t.replace_schema_metadata(meta), shard)
    msg = rf"{shard.name} has schema version 99.*reads version {schema.SCHEMA_VERSION}"
    with pytest.raises(index.IngestError, match=msg):
        index.ingest_run(con, run_a)
    pq.write_table(t.replace_schema_metadata({}), shard)
    with pytest.raises(index.IngestError, match="no tokviz.schema_version metadata"):
        index.ingest_run(con, run_a)
    cfg = json.loads((run_a / "config.json").read_text())
    (run_a / "config.json").write_text(json.dumps({**cfg, "schema_version": 0}))
    with pytest.raises(index.IngestError, match="config.json: schema_version 0"):
        index.ingest_run(con, run_a)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_copied_and_removed_runs(home, run_a, run_b):
    con = index.connect()
    index.ingest_all(con)
    copy = home / "elsewhere" / "run-a"
    shutil.copytree(run_a, copy)
    with pytest.raises(index.IngestError, match="run id 'run-a' is already indexed from"):
        index.ingest_run(con, copy)
    shutil.rmtree(run_b)
    results = index.ingest_all(con)
    assert [(r.run_id, r.action) for r in results] == [("run-b", "removed"), ("run-a", "unchanged")]
    assert queries.list_runs(con)["run_id"].tolist() == ["run-a"]
    assert con.execute("SELECT count(*) FROM token_modules WHERE run_id = 'run-b'").fetchone()[0] == 0


def test_run_without_manifest_ingests_complete_steps(home):
    run = make_run(SynthConfig.tiny(finished=False, world_size=2), home / "runs", run_id="live")
    assert not (run / MANIFEST).exists()
    (run / "trace" / "token_modules" / "step_000020.rank1.parquet").unlink()    # step 20 half written
    con = index.connect()
    res = index.ingest_run(con, run)
    assert res.status == "running"
    assert queries.traced_steps("live", con) == [5, 10]
    assert queries.list_runs(con).set_index("run_id").loc["live", "status"] == "running"
    RunDir(path=run, run_id="live").fail(RuntimeError("CUDA out of memory"))    # the job crashed
    assert index.ingest_run(con, run).status == "failed"


def _write_old_index(path: Path) -> None:
    """An index from before the meta table (version 0), with a tokens table of another layout."""
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE tokens (run_id VARCHAR, step INTEGER, score DOUBLE)")
    con.execute("INSERT INTO tokens VALUES ('ghost', 1, 0.5)")
    con.close()


def test_older_index_without_migration_is_rebuilt(home, run_a):
    _write_old_index(home / "tokviz.duckdb")
    with pytest.raises(index.IndexVersionError, match="version 0, older than"):
        index.connect(read_only=True)                        # never misread
    con = index.connect()                                    # rebuilt from the run directories
    assert con.execute(sql.GET_META, ["schema_version"]).fetchone()[0] == str(sql.INDEX_VERSION)
    assert queries.list_runs(con)["run_id"].tolist() == ["run-a"]
    assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == len(read_shards(run_a, "tokens"))


def test_older_index_is_migrated(home, run_a, monkeypatch):
    con = index.connect()
    index.ingest_run(con, run_a)
    before = snapshot(con)
    con.close()
    monkeypatch.setattr(sql, "INDEX_VERSION", sql.INDEX_VERSION + 1)
    monkeypatch.setitem(sql.MIGRATIONS, sql.INDEX_VERSION - 1, ("ALTER TABLE runs ADD COLUMN notes VARCHAR",))
    con = index.connect()
    assert con.execute(sql.GET_META, ["schema_version"]).fetchone()[0] == str(sql.INDEX_VERSION)
    assert "notes" in queries.run_info("run-a", con).columns
    assert snapshot(con) == before                           # migrated in place, nothing re-read


def test_newer_index_is_refused(home):
    con = index.connect()
    con.execute(sql.SET_META, ["schema_version", str(sql.INDEX_VERSION + 5)])
    con.close()
    with pytest.raises(index.IndexVersionError, match="newer than this tokviz reads"):
        index.connect()


def test_locked_index_is_reported(home, run_a, capsys):
    path = home / "tokviz.duckdb"
    index.connect(path).close()
    with index_held_elsewhere(path) as holder:
        with pytest.raises(index.IndexLockedError, match=f"in use by another process \\(pid {holder.pid}"):
            index.connect(path)
        assert index.main([]) == 2
        assert "The tokviz app holds it while it runs" in capsys.readouterr().err


def test_closing_the_shared_connection_waits_for_a_call_still_running(home, monkeypatch):
    """The app's shutdown (and every app test's teardown) closed the shared connection while a request the server
    was finishing still ran a query on one of its cursors: DuckDB refused ('connection is busy with another call').
    A query held open by a UDF: the close retries until it has returned, and the query's result is whole."""
    import threading
    import time

    from backend.index import db
    cur = db.shared()
    running, release, retried, done = (threading.Event() for _ in range(4))

    def hold() -> int:
        running.set()
        release.wait(60)
        return 7
    cur.create_function("hold", hold, [], "INTEGER")
    out: dict = {}

    def query():
        try:
            out["query"] = cur.execute("SELECT hold()").fetchall()
        except Exception as e:          # recorded: the assertions below say what went wrong
            out["query"] = e

    def close():
        try:
            index.close_shared()
        except Exception as e:
            out["close"] = e
        done.set()

    class Clock:                        # db's clock, with a signal when the close waits for the call
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(s: float) -> None:
            retried.set()
            time.sleep(s)
    monkeypatch.setattr(db, "time", Clock, raising=False)
    q = threading.Thread(target=query)
    q.start()
    assert running.wait(60)
    c = threading.Thread(target=close)
    c.start()
    wait_for(lambda: retried.is_set() or done.is_set(), 60, "the close to wait or end")
    release.set()
    c.join(60)
    q.join(60)
    assert "close" not in out, out
    assert retried.is_set() and out["query"] == [(7,)]
    assert not db.shared_path_held()


def test_index_cli_refuses_a_runs_folder_that_is_not_one(home, tmp_path, capsys):
    """--runs naming nothing ingested nothing and still made an index file; naming a file was a traceback."""
    f = tmp_path / "a-file"
    f.write_text("x")
    for bad in (tmp_path / "missing", f):
        assert index.main(["--runs", str(bad), "--index", str(tmp_path / "i.duckdb")]) == 2
        assert f"--runs {str(bad)!r} is not a folder of run directories" in capsys.readouterr().err
    assert not (tmp_path / "i.duckdb").exists()


# ------------------------------------------------------------------------------------------------ queries
def test_queries_return_what_the_shards_hold(home, run_a):
    con = index.connect()
    index.ingest_run(con, run_a)
    tok = read_shards(run_a, "tokens")
    mod = read_shards(run_a, "token_modules")
    steps = queries.run_steps("run-a", con)
    assert steps["step"].tolist() == [5, 10, 20]
    np.testing.assert_allclose(steps["share_sum"], 1.0, rtol=1e-4)      # position mode: shares sum to 1
    samples = queries.step_samples("run-a", 10, con)
    assert sorted(samples["sample_idx"]) == sorted(tok[tok.step == 10].sample_idx.unique())
    s = int(samples["sample_idx"].iloc[1])
    got = queries.sample_tokens("run-a", 10, s, con)
    want = tok[(tok.step == 10) & (tok.sample_idx == s)].sort_values("position")
    assert got["position"].tolist() == want["position"].tolist()
    assert got["token"].tolist() == want["token"].tolist()
    np.testing.assert_allclose(got["alignment"], want["alignment"], rtol=1e-6)
    pos = int(want["position"].iloc[-1])
    br = queries.token_breakdown("run-a", 10, s, pos, con)
    mw = mod[(mod.step == 10) & (mod.sample_idx == s) & (mod.position == pos)]
    assert len(br) == len(mw) == 2 * 7 * 2
    # the token's dot is the sum of its module dots (design: dot = sum_m <P_m, G_m>)
    assert br["dot"].sum() == pytest.approx(float(want["dot"].iloc[-1]), rel=1e-4)
    prof = queries.sample_layer_profile("run-a", 10, s, con)
    assert len(prof) == len(want) * 2
    sample_mod = mod[(mod.step == 10) & (mod.sample_idx == s)]
    assert prof["dot"].sum() == pytest.approx(float(sample_mod["dot"].sum()), rel=1e-4)
    hits = queries.search_samples("run-a", "STEP", con=con)                 # case-insensitive
    text = tok[tok.step == 5].sort_values(["sample_idx", "position"]).groupby("sample_idx").token.agg("".join)
    assert set(hits[hits.step == 5].sample_idx) == {i for i, t in text.items() if "step" in t.lower()}
    assert len(queries.train_steps("run-a", con)) == 20
    assert len(queries.eval_rows("run-a", con)) == 20


def test_queries_name_what_exists(home, run_a):
    con = index.connect()
    index.ingest_run(con, run_a)
    with pytest.raises(ValueError, match="run 'nope' is not in the index; indexed runs: run-a"):
        queries.run_steps("nope", con)
    with pytest.raises(ValueError, match="step 7 is not a traced step.*traced steps: 5, 10, 20"):
        queries.step_samples("run-a", 7, con)
    with pytest.raises(ValueError, match="has no sample 99999; samples:"):
        queries.sample_tokens("run-a", 5, 99999, con)
    with pytest.raises(ValueError, match="must not be empty"):
        queries.search_samples("run-a", "", con=con)


def test_console_is_read_only_and_sandboxed(home, run_a):
    con = index.connect()
    index.ingest_run(con, run_a)
    con.close()
    df = queries.console_query("SELECT module, count(*) AS n FROM token_modules GROUP BY module ORDER BY module")
    assert df["module"].tolist() == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    assert len(queries.console_query("SELECT * FROM tokens", limit=5)) == 5
    with pytest.raises(ValueError, match="exactly one SELECT statement; got DELETE"):
        queries.console_query("DELETE FROM tokens")
    with pytest.raises(ValueError, match="got SELECT, DROP"):
        queries.console_query("SELECT 1; DROP TABLE tokens")
    for query in ("SELECT * FROM read_csv('/etc/passwd')", f"SELECT * FROM read_parquet('{run_a}/eval/*.parquet')"):
        with pytest.raises(ValueError, match="disabled by configuration"):
            queries.console_query(query)
    # inside the app: the shared writer connection, locked down to the data root, rolled back
    assert len(queries.list_runs()) == 1
    assert queries.console_query("SELECT count(*) AS n FROM runs")["n"].tolist() == [1]
    with pytest.raises(ValueError, match="disabled by configuration"):
        queries.console_query("SELECT * FROM read_csv('/etc/passwd')")
    assert len(queries.list_runs()) == 1
