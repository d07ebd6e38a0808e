"""The token table (backend.index.token_table, the Tokens tab's table): every page, sorted and filtered, against
the same rows sorted and filtered by pandas from the run's Parquet shards; the deep-page paths (per-sample
counts, value brackets, ties, NULLs) forced on a small run; the app's /token_table endpoint.

    pytest tests/test_token_table.py
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from backend import index
from backend.dev.synth import SynthConfig, make_run, read_shards
from backend.index import token_table as tt
from tests.conftest import app_server

STEP = 10


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """An in-memory index of one synthetic run, with planted NULL shares and tied losses, and the same
    changes made to the shards' rows (the reference)."""
    root = tmp_path_factory.mktemp("tt")
    run = make_run(SynthConfig.tiny(n_samples=30, traced_steps=(5, STEP)), root / "runs", run_id="tt")
    con = index.connect(index.MEMORY)
    index.ingest_run(con, run)
    con.execute("UPDATE tokens SET share = NULL WHERE sample_idx % 3 = 0")
    con.execute("UPDATE tokens SET loss = 1.0 WHERE position % 4 = 0")
    ref = read_shards(run, "tokens")
    ref.loc[ref.sample_idx % 3 == 0, "share"] = np.nan
    ref.loc[ref.position % 4 == 0, "loss"] = np.float32(1.0)
    yield con, ref
    con.close()


def reference(ref: pd.DataFrame, q: tt.TableQuery) -> pd.DataFrame:
    """The query's rows in order, by pandas: filter, then a stable sort (metric with NULLs last, sample, position)."""
    df = ref[(ref.step == STEP) & ref.is_response]
    if q.categories:
        df = df[df.category.isin(q.categories)]
    for col, (lo, hi) in q.ranges.items():
        if lo is not None:
            df = df[df[col] >= np.float32(lo)]
        if hi is not None:
            df = df[df[col] <= np.float32(hi)]
    if q.text:
        df = df[df.token.str.lower().str.contains(q.text.lower(), regex=False)]
    df = df.sort_values(["sample_idx", "position"])
    if q.sort != "sample":
        df = df.sort_values(q.sort, ascending=not q.descending, na_position="last", kind="stable")
    return df


def all_pages(con, q: tt.TableQuery) -> tuple[pd.DataFrame, tt.TokenPage]:
    first = tt.token_page("tt", STEP, q, con)
    pages = [first.rows] + [tt.token_page("tt", STEP, tt.TableQuery(**{**q.__dict__, "page": i}), con).rows
                            for i in range(1, first.pages)]
    return pd.concat(pages, ignore_index=True), first


QUERIES = [
    tt.TableQuery(page_size=37),
    tt.TableQuery(sort="loss", page_size=41),                      # ties at 1.0
    tt.TableQuery(sort="loss", descending=True, page_size=41),
    tt.TableQuery(sort="alignment", descending=True, page_size=50),
    tt.TableQuery(sort="share", page_size=33),                     # NULLs last
    tt.TableQuery(sort="share", descending=True, page_size=33),
    tt.TableQuery(sort="weight", page_size=29),                    # every weight equal: one tie
    tt.TableQuery(sort="magnitude", categories=("number", "operator"), page_size=20),
    tt.TableQuery(sort="dot", ranges={"loss": (0.5, 2.0), "alignment": (None, 0.0)}, page_size=25),
    tt.TableQuery(text="E", page_size=10),                         # case-insensitive: " the", "Step", ...
]


@pytest.mark.parametrize("deep", [False, "head", True, "misled"],
                         ids=["direct", "head-then-deep", "deep-paths", "misled-estimate"])
@pytest.mark.parametrize("q", QUERIES, ids=lambda q: f"{q.sort}{'-desc' if q.descending else ''}")
def test_every_page_matches_pandas(indexed, monkeypatch, q, deep):
    con, ref = indexed
    if deep == "head":       # the first pages from the set's first 90 values, the rest by brackets and counts
        monkeypatch.setattr(tt, "SMALL_SET", 0)
        monkeypatch.setattr(tt, "DIRECT_ROWS", 0)
        monkeypatch.setattr(tt, "DIRECT_SORTED", 90)
        monkeypatch.setattr(tt, "_SAMPLE_PERCENT", 100)
        tt._cache.data.clear()
    if deep in (True, "misled"):    # every page by the per-sample counts / value brackets, from a sample of all values
        monkeypatch.setattr(tt, "SMALL_SET", 0)
        monkeypatch.setattr(tt, "DIRECT_ROWS", 0)
        monkeypatch.setattr(tt, "DIRECT_SORTED", 0)
        monkeypatch.setattr(tt, "_SAMPLE_PERCENT", 100)
        tt._cache.data.clear()
        if deep == "misled":      # a value sample shifted off the data: brackets miss, are widened, or give up
            monkeypatch.setattr(tt, "VALUE_SAMPLE", "SELECT {col} * 0.7 + 0.01 AS v, ({filters}) AS keep FROM tokens "
                                "TABLESAMPLE {pct}% (system, 7) WHERE run_id = ? AND step = ? AND is_response")
        plain = []          # top-N queries on the whole set: only the continuation past a tie may use one
        top = tt._top
        monkeypatch.setattr(tt, "_top", lambda cur, where, order, params, n, offset: (
            plain.append((where, offset)), top(cur, where, order, params, n, offset))[1])
    heads = []
    head = tt._head
    monkeypatch.setattr(tt, "_head", lambda cur, where, params, q_, key: (
        heads.append((q_.sort, q_.descending)), head(cur, where, params, q_, key))[1])
    want = reference(ref, q)
    got, first = all_pages(con, q)
    assert first.total == len(want) > 0
    assert first.pages == -(-len(want) // q.page_size)
    assert got[["sample_idx", "position"]].values.tolist() == want[["sample_idx", "position"]].values.tolist()
    for col in ("loss", "alignment", "share", "magnitude", "weight"):
        np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), rtol=1e-6, equal_nan=True)
    assert got.token.tolist() == want.token.tolist() and got.category.tolist() == want.category.tolist()
    if deep is True:
        assert all(offset == 0 and "IS NOT NULL" not in where for where, offset in plain), plain
    if deep in (False, "head") and q.sort != "sample":       # the first pages came from the set's first values
        assert heads and all(h == (q.sort, q.descending) for h in heads), heads


def test_context_is_the_tokens_around(indexed):
    con, ref = indexed
    rows = tt.token_page("tt", STEP, tt.TableQuery(sort="alignment", page_size=30), con).rows
    step = ref[ref.step == STEP]
    for r in rows.itertuples():
        seq = step[step.sample_idx == r.sample_idx].set_index("position").token
        assert r.context_before == "".join(seq.loc[r.position - tt.CONTEXT_BEFORE:r.position - 1])
        assert r.context_after == "".join(seq.loc[r.position + 1:r.position + tt.CONTEXT_AFTER])


def test_a_page_past_the_end_is_the_last_and_bad_input_is_named(indexed):
    con, _ = indexed
    p = tt.token_page("tt", STEP, tt.TableQuery(page=10_000, page_size=100), con)
    assert p.page == p.pages - 1 and 0 < len(p.rows) <= 100
    empty = tt.token_page("tt", STEP, tt.TableQuery(text="no such text"), con)
    assert empty.total == 0 and empty.rows.empty and empty.pages == 1
    for bad, why in [(dict(sort="token; DROP TABLE tokens"), "cannot sort.*allowed: sample, loss"),
                     (dict(ranges={"run_id": (0, 1)}), "cannot filter.*allowed: loss"),
                     (dict(ranges={"loss": (2.0, 1.0)}), "range is empty"),
                     (dict(page_size=0), "page_size"), (dict(page=-1), "page must be")]:
        with pytest.raises(ValueError, match=why):
            tt.TableQuery(**bad)
    with pytest.raises(ValueError, match="not a traced step.*5, 10"):
        tt.token_page("tt", 7, tt.TableQuery(), con)
    with pytest.raises(ValueError, match="not in the index"):
        tt.token_page("nope", STEP, tt.TableQuery(), con)


def test_user_text_is_bound_not_formatted(indexed):
    con, ref = indexed
    p = tt.token_page("tt", STEP, tt.TableQuery(text="') OR 1=1 --"), con)
    assert p.total == 0                        # a literal no token contains, not SQL


def test_api_token_table_first_page(data_home):
    shards = read_shards(data_home / "runs" / "synth-sft", "tokens")
    want = shards[(shards.step == STEP) & shards.is_response].sort_values(
        ["sample_idx", "position"]).sort_values("loss", ascending=False, kind="stable")
    with app_server(data_home) as (url, _):
        client = Client(url, verbose=False)
        html, page = client.predict("synth-sft", STEP, "loss", True, [], "", "(no range)", "", "", 25, 1,
                                    api_name="/token_table")
        rows = re.findall(r'<tr data-sample="(\d+)" data-pos="(\d+)">', html)
        assert page == 1 and f"{len(want):,} response tokens" in html
        assert [(int(s), int(p)) for s, p in rows] == list(zip(want.sample_idx[:25], want.position[:25]))
        html, page = client.predict("synth-sft", STEP, "sample", False, ["number"], "", "loss", "1.0", "", 25, 1,
                                    api_name="/token_table")
        n = int(((want.category == "number") & (want.loss >= 1.0)).sum())
        assert f'data-total="{n}"' in html
        with pytest.raises(AppError, match="range's min must be a number"):
            client.predict("synth-sft", STEP, "sample", False, [], "", "loss", "abc", "", 25, 1,
                           api_name="/token_table")
        # the Tokens tab with a bad range end: its figures still render, the table says what was wrong
        from tokviz.tabs import tokens
        values, _ = tokens.render("synth-sft", STEP, ["sample", False, [], "", "loss", "abc", "", 50, 1])
        assert "range&#x27;s min must be a number" in values[5] and len(values) == 7
