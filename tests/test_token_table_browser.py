"""The Tokens tab's token table in headless Chromium: sorted by a metric, filtered by category and text (each
checked against the run's shards in pandas), and a row opening its token in Inspect. Screenshots go to
test-artifacts/ui/.

    pytest -m slow tests/test_token_table_browser.py
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backend.dev.synth import read_shards
from tests.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, app_server

pw = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip(f"no Chromium at {CHROMIUM} (set TOKVIZ_CHROMIUM)", allow_module_level=True)

pytestmark = pytest.mark.slow
RUN, STEP = "synth-sft", 10
TABLE = "#tv-token-table"


@pytest.fixture(scope="module")
def page(data_home):
    with app_server(data_home) as (url, _), pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(30_000)
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.goto(f"{url}?tab=tokens&run={RUN}&step={STEP}")
        yield pg
        browser.close()


def pick(page, elem_id: str, option: str) -> None:
    """Choose ``option`` in a Gradio dropdown."""
    page.click(f"#{elem_id} input")
    page.locator("ul[role=listbox] li", has_text=option).filter(has_text=option).first.click()


def keys(page) -> list[tuple[int, int]]:
    rows = page.locator(f"{TABLE} tr[data-pos]")
    return [(int(rows.nth(i).get_attribute("data-sample")), int(rows.nth(i).get_attribute("data-pos")))
            for i in range(rows.count())]


def wait_total(page, n: int) -> None:
    page.wait_for_selector(f'{TABLE} .tv-surprise-cap[data-total="{n}"]')


def test_sort_filter_and_open_a_row_in_inspect(page, data_home):
    tok = read_shards(data_home / "runs" / RUN, "tokens")
    resp = tok[(tok.step == STEP) & tok.is_response].sort_values(["sample_idx", "position"])
    page.locator("#tv-tt-box").get_by_text("All response tokens").first.click()       # closed until asked for
    page.wait_for_selector(f"{TABLE} tr[data-pos]")
    wait_total(page, len(resp))
    assert keys(page) == list(zip(resp.sample_idx, resp.position))[:50]          # by sample, position
    # sorted by loss, descending
    pick(page, "tv-tt-sort", "loss")
    page.wait_for_selector(f"{TABLE} .tv-surprise-cap:has-text('sorted by loss')")
    page.click("#tv-tt-desc input")
    page.wait_for_selector(f"{TABLE} .tv-surprise-cap:has-text('sorted by loss (descending)')")
    by_loss = resp.sort_values("loss", ascending=False, kind="stable")
    assert keys(page) == list(zip(by_loss.sample_idx, by_loss.position))[:50]
    # filtered: numbers whose text contains "1"
    pick(page, "tv-tt-categories", "number")
    page.keyboard.press("Escape")
    numbers = by_loss[by_loss.category == "number"]
    wait_total(page, len(numbers))
    page.fill("#tv-tt-text textarea, #tv-tt-text input", "1")
    page.keyboard.press("Enter")
    ones = numbers[numbers.token.str.contains("1", regex=False)]
    assert len(ones) > 0
    wait_total(page, len(ones))
    # and a value range: alignment >= 0
    pick(page, "tv-tt-metric", "alignment")
    page.fill("#tv-tt-lo textarea, #tv-tt-lo input", "0")
    page.keyboard.press("Enter")
    ones = ones[ones.alignment >= 0]
    assert len(ones) > 0
    wait_total(page, len(ones))
    assert keys(page) == list(zip(ones.sample_idx, ones.position))[:50]
    page.screenshot(path=str(ARTIFACTS / "ui" / "token-table.png"), full_page=True)
    # a row opens its token in Inspect
    sample, position = keys(page)[0]
    page.locator(f"{TABLE} tr[data-pos]").first.locator("td.ctx b").click()
    page.wait_for_function("location.search.includes('tab=inspect') && location.search.includes('token=')")
    assert page.get_attribute("#tv-overlay .t.sel", "data-i") == str(position)
    assert f"sample={sample}" in page.evaluate("location.search")
    assert page.errors == []
