"""The Activations tab and the Training tab's embedding-gradient panel in headless Chromium, on the shipped demo
runs (data/runs/demo-actgrad-modadd, demo-embgrad-modadd): a deep link opens the actgrad view, a sample's
heatmap shows its real tokens, the PCA is drawn; the panel draws the metrics and the top tokens with their text.
Screenshots go to test-artifacts/ui/.

    pytest -m slow tests/test_gradients_browser.py
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backend.store import paths
from tests.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, app_server, make_home, wait_for

pw = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip(f"no Chromium at {CHROMIUM} (set TOKVIZ_CHROMIUM)", allow_module_level=True)

pytestmark = pytest.mark.slow
SHOTS = ARTIFACTS / "ui"
DEMOS = ("demo-actgrad-modadd", "demo-embgrad-modadd")
TICK = "[...document.querySelectorAll('#{elem} .xtick text')].some(t => {test})"     # an x tick label that passes


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("tokviz-grads"), xss=False)
    for d in DEMOS:
        shutil.copytree(paths.SHIPPED_DATA / "runs" / d, home / "runs" / d)
    with app_server(home) as (url, ctx):
        yield url, ctx


@pytest.fixture(scope="module")
def page(app):
    SHOTS.mkdir(parents=True, exist_ok=True)
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


def plots(page, elem: str) -> int:
    return page.locator(f"#{elem} .js-plotly-plot .main-svg").count()


def test_activations_deep_link_heatmap_and_pca(app, page):
    url, _ = app
    page.goto(f"{url}?tab=activations&run=demo-actgrad-modadd")
    tab = page.get_by_role("tab", name="Activations", exact=True)
    wait_for(lambda: tab.get_attribute("aria-selected") == "true", 30, "the Activations tab selected")
    page.wait_for_function("document.querySelector('#tv-act-info')?.innerText.includes('targets found')")
    for elem in ("tv-act-heatmap", "tv-act-layers", "tv-act-pca"):
        wait_for(lambda e=elem: plots(page, e) > 0, 30, f"the {elem} figure")
    # the aggregated heatmap labels its columns with the template tokens (digits as X)
    page.wait_for_function(TICK.format(elem="tv-act-heatmap", test="t.textContent === 'XX'"))
    assert "first =" in page.locator("#tv-act-info").inner_text()
    page.screenshot(path=str(SHOTS / "activations.png"), full_page=True)
    # one sample: its real tokens on the x axis, the title says which sample
    page.click("#tv-act-sample input")
    page.locator("ul[role=listbox] li", has_text="3").first.click()
    page.wait_for_function("document.querySelector('#tv-act-heatmap .gtitle')?.textContent.includes('sample 3')")
    page.wait_for_function(TICK.format(elem="tv-act-heatmap", test="t.textContent === '+'"))
    assert page.errors == []


def test_training_panel_shows_embedding_gradients(app, page):
    url, _ = app
    page.goto(f"{url}?tab=training&run=demo-embgrad-modadd")
    for elem in ("tv-embgrad-metrics", "tv-embgrad-top"):
        wait_for(lambda e=elem: plots(page, e) > 0, 30, f"the {elem} figure")
    page.wait_for_function("document.querySelector('#tv-embgrad-top .gtitle')?.textContent.includes('step 150')")
    page.wait_for_function("document.querySelector('#tv-embgrad-metrics')?.innerText.includes('stride-7 groups')")
    # the bars are labelled with the tokens' text and ids, e.g. "= (4)"
    page.wait_for_function(TICK.format(elem="tv-embgrad-top", test="/\\(\\d+\\)$/.test(t.textContent)"))
    page.click("#tv-embgrad-step input")
    page.locator("ul[role=listbox] li", has_text="50").first.click()
    page.wait_for_function("document.querySelector('#tv-embgrad-top .gtitle')?.textContent.includes('step 50')")
    page.screenshot(path=str(SHOTS / "training-embgrad.png"), full_page=True)
    assert page.errors == []


def test_compute_queues_an_actgrad_job_on_the_headers_train_run(app, page):
    url, ctx = app
    page.goto(f"{url}?tab=activations&run=demo-embgrad-modadd")
    page.wait_for_function("document.querySelector('#tv-act-info')?.innerText.includes('demo-actgrad-modadd')")
    page.click("#tv-act-compute")
    page.wait_for_function("document.querySelector('#tv-act-queued')?.innerText.includes('queued job')")
    (job,) = [j for j in ctx.jobs.snapshot() if j.kind == "actgrad"]
    wait_for(lambda: ctx.jobs.get(job.job_id).status in ("finished", "failed"), 600, "the actgrad job to end")
    assert ctx.jobs.get(job.job_id).status == "finished", ctx.jobs.log_tail(job.job_id)[-3000:]
    wait_for(lambda: job.run_id in ctx.runs()["run_id"].tolist(), 240, "the new run in the index")
    # the header's train run now opens its newest actgrad run: the one just made
    page.goto(f"{url}?tab=activations&run=demo-embgrad-modadd")
    page.wait_for_function(f"document.querySelector('#tv-act-info')?.innerText.includes('{job.run_id}')")
    wait_for(lambda: plots(page, "tv-act-heatmap") > 0, 30, "the new run's heatmap")
    assert page.errors == []
