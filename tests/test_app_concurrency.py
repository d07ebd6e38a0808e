"""The app's events run in the concurrency groups of ``tokviz.concurrency``: every event names its group and
limit (so an edit cannot silently fall back to Gradio's default of one running event per function), and, on
the running app, a held SQL console query or a held Inspect render does not hold back another session's
Inspect render. Nothing here is timed: the held calls wait on events the test sets.

    pytest tests/test_app_concurrency.py
"""
from __future__ import annotations

import threading

import pytest
from gradio_client import Client

from backend.index import memo, queries
from tests.conftest import app_server, wait_for
from tokviz import concurrency
from tokviz.context import AppContext
from tokviz.ui import build_app

# the public endpoints and the group each must run in
EXPECTED = {
    **{name: "render" for name in ("inspect_sample", "inspect_token", "previous_sample", "next_sample",
                                   "recolour", "search_samples", "concentration", "layer_position_heatmap",
                                   "layer_module_contribution", "compare_runs")},
    "sql": "sql", "launch": "jobs", "cancel_job": "jobs", "refresh_runs": "ingest",
}
HOLD_S = 60.0        # a held call gives up after this (a test that fails must not hang)


@pytest.fixture(scope="module")
def server(data_home):
    with app_server(data_home) as (url, ctx):
        yield url, ctx


@pytest.fixture(scope="module")
def fns(server):
    """The event functions of an app built on the server's data root (TOKVIZ_HOME is still set by it)."""
    return list(build_app(AppContext.from_env()).fns.values())


def test_public_endpoints_run_in_their_groups(fns):
    by_api = {f.api_name: f for f in fns if f.api_name}
    assert set(EXPECTED) <= set(by_api), f"endpoints missing: {set(EXPECTED) - set(by_api)}"
    for name, group in EXPECTED.items():
        f = by_api[name]
        assert (f.concurrency_id, f.concurrency_limit) == (group, concurrency.GROUPS[group]), name


def test_every_event_names_a_group_and_its_limit(fns):
    backend = [f for f in fns if f.fn is not None]
    assert len(backend) > 20
    for f in backend:
        # Gradio's default id is the function's id() and its default limit "default" (1 unless set)
        assert f.concurrency_id in concurrency.GROUPS, (f.name, f.api_name, f.concurrency_id)
        assert f.concurrency_limit == concurrency.GROUPS[f.concurrency_id], (f.name, f.api_name)
    # the private renders (tab switches, run and step, the deep link, a search result) share the render group
    names = {f.fn.__name__: f.concurrency_id for f in backend}
    for name in ("opened", "on_run", "on_step", "on_load", "open_result", "open_token"):
        assert names[name] == "render", name
    assert names["poll"] == "poll"


def test_group_limits():
    assert concurrency.RENDER_LIMIT >= 2 and concurrency.RENDER_LIMIT == 2 * concurrency.CORES
    assert concurrency.GROUPS["jobs"] == 1 and concurrency.GROUPS["ingest"] == 1
    assert concurrency.GROUPS["sql"] >= 1 and concurrency.GROUPS["ui"] is None


class Gate:
    """Wraps a function so that a call whose arguments ``match`` waits at the gate until ``release``."""

    def __init__(self, fn, match) -> None:
        self.fn, self.match = fn, match
        self.entered, self.released = threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        if self.match(*args, **kwargs):
            self.entered.set()
            if not self.released.wait(HOLD_S):
                raise RuntimeError(f"the test did not release the gate within {HOLD_S:g} s")
        return self.fn(*args, **kwargs)


def inspect_args(sample: int) -> tuple:
    return ("synth-sft", 10, sample, "alignment", None)


def samples_of(client: Client) -> list[int]:
    _, table, _ = client.predict("SELECT DISTINCT sample_idx FROM tokens WHERE run_id = 'synth-sft' AND step = 10 "
                                 "ORDER BY 1", 100, api_name="/sql")
    return [int(r[0]) for r in table["data"]]


def held_while(gate: Gate, held_job, other_call) -> object:
    """``other_call()`` (in a thread) finishes while ``held_job`` waits at ``gate``; then the gate opens."""
    try:
        wait_for(gate.entered.is_set, HOLD_S, "the held call to reach the gate")
        done: dict = {}

        def call() -> None:
            try:
                done["out"] = other_call()
            except Exception as e:  # noqa: BLE001 - handed to the test thread, which raises it
                done["error"] = e

        threading.Thread(target=call, daemon=True).start()
        wait_for(lambda: done, HOLD_S, "the other call to finish while the first one is held")
        if "error" in done:
            raise done["error"]
        assert not held_job.done(), "the held call finished before the gate was opened"
        return done["out"]
    finally:
        gate.released.set()


def test_a_held_sql_query_does_not_block_inspect(server, monkeypatch):
    url, _ = server
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    sample = samples_of(b)[0]
    gate = Gate(queries.console_query, lambda *args, **kwargs: "held" in str(args[0] if args else kwargs.get("query")))
    monkeypatch.setattr(queries, "console_query", gate)
    job = a.submit("SELECT 42 AS held", 10, api_name="/sql")
    out = held_while(gate, job, lambda: b.predict(*inspect_args(sample), api_name="/inspect_sample"))
    assert f"data-sample=\"synth-sft/10/{sample}\"" in out[0]
    msg, table, _ = job.result(timeout=HOLD_S)
    assert msg == "1 row" and table["data"] == [[42]]


def test_inspect_renders_of_two_sessions_run_side_by_side(server, monkeypatch):
    url, _ = server
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    first, second = samples_of(b)[:2]
    gate = Gate(queries.sample_tokens, lambda run_id, step, sample_idx, *args, **kw: sample_idx == first)
    monkeypatch.setattr(queries, "sample_tokens", gate)
    memo.clear()            # a render cached by an earlier test would answer without reaching the gate
    job = a.submit(*inspect_args(first), api_name="/inspect_sample")
    out = held_while(gate, job, lambda: b.predict(*inspect_args(second), api_name="/inspect_sample"))
    assert f"data-sample=\"synth-sft/10/{second}\"" in out[0]
    assert f"data-sample=\"synth-sft/10/{first}\"" in job.result(timeout=HOLD_S)[0]
