"""Read-only mode (a hosted Space, or TOKVIZ_READONLY=1): every view works, launching is refused unless the
owner's admin token is given.

    pytest tests/test_app_readonly.py
"""
from __future__ import annotations

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.conftest import app_server

TOKEN = "owner-s3cret"


@pytest.fixture(scope="module")
def server(data_home):
    with app_server(data_home, TOKVIZ_READONLY="1", TOKVIZ_ADMIN_TOKEN=TOKEN) as (url, ctx):
        yield url, ctx, Client(url, verbose=False)


def test_launching_is_refused_without_the_admin_token(server):
    _, ctx, client = server
    assert ctx.settings.readonly
    for token in ("", "wrong-token", TOKEN[:-1]):
        with pytest.raises(AppError, match="read-only"):
            client.predict("steps: 1\ntrace_every: 1", token, api_name="/launch")
    with pytest.raises(AppError, match="read-only"):
        client.predict("job1-x", "", api_name="/cancel_job")
    assert ctx.jobs.snapshot() == []
    # the owner's token passes the gate; this config is then refused for its own reason, so nothing runs
    with pytest.raises(AppError, match="lora_r=0"):
        client.predict("lora_r: 0", TOKEN, api_name="/launch")
    assert ctx.jobs.snapshot() == []


def test_views_still_work(server):
    _, _, client = server
    html = client.predict("synth-sft", 5, 0, "alignment", None, api_name="/next_sample")[1]
    assert 'class="tv-text"' in html
    msg, table, _ = client.predict("SELECT count(*) FROM runs", 5, api_name="/sql")
    assert table["data"] == [[2]]


def test_launch_button_is_disabled_without_an_admin_token(server, monkeypatch):
    from tokviz.context import AppContext
    from tokviz.ui import build_app
    monkeypatch.delenv("TOKVIZ_ADMIN_TOKEN")
    demo = build_app(AppContext.from_env())
    props = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"]}
    assert props["tv-launch"]["interactive"] is False
    assert props["tv-admin-token"]["visible"] is False
    assert "read-only" in props["tv-readonly"]["value"]


def test_publishing_from_the_app_needs_the_admin_token_and_stays_in_the_data_root(server, data_home):
    _, ctx, client = server
    for token in ("", "wrong-token"):
        out = client.predict(["synth-sft"], "t", "space1", False, False, False, token, api_name="/publish")
        assert "read-only: publishing is disabled" in out
    assert not (data_home / "spaces").exists()
    for bad in ("../outside", "a/b", ""):
        out = client.predict(["synth-sft"], "t", bad, False, False, False, TOKEN, api_name="/publish")
        assert "a name, not a path" in out
    out = client.predict([], "t", "space1", False, False, False, TOKEN, api_name="/publish")
    assert "choose at least one run" in out


@pytest.mark.slow          # the check starts the published app
def test_the_owner_publishes_two_runs_and_the_published_app_checks_out(server, data_home):
    _, _, client = server
    out = client.predict(["synth-sft", "synth-antiop"], "Two synthetic runs", "two", False, False, True, TOKEN,
                         api_name="/publish")
    assert "Check passed: the published app lists exactly these 2 runs" in out, out
    assert sorted(p.name for p in (data_home / "spaces" / "two" / "data" / "runs").iterdir()) == \
        ["synth-antiop", "synth-sft"]
