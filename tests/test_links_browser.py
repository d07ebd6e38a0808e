"""Views you can keep, in headless Chromium (Playwright with the system Chromium): Inspect's colour metric and
breakdown, Compare's runs and the SQL console's text go into the address bar as they are chosen, and a reload
of that address shows them again (the SQL text in the editor, not run); a link's unknown values fall back with
the header's notice saying so; the overlay's "loading" placeholder is replaced by the first render.

    pytest -m slow tests/test_links_browser.py

The tests share one page and run in file order.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import CHROMIUM, CHROMIUM_ARGS, app_server

pw = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip(f"no Chromium at {CHROMIUM} (set TOKVIZ_CHROMIUM)", allow_module_level=True)

pytestmark = pytest.mark.slow
NAMES = {"synth-sft": "synthetic sft", "synth-antiop": "synthetic antiop"}     # run id -> its name in lists


@pytest.fixture(scope="module")
def app(data_home):
    with app_server(data_home) as (url, ctx):
        yield url, ctx


@pytest.fixture(scope="module")
def page(app):
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ctx = b.new_context(viewport={"width": 1400, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(30_000)
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        yield pg
        ctx.close()
        b.close()


def wait_link(page, part: str) -> None:
    """Until the address bar's query holds ``part`` (as the page writes it: url-encoded)."""
    page.wait_for_function("(p) => location.search.includes(p)", arg=part)


def reload(page) -> None:
    """Open the address bar's link anew (what a reader of a shared link gets), once the page has loaded."""
    page.goto(page.url)
    page.wait_for_function("() => (document.querySelector('#tv-query textarea, #tv-query input') || {}).value")


def checked_view(page) -> str | None:
    return page.evaluate("() => [...document.querySelectorAll('#tv-view input')].find(i => i.checked)?.value")


def compare_tokens(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('#tv-cmp-runs .token')].map(e => e.innerText)")


def test_the_loading_placeholder_is_replaced_by_the_first_render(app, page):
    page.goto(app[0])
    page.wait_for_selector("#tv-overlay .tv-text .t.r")
    assert "loading the sample" not in page.inner_text("#tv-overlay")


def test_inspect_metric_and_breakdown_survive_a_reload(page):
    page.click("#tv-metric input")
    page.locator("ul[role=listbox] li", has_text="loss -log p").first.click()
    page.wait_for_selector("#tv-overlay .tv-text[data-metric='loss']")
    wait_link(page, "metric=loss")
    page.locator("#tv-view label", has_text="bars: dot per layer").click()
    wait_link(page, "view=bars")
    assert "metric=loss" in page.url                  # the breakdown's event kept the metric in the link
    reload(page)
    page.wait_for_selector("#tv-overlay .tv-text[data-metric='loss'] .t.r")
    page.wait_for_function("() => [...document.querySelectorAll('#tv-view input')].some(i => i.checked && "
                           "i.value === 'bars: dot per layer')")
    assert "loss" in page.input_value("#tv-metric input")
    assert "metric=loss" in page.url and "view=bars" in page.url
    # a token clicked in the restored view keeps both in the link
    page.locator("#tv-overlay .t.r").nth(1).click()
    wait_link(page, "token=")
    wait_link(page, "view=bars")
    assert "metric=loss" in page.url


def test_compare_runs_survive_a_reload(page):
    page.get_by_role("tab", name="Compare runs", exact=True).click()
    wait_link(page, "tab=compare")
    page.wait_for_function("() => document.querySelectorAll('#tv-cmp-runs .token').length === 2")
    first, second = [next(r for r, n in NAMES.items() if n in t) for t in compare_tokens(page)]
    # the first run out, then back in: the runs are now in the other order (and so are their colours)
    page.locator("#tv-cmp-runs .token", has_text=NAMES[first]).locator(".token-remove").click()
    page.wait_for_function("(r) => new URLSearchParams(location.search).get('runs') === r", arg=second)
    page.click("#tv-cmp-runs input")
    page.locator("ul[role=listbox] li", has_text=NAMES[first]).first.click()
    page.wait_for_function("(r) => new URLSearchParams(location.search).get('runs') === r", arg=f"{second},{first}")
    assert f"runs={second},{first}" in page.url          # short: the comma is not encoded
    reload(page)
    assert page.get_by_role("tab", name="Compare runs", exact=True).get_attribute("aria-selected") == "true"
    page.wait_for_function("() => document.querySelectorAll('#tv-cmp-runs .token').length === 2")
    tokens = compare_tokens(page)
    assert NAMES[second] in tokens[0] and NAMES[first] in tokens[1]
    page.wait_for_selector("#tv-cmp-grid .js-plotly-plot")
    assert page.locator("#tv-cmp-summary th").nth(1).inner_text() in (second, NAMES[second])


def test_the_sql_text_survives_a_reload_and_is_not_run(app, page):
    page.goto(f"{app[0]}?tab=sql")      # by its link: with many tabs the strip may fold SQL into its overflow menu
    page.wait_for_selector("#tv-sql-query .cm-content")
    wait_link(page, "tab=sql")
    text = "SELECT 42 AS answer -- a&b #c"
    page.click("#tv-sql-query .cm-content")
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type(text)
    page.click("#tv-sql-tables summary")             # leaving the editor puts its text in the link
    page.wait_for_function("(t) => new URLSearchParams(location.search).get('sql') === t", arg=text)
    reload(page)
    assert "sql=" in page.url
    page.wait_for_function("(t) => document.querySelector('#tv-sql-query .cm-content')?.innerText.trim() === t",
                           arg=text)
    assert page.inner_text("#tv-sql-message").strip() == ""            # only placed in the editor, never run
    assert not page.locator("#tv-sql-result").is_visible()


def test_a_links_unknown_values_fall_back_and_say_so(app, page):
    url, _ = app
    page.goto(f"{url}?tab=inspect&run=synth-sft&metric=%3Cb%3Enope&view=sideways")
    page.wait_for_selector("#tv-overlay .tv-text[data-metric='alignment'] .t.r")
    page.wait_for_function("() => document.querySelector('#tv-notice')?.innerText.includes('no colour metric')")
    notice = page.inner_text("#tv-notice")
    assert "<b>nope" in notice and "no breakdown 'sideways'" in notice       # shown as text, not markup
    assert checked_view(page) == "heatmap: dot"
    page.goto(f"{url}?tab=compare&run=synth-sft&runs=no-such-run,synth-antiop")
    page.wait_for_function("() => document.querySelector('#tv-notice')?.innerText.includes('no-such-run')")
    page.wait_for_function("() => document.querySelectorAll('#tv-cmp-runs .token').length === 2")
    assert page.errors == []
