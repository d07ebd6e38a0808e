"""The real app in headless Chromium (Playwright with the system Chromium): the first page, selecting and
hovering a token, previous/next, hostile token text, every tab, a deep link, a surprising token opened in
Inspect, the SQL console, and a short real trace job launched from the form that finishes and appears in the
run list. Screenshots go to test-artifacts/ui/.

    pytest tests/test_ui_browser.py

The tests share one page and run in file order (one flow through the app).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, XSS_TOKENS, app_server, wait_for
from tokviz.tabs import TABS

pw = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip(f"no Chromium at {CHROMIUM} (set TOKVIZ_CHROMIUM)", allow_module_level=True)

SHOTS = ARTIFACTS / "ui"
TAB_NAMES = {"inspect": "Inspect", "concentration": "Concentration", "layers": "Layers & positions",
             "tokens": "Tokens", "training": "Training", "compare": "Compare runs", "launch": "Launch", "sql": "SQL",
             "runvsrun": "Run vs run", "schemes": "Schemes"}
JOB_TIMEOUT_S = 600          # bounds a hang, not a speed: this test took up to 4.7 min at load average 14


pytestmark = pytest.mark.slow         # a real browser: minutes on a busy machine; CI runs `-m slow` too


@pytest.fixture(scope="module")
def app(data_home):
    with app_server(data_home) as (url, ctx):
        yield url, ctx


@pytest.fixture(scope="module")
def browser():
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(app, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("dialog", lambda d: (pg.errors.append(f"dialog: {d.message}"), d.dismiss()))
    pg.goto(app[0])                     # loaded here, so any subset of these tests runs on its own
    pg.wait_for_selector("#tv-overlay .t")
    yield pg
    ctx.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    """Click the tab, in the tab strip or, when the strip is too narrow for every tab (Gradio folds the last ones
    into a menu), in the overflow menu, as a user would."""
    tab = page.get_by_role("tab", name=TAB_NAMES[name], exact=True)
    if not tab.is_visible():
        page.locator(".overflow-menu button").first.click()
        tab = page.locator(".overflow-dropdown").get_by_text(TAB_NAMES[name], exact=True)
    tab.click()
    page.wait_for_function(f"location.search.includes('tab={name}')")


def painted_sample(page) -> str:
    return page.get_attribute("#tv-overlay .tv-text", "data-sample")


def test_first_page_shows_a_sample_token_by_token(app, page):
    url, _ = app
    page.goto(url)
    page.wait_for_selector("#tv-overlay .tv-text .t.r")
    assert page.locator("#tv-overlay .tv-seg").first.inner_text().lower() == "prompt"
    assert page.locator("#tv-overlay .t.p").count() > 0 and page.locator("#tv-overlay .t.r").count() > 0
    assert "alignment" in page.inner_text("#tv-overlay .tv-legend")
    assert re.search(r"tab=inspect&run=[\w-]+&step=\d+&sample=\d+", page.url)
    assert page.errors == []


def test_hover_shows_numbers_and_click_selects_a_token(page):
    tok = page.locator("#tv-overlay .t.r").nth(5)
    tok.hover()
    wait_for(lambda: "alignment" in (page.text_content(".tv-tip") or ""), 15, "the tooltip's numbers")
    tip = page.text_content(".tv-tip")
    assert "loss" in tip and "share" in tip and f"#{tok.get_attribute('data-i')} response" in tip
    position = tok.get_attribute("data-i")
    tok.click()
    page.wait_for_function(f"location.search.includes('token={position}')")
    page.wait_for_selector("#tv-breakdown .js-plotly-plot")
    assert f"Token #{position}" in page.inner_text("#tv-token-title")
    assert "▶" in page.inner_text("#tv-neighbours")
    assert page.locator("#tv-overlay .t.sel").get_attribute("data-i") == position
    shot(page, "inspect")


def test_previous_and_next_sample(page):
    first = painted_sample(page)
    page.click("#tv-next")
    page.wait_for_function(f"document.querySelector('#tv-overlay .tv-text').dataset.sample !== '{first}'")
    page.wait_for_function("!location.search.includes('token=')")
    page.click("#tv-prev")
    page.wait_for_function(f"document.querySelector('#tv-overlay .tv-text').dataset.sample === '{first}'")


def test_keyboard_moves_between_tokens_and_samples(page):
    """Left/right select the next/previous token (the server answers as to a click: the link and the breakdown
    follow); j/k and down/up go to the next/previous sample; typing in a field does neither."""
    page.locator("#tv-overlay .t.r").nth(3).click()
    start = int(page.locator("#tv-overlay .t.sel").get_attribute("data-i"))
    page.wait_for_function(f"location.search.includes('token={start}')")
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"new URLSearchParams(location.search).get('token') === '{start + 1}'")
    for key in ("ArrowRight", "ArrowRight", "ArrowLeft", "ArrowLeft", "ArrowLeft"):   # faster than the server
        page.keyboard.press(key)
    # the server ends on the token the overlay highlights (the last press), whatever order the answers took
    page.wait_for_function(f"new URLSearchParams(location.search).get('token') === '{start}'")
    page.wait_for_function(f"document.querySelector('#tv-token-title').innerText.includes('Token #{start}')")
    assert page.locator("#tv-overlay .t.sel").get_attribute("data-i") == str(start)
    first = painted_sample(page)
    page.keyboard.press("j")
    page.wait_for_function(f"document.querySelector('#tv-overlay .tv-text').dataset.sample !== '{first}'")
    page.keyboard.press("ArrowUp")
    page.wait_for_function(f"document.querySelector('#tv-overlay .tv-text').dataset.sample === '{first}'")
    # typed into a field, the keys are text: the handler runs synchronously, so a click it made would count now
    page.evaluate("window.tvNext = 0; document.querySelector('#tv-next').addEventListener('click', "
                  "() => { window.tvNext += 1; })")
    field = "#tv-search textarea, #tv-search input"
    if not page.is_visible(field):
        page.click("text=Search samples by text")
    page.click(field)
    page.keyboard.press("j")
    page.keyboard.press("ArrowDown")
    assert page.input_value(field) == "j" and page.evaluate("window.tvNext") == 0
    page.fill(field, "")


def test_hostile_token_text_renders_as_text(app, page):
    url, _ = app
    page.goto(f"{url}?tab=inspect&run=synth-antiop&step=5")
    page.wait_for_selector("#tv-overlay .t.r")
    texts = page.eval_on_selector_all("#tv-overlay .t", "els => els.map(e => e.textContent)")
    for t in XSS_TOKENS:
        assert t in texts
    assert page.evaluate("window.__xss") is None
    assert page.locator("#tv-overlay script, #tv-overlay img").count() == 0
    assert page.errors == []


@pytest.mark.parametrize("name", ["concentration", "layers", "tokens", "training", "compare"])
def test_every_analysis_tab_renders(page, name):
    open_tab(page, name)
    panel = page.locator(f"#tv-tab-{name}")
    # Compare draws its six panels as one grid figure
    n = 1 if name == "compare" else 2
    wait_for(lambda: panel.locator(".js-plotly-plot .main-svg").count() >= n, 30, f"the {name} figures")
    page.wait_for_timeout(300)
    shot(page, name)
    if name == "layers":            # the slower figure renders when its section is opened
        page.locator("#tv-contribution-box").get_by_text("Share of the update per layer and module").first.click()
        page.wait_for_selector("#tv-contribution .js-plotly-plot")


def test_a_surprising_token_opens_in_inspect(page):
    open_tab(page, "tokens")
    row = page.locator("#tv-surprising tr[data-pos]").first              # the most opposing token
    sample, position = row.get_attribute("data-sample"), row.get_attribute("data-pos")
    row.locator("td.ctx b").click()
    page.wait_for_function("location.search.includes('tab=inspect') && location.search.includes('token=')")
    assert page.get_attribute("#tv-overlay .t.sel", "data-i") == position
    page.wait_for_timeout(2000)         # the tab's own select event and a poll later, the link still holds it
    search = page.evaluate("location.search")
    assert f"sample={sample}" in search and f"token={position}" in search, search
    page.wait_for_selector("#tv-breakdown .js-plotly-plot")


def test_a_deep_link_opens_that_view(app, page):
    url, _ = app
    page.goto(f"{url}?tab=layers&run=synth-sft&step=10")
    page.wait_for_selector("#tv-tab-layers .js-plotly-plot")
    assert page.get_by_role("tab", name="Layers & positions", exact=True).get_attribute("aria-selected") == "true"
    assert page.input_value("#tv-step input") == "10"
    assert "synth-sft" in page.input_value("#tv-run input")
    page.goto(f"{url}?tab=inspect&run=synth-sft&step=20&sample=999999&token=3")   # no such sample: first one
    page.wait_for_selector("#tv-overlay .t.r")
    assert "synth-sft/20/" in painted_sample(page)


def test_copy_link_shows_the_url(page):
    page.click("#tv-copy")
    page.wait_for_selector("#tv-link textarea, #tv-link input")
    wait_for(lambda: "tab=inspect" in page.locator("#tv-link textarea, #tv-link input").first.input_value(), 10,
             "the link")


def test_sql_console(page):
    open_tab(page, "sql")
    page.click("#tv-sql-run")
    page.wait_for_selector("#tv-sql-result [data-testid='cell-0-0']")
    assert "rows" in page.inner_text("#tv-sql-message")
    page.wait_for_selector("#tv-sql-csv", state="visible")
    shot(page, "sql")


def test_launch_forms_are_made_when_their_tab_or_accordion_opens(app, browser):
    """No job form is part of the first page; opening Launch (by a click or a deep link) makes the chosen kind's
    form, another kind replaces it and the launch button then launches that kind; the Schemes tab's comparison
    form is made when its accordion opens and keeps what was typed when it is closed and opened again."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        pg.goto(app[0])
        pg.wait_for_selector("#tv-overlay .t")
        forms = "[id^='tv-f-'], [id^='tv-sch-f-'], [id^='tv-upload']"
        assert pg.locator(forms).count() == 0
        in_config = ("re => window.gradio_config.components.filter(c => new RegExp(re).test(c.props.elem_id || ''))"
                     ".length")
        assert pg.evaluate(in_config, "^tv-(f|sch-f)-") == 0 and pg.evaluate(in_config, "^tv-tab-") == len(TABS)
        open_tab(pg, "launch")
        pg.wait_for_selector("#tv-f-steps input")
        pg.wait_for_selector("#tv-upload", state="attached")       # the dataset upload of a train job
        pg.locator("#tv-kind label", has_text="probe").click()
        pg.wait_for_selector("#tv-f-probe-num_samples input")
        wait_for(lambda: pg.locator("#tv-f-steps").count() == 0, 20, "the train form to go")
        pg.fill("#tv-f-probe-num_samples input", "0")
        pg.click("#tv-launch")                                  # the probe form's values, checked as a probe's
        pg.wait_for_selector("#tv-launch-message .tv-err")
        assert "num_samples=0 is outside the allowed range" in pg.inner_text("#tv-launch-message")
        pg.locator("#tv-kind label", has_text="train").click()
        pg.wait_for_selector("#tv-f-steps input")
        assert pg.locator("[id^='tv-f-probe-']").count() == 0

        pg.goto(app[0] + "?tab=launch")                         # a deep link to the tab makes its form too
        pg.wait_for_selector("#tv-f-steps input")

        open_tab(pg, "schemes")
        assert pg.locator("[id^='tv-sch-f-']").count() == 0
        pg.click("#tv-sch-launch-box button")
        name = "#tv-sch-f-compare-schemes-name"
        pg.fill(f"{name} input, {name} textarea", "kept-name")
        pg.click("#tv-sch-launch-box button")                   # closed and opened again: made again, value kept
        wait_for(lambda: not pg.locator(name).is_visible(), 20, "the accordion to close")
        pg.click("#tv-sch-launch-box button")
        pg.wait_for_selector(f"{name} input, {name} textarea")
        wait_for(lambda: pg.locator(f"{name} input, {name} textarea").first.input_value() == "kept-name", 20,
                 "the typed name back in the made-again form")
        assert errors == []
    finally:
        ctx.close()


def test_launch_a_short_trace_job_from_the_form(app, page):
    _, ctx = app
    open_tab(page, "launch")
    # lr 2e-5: config.json holds json.dumps' '2e-05', which the job must read back as a number
    fill = {"name": "ui-test", "steps": "4", "trace_every": "2", "n_train": "64", "n_eval": "8", "batch_size": "4",
            "lr": "2e-5", "lora_r": "0"}
    for field, value in fill.items():
        page.fill(f"#tv-f-{field} input, #tv-f-{field} textarea", value)
    page.click("#tv-launch")                                    # lora_r = 0: refused, with the field named
    page.wait_for_selector("#tv-launch-message .tv-err")
    assert "lora_r=0 is outside the allowed range" in page.inner_text("#tv-launch-message")
    page.fill("#tv-f-lora_r input", "4")
    page.click("#tv-launch")
    page.wait_for_selector("#tv-launch-message .tv-ok")
    job = ctx.jobs.snapshot()[0]

    def wait_job(pred, what: str) -> None:
        """The job's states bound only a hang (a loaded machine starts a job in minutes); a timeout says where
        the job was."""
        try:
            wait_for(pred, JOB_TIMEOUT_S, what)
        except AssertionError as e:
            raise AssertionError(f"{e}; job {job.job_id} log:\n{ctx.jobs.log_tail(job.job_id)[-3000:]}") from None

    wait_job(lambda: page.locator("#tv-jobs .tv-running .tv-pbar, #tv-jobs .tv-finished, #tv-jobs .tv-failed")
             .count() > 0, "the job's progress bar")
    wait_job(lambda: page.locator("#tv-jobs .tv-finished, #tv-jobs .tv-failed").count() > 0, "the job to end")
    assert page.locator("#tv-jobs .tv-finished").count() == 1, ctx.jobs.log_tail(job.job_id)[-3000:]
    assert "run finished" in page.input_value("#tv-log textarea")
    assert json.loads((Path(job.run_dir) / "config.json").read_text())["config"]["lr"] == 2e-5
    shot(page, "launch")
    # the finished run is ingested and appears in the header's run list, without a restart
    wait_for(lambda: job.run_id in ctx.runs()["run_id"].tolist(), JOB_TIMEOUT_S, "the run in the index")

    def listed() -> bool:
        page.click("#tv-run input")                     # (re)open: the list shows the choices of that moment
        if page.locator("ul[role=listbox] li", has_text=job.run_id).count() > 0:
            return True
        page.keyboard.press("Escape")
        return False
    wait_for(listed, 120, "the new run in the run list", every=1.0)
    page.locator("ul[role=listbox] li", has_text=job.run_id).first.click()
    open_tab(page, "inspect")
    page.wait_for_function(f"(document.querySelector('#tv-overlay .tv-text') || {{dataset: {{}}}})"
                           f".dataset.sample?.startsWith('{job.run_id}/')")
    page.locator("#tv-overlay .t.r").nth(2).click()
    page.wait_for_selector("#tv-breakdown .js-plotly-plot")
    shot(page, "inspect-real-run")
    assert page.errors == []


def test_a_new_tab_is_its_module_and_one_registry_line(data_home, browser, monkeypatch):
    """A tab added to the registry with one TabSpec (its module here: a build and a render) is in the tab
    strip, named by a deep link, and rendered for the link's run and step, and again when the run changes."""
    from dataclasses import dataclass

    import gradio as gr

    import tokviz.tabs
    from tokviz.tabs import TABS, TabSpec

    @dataclass
    class ToyTab:
        text: gr.Markdown
        inputs = property(lambda self: [])
        outputs = property(lambda self: [self.text])

    def render_tab(t, at, got):
        return [f"toy of {at.run} at step {at.step}"], {}

    toy = TabSpec("toy", "Toy", lambda ctx: ToyTab(gr.Markdown("", elem_id="tv-toy")), lambda t, page: None,
                  render_tab)
    monkeypatch.setattr(tokviz.tabs, "TABS", TABS + (toy,))
    with app_server(data_home) as (url, _):
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(20_000)
        pg.goto(f"{url}?tab=toy&run=synth-sft&step=10")
        pg.wait_for_function("document.querySelector('#tv-toy')?.innerText.includes('toy of synth-sft at step 10')")
        assert pg.get_by_role("tab", name="Toy", exact=True).get_attribute("aria-selected") == "true"
        assert "tab=toy&run=synth-sft&step=10" in pg.url
        pg.click("#tv-run input")
        pg.locator("ul[role=listbox] li", has_text="synth-antiop").first.click()
        pg.wait_for_function("document.querySelector('#tv-toy')?.innerText.includes('toy of synth-antiop at step 10')")
        ctx.close()
