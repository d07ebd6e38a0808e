"""Run vs run on one sample (``backend.analysis.runvsrun``, ``tokviz/tabs/runvsrun.py``) on the shipped demo runs
demo-sft-position and demo-antiop-position (the arith task, the same data seed and traced steps): the samples they
share, B - A checked against a pandas subtraction of the raw Parquet shards, the refusals (a probe run that
traced nothing, synthetic runs whose samples hold other tokens), and the tab's render. The browser test is
slow-marked:

    pytest tests/test_runvsrun.py                 # fast (API)
    pytest tests/test_runvsrun.py -m slow         # the tab in Chromium
"""
from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "data" / "runs"
A, B = "demo-sft-position", "demo-antiop-position"
TOKEN_RUN = "demo-dft-token"        # the same task and data seed, traced in token mode at steps 20 and 40


def _home(root: Path) -> Path:
    """A data root with the two demo runs (no checkpoints), the demo probe run, and two synthetic runs whose
    (step, sample) pairs coincide but whose tokens differ."""
    from backend.dev.synth import SynthConfig, make_run
    for r in (A, B, "demo-probe", TOKEN_RUN):
        shutil.copytree(RUNS / r, root / "runs" / r, ignore=shutil.ignore_patterns("checkpoint", "adapter"))
    cfg = dict(n_layers=2, n_samples=3, traced_steps=(5, 10), max_step=10, prompt_len=(6, 8), response_len=(10, 14))
    make_run(SynthConfig(scheme="sft", seed=1, **cfg), root / "runs", run_id="synth-1")
    other = make_run(SynthConfig(scheme="antiop", seed=1, **cfg), root / "runs", run_id="synth-2")
    _other_data(other)
    return root


def _other_data(run_dir: Path) -> None:
    """Change the token id of the third response token of every sample (every step): the same samples, other
    data."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    for f in sorted((run_dir / "trace" / "tokens").glob("*.parquet")):
        t = pq.read_table(f)
        d = t.to_pandas()
        third = d[d["is_response"]].groupby("sample_idx")["position"].nsmallest(3).groupby(level=0).max()
        hit = d["position"].to_numpy() == d["sample_idx"].map(third).to_numpy()
        d.loc[hit, "token_id"] = d.loc[hit, "token_id"] + 1
        pq.write_table(pa.Table.from_pandas(d, schema=t.schema, preserve_index=False), f)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The data root, indexed on this process's shared connection (what the app's queries read)."""
    from backend import index
    root = _home(tmp_path_factory.mktemp("rvr-home"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKVIZ_HOME", str(root))
        index.close_shared()
        cur = index.shared()
        index.ingest_all(cur)
        cur.close()
        yield root
        index.close_shared()


def _shard(root: Path, run: str, table: str, step: int) -> pd.DataFrame:
    return pd.read_parquet(root / "runs" / run / "trace" / table / f"step_{step:06d}.rank0.parquet")


def _first_pair(root: Path) -> tuple[int, int]:
    """A (step, sample) both demo runs traced, from their shards: the first sample of their first step."""
    a = _shard(root, A, "tokens", 20)
    return 20, int(sorted(a["sample_idx"].unique())[1])


def test_the_demo_runs_share_every_traced_sample_with_the_same_tokens(home):
    from backend.analysis import runvsrun
    common = runvsrun.common_samples(A, B)
    expect = set()
    for step in (20, 40, 60, 80, 100):
        a, b = _shard(home, A, "tokens", step), _shard(home, B, "tokens", step)
        expect |= {(step, k) for k in set(a["sample_idx"]) & set(b["sample_idx"])}
        for k in set(a["sample_idx"]) & set(b["sample_idx"]):       # the data: token ids position by position
            ia = a[a["sample_idx"] == k].sort_values("position")["token_id"].tolist()
            ib = b[b["sample_idx"] == k].sort_values("position")["token_id"].tolist()
            assert ia == ib
    assert set(zip(common["step"], common["sample_idx"])) == expect and len(expect) == 40
    assert common["same_tokens"].all()
    partners = runvsrun.partners(A)            # not the probe, not the synthetic runs; most pairs in common first
    assert partners["run_id"].tolist() == [B, TOKEN_RUN] and partners["n_common"].tolist()[0] == 40


@pytest.mark.parametrize("metric", ["weight", "loss", "alignment", "magnitude", "influence"])
def test_difference_is_the_per_position_subtraction_of_the_shards(home, metric):
    from backend.analysis import runvsrun
    step, k = _first_pair(home)
    got = runvsrun.compare_sample(A, B, step, k, metric)
    table = "influence" if metric == "influence" else "tokens"
    ref = {}
    for run in (A, B):
        d = _shard(home, run, table, step)
        ref[run] = d[d["sample_idx"] == k].set_index("position")[metric].astype("float64").sort_index()
    expect = ref[B] - ref[A]
    assert got["position"].tolist() == expect.index.tolist()
    np.testing.assert_array_equal(got["a"].to_numpy(), ref[A].to_numpy())
    np.testing.assert_array_equal(got["b"].to_numpy(), ref[B].to_numpy())
    np.testing.assert_array_equal(got["diff"].to_numpy(), expect.to_numpy())
    assert (got["token_id_a"] == got["token_id_b"]).all()
    if metric == "weight":            # the schemes weigh the response differently: some difference is not 0
        assert (got.loc[got["is_response_a"], "diff"].abs() > 1e-3).any()


def test_summary_against_a_hand_computation(home):
    from backend.analysis import runvsrun
    step, k = _first_pair(home)
    df = runvsrun.compare_sample(A, B, step, k, "weight")
    s = runvsrun.summary(df, top=2)
    a, b = _shard(home, A, "tokens", step), _shard(home, B, "tokens", step)
    a, b = (x[x["sample_idx"] == k].set_index("position").sort_index() for x in (a, b))
    d = (b["weight"].astype("float64") - a["weight"].astype("float64"))[a["is_response"]]
    assert s["n"] == len(d)
    assert s["mean_abs_diff"] == pytest.approx(float(np.mean(np.abs(d.to_numpy()))), rel=1e-12)
    lost = d[d < 0].sort_values().index[:2].tolist()
    assert s["lost"]["position"].tolist() == lost


def test_refuses_what_cannot_be_compared(home):
    from backend.analysis import runvsrun
    step, k = _first_pair(home)
    with pytest.raises(ValueError, match=r"'demo-probe' did not trace step 20 .*same tokens: step 20 sample|"
                                         r"'demo-probe' did not trace step 20 .*none"):
        runvsrun.compare_sample(A, "demo-probe", step, k)
    with pytest.raises(ValueError, match=r"did not trace step 30 .* 20, 40, 60, 80, 100"):
        runvsrun.compare_sample(A, B, 30, k)
    with pytest.raises(ValueError, match=r"did not trace sample 999999 at step 20"):
        runvsrun.compare_sample(A, B, step, 999999)
    with pytest.raises(ValueError, match=r"unknown metric 'bogus'; allowed: weight, alignment"):
        runvsrun.compare_sample(A, B, step, k, "bogus")
    # two synthetic runs: the same steps and sample numbers, other tokens (other data)
    common = runvsrun.common_samples("synth-1", "synth-2")
    assert len(common) == 6 and not common["same_tokens"].any()         # 3 samples x 2 steps
    with pytest.raises(ValueError, match=r"holds different tokens in 'synth-1' and 'synth-2' .*: 1 of \d+ "
                                         r"positions differ, the first at position \d+ .*same tokens: none"):
        runvsrun.compare_sample("synth-1", "synth-2", 5, int(common["sample_idx"][0]))
    with pytest.raises(ValueError, match="did not trace step 20"):      # a demo run against a synthetic one
        runvsrun.compare_sample(A, "synth-1", step, k)


def test_the_tab_renders_three_overlays_and_the_summary(home):
    from tokviz.tabs import runvsrun as tab
    step, k = _first_pair(home)
    values, focus = tab.render(A, step, None, None, k, "weight")
    run_b, steps, samples, metric, summary, ov_a, ov_b, ov_diff = values
    assert run_b["value"] == B and steps["value"] == step and samples["value"] == k and metric["value"] == "weight"
    assert "influence" in metric["choices"]                    # both demo runs recorded it
    assert focus == {"step": step, "sample": k, "metric": "weight", "runs": (B,)}
    assert f'data-sample="{A}/{step}/{k}"' in ov_a and f'data-sample="{B}/{step}/{k}"' in ov_b
    assert 'data-metric="diff:weight"' in ov_diff
    # A and B on one scale: the same legend; the difference diverges around 0
    legend = re.compile(r'<div class="tv-legend">.*?</div>')
    assert legend.search(ov_a).group(0) == legend.search(ov_b).group(0)
    assert "centre 0" in ov_diff
    # each token's tooltip: A, B and B - A (from the frame the backend returns)
    from backend.analysis import runvsrun
    df = runvsrun.compare_sample(A, B, step, k, "weight")
    r = df[df["is_response_a"]].iloc[0]
    tip = re.search(rf'data-i="{int(r["position"])}" title="([^"]*)"', ov_diff).group(1)
    assert f"A {float(r['a']):.4g} · B {float(r['b']):.4g} · B − A {float(r['diff']):.4g}" in tip
    assert "mean |B − A| over" in summary and "lost most under B" in summary
    # a step the header shows that the runs do not share moves to the first common one
    values, _ = tab.render(A, 9999, B, None, None, "loss")
    assert values[1]["value"] == 20


def test_the_header_step_leads_when_both_runs_traced_it(home):
    from types import SimpleNamespace

    from tokviz.common import At
    from tokviz.tabs import runvsrun as tab
    t = SimpleNamespace(run_b="b", step="step", sample="sample", metric="metric")
    got = {"b": B, "step": 20, "sample": None, "metric": "loss"}
    values, focus = tab.render_tab(t, At(None, A, 40), got)          # the header moved to step 40
    assert values[1]["value"] == 40 and focus["step"] == 40 and values[3]["value"] == "loss"
    values, _ = tab.render_tab(t, At(None, A, 9999), got)            # a step the runs do not share: the tab's
    assert values[1]["value"] == 20


def test_the_deep_link_carries_run_b_sample_and_metric(home):
    from tokviz.links import Focus
    from tokviz.tabs import runvsrun as tab
    q = Focus("runvsrun", A, 40, sample=1043, metric="loss", runs=(B,)).query()
    assert q == f"?tab=runvsrun&run={A}&step=40&runs={B}&sample=1043&metric=loss"
    back = Focus.from_query(dict(p.split("=", 1) for p in q[1:].split("&")))
    assert (back.tab, back.run, back.step, back.sample, back.metric, back.runs) == ("runvsrun", A, 40, 1043, "loss",
                                                                                     (B,))
    values, _ = tab.render(A, back.step, back.runs, None, back.sample, back.metric)     # what the load passes
    assert [v["value"] for v in values[:4]] == [B, 40, 1043, "loss"]


def test_the_tab_warns_when_the_runs_traced_in_different_modes(home):
    from backend.analysis import runvsrun
    from tokviz.tabs import runvsrun as tab
    pair = runvsrun.comparable(A, TOKEN_RUN).iloc[0]
    step, k = int(pair["step"]), int(pair["sample_idx"])
    values, _ = tab.render(A, step, TOKEN_RUN, step, k, "alignment")
    assert "traced in different modes (A: position, B: token)" in values[4]
    values, _ = tab.render(A, step, TOKEN_RUN, step, k, "loss")          # not a gradient: no warning
    assert "different modes" not in values[4]


def test_the_tab_says_when_no_run_shares_a_sample(home):
    from tokviz.tabs import runvsrun as tab
    values, focus = tab.render("synth-1", 5, None, None, None, None)
    assert "No other run traced a sample" in values[4] and "synth-1" in focus["notice"]


@contextmanager
def runvsrun_page(home: Path) -> Iterator[tuple[object, list[str], int, int]]:
    """The app on ``home`` and a Chromium page opened on Run vs run for run A at the first (step, sample) both runs
    traced: (page, its page errors, step, sample); skips without playwright or Chromium."""
    from tests.conftest import CHROMIUM, CHROMIUM_ARGS, app_server
    pw = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from backend import index
    index.close_shared()            # the app opens its own
    step, k = _first_pair(home)
    with app_server(home) as (url, _), pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}?tab=runvsrun&run={A}&step={step}&sample={k}")
            yield page, errors, step, k
        finally:
            browser.close()


@pytest.mark.slow
def test_run_vs_run_in_the_browser(home):
    from tests.conftest import ARTIFACTS, wait_for
    with runvsrun_page(home) as (page, errors, step, k):
        def painted(which: str) -> str | None:
            return page.evaluate(f"() => {{ const b = document.querySelector('#tv-rvr-{which} .tv-text'); "
                                 "return b ? b.dataset.sample + '|' + b.dataset.metric : null; }")

        wait_for(lambda: painted("a") == f"{A}/{step}/{k}|weight", 90, "run A's overlay")
        assert painted("b") == f"{B}/{step}/{k}|weight"
        assert painted("diff") == f"{B} - {A}/{step}/{k}|diff:weight"
        summary = page.locator("#tv-rvr-summary")
        assert "mean |B − A|" in summary.inner_text()
        n_tok = page.locator("#tv-rvr-diff .tv-text [data-i]").count()
        assert n_tok == len(_shard(home, A, "tokens", step).query("sample_idx == @k"))
        assert "B − A" in page.locator("#tv-rvr-diff .tv-text [data-i]").first.get_attribute("title")
        # another metric: the three overlays follow
        page.click("#tv-rvr-metric input")
        page.locator("ul[role=listbox] li", has_text="loss").first.click()
        wait_for(lambda: painted("diff") == f"{B} - {A}/{step}/{k}|diff:loss", 60, "the loss difference")
        assert painted("a").endswith("|loss") and painted("b").endswith("|loss")
        wait_for(lambda: f"runs={B}" in page.url and "metric=loss" in page.url and f"sample={k}" in page.url,
                 30, "the deep link")
        page.goto(page.url)                                 # the link restores run B, sample and metric
        wait_for(lambda: painted("diff") == f"{B} - {A}/{step}/{k}|diff:loss", 90, "the view from the link")
        page.screenshot(path=str(ARTIFACTS / "runvsrun.png"), full_page=True)
        assert not errors, errors


@pytest.mark.slow
def test_run_vs_run_tokens_open_in_inspect_by_click_and_keys(home):
    """Keys: right twice selects the second token in A, B and B - A; Enter opens it in Inspect (run A, the tab's
    step and sample). Back on the tab, a click on a token of B opens it in Inspect with the header on run B."""
    from tests.test_ui_browser import open_tab
    with runvsrun_page(home) as (page, errors, step, k):
        page.wait_for_selector(f"#tv-rvr-b .tv-text[data-sample='{B}/{step}/{k}']", timeout=90_000)
        second = page.locator("#tv-rvr-a .tv-text [data-i]").nth(1).get_attribute("data-i")
        page.locator("#tv-rvr-summary").click()        # no field has the focus
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        for which in ("a", "b", "diff"):
            assert page.locator(f"#tv-rvr-{which} .t.sel").get_attribute("data-i") == second, which
        page.keyboard.press("Enter")
        page.wait_for_function(f"location.search.includes('tab=inspect') && "
                               f"location.search.includes('token={second}')", timeout=60_000)
        search = page.evaluate("location.search")
        assert f"run={A}" in search and f"step={step}" in search and f"sample={k}" in search, search
        page.wait_for_function(f"document.querySelector('#tv-overlay .t.sel')?.dataset.i === '{second}'")
        assert page.get_by_role("tab", name="Inspect", exact=True).get_attribute("aria-selected") == "true"

        open_tab(page, "runvsrun")
        tok = page.locator(f"#tv-rvr-b .tv-text[data-sample='{B}/{step}/{k}'] [data-i]").nth(3)
        pos = tok.get_attribute("data-i")
        tok.click()
        page.wait_for_function(f"location.search.includes('tab=inspect') && location.search.includes('run={B}') "
                               f"&& location.search.includes('token={pos}')", timeout=60_000)
        page.wait_for_selector(f"#tv-overlay .tv-text[data-sample='{B}/{step}/{k}'] .t.sel[data-i='{pos}']")
        assert B in page.locator("#tv-run input").input_value()
        assert not errors, errors
