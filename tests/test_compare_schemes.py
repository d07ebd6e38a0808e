"""Scheme comparisons (backend.jobs.compare_schemes): the interval code against hand-computed and textbook
cases, the config and its child runs, results from eval records, bit-identical runs for identical settings,
and (slow) a tiny comparison through the CLI with a killed run resumed, and through the app in the browser.

    pytest tests/test_compare_schemes.py            # fast: ~20 s
    pytest tests/test_compare_schemes.py -m slow    # the CLI and the browser end to end: minutes
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from backend.analysis import report
from backend.analysis.intervals import paired_bootstrap, verdict
from backend.jobs import compare_schemes_run as csr
from backend.jobs.compare_schemes import (
    CompareSchemesConfig,
    child_config,
    plan,
    settings_hash,
)
from backend.jobs.train import TrainConfig
from backend.store import schema
from backend.store.rundir import RunDir, read_events, rows_to_table

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(steps=3, n_train=32, n_eval=4, eval_k=2, batch_size=4, eval_max_new_tokens=8, eval_batch_size=8,
            warmup_steps=1, checkpoint_every=1)


# ---- intervals ------------------------------------------------------------------------------------------------

def test_bootstrap_hand_computed_three_items():
    """Items scored (0, 0, 1): a resample's mean is (draws of the 1-item)/3, Binomial(3, 1/3): P(0) = 8/27,
    P(1/3) = 12/27, P(2/3) = 6/27, P(1) = 1/27 = 3.7%. So the 2.5% quantile is 0 (P(0) = 29.6% > 2.5%), and
    the 97.5% quantile is 1 (P(mean <= 2/3) = 26/27 = 96.3% < 97.5%)."""
    scores = np.array([[[0.0, 0.0, 1.0]]])                                  # (S=1, J=1, I=3)
    r = paired_bootstrap(scores, n_boot=50_000, seed=1)
    assert r.mean[0] == pytest.approx(1 / 3)
    assert (r.ci_low[0], r.ci_high[0]) == (0.0, 1.0)
    r80 = paired_bootstrap(scores, n_boot=50_000, seed=1, level=0.80)       # 10%: 0 (29.6%); 90%: 2/3 (96.3%)
    assert (r80.ci_low[0], r80.ci_high[0]) == (0.0, pytest.approx(2 / 3))


def test_bootstrap_resamples_seeds_too():
    """One item, two seeds scored 0 and 1: a resample draws the 1-seed k ~ Binomial(2, 1/2) times, mean k/2:
    P(0) = P(1) = 25%, so the 95% interval is [0, 1]; without resampling seeds every replicate is 0.5."""
    scores = np.array([[[0.0], [1.0]]])                                     # (S=1, J=2, I=1)
    r = paired_bootstrap(scores, n_boot=20_000, seed=0)
    assert (r.ci_low[0], r.ci_high[0]) == (0.0, 1.0)
    fixed = paired_bootstrap(scores, n_boot=2_000, seed=0, resample_seeds=False)
    assert (fixed.ci_low[0], fixed.ci_high[0]) == (0.5, 0.5)


def test_bootstrap_matches_the_normal_approximation():
    """For n Bernoulli items the bootstrap interval of the mean approaches p ± 1.96 sqrt(p (1 - p) / n)
    (textbook Wald interval), and the paired delta's approaches mean(d) ± 1.96 sd(d) / sqrt(n) over the item
    differences d (the paired t/z interval), which is much narrower than the unpaired one here."""
    rng = np.random.default_rng(7)
    n = 4000
    base = (rng.random(n) < 0.3).astype(float)
    other = base.copy()
    flip = rng.random(n) < 0.1                                              # 10% of items change
    other[flip] = 1 - other[flip]
    scores = np.stack([base, other])[:, None, :]                            # (S=2, J=1, I=n)
    r = paired_bootstrap(scores, baseline=0, n_boot=8000, seed=3)
    p = base.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    assert r.ci_low[0] == pytest.approx(p - half, abs=0.002)
    assert r.ci_high[0] == pytest.approx(p + half, abs=0.002)
    d = other - base
    dhalf = 1.96 * d.std(ddof=1) / np.sqrt(n)
    assert r.delta[1] == pytest.approx(d.mean())
    assert r.delta_low[1] == pytest.approx(d.mean() - dhalf, abs=0.002)
    assert r.delta_high[1] == pytest.approx(d.mean() + dhalf, abs=0.002)
    assert dhalf < 0.5 * 1.96 * np.sqrt(2 * p * (1 - p) / n)                 # pairing narrows it


def test_bootstrap_degenerate_deltas_and_verdicts():
    base = np.array([[0.25, 0.75, 0.5, 0.5], [0.5, 0.25, 0.75, 0.5]])      # (J=2, I=4), every cell in [.25, .75]
    scores = np.stack([base, base, np.ones_like(base), np.zeros_like(base)])
    r = paired_bootstrap(scores, baseline=0, n_boot=500, seed=0)
    assert (r.delta_low[1], r.delta_high[1]) == (0.0, 0.0)                  # the same scores: delta exactly 0
    assert verdict(r.delta_low[1], r.delta_high[1]) == "not distinguishable"
    assert r.delta_low[2] > 0 and verdict(r.delta_low[2], r.delta_high[2]) == "better"
    assert r.delta_high[3] < 0 and verdict(r.delta_low[3], r.delta_high[3]) == "worse"
    for bad in (np.zeros((2, 3)), np.zeros((2, 0, 3)), np.full((1, 1, 2), np.nan)):
        with pytest.raises(ValueError):
            paired_bootstrap(bad)
    with pytest.raises(ValueError, match="baseline index 5"):
        paired_bootstrap(scores, baseline=5)


# ---- config and child runs ------------------------------------------------------------------------------------

def test_config_takes_every_train_flag_and_rejects_bad_input():
    names = {f.name for f in fields(CompareSchemesConfig)}
    per_run = {"scheme", "seed", "dataset"}
    assert {f.name for f in fields(TrainConfig)} - per_run <= names
    assert {"schemes", "seeds", "baseline", "devices", "scheme_params"} <= names
    for bad, match in [(dict(schemes=["sft", "nope"]), "unknown scheme 'nope'"),
                       (dict(schemes=["sft"]), "at least two schemes"),
                       (dict(schemes=["sft", "sft"]), "each scheme once"),
                       (dict(baseline="dft"), "baseline 'dft' must be one of"),
                       (dict(eval_k=0), "eval_k"),
                       (dict(n_eval=0), "n_eval"),
                       (dict(devices=["x"]), "devices"),
                       (dict(scheme_params={"dft": {}}), "not among the schemes"),
                       (dict(scheme_params={"antiop": {"clip_mult": -1}}), "clip_mult"),
                       (dict(seeds=0), "seeds=0")]:
        with pytest.raises(ValueError, match=match):
            CompareSchemesConfig(**bad)


def test_child_runs_differ_only_in_scheme_and_seed_with_deterministic_ids():
    cfg = CompareSchemesConfig(name="t", schemes=["sft", "antiop"], seeds=2, first_seed=5, steps=7, lr=1e-3,
                               trace_every=3, trace_mode="token", scheme_params={"antiop": {"clip_mult": 2.0}})
    kids = plan(cfg)
    assert [(c.scheme, c.seed) for c in kids] == [("sft", 5), ("antiop", 5), ("sft", 6), ("antiop", 6)]
    own = {"scheme", "scheme_params", "seed", "name", "run_id"}
    ref = {k: v for k, v in kids[0].to_dict().items() if k not in own}
    for c in kids:
        assert {k: v for k, v in c.to_dict().items() if k not in own} == ref     # steps, lr, trace, eval, ...
    assert kids[1].scheme_params["clip_mult"] == 2.0 and kids[0].scheme_params == {}
    assert [c.run_id for c in plan(cfg)] == [c.run_id for c in kids]            # deterministic
    assert kids[0].run_id.startswith("t-sft-s5-") and len({c.run_id for c in kids}) == 4
    other = CompareSchemesConfig(**{**cfg.to_dict(), "lr": 2e-3})
    assert plan(other)[0].run_id != kids[0].run_id                               # other settings, other runs
    renamed = CompareSchemesConfig(**{**cfg.to_dict(), "run_id": "x", "log_every": 3})
    assert settings_hash(plan(renamed)[0]) == settings_hash(kids[0])             # what a run computes is the same


# ---- results from eval records --------------------------------------------------------------------------------

def _fake_child(root: Path, run_id: str, correct: dict[int, list[bool]]) -> Path:
    """A child run directory with only eval records: sample_k -> per-item correctness."""
    rows = {f.name: [] for f in schema.EVAL}
    for k, cs in correct.items():
        for i, c in enumerate(cs):
            for key, v in dict(run_id=run_id, sample_idx=i, sample_k=k, prediction="", answer=str(i),
                               extracted=str(i), correct=bool(c)).items():
                rows[key].append(v)
    path = root / run_id
    (path / "eval").mkdir(parents=True)
    pq.write_table(rows_to_table(rows, schema.EVAL), path / "eval" / "rank0.parquet")
    return path


def test_results_from_eval_records(tmp_path):
    """Greedy = mean of the sample_k = -1 records; sampled = mean over the k samples of each item; both over
    seeds and items, checked by hand; the delta to the baseline and the written results table."""
    cfg = CompareSchemesConfig(schemes=["sft", "topk"], seeds=2, n_boot=500, runs_root=str(tmp_path))
    g = {("sft", 0): [1, 0, 0, 1], ("sft", 1): [1, 1, 0, 0], ("topk", 0): [1, 1, 1, 1], ("topk", 1): [1, 1, 0, 1]}
    s = {("sft", 0): [[0, 0, 1, 1], [0, 1, 1, 1]], ("sft", 1): [[0, 0, 0, 0], [0, 0, 0, 1]],
         ("topk", 0): [[1, 1, 1, 1], [1, 1, 1, 1]], ("topk", 1): [[1, 0, 1, 1], [1, 1, 1, 1]]}
    children = []
    for c in plan(cfg):
        key = (c.scheme, c.seed)
        path = _fake_child(tmp_path, c.run_id, {-1: g[key], 0: s[key][0], 1: s[key][1]})
        children.append(csr.Child(cfg=c, path=path, status="finished"))
    rd = RunDir.create("compare-schemes", "t", cfg.to_dict(), root=tmp_path, run_id="cmp")
    try:
        m = csr.results(rd, cfg, children)
    finally:
        rd.stop_heartbeat()
    assert m["schemes"]["sft"]["greedy"]["mean"] == pytest.approx(4 / 8)
    assert m["schemes"]["topk"]["greedy"]["mean"] == pytest.approx(7 / 8)
    assert m["schemes"]["sft"]["sampled"]["mean"] == pytest.approx(6 / 16)
    assert m["schemes"]["topk"]["sampled"]["mean"] == pytest.approx(15 / 16)
    d = m["schemes"]["topk"]["greedy"]["delta_vs_baseline"]
    assert d["delta"] == pytest.approx(3 / 8) and d["ci_low"] <= 3 / 8 <= d["ci_high"]
    assert m["schemes"]["sft"]["greedy"]["delta_vs_baseline"]["verdict"] == "baseline"
    assert m["protocol"]["k_samples"] == 2 and m["protocol"]["items"] == 4
    for metric in ("greedy", "sampled"):
        one = m["schemes"]["topk"][metric]
        assert one["ci_low"] <= one["mean"] <= one["ci_high"]
    table = pq.read_table(rd.path / "compare" / "results.parquet").to_pandas()
    assert len(table) == 4 and set(table["metric"]) == {"greedy", "sampled"}
    # a run evaluated on other items is refused: the protocol needs the same items everywhere
    bad = tmp_path / "bad"
    _fake_child(bad, children[1].cfg.run_id, {-1: [1, 0, 1], 0: [1, 0, 1], 1: [1, 0, 1]})
    children[1].path = bad / children[1].cfg.run_id
    with pytest.raises(ValueError, match="other items"):
        csr.score_arrays({(c.cfg.scheme, c.cfg.seed): c.path for c in children}, ["sft", "topk"], [0, 1])


def test_compare_flags_runs_of_other_modes_or_steps():
    same = {"a": {"mode": "position", "step": 20}, "b": {"mode": "position", "step": 20}}
    assert report.comparability(same) == []
    flags = report.comparability({"a": {"mode": "position", "step": 20}, "b": {"mode": "token", "step": 40}})
    assert len(flags) == 2 and "different modes" in flags[0] and "a: position" in flags[0]
    assert "different steps" in flags[1] and "b: step 40" in flags[1]


def test_trace_stats_by_scheme_against_the_baseline(tmp_path):
    """A comparison grouping four synthetic traced runs (2 schemes x 2 seeds), ingested: its children, and the
    trace statistics per scheme: mean alignment = the mean of each run's response-token alignment at the step
    (SQL straight on the tokens, averaged over seeds), its delta = that minus the baseline's."""
    from backend import index
    from backend.analysis import schemes
    from backend.dev.synth import SynthConfig, make_run
    from backend.jobs.compare_schemes import COMPARE_RUNS
    runs = tmp_path / "runs"
    syn = dict(n_layers=2, n_samples=3, traced_steps=(5, 10), max_step=10, prompt_len=(4, 6), response_len=(8, 12))
    kids = {(sch, seed): make_run(SynthConfig(scheme=sch, seed=10 * i + seed, **syn), runs,
                                  run_id=f"k-{sch}-{seed}").name
            for i, sch in enumerate(["sft", "topk"]) for seed in (0, 1)}
    cfg = CompareSchemesConfig(schemes=["sft", "topk"], seeds=2)
    rd = RunDir.create("compare-schemes", "syn", cfg.to_dict(), root=runs, run_id="cmp-syn")
    rd.write_table("compare/runs.parquet", rows_to_table({
        "run_id": ["cmp-syn"] * 4, "child_run_id": list(kids.values()), "scheme": [k[0] for k in kids],
        "seed": [k[1] for k in kids], "status": ["finished"] * 4, "device": [""] * 4,
        "greedy_accuracy": [0.5] * 4, "sampled_accuracy": [0.5] * 4, "seconds": [1.0] * 4}, COMPARE_RUNS))
    rd.finish({})
    con = index.connect(index.MEMORY)
    try:
        index.ingest_all(con, runs)
        assert sorted(schemes.children("cmp-syn", con)["child_run_id"]) == sorted(kids.values())
        st = schemes.trace_stats("cmp-syn", con).set_index(["scheme", "stat"])
        direct = {k: con.execute("SELECT avg(alignment) FROM tokens WHERE run_id = ? AND step = 10 AND is_response",
                                 [rid]).fetchone()[0] for k, rid in kids.items()}
        mean = {sch: (direct[(sch, 0)] + direct[(sch, 1)]) / 2 for sch in ("sft", "topk")}
        assert st.loc[("topk", "mean_alignment"), "mean"] == pytest.approx(mean["topk"], rel=1e-5)
        assert st.loc[("topk", "mean_alignment"), "delta_vs_baseline"] == pytest.approx(mean["topk"] - mean["sft"],
                                                                                        rel=1e-4, abs=1e-7)
        assert st.loc[("sft", "gini"), "delta_vs_baseline"] == 0.0
        assert set(st["step"]) == {10} and set(st["n_seeds"]) == {2}
        assert schemes.weights_figure(schemes.weights_by_category("cmp-syn", con)).data
    finally:
        con.close()


# ---- identical settings, identical runs ----------------------------------------------------------------------

def test_identical_settings_give_bit_identical_runs(tmp_path):
    """antiop seed 0 trained twice in separate roots: the same trained weights (sha256 of the LoRA bytes),
    losses and eval records. sft with the same seed: the same first-step cross-entropy (same LoRA init, same
    first batch; the loss is logged before the update); sft with another seed: another one."""
    from backend.lm.trainer import train

    def one(root: str, scheme: str, seed: int) -> tuple:
        cfg = CompareSchemesConfig(schemes=["sft", "antiop"], seeds=2, runs_root=str(tmp_path / root),
                                   **{**TINY, "n_eval": 2, "eval_k": 1})
        path = train(child_config(cfg, scheme, seed), progress=False)
        m = json.loads((path / "manifest.json").read_text())
        steps = pq.read_table(path / "train_steps").to_pandas().sort_values("step")
        ev = pq.read_table(path / "eval" / "rank0.parquet").to_pandas()
        return (m["rank_param_digests"][0], steps["loss"].tolist(), ev["correct"].tolist(),
                ev["prediction"].tolist()), steps["ce_loss"].iloc[0]

    first, ce_antiop = one("a", "antiop", 0)
    again, _ = one("b", "antiop", 0)
    assert first == again
    _, ce_sft = one("a", "sft", 0)
    _, ce_sft_seed1 = one("a", "sft", 1)
    assert ce_sft == ce_antiop and ce_sft != ce_sft_seed1


# ---- end to end (slow) -----------------------------------------------------------------------------------------

def _cli(root: Path, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    return [sys.executable, "-m", "backend", "compare-schemes", "--name", "e2e", "--schemes", "sft,antiop",
            "--seeds", "1", "--runs-root", str(root), "--quiet", *flags, "--steps", "30", *extra]


@pytest.mark.slow
def test_cli_end_to_end_with_a_killed_run_resumed(tmp_path):
    """The first child is killed (SIGKILL) after its first checkpoint: the comparison finishes the other run,
    then fails naming the killed one. Run again with the same settings: the killed run resumes from its
    checkpoint, the finished one is reused, and --json prints the results; the index groups the runs under
    the comparison."""
    env = {**os.environ, "TOKVIZ_HOME": str(tmp_path)}
    first = subprocess.Popen(_cli(tmp_path / "runs", "--run-id", "cmp-1"), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = tmp_path / "runs" / plan(CompareSchemesConfig(name="e2e", schemes=["sft", "antiop"], seeds=1,
                                                           runs_root=str(tmp_path / "runs"),
                                                           **{**TINY, "steps": 30}))[0].run_id
    deadline = time.time() + 300
    while time.time() < deadline:
        ev = read_events(victim) if victim.exists() else []
        if any(e["type"] == "checkpoint" for e in ev):
            os.kill(next(e["pid"] for e in ev if e["type"] == "start"), signal.SIGKILL)
            break
        time.sleep(0.05)
    else:
        first.kill()
        pytest.fail("the first run never wrote a checkpoint")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 2, err
    assert "1 of 2 runs did not finish" in err and victim.name in err
    assert not (victim / "manifest.json").exists()

    second = subprocess.run(_cli(tmp_path / "runs", "--run-id", "cmp-2", "--json"), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr
    res = json.loads(second.stdout)
    for s in ("sft", "antiop"):
        for metric in ("greedy", "sampled"):
            r = res["schemes"][s][metric]
            assert r["ci_low"] <= r["mean"] <= r["ci_high"] and "delta_vs_baseline" in r
    status = {r["scheme"]: r["status"] for r in res["runs"]}
    assert status == {"sft": "finished", "antiop": "reused"}
    assert any(e["type"] == "resumed" for e in read_events(victim))       # continued from its checkpoint
    plan_ev = next(e for e in read_events(tmp_path / "runs" / "cmp-2") if e["type"] == "plan")
    assert plan_ev["reused"] == 1 and plan_ev["runs"] == 2

    from backend import index
    from backend.analysis import schemes
    con = index.connect(index.MEMORY)
    try:
        index.ingest_all(con, tmp_path / "runs")
        kids = schemes.children("cmp-2", con)
        assert sorted(kids["scheme"]) == ["antiop", "sft"] and set(kids["status"]) == {"finished"}
        assert len(schemes.results("cmp-2", con)) == 4
        assert len(schemes.loss_curves("cmp-2", con)) == 2 * 30
        assert schemes.loss_figure(schemes.loss_curves("cmp-2", con)).data
    finally:
        con.close()


@pytest.mark.slow
def test_a_tiny_comparison_launched_from_the_schemes_tab(tmp_path):
    """In the browser: the Schemes tab's form launches a 2-scheme comparison; its status line, then the
    results table (both schemes, intervals, a verdict) and its runs appear without a reload."""
    from tests.conftest import (
        ARTIFACTS,
        CHROMIUM,
        CHROMIUM_ARGS,
        app_server,
        make_home,
        wait_for,
    )
    pw = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    home = make_home(tmp_path / "home", xss=False)
    with app_server(home) as (url, ctx), pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "?tab=schemes")
            page.wait_for_selector("#tv-sch-status", state="attached")
            wait_for(lambda: "No scheme comparison indexed yet" in page.inner_text("#tv-sch-status"), 60,
                     "the empty-state line")
            page.click("#tv-sch-launch-box button")                       # open the launch accordion
            form = {"name": "ui", "schemes": "sft, antiop", "seeds": "1", "steps": "3", "n_train": "32",
                    "n_eval": "4", "batch_size": "4", "eval_k": "1"}
            for field, value in form.items():
                sel = f"#tv-sch-f-compare-schemes-{field}"
                page.fill(f"{sel} input, {sel} textarea", value)
            page.click("#tv-sch-launch")
            page.wait_for_selector("#tv-sch-message .tv-ok")
            job = ctx.jobs.snapshot()[0]
            assert job.kind == "compare-schemes"
            wait_for(lambda: ctx.jobs.snapshot()[0].status not in ("queued", "running"), 420, "the comparison")
            assert ctx.jobs.snapshot()[0].status == "finished", ctx.jobs.log_tail(job.job_id)[-3000:]
            wait_for(lambda: "Results ·" in page.inner_text("#tv-sch-table"), 60, "the results table")
            table = page.inner_text("#tv-sch-table")
            assert "sft" in table and "antiop" in table and "baseline" in table
            assert "not distinguishable" in table or "better" in table or "worse" in table
            assert page.locator("#tv-sch-runs tr").count() == 3                 # header + 2 runs
            page.wait_for_selector("#tv-sch-loss .js-plotly-plot")
            (ARTIFACTS / "ui").mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui" / "schemes.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()


@pytest.mark.slow
def test_cancelling_a_comparison_in_the_queue_stops_its_runs(tmp_path, monkeypatch):
    """The app's queue cancels a running comparison (SIGINT, then SIGKILL, to its process group): the running
    child run's process is gone too, the child and the comparison are recorded as failed."""
    from backend.index.ingest import status_of
    from backend.jobs.queue import JobQueue
    from backend.store.rundir import process_alive
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path))
    q = JobQueue(max_running=1, logs_dir=tmp_path / "jobs")
    cfg = CompareSchemesConfig(name="cancel", schemes=["sft", "antiop"], seeds=1, **{**TINY, "steps": 100000})
    job = q.submit(cfg)
    child = tmp_path / "runs" / plan(cfg)[0].run_id
    start = wait_until(lambda: next((e for e in read_events(child) if e["type"] == "progress"), None)
                       if child.exists() else None, 300, "the first run's first step")
    pid_event = next(e for e in read_events(child) if e["type"] == "start")
    assert start["step"] >= 1 and process_alive(pid_event) is True
    q.cancel(job.job_id)
    q.wait(job.job_id, timeout=60)
    assert q.get(job.job_id).status == "cancelled"
    wait_until(lambda: process_alive(pid_event) is False, 30, "the child process to end")
    assert status_of(child) in ("failed", "interrupted")
    assert status_of(job.run_dir) == "failed"
    q.shutdown()


def wait_until(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
