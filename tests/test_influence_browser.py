"""The Influence tab in headless Chromium on a tiny run trained with --influence-eval: a deep link opens it with
the step's summary, its four figures and the help/hurt table; a row click opens that token in Inspect; a run
without influence says how to record it.

    pytest -m slow tests/test_influence_browser.py
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backend.dev.synth import SynthConfig, make_run
from tests.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, app_server

pw = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip(f"no Chromium at {CHROMIUM} (set TOKVIZ_CHROMIUM)", allow_module_level=True)

pytestmark = pytest.mark.slow
FIGURES = ("over", "quadrants", "category", "tokens")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> tuple[Path, str]:
    from backend.jobs.train import TrainConfig
    from backend.lm.trainer import train

    root = tmp_path_factory.mktemp("influence-home")
    run = train(TrainConfig(name="infl", n_train=16, n_eval=4, eval_max_new_tokens=4, batch_size=4, steps=2,
                            trace_every=1, trace_sequences=4, influence_eval=4, runs_root=str(root / "runs")),
                progress=False)
    make_run(SynthConfig.tiny(), root / "runs", run_id="plain")
    return root, run.name


def test_influence_tab_and_a_token_opened_in_inspect(home):
    root, run_id = home
    shots = ARTIFACTS / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    with app_server(root) as (url, _ctx), pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}?tab=influence&run={run_id}&step=2")
        page.wait_for_selector("#tv-infl-summary :text('cos(G, G_eval)')")
        for elem in FIGURES:
            page.wait_for_selector(f"#tv-infl-{elem} .js-plotly-plot .main-svg")
        summary = page.inner_text("#tv-infl-summary")
        assert "Step 2" in summary and "positive helps" in summary and "held-out examples" in summary
        assert "aligned but hurts eval" in page.inner_text("#tv-infl-quadrants")
        assert page.get_by_role("tab", name="Influence", exact=True).get_attribute("aria-selected") == "true"
        assert "help most" in page.inner_text("#tv-infl-table")
        page.screenshot(path=str(shots / "influence.png"), full_page=True)

        row = page.locator("#tv-infl-table tr[data-pos]").first           # the token that helps most
        sample, position = row.get_attribute("data-sample"), row.get_attribute("data-pos")
        row.locator("td.ctx b").click()
        page.wait_for_function("location.search.includes('tab=inspect') && location.search.includes('token=')")
        page.wait_for_function(f"document.querySelector('#tv-overlay .t.sel')?.dataset.i === '{position}'")
        search = page.evaluate("location.search")
        assert f"sample={sample}" in search and f"token={position}" in search and f"run={run_id}" in search, search
        assert page.get_by_role("tab", name="Inspect", exact=True).get_attribute("aria-selected") == "true"

        page.goto(f"{url}?tab=influence&run=plain&step=20")
        page.wait_for_selector("#tv-infl-summary :text('has no influence data')")
        assert "--influence-eval N" in page.inner_text("#tv-infl-summary")
        assert not errors, errors
        browser.close()
