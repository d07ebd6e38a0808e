"""The SQL tab lists the index's tables and their columns (name, type), read through the console's read-only
connection (the empty result grid, a "1 2 3" placeholder, stays hidden until a query runs): checked in the
running app's page config against the tables' Arrow schemas (backend.store.schema) and DuckDB's own DESCRIBE.

    pytest tests/test_sql_tables.py
"""
from __future__ import annotations

import json
import re
import urllib.request

from backend import index
from backend.store import schema
from tests.conftest import app_server


def component(config: dict, elem_id: str) -> dict:
    return next(c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def test_sql_tab_lists_every_table_with_its_columns(data_home):
    with app_server(data_home) as (url, _):
        config = json.loads(urllib.request.urlopen(url + "config", timeout=30).read())
        listing = component(config, "tv-sql-tables")["value"]
        result = component(config, "tv-sql-result")
        cur = index.shared()
        try:
            described = {t: cur.execute(f"DESCRIBE {t}").fetchall() for t in ("tokens", "runs", "train_steps")}
        finally:
            cur.close()
    tables = dict(re.findall(r'data-table="([^"]+)"><b>[^<]+</b> \((.*?)\)</div>', listing))
    assert {"runs", "tokens", "token_modules", "train_steps", "eval"} <= set(tables)
    for s in (schema.TOKENS, schema.TOKEN_MODULES, schema.TRAIN_STEPS):
        name = s.metadata[schema.TABLE_KEY].decode()
        cols = re.findall(r'<span class="col">([^<]+)</span> <i>([^<]+)</i>', tables[name])
        assert [c for c, _ in cols][:len(s.names)] == s.names          # the Parquet contract's columns, in order
    for name, rows in described.items():                                # names and types as DuckDB describes them
        cols = re.findall(r'<span class="col">([^<]+)</span> <i>([^<]+)</i>', tables[name])
        assert cols == [(r[0], r[1]) for r in rows]
    assert result["visible"] is False          # no empty placeholder grid before a query has run
