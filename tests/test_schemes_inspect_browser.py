"""One sample under every scheme of a comparison, in the browser (real Chromium) on the shipped demo-schemes runs:
Inspect keeps the sample and step when the header's run switches to another scheme's run of the same seed (and
the weights it paints change), says so when the new run did not trace the sample, and the Schemes tab's links
open a sample in Inspect under the scheme clicked. Helpers without a browser are tested at the end (fast).

    pytest tests/test_schemes_inspect_browser.py -m slow
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "runs" / "demo-schemes"


def _children() -> dict[tuple[str, int], str]:
    """(scheme, seed) -> run id of the shipped comparison's runs."""
    out = {}
    for rel in json.loads((DEMO / "children.json").read_text()):
        cfg = json.loads((DEMO / rel / "config.json").read_text())["config"]
        out[(cfg["scheme"], cfg["seed"])] = Path(rel).name
    return out


def _painted(page) -> dict:
    """What the overlay paints: run/step/sample, metric, and the colour level of every response token."""
    return page.evaluate("""() => {
      const box = document.querySelector('#tv-overlay .tv-text');
      if (!box) return {};
      const levels = [...box.querySelectorAll('.t.r')].map(e => [...e.classList].filter(c => /^[cs]\\d+$/.test(c))
                                                                 .join(''));
      return {sample: box.dataset.sample, metric: box.dataset.metric, levels: levels};
    }""")


def _choose(page, field: str, text: str) -> None:
    page.click(f"{field} input")
    page.locator("ul[role=listbox] li", has_text=text).first.click()


@pytest.mark.slow
def test_switching_scheme_keeps_sample_and_step(tmp_path):
    from tests.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, app_server, wait_for
    pw = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    home = tmp_path / "home"
    for d in [DEMO, *(DEMO.parent / r for r in _children().values())]:
        shutil.copytree(d, home / "runs" / d.name, ignore=shutil.ignore_patterns("checkpoint", "adapter"))
    kids = _children()
    sft, topk, sft1 = kids[("sft", 0)], kids[("topk", 0)], kids[("sft", 1)]
    with app_server(home) as (url, ctx), pw.sync_playwright() as p:
        from backend.index import queries
        steps = queries.traced_steps(sft)
        samples = queries.step_samples(sft, steps[0], preview_chars=0)["sample_idx"].tolist()
        step, k = steps[0], samples[1]          # not the step's first sample: kept, not a default
        w = {r: queries.sample_tokens(r, step, k) for r in (sft, topk)}
        assert not w[sft]["weight"].equals(w[topk]["weight"])                   # the weights differ in the index
        assert k not in queries.step_samples(sft1, step, preview_chars=0)["sample_idx"].tolist()

        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}?tab=inspect&run={sft}&step={step}&sample={k}")
            wait_for(lambda: _painted(page).get("sample") == f"{sft}/{step}/{k}", 60, "sft's sample k")
            _choose(page, "#tv-metric", "scheme weight")
            wait_for(lambda: _painted(page).get("metric") == "weight", 30, "the weight colouring")
            before = _painted(page)

            _choose(page, "#tv-run", topk)                                      # the sibling of another scheme
            wait_for(lambda: _painted(page).get("sample") == f"{topk}/{step}/{k}", 60, "topk's run, same sample")
            after = _painted(page)
            assert page.input_value("#tv-step input") == str(step)
            assert f"#{k} " in page.input_value("#tv-sample input")
            assert after["metric"] == "weight" and len(after["levels"]) == len(before["levels"])
            assert after["levels"] != before["levels"]                          # other weights, same tokens
            wait_for(lambda: f"sample={k}" in page.evaluate("location.search"), 10, "the link to follow")
            assert page.inner_text("#tv-notice").strip() == ""
            (ARTIFACTS / "ui").mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui" / "schemes-inspect-sibling.png"), full_page=True)

            _choose(page, "#tv-run", sft1)                                      # another seed: other samples
            wait_for(lambda: (_painted(page).get("sample") or "").startswith(f"{sft1}/{step}/"), 60, "seed 1's run")
            wait_for(lambda: f"sample #{k} was not traced" in page.inner_text("#tv-notice"), 30, "the fallback note")

            page.goto(f"{url}?tab=schemes")                                     # a link per scheme
            page.wait_for_selector("#tv-sch-inspect a.tv-sch-open[data-scheme='lr']")
            pick = page.input_value("#tv-sch-inspect-pick input")
            page.locator("#tv-sch-inspect").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "ui" / "schemes-inspect-links.png"))
            seed, s_step, s_k = (int(x.split(" ")[-1].lstrip("#")) for x in pick.split(" · ")[:3])
            page.click("#tv-sch-inspect a.tv-sch-open[data-scheme='lr']")
            lr = kids[("lr", seed)]
            wait_for(lambda: _painted(page).get("sample") == f"{lr}/{s_step}/{s_k}", 60, "lr's run in Inspect")
            assert page.get_by_role("tab", name="Inspect", exact=True).get_attribute("aria-selected") == "true"
            assert errors == []
        finally:
            browser.close()


def test_inspect_links_per_scheme():
    """Links of one seed's runs at the picked step and sample, escaped; a run without that sample: no link."""
    from tokviz.tabs.schemes import inspect_choices, inspect_links_html
    samples = pd.DataFrame({"scheme": ["sft", "topk", "sft"], "seed": [0, 0, 1], "step": [20, 20, 20],
                            "child_run_id": ["a-sft", "a-topk", "b-sft"], "sample_idx": [7, 7, 9],
                            "preview": ["Step 1:\n2", "x", "y"]})
    kids = pd.DataFrame({"scheme": ["sft", "topk", "<b>", "sft"], "seed": [0, 0, 0, 1],
                         "child_run_id": ["a-sft", "a-topk", "a-x", "b-sft"]})
    assert inspect_choices(samples) == [("seed 0 · step 20 · #7 · Step 1:⏎ 2", "0:20:7"),
                                        ("seed 1 · step 20 · #9 · y", "1:20:9")]
    out = inspect_links_html(samples, kids, "0:20:7")
    assert 'href="?tab=inspect&amp;run=a-sft&amp;step=20&amp;sample=7"' in out
    assert 'href="?tab=inspect&amp;run=a-topk&amp;step=20&amp;sample=7"' in out
    assert "&lt;b&gt; (not traced)" in out and "b-sft" not in out
    with pytest.raises(ValueError, match="seed:step:sample"):
        inspect_links_html(samples, kids, "nope")
    assert "trace_every" in inspect_links_html(samples.iloc[:0], kids, None)


def test_step_note_says_when_the_step_moved():
    from tokviz.header import step_note
    assert step_note("r", 20, 20) == "" and step_note("r", "20", 20) == ""
    assert step_note("r", None, 20) == "" and step_note("r", 20, None) == ""
    assert "step 30 was not traced in r; showing step 20" in step_note("r", 30, 20)
