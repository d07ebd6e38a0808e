"""Deep links that keep every choice of the view (issue #14, "Views you can keep"): Inspect's colour metric and
breakdown, Compare's runs, the SQL console's text; and the loading placeholder the page shows before its first
render. Fast: ``Focus`` parsing and writing, the tabs' fallbacks for a link's unknown values (in process, on the
synthetic index), and the initial component values. The browser side is tests/test_links_browser.py.

    pytest tests/test_links_views.py
"""
from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import gradio as gr
import pytest

from tests.conftest import app_server
from tokviz import links
from tokviz.links import Focus


def parse(q: str) -> Focus:
    """What a page loaded with query ``q`` ('?tab=...') gets: the browser's parsing, then Focus's."""
    return Focus.from_query(dict(parse_qsl(urlsplit(q).query)))


# ---------------------------------------------------------------------------------------------- Focus
def test_inspect_metric_and_view_round_trip_with_a_short_view_name():
    f = Focus("inspect", "run-1", 20, 3, 57, metric="loss", view="bars: dot per layer")
    q = f.query()
    assert q == "?tab=inspect&run=run-1&step=20&sample=3&token=57&metric=loss&view=bars"
    assert parse(q) == f
    for key, label in links.VIEW_KEYS.items():     # every breakdown: the link's name back to the radio's label
        assert parse(f"?view={key}").view == label


def test_defaults_are_left_out_of_the_link():
    f = Focus("inspect", "r", 5, 1, None, metric=links.DEFAULT_METRIC, view="heatmap: dot")
    assert f.query() == "?tab=inspect&run=r&step=5&sample=1"
    assert parse(f.query()) == Focus("inspect", "r", 5, 1)      # the same view: the tab's defaults


def test_compare_runs_round_trip_in_order():
    f = Focus("compare", "a", 10, runs=("synth-b", "synth-a"))
    q = f.query()
    assert q == "?tab=compare&run=a&step=10&runs=synth-b,synth-a"
    assert parse(q) == f and parse(q).runs == ("synth-b", "synth-a")   # the order is the runs' colours


def test_sql_text_round_trips_through_url_encoding():
    text = "SELECT run_id, count(*) AS n\nFROM tokens WHERE token = 'a&b=c#d' AND x < 2 -- ü ⏎\nGROUP BY ALL"
    q = Focus("sql", "r", 5, sql=text).query()
    assert "\n" not in q and "#" not in q and "&b=" not in q          # one query parameter, nothing raw
    assert parse(q).sql == text


def test_each_choice_is_only_in_the_link_of_its_own_tab():
    f = Focus("inspect", "r", 5, 2, 3, metric="loss", view="heatmap: alignment", runs=("x", "y"), sql="SELECT 1")
    for tab, present, absent in [("inspect", ["metric=loss", "view=alignment", "sample=2"], ["runs=", "sql="]),
                                 ("compare", ["runs=x,y"], ["metric=", "view=", "sql=", "sample="]),
                                 ("sql", ["sql=SELECT+1"], ["metric=", "view=", "runs=", "sample="]),
                                 ("layers", ["step=5"], ["metric=", "view=", "runs=", "sql=", "sample="])]:
        q = f.with_(tab=tab).query()
        assert all(p in q for p in present) and not any(a in q for a in absent), (tab, q)


def test_hostile_and_malformed_values():
    bad = Focus.from_query({"tab": "sql", "metric": "<script>" * 100, "view": "nope",
                            "runs": ",,a,a,,b," + ",".join(f"r{i}" for i in range(40)), "sql": "x" * 5000})
    assert bad.metric == ("<script>" * 100)[:links.MAX_ID_CHARS]        # kept (escaped by whoever shows it)
    assert bad.view == "nope"                      # unknown: kept as given; the tab falls back and says so
    assert bad.runs[:3] == ("a", "b", "r0") and len(bad.runs) == links.MAX_RUNS     # no empties, no repeats
    assert bad.sql is None                         # too long for a link: left out, not cut mid-statement
    assert Focus("sql", sql="y" * (links.MAX_SQL_CHARS + 1)).query() == "?tab=sql"
    empty = Focus.from_query({"metric": "", "view": "", "runs": "", "sql": ""})
    assert (empty.metric, empty.view, empty.runs, empty.sql) == (None, None, (), None)


def test_field_turns_a_controls_value_into_the_links():
    assert Focus.field("runs", ["a", "b", "a"]) == ("a", "b")
    assert Focus.field("runs", None) == ()
    assert Focus.field("sample", "7") == 7 and Focus.field("token", "x") is None
    assert Focus.field("view", "magnitude") == "heatmap: magnitude"
    assert Focus.field("metric", None) is None and Focus.field("metric", "dot") == "dot"


# ---------------------------------------------------------------------------------------------- loading state
def test_the_overlay_starts_with_a_loading_placeholder():
    """Before the page's first render the overlay says it is loading (the browser test sees it replaced);
    the bench's first-paint check waits for tokens, which the placeholder has none of."""
    from tokviz.tabs import inspect_tab
    with gr.Blocks():
        t = inspect_tab.build(None)          # the tab's build reads nothing of the app context
    assert "loading the sample" in t.overlay.value
    assert "tv-text" not in t.overlay.value and "data-i" not in t.overlay.value       # no token in it


# ---------------------------------------------------------------------------------------------- fallbacks
@pytest.fixture(scope="module")
def index_open(data_home):
    with app_server(data_home) as (_, ctx):
        yield ctx


def test_inspect_falls_back_from_an_unknown_metric_and_view(index_open):
    from backend.index import queries
    from tokviz.tabs import inspect_tab
    step = queries.traced_steps("synth-sft")[0]
    values, focus = inspect_tab.render("synth-sft", step, None, "<b>nope</b>", None, "sideways")
    assert values[-2:] == [links.DEFAULT_METRIC, inspect_tab.VIEWS[0]]        # the controls show the fallback
    assert focus["metric"] == links.DEFAULT_METRIC and focus["view"] == inspect_tab.VIEWS[0]
    assert "no colour metric '&lt;b&gt;nope&lt;/b&gt;'" in focus["notice"]     # escaped: the notice is Markdown
    assert "no breakdown 'sideways'" in focus["notice"]
    assert 'data-metric="alignment"' in values[1]
    # a known metric and a link's short view name are kept
    values, focus = inspect_tab.render("synth-sft", step, None, "loss", None, "heatmap: magnitude")
    assert values[-2:] == ["loss", "heatmap: magnitude"] and "notice" not in focus
    assert 'data-metric="loss"' in values[1]


def test_compare_keeps_a_links_runs_in_order_and_drops_unknown_ones(index_open):
    from tokviz.tabs import compare
    choices = index_open.run_choices(traced_only=True)
    values, focus = compare.render("synth-sft", None, ("synth-antiop", "synth-sft"), choices)
    assert values[0]["value"] == ["synth-antiop", "synth-sft"] and focus["runs"] == ("synth-antiop", "synth-sft")
    assert "notice" not in focus
    values, focus = compare.render("synth-sft", None, ("no-such-run", "synth-antiop"), choices)
    assert values[0]["value"] == ["synth-antiop", "synth-sft"]        # the header's run fills the second place
    assert "no traced run 'no-such-run'" in focus["notice"]
