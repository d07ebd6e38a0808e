"""The Probes tab in headless Chromium on the shipped demo probe (with hostile token text planted): a deep link
opens it with real figures; selecting a rollout row shows its tokens coloured, escaped, and recolours by bucket.

    pytest -m slow tests/test_probe_browser.py
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backend.store import paths
from tests.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, XSS_TOKENS, app_server

pw = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip(f"no Chromium at {CHROMIUM} (set TOKVIZ_CHROMIUM)", allow_module_level=True)

pytestmark = pytest.mark.slow
DEMO = paths.SHIPPED_DATA / "runs" / "demo-probe"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe-home")
    run = root / "runs" / "demo-probe"
    shutil.copytree(DEMO, run)
    f = run / "probe" / "tokens.parquet"           # the first rollout's first tokens get hostile text
    t = pq.read_table(f)
    d = t.to_pydict()
    first = [i for i in range(len(d["model"])) if d["model"][i] == "base" and d["prompt_idx"][i] == 0
             and d["sample_idx"][i] == 0][:len(XSS_TOKENS)]
    for i, text in zip(first, XSS_TOKENS):
        d["token"][i] = text
    pq.write_table(pa.Table.from_pydict(d, schema=t.schema), f)
    return root


def test_probes_tab_by_deep_link(home):
    shots = ARTIFACTS / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    with app_server(home) as (url, _ctx), pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}?tab=probes&run=demo-probe")
        page.wait_for_selector("#tv-probe-pr .js-plotly-plot")
        page.wait_for_selector("#tv-probe-info :text('PR per bucket')")
        for elem in ("energy", "cosine", "pca", "hist", "bars"):
            page.wait_for_selector(f"#tv-probe-{elem} .js-plotly-plot")
        assert "participation ratio" in page.inner_text("#tv-probe-pr")
        page.locator("#tv-probe-rollouts [role=gridcell]").first.click()      # row 0: base, prompt 0, sample 0
        page.wait_for_selector("#tv-probe-rollout .tv-probe-roll span.t")
        text = page.inner_text("#tv-probe-rollout")
        assert XSS_TOKENS[0] in text and "onerror" in text          # shown as text, not run
        assert page.evaluate("window.__xss") is None
        before = page.get_attribute("#tv-probe-rollout span.t >> nth=3", "style")
        page.locator("#tv-probe-token-color label", has_text="bucket").click()
        page.wait_for_function("document.querySelector('#tv-probe-rollout span.t:nth-child(4)')"
                               f".getAttribute('style') !== {before!r}")
        page.screenshot(path=str(shots / "probes.png"), full_page=True)
        assert "tab=probes" in page.url and not errors, errors
        browser.close()
