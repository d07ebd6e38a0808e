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


# the most isolated PCA point on screen (so the click cannot land on a neighbour): its page coordinates and key
ISOLATED_POINT_JS = """() => {
  const gd = document.querySelector('#tv-probe-pca .js-plotly-plot');
  const fl = gd._fullLayout, box = gd.getBoundingClientRect(), pts = [];
  gd._fullData.forEach((tr) => {
    for (let i = 0; i < tr.x.length; i++) {
      pts.push({x: box.left + fl._size.l + fl.xaxis.l2p(tr.x[i]), y: box.top + fl._size.t + fl.yaxis.l2p(tr.y[i]),
                key: Array.from(tr.customdata[i]).slice(0, 4)});
    }
  });
  let best = null, gap = -1;
  for (const p of pts) {
    let d = Infinity;
    for (const q of pts) if (q !== p) d = Math.min(d, Math.hypot(p.x - q.x, p.y - q.y));
    if (d > gap) { gap = d; best = p; }
  }
  return {...best, gap: gap, n: pts.length};
}"""


def test_pca_point_click_opens_its_rollout(home):
    tokens = pq.read_table(home / "runs/demo-probe/probe/tokens.parquet").to_pandas()
    rollouts = pq.read_table(home / "runs/demo-probe/probe/rollouts.parquet").to_pandas()
    with app_server(home) as (url, _ctx), pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}?tab=probes&run=demo-probe")
        page.wait_for_selector("#tv-probe-pca .js-plotly-plot .scatterlayer, #tv-probe-pca .js-plotly-plot canvas")
        page.wait_for_selector("#tv-probe-pca-click :text('Click a point')")
        page.locator("#tv-probe-pca").scroll_into_view_if_needed()
        page.wait_for_function("document.querySelector('#tv-probe-pca .js-plotly-plot')._fullLayout !== undefined")
        pt = page.evaluate(ISOLATED_POINT_JS)
        assert pt["n"] > 10 and pt["gap"] > 3, pt        # a point a click can single out
        model, prompt_idx, sample_idx, position = pt["key"]
        page.mouse.move(pt["x"], pt["y"])
        page.mouse.click(pt["x"], pt["y"])
        page.wait_for_selector("#tv-probe-point .tv-probe-roll span.t.h")
        shown = page.inner_text("#tv-probe-point")
        assert f"{model} · prompt {prompt_idx} · sample {sample_idx}" in shown and f"position {position}" in shown
        roll = rollouts[(rollouts["model"] == model) & (rollouts["prompt_idx"] == prompt_idx)
                        & (rollouts["sample_idx"] == sample_idx)].iloc[0]
        assert roll["prompt"].split("\n")[0].strip() in shown                   # the prompt ...
        assert ("✅ correct" if roll["correct"] else "❌ incorrect") in shown   # ... its correctness
        mine = tokens[(tokens["model"] == model) & (tokens["prompt_idx"] == prompt_idx)
                      & (tokens["sample_idx"] == sample_idx)].sort_values("position")
        spans = page.locator("#tv-probe-point span.t")
        assert spans.count() == len(mine)                                       # ... the whole response
        marked = page.inner_text("#tv-probe-point span.t.h").replace("\n", "")
        assert marked == mine.loc[mine["position"] == position, "token"].iloc[0].replace("\n", "⏎")
        assert page.locator("#tv-probe-point span.t.h").count() == 1
        (ARTIFACTS / "ui").mkdir(parents=True, exist_ok=True)
        page.locator("#tv-probe-pca").screenshot(path=str(ARTIFACTS / "ui" / "probes_pca_click_plot.png"))
        page.locator("#tv-probe-point").screenshot(path=str(ARTIFACTS / "ui" / "probes_pca_click.png"))
        assert page.evaluate("window.__xss") is None and not errors, errors
        browser.close()
