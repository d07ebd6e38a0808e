"""The web app's pure parts, without a server: the token overlay, deep links, the launch form's config and
path checks, the job queue, the scheme table, the new figure builders, and a torch-free start.

    pytest tests/test_ui_units.py
"""
from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from backend.analysis import figures
from backend.jobs import queue as jobs
from backend.jobs import registry
from backend.jobs.train import TrainConfig
from backend.store import paths
from tokviz import links, overlay
from tokviz.context import Settings

ROOT = Path(__file__).resolve().parent.parent


def tokens_frame(texts: list[str], alignment: list[float], n_prompt: int) -> pd.DataFrame:
    n = len(texts)
    return pd.DataFrame({
        "position": np.arange(n), "resp_pos": [None] * n_prompt + list(range(n - n_prompt)), "token_id": 0,
        "token": texts, "category": "word", "is_response": [False] * n_prompt + [True] * (n - n_prompt),
        "loss": 1.0, "prob": 0.4, "entropy": 1.2, "weight": 1.0, "mode": "position",
        "alignment": alignment, "dot": alignment, "share": np.array(alignment) / 10, "magnitude": 0.5,
        "magnitude_estimated": False, "rank": 0})


# ---------------------------------------------------------------------------------------------- overlay
def test_overlay_escapes_token_text_and_keeps_whitespace():
    texts = ["Q", ":", "<script>alert(1)</script>", " a&b", "\n", '"x"', "<img src=x onerror=alert(1)>"]
    html = overlay.render(tokens_frame(texts, [0.1, -0.2, 0.3, 0.0, -0.1, 0.2, 0.05], n_prompt=2),
                          overlay.METRICS["alignment"], selected=3)
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert " a&amp;b" in html and "&quot;x&quot;" in html
    assert '<i class="nl">⏎</i>\n' in html                      # the newline token is kept, and visible
    text = html.split('class="tv-text"', 1)[1]                   # after the legend
    assert 'data-tip' not in html and 'data-json' not in html   # the numbers come on hover, not with the text
    assert text.count('class="t p') == 2 and text.count('class="t r') == 5
    assert text.count('class="tv-seg"') == 2                     # "prompt" and "response" labels
    assert "sel" in text.split('data-i="3"')[0].rsplit("<span", 1)[1]


def test_surprising_tokens_table_escapes_text_and_carries_the_token():
    from tokviz.tabs import tokens
    df = pd.DataFrame([{"kind": "opposing", "rank": 1, "sample_idx": 3, "position": 57, "resp_pos": 4,
                        "token": "<script>alert(1)</script>", "category": "<b>", "alignment": -0.5,
                        "magnitude": 1e-3, "loss": float("nan"), "prob": 0.25,
                        "context_before": 'x="<img src=x onerror=alert(2)>"\n', "context_after": " &"}])
    out = tokens.surprising_html(df)
    assert "<script>" not in out and "<img" not in out and "<b><" not in out
    assert "«&lt;script&gt;alert(1)&lt;/script&gt;»" in out and "&lt;img src=x onerror=alert(2)&gt;" in out
    assert '<tr data-sample="3" data-pos="57">' in out
    assert ">-0.5000<" in out and ">–<" in out and ">0.250<" in out        # formats; NaN as a dash
    assert "no response tokens" in tokens.surprising_html(df.iloc[:0])


def test_compare_summary_table_escapes_run_names_and_shortens_per_category_values():
    from tokviz.tabs import compare
    t = pd.DataFrame({"metric": ["gini", "category_alignment"],
                      "<img src=x onerror=alert(1)>": ["0.5", '{"word": 0.123456789, "<b>": -0.5}']})
    out = compare.summary_html(t)
    assert "<img" not in out and "<b>" not in out and "&lt;img src=x onerror=alert(1)&gt;" in out
    assert "<td>word 0.1235 · &lt;b&gt; -0.5</td>" in out


def test_overlay_colour_scale_is_diverging_around_the_centre():
    df = tokens_frame(["a", "b", "c", "d"], [-0.5, 0.0, 0.5, 0.25], n_prompt=0)
    m = overlay.METRICS["alignment"]
    scale = overlay.scale_for(m, df["alignment"], df["is_response"])
    assert scale.centre == 0.0
    t = scale.position(df["alignment"].to_numpy())
    assert t[1] == 0 and t[0] < 0 < t[2]
    colours = overlay.colours(np.array([-1.0, 0.0, 1.0, np.nan]))
    assert colours[1] == "#f7f7f7" and colours[3] == ""         # white at the centre, none for missing
    r, b = int(colours[0][1:3], 16), int(colours[0][5:7], 16)
    assert r > b                                                # negative: red
    r, b = int(colours[2][1:3], 16), int(colours[2][5:7], 16)
    assert b > r                                                # positive: blue
    html = overlay.render(df, m, key=("r", 5, 3))
    assert 'class="t r c0"' in html and 'class="t r c10"' in html and 'class="t r c20"' in html
    assert 'data-run="r" data-step="5" data-idx="3" data-metric="alignment"' in html


def test_one_sided_metrics_get_a_sequential_scale_over_their_real_range():
    # loss, probability, entropy, magnitude have no centre to diverge from: white at the sample's low end, dark at
    # its high end, the legend showing that range (it used to run from -3.03 to +3.03 around a median)
    loss = overlay.METRICS["loss"]
    vals = pd.Series(np.linspace(0.0, 10.0, 101))
    s = overlay.scale_for(loss, vals, pd.Series([True] * 101))
    assert s.sequential and s.value_at(-1) == pytest.approx(0.2) and s.value_at(1) == pytest.approx(9.8)
    assert s.position(np.array([0.2, 9.8])) == pytest.approx([-1, 1])
    seq = overlay.colours(np.array([-1.0, 1.0]), sequential=True)
    assert seq[0] == "#fcfbfd" and sum(int(seq[1][i:i + 2], 16) for i in (1, 3, 5)) < 300     # white .. dark
    mag = overlay.scale_for(overlay.METRICS["magnitude"], pd.Series([1e-6, 1e-4, 1e-2]), pd.Series([True] * 3))
    assert mag.sequential and mag.log and 1e-6 <= mag.value_at(-1) < mag.value_at(1) <= 1e-2
    for name in ("alignment", "dot", "share", "weight"):
        assert overlay.METRICS[name].centre is not None                  # signed, or a ratio around 1: diverging
    df = tokens_frame(["a", "b", "c", "d"], [-0.5, 0.0, 0.5, 0.25], n_prompt=0).assign(loss=[0.1, 1.0, 2.0, 3.0])
    html = overlay.render(df, loss)
    assert 'class="t r s0"' in html and 'class="t r s20"' in html and not re.search(r'class="t [rp] c\d', html)
    assert "centre" not in html.split('class="tv-text"', 1)[0]            # a sequential legend has no centre


def test_prompt_tokens_are_uncoloured_for_metrics_of_trained_tokens():
    df = tokens_frame(["p1", "p2", "r1", "r2"], [0.3, -0.3, 0.2, -0.1], n_prompt=2).assign(loss=[9.0, 8.0, 0.1,
                                                                                                 0.2])
    html = overlay.render(df, overlay.METRICS["loss"])
    text = html.split('class="tv-text"', 1)[1]
    assert text.count('class="t p"') == 2 and text.count('class="t r s') == 2      # prompt: no colour class
    assert "prompt (not trained on: uncoloured)" in html
    # the prompt's huge losses do not stretch the scale either: it spans the response tokens
    assert overlay.scale_for(overlay.METRICS["loss"], df["loss"], df["is_response"]).value_at(1) < 1
    # alignment of a prompt position (its piece in position mode) keeps its colour
    html = overlay.render(df, overlay.METRICS["alignment"])
    assert html.split('class="tv-text"', 1)[1].count('class="t p c') == 2


def test_tooltip_numbers_are_compact_json_with_nulls():
    df = tokens_frame(["a", "b", "c"], [0.123456, np.nan, -2.5e-7], n_prompt=1)
    d = json.loads(overlay.tip_data(df, np.array([1.0, 0.333333, np.nan]), "antiop"))
    cols = d["columns"]
    assert cols["alignment"] == [0.1235, None, -2.5e-07] and cols["position"] == [0, 1, 2]
    assert cols["resp_pos"] == [-1, 0, 1] and cols["is_response"] == [0, 1, 1]
    assert d["categories"] == ["word"] and d["what_if"] == {"name": "antiop", "values": [1.0, 0.3333, None]}


# ---------------------------------------------------------------------------------------------- deep links
def test_focus_round_trip_and_hostile_values():
    f = links.Focus("inspect", "run-1", 20, 3, 57)
    q = f.query()
    assert q == "?tab=inspect&run=run-1&step=20&sample=3&token=57"
    from urllib.parse import parse_qsl
    assert links.Focus.from_query(dict(parse_qsl(q[1:]))) == f
    bad = links.Focus.from_query({"tab": "<x>", "run": "../../etc/passwd", "step": "1e9x", "sample": "-4",
                                  "token": "2"})
    assert bad.tab == "inspect" and bad.step is None and bad.sample is None and bad.run == "../../etc/passwd"
    assert links.Focus("layers", "r", 5, 3, 4).query() == "?tab=layers&run=r&step=5"   # no sample/token off Inspect


# ---------------------------------------------------------------------------------------------- tabs and the page
def test_the_tab_registry_names_the_deep_links_tabs():
    from tokviz.tabs import TABS
    assert links.tab_names() == tuple(t.name for t in TABS)
    assert len(set(links.tab_names())) == len(TABS) and links.HOME == TABS[0].name
    # a link names what a render reads; the SQL console (no render) has its text put straight into its editor
    assert all(t.link is None or t.render is not None for t in TABS if t.name != "sql")


def fake_views(blocked: dict):
    """The app's Views over two fake tabs whose render records (tab, run) and waits on ``blocked[(tab, run)]``
    (a threading.Event) where there is one: a render that is still running when another event fires."""
    from types import SimpleNamespace

    from tokviz.tabs import TabSpec
    from tokviz.ui import Built, Views

    calls = []

    def render(t, at, got):
        calls.append((t.name, at.run))
        if (t.name, at.run) in blocked:
            assert blocked[(t.name, at.run)].wait(10)
        return [f"{t.name}@{at.run}/{at.step}"], {}

    def tab(name):
        t = SimpleNamespace(name=name, inputs=[], outputs=[f"{name}-out"])
        return Built(TabSpec(name, name.title(), build=None, wire=None, render=render), tab=None, t=t)
    page = SimpleNamespace(ctx=None, header=SimpleNamespace(notice="notice", query="query"))
    return Views(page, [tab("inspect"), tab("layers")]), calls


def in_thread(fn, *args):
    out = {}
    th = threading.Thread(target=lambda: out.update(fn(*args)), daemon=True)
    th.start()
    return th, out


def test_a_run_change_renders_the_tab_a_switch_opened_while_that_switch_renders():
    """A tab switch (unqueued) is still rendering Inspect for the old run when the run change (queued) fires:
    the run change waits for it and renders Inspect, the tab now on screen, for the new run (it used to render
    the tab it found in the page's state when it fired, the one before the switch, and leave Inspect showing
    the old run)."""
    from tokviz.header import Shown
    gate = threading.Event()
    views, calls = fake_views({("inspect", "old"): gate})
    shown = Shown(tab="layers", run="old", step=5)
    shown.mark("layers", 0)
    switch, switched = in_thread(views.open, shown, "inspect", 0, {"query": "?tab=layers"})
    wait_for_call(calls, ("inspect", "old"))
    change, changed = in_thread(views.move, shown, "new", 5, 0, {})
    time.sleep(0.2)                      # the run change is waiting for the switch's render
    assert calls == [("inspect", "old")]
    gate.set()
    switch.join(10), change.join(10)
    assert switched["inspect-out"] == "inspect@old/5"
    assert changed["inspect-out"] == "inspect@new/5" and "layers-out" not in changed
    assert changed["query"] == "?tab=inspect&run=new&step=5"
    assert shown.tab == "inspect" and shown.rendered == {"inspect": "new|5|0"}


def test_a_tab_switch_while_a_run_change_renders_shows_the_new_run():
    """The run change is rendering the tab on screen when another tab is opened: the switch waits and renders
    the header the run change left (run and step), not the one the browser sent when the tab was clicked."""
    from tokviz.header import Shown
    gate = threading.Event()
    views, calls = fake_views({("layers", "new"): gate})
    shown = Shown(tab="layers", run="old", step=5)
    change, changed = in_thread(views.move, shown, "new", 7, 0, {})
    wait_for_call(calls, ("layers", "new"))
    switch, switched = in_thread(views.open, shown, "inspect", 0, {"query": "?tab=layers&run=new&step=7"})
    time.sleep(0.2)
    assert calls == [("layers", "new")]
    gate.set()
    change.join(10), switch.join(10)
    assert changed["layers-out"] == "layers@new/7"
    assert switched["inspect-out"] == "inspect@new/7" and switched["query"] == "?tab=inspect&run=new&step=7"
    assert shown.rendered == {"layers": "new|7|0", "inspect": "new|7|0"}
    # opened again with nothing new to show: no render; the link keeps what it holds
    again = views.open(shown, "inspect", 0, {"query": "?tab=inspect&run=new&step=7"})
    assert again == {"query": {"__type__": "update"}}
    assert calls == [("layers", "new"), ("inspect", "new")]


def test_a_tab_select_sent_before_the_page_loaded_changes_nothing():
    """The tab strip selects its first tab as the page mounts, alongside the load: handled after the load, it
    must not take the page from the tab the link opened (the header's query is empty until the load)."""
    from tokviz.header import Shown
    views, calls = fake_views({})
    shown = Shown(tab="layers", run="r", step=5)
    shown.mark("layers", 0)
    assert views.open(shown, "inspect", 0, {"query": ""}) == {"__type__": "update"}
    assert shown.tab == "layers" and calls == []


def wait_for_call(calls: list, call: tuple, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while call not in calls:
        assert time.time() < deadline, f"no render of {call} within {timeout} s: {calls}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------- the launch config
def test_a_queued_config_round_trips_through_its_config_file(tmp_path):
    """The queue writes a job's config to its run directory and the job reads it back (``--config``): the
    same object, whatever its fields hold (a comma inside a list entry, a leading dash)."""
    import argparse

    from backend.jobs.config import add_config_args, config_from_args
    from backend.store.rundir import queue_config
    cfg = TrainConfig(name="-odd name", task="modadd", task_params={"p": 13}, scheme="topk",
                      scheme_params={"keep_ratio": 0.5}, lora_targets=["q_proj", "v,proj"], lora_alpha=8.0,
                      chat_template=False, steps=4, trace_every=2, n_train=64, n_eval=8, batch_size=4, lr=1e-3,
                      run_id="r1")
    queue_config(tmp_path / "r1", "train", cfg)
    parser = argparse.ArgumentParser()
    add_config_args(parser, TrainConfig)
    back = config_from_args(parser.parse_args(["--config", str(tmp_path / "r1" / "config.json")]), TrainConfig)
    assert back.to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="already exists"):
        queue_config(tmp_path / "r1", "train", cfg)


def test_form_values_build_the_same_config_and_name_bad_fields(tmp_path):
    from tokviz.tabs.launch import config_from_form, form_fields
    names = {f.name for f in form_fields()}
    assert {"model", "scheme", "scheme_params", "lora_r", "steps", "trace_every", "trace_mode"} <= names
    assert not names & {"runs_root", "run_id", "dataset"}
    cfg = config_from_form({"steps": 4.0, "lora_targets": "q_proj, v_proj", "scheme": "antiop",
                            "scheme_params": "clip_mult=2", "trace_every": 2, "chat_template": False})
    assert cfg.steps == 4 and cfg.lora_targets == ["q_proj", "v_proj"] and cfg.scheme_params == {"clip_mult": 2}
    from backend.lm.scheme_specs import SCHEMES
    from tokviz.tabs.launch import form_text
    for name, info in SCHEMES.items():          # the text the form shows for a scheme's defaults parses back
        cfg = config_from_form({"scheme": name, "scheme_params": form_text(info.defaults, "dict")})
        assert cfg.scheme_params == info.defaults
    with pytest.raises(ValueError, match=r"lora_r=0 is outside the allowed range \[1, 4096\]"):
        config_from_form({"lora_r": 0})
    with pytest.raises(ValueError, match="steps: expected a whole number"):
        config_from_form({"steps": 2.5})
    with pytest.raises(ValueError, match="clip_mult"):
        config_from_form({"scheme": "antiop", "scheme_params": "clip_mult=-1"})


def test_the_launch_form_left_as_it_is_launches_a_traced_run():
    # a new user launching with the defaults got an untraced run, which most tabs cannot show
    import gradio as gr

    from backend.jobs import registry
    from tokviz.tabs.launch import _kind_form, config_from_form
    with gr.Blocks():
        form = _kind_form(registry.get("train"))
    values = {name: comp.value for name, comp in form.fields.items()}
    assert values["trace_every"] == 20
    assert config_from_form(values).trace_every == 20


def test_confine_paths_keeps_user_paths_inside_the_data_root(tmp_path):
    root = tmp_path / "home"
    (root / "models" / "m").mkdir(parents=True)
    ok = [TrainConfig(model="default"), TrainConfig(model="Qwen/Qwen2.5-1.5B"),
          TrainConfig(model=str(root / "models" / "m"))]
    for cfg in ok:
        jobs.confine_paths(cfg, [root])
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"prompt": "a", "response": "b"}\n')
    for model in ("../../etc", "/etc", "~/", "a/../../b", str(tmp_path)):
        with pytest.raises(ValueError, match="model"):
            jobs.confine_paths(TrainConfig(model=model), [root])
    with pytest.raises(ValueError, match="dataset"):
        jobs.confine_paths(TrainConfig(dataset=str(outside)), [root])
    with pytest.raises(ValueError, match="outside the allowed roots"):
        jobs.confine_paths(TrainConfig(runs_root=str(tmp_path)), [root])
    # the held-out file of influence tracing is a path too (it was read from anywhere on the server)
    from backend.jobs.compare_schemes import CompareSchemesConfig
    for cfg in (TrainConfig(trace_every=5, influence_eval=4, influence_file=str(outside)),
                CompareSchemesConfig(trace_every=5, influence_eval=4, influence_file=str(outside))):
        with pytest.raises(ValueError, match="influence_file .* outside the allowed roots"):
            jobs.confine_paths(cfg, [root])


def test_every_path_like_config_field_is_confined():
    """A str field that names a file or folder (dataset, *_file, *_root, *_dir, run, adapter) is in its kind's
    path_fields, so a hosted app that launches jobs checks it against the allowed roots."""
    from dataclasses import fields

    from backend.jobs import registry
    for spec in registry.kinds().values():
        path_like = {f.name for f in fields(spec.config) if f.type == "str" and (
            f.name in ("dataset", "run", "adapter") or f.name.endswith(("_file", "_root", "_dir", "_path")))}
        assert path_like <= set(spec.path_fields), (spec.name, sorted(path_like - set(spec.path_fields)))


def test_uploads_are_stored_inside_the_data_root(tmp_path):
    from tokviz.tabs.launch import store_upload
    up = tmp_path / "up" / "..%2f..%2fevil name.jsonl"
    up.parent.mkdir()
    up.write_text('{"prompt": "a", "response": "b"}\n')
    stored = Path(store_upload(str(up), tmp_path / "home"))
    assert (tmp_path / "home" / "uploads") in stored.parents and stored.read_text() == up.read_text()
    bad = tmp_path / "x.exe"
    bad.write_text("")
    with pytest.raises(ValueError, match="expected one of"):
        store_upload(str(bad), tmp_path / "home")


def test_read_only_mode_needs_the_admin_token(monkeypatch, tmp_path):
    s = Settings(tmp_path, readonly=True, admin_token="s3cret")
    assert not s.may_launch(None) and not s.may_launch("") and not s.may_launch("wrong")
    assert s.may_launch("s3cret")
    assert not Settings(tmp_path, readonly=True).may_launch("anything")
    assert Settings(tmp_path).may_launch(None)
    monkeypatch.setenv("SPACE_ID", "user/space")
    assert Settings.from_env().readonly


# ---------------------------------------------------------------------------------------------- the job queue
FAKE_JOB = """
import json, os, sys, time
run = sys.argv[1]
os.makedirs(run, exist_ok=True)
open(os.path.join(run, "config.json"), "w").write("{}")
total = int(sys.argv[2])
for step in range(1, total + 1):
    with open(os.path.join(run, "events.jsonl"), "a") as f:
        f.write(json.dumps({"type": "progress", "step": step, "total": total, "eta_s": 0.1 * (total - step)}) + "\\n")
    time.sleep(0.1)
if total > 3:
    open(os.path.join(run, "manifest.json"), "w").write("{}")
else:
    print("error: something went wrong", file=sys.stderr)
    sys.exit(2)
"""


def test_job_queue_runs_one_at_a_time_reports_progress_and_cancels(tmp_path):
    ended = []
    q = jobs.JobQueue(max_running=1, on_exit=ended.append, logs_dir=tmp_path / "logs")

    def submit(name: str, total: int) -> jobs.Job:
        return q.submit_command("fake", [sys.executable, "-c", FAKE_JOB, str(tmp_path / name), str(total)], name,
                                tmp_path / name, title=name)
    try:
        a, b, c = submit("ok", 5), submit("fails", 2), submit("slow", 400)
        time.sleep(0.3)
        assert [v.status for v in q.snapshot()][::-1][:2] == ["running", "queued"]
        q.wait(a.job_id, 30)
        assert a.status == "finished" and q.snapshot()[-1].fraction == 1.0
        q.wait(b.job_id, 30)
        assert b.status == "failed" and "something went wrong" in b.message
        assert "error: something went wrong" in q.log_tail(b.job_id)
        view = next(v for v in _wait_running(q, c.job_id))
        assert view.total == 400 and view.step >= 1
        q.cancel(c.job_id)
        q.wait(c.job_id, 30)
        assert c.status == "cancelled"
        events = [json.loads(ln) for ln in (tmp_path / "slow" / "events.jsonl").read_text().splitlines()]
        assert events[-1]["type"] == "error" and "cancelled" in events[-1]["error"]
        assert [j.job_id for j in ended] == [a.job_id, b.job_id, c.job_id]
        with pytest.raises(ValueError, match="already ended"):
            q.cancel(a.job_id)
        with pytest.raises(ValueError, match="no job"):
            q.get("nope")
    finally:
        q.shutdown()


def test_the_queue_outlives_an_on_exit_that_raises(tmp_path, capfd):
    """An error after a job ended (the app's ingest hit a DuckDB conflict) is reported on that job and on
    stderr; the next job, queued behind it, still starts and finishes, and shutdown stops the watcher."""
    import duckdb

    def on_exit(job: jobs.Job) -> None:
        if job.title == "first":
            raise duckdb.TransactionException("TransactionContext Error: Conflict on tuple deletion!")

    q = jobs.JobQueue(max_running=1, on_exit=on_exit, logs_dir=tmp_path / "logs")
    a, b = (q.submit_command("fake", [sys.executable, "-c", FAKE_JOB, str(tmp_path / n), "4"], n, tmp_path / n,
                             title=n) for n in ("first", "second"))
    try:
        q.wait(a.job_id, 30)
        assert a.status == "finished" and "TransactionException: TransactionContext Error: Conflict" in a.message
        q.wait(b.job_id, 30)
        assert b.status == "finished" and b.message == ""
    finally:
        q.shutdown()
    assert not q._watcher.is_alive() and not q.active()
    assert f"tokviz: job {a.job_id} (run first) after it ended: TransactionException" in capfd.readouterr().err


def test_the_app_reports_an_ingest_error_and_keeps_its_queue(tmp_path, monkeypatch, capfd):
    """``AppContext``'s on_exit (ingest) failing with a DuckDB error: the job says its run is not indexed, the
    next job runs and is ingested, and the app closes."""
    import duckdb

    from backend import index
    from tokviz.context import AppContext
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path))
    real, calls = index.ingest_run, []

    def ingest_run(con, run_dir, **kw):
        calls.append(Path(run_dir).name)
        if len(calls) == 1:
            raise duckdb.TransactionException("TransactionContext Error: Conflict on tuple deletion!")
        return real(con, run_dir, **kw)
    monkeypatch.setattr(index, "ingest_run", ingest_run)
    ctx = AppContext(Settings(tmp_path))
    runs = tmp_path / "runs"
    a, b = (ctx.jobs.submit_command("fake", [sys.executable, "-c", FAKE_JOB, str(runs / n), "4"], n, runs / n,
                                    title=n) for n in ("first", "second"))
    try:
        ctx.jobs.wait(a.job_id, 30)
        ctx.jobs.wait(b.job_id, 30)
        assert calls == ["first", "second"]
        assert a.message.startswith("not indexed: TransactionException") and b.status == "finished"
    finally:
        ctx.close()
        index.close_shared()
    assert not ctx.jobs._watcher.is_alive()
    assert "tokviz: could not ingest run first" in capfd.readouterr().err


def _wait_running(q: jobs.JobQueue, job_id: str):
    deadline = time.time() + 30
    while time.time() < deadline:
        v = next(v for v in q.snapshot() if v.job_id == job_id)
        if v.status == "running" and v.step:
            yield v
            return
        time.sleep(0.05)
    raise AssertionError("the job never reported progress")


def test_max_jobs_from_env(monkeypatch):
    monkeypatch.setenv("TOKVIZ_MAX_JOBS", "3")
    assert jobs.max_jobs_from_env() == 3
    monkeypatch.setenv("TOKVIZ_MAX_JOBS", "0")
    with pytest.raises(ValueError, match="TOKVIZ_MAX_JOBS"):
        jobs.max_jobs_from_env()


# ---------------------------------------------------------------------------------------------- schemes
def test_what_if_numpy_weights_match_the_torch_schemes():
    """The app's numpy weights (scheme_specs) and training's torch weights (schemes) on random batches."""
    import torch

    from backend.lm.scheme_specs import SCHEMES as SPECS
    from backend.lm.scheme_specs import WHAT_IF, what_if_weights
    from backend.lm.schemes import SCHEMES, SchemeInputs
    assert list(SPECS) == list(SCHEMES) and set(WHAT_IF) == {"sft", "dft", "asft", "topk", "antiop", "entropy"}
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 40
        loss = rng.exponential(1.0, n).astype(np.float32)
        loss[rng.integers(0, n, 3)] = loss[0]                          # ties for the top-k cuts
        resp = rng.random(n) < 0.8
        ent = rng.exponential(2.0, n).astype(np.float32)
        df = pd.DataFrame({"loss": loss, "is_response": resp, "entropy": ent})
        for name in WHAT_IF:
            s = SCHEMES[name]
            x = SchemeInputs(loss=torch.tensor(loss)[None], mask=torch.tensor(resp)[None],
                             entropy=torch.tensor(ent)[None])
            want = s.compute(x, s.resolve_params({}))[0].numpy()
            np.testing.assert_allclose(what_if_weights(df, name).to_numpy(), want, rtol=1e-6, err_msg=name)


def test_what_if_weights_match_hand_computed_weights():
    from backend.lm.scheme_specs import what_if_weights
    loss = np.array([0.1, 0.2, 4.0, 0.5, 3.0, 9.0, 0.3])
    resp = np.array([False, True, True, True, True, True, True])
    df = pd.DataFrame({"loss": loss, "is_response": resp, "entropy": np.arange(7.0)})
    c = 3.0 * np.median(loss[resp])                                    # antiop: clip at 3 x median loss
    want = np.where(resp, np.where(loss <= c, 1.0, c / loss), 0.0)
    np.testing.assert_allclose(what_if_weights(df, "antiop").to_numpy(), want, rtol=1e-6)
    keep = np.zeros(7)
    keep[np.flatnonzero(resp)[np.argsort(loss[resp], kind="stable")[:3]]] = 1.0   # topk 0.5 of 6: 3 lowest
    np.testing.assert_allclose(what_if_weights(df, "topk", {"keep_ratio": 0.5}).to_numpy(), keep)
    np.testing.assert_allclose(what_if_weights(df, "dft").to_numpy(), np.where(resp, np.exp(-loss), 0), rtol=1e-6)
    with pytest.raises(ValueError, match="reference model"):
        what_if_weights(df, "rho1")


# ---------------------------------------------------------------------------------------------- figures
def test_token_breakdown_heatmap_sums_parts_per_cell():
    rows = pd.DataFrame({"layer": [0, 0, 1, 1], "module": ["q_proj", "q_proj", "q_proj", "v_proj"],
                         "part": ["lora_A", "lora_B", "lora_A", "lora_B"], "alignment": [0.1, -0.2, 0.3, 0.4],
                         "dot": [1.0, 2.0, 3.0, 4.0], "magnitude": [1.0, 1.0, 1.0, 1.0]})
    fig = figures.token_breakdown(rows, "dot")
    hm = fig.data[0]
    assert list(hm.x) == ["q_proj A", "q_proj B", "v_proj B"] and list(hm.y) == ["0", "1"]
    z = np.array(hm.z, dtype=float)
    assert z[0, 0] == 1.0 and z[0, 1] == 2.0 and z[1, 0] == 3.0 and z[1, 2] == 4.0 and np.isnan(z[0, 2])
    bars = figures.token_breakdown(rows, kind="bars")
    assert {t.name for t in bars.data} == {"q_proj", "v_proj"}
    assert sum(sum(t.y) for t in bars.data) == 10.0
    assert figures.token_breakdown(rows.iloc[:0]).layout.annotations      # says why it is empty
    with pytest.raises(ValueError, match="value must be"):
        figures.token_breakdown(rows, "loss")
    # a null alignment (a module whose gradient is ~0) is a grey cell, not a 0, and the note says so; a layer
    # whose every value is null keeps its row
    nulls = rows.assign(alignment=[0.1, np.nan, np.nan, np.nan])
    fig = figures.token_breakdown(nulls, "alignment")
    z = np.array(fig.data[0].z, dtype=float)
    assert list(fig.data[0].y) == ["0", "1"] and z[0, 0] == pytest.approx(0.1) and np.isnan(z[0, 1:]).all() \
        and np.isnan(z[1]).all()
    assert fig.layout.plot_bgcolor == figures.NO_DATA and "gradient ~0" in fig.layout.annotations[0].text
    assert fig.layout.yaxis.type == "category" and fig.layout.yaxis.title.text == "layer"


def test_grid_keeps_every_panel_its_axes_shapes_and_one_legend_entry_per_name():
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    a = go.Figure([go.Scatter(x=[0, 1], y=[1, 2], name="run A"), go.Scatter(x=[0, 1], y=[2, 1], name="run B")])
    a.add_hline(y=0)
    a.update_layout(title_text="first", xaxis_title_text="step", yaxis_title_text="alignment",
                    yaxis_tickformat=".0%")
    b = make_subplots(specs=[[{"secondary_y": True}]])
    b.add_trace(go.Bar(x=["q", "k"], y=[1, 2], name="run A"))
    b.add_trace(go.Scatter(x=["q", "k"], y=[5, 6], name="lr"), secondary_y=True)
    b.update_layout(title_text="second", barmode="group")
    b.update_yaxes(title_text="lr", secondary_y=True)
    c = go.Figure(go.Scatter(x=[1], y=[1], name="run B"))
    g = go.Figure(figures.grid([a, b, c], cols=2))                              # validates the dict
    assert [t.text for t in g.layout.annotations] == ["first", "second"]       # no title, no label
    assert [(t.name, t.xaxis, t.yaxis) for t in g.data] == [
        ("run A", "x", "y"), ("run B", "x", "y"), ("run A", "x2", "y2"), ("lr", "x2", "y4"), ("run B", "x3", "y3")]
    assert [t.showlegend for t in g.data] == [True, True, False, True, False]     # each name once
    assert [t.legendgroup for t in g.data] == ["run A", "run B", "run A", "lr", "run B"]
    assert g.layout.xaxis.title.text == "step" and g.layout.yaxis.tickformat == ".0%"
    assert g.layout.yaxis4.title.text == "lr" and g.layout.yaxis4.overlaying == "y2"      # secondary axes last
    assert [(s.xref, s.yref) for s in g.layout.shapes] == [("x domain", "y")]
    assert g.layout.xaxis3.anchor == "y3" and g.layout.yaxis3.domain[1] < g.layout.yaxis.domain[0]   # row 2
    assert g.layout.barmode == "group"
    with pytest.raises(ValueError, match="at least one"):
        figures.grid([])


def test_concentration_and_loss_figures():
    stats = pd.DataFrame({"step": [10, 20], "n": [5, 5], "gini": [0.3, 0.4], "tokens_for_50pct": [0.2, 0.1],
                          "tokens_for_80pct": [0.5, 0.4], "tokens_for_90pct": [0.7, 0.6]})
    fig = figures.concentration_over_training(stats)
    assert [t.name for t in fig.data] == ["Gini", "tokens for 50%", "tokens for 80%", "tokens for 90%"]
    assert list(fig.data[0].y) == [0.3, 0.4]
    two = figures.concentration_over_training(pd.concat([stats.assign(run="a"), stats.assign(run="b")]))
    assert len(two.data) == 8
    train = pd.DataFrame({"step": [1, 2], "loss": [2.0, 1.0], "ce_loss": [2.5, 1.5], "lr": [1e-3, 2e-3]})
    names = [t.name for t in figures.loss_curve(train).data]
    assert names == ["loss (scheme)", "cross-entropy", "learning rate"]


# ---------------------------------------------------------------------------------------------- start-up
def test_the_app_starts_without_importing_torch(tmp_path):
    code = ("import sys, app, tokviz.ui, backend.jobs.queue, backend.analysis.report\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "TOKVIZ_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]


def test_every_config_field_has_a_form_input_or_is_set_by_the_app():
    from tokviz.tabs.launch import form_fields
    HIDDEN = registry.get("train").hidden_fields
    assert {f.name for f in form_fields()} | set(HIDDEN) == {f.name for f in fields(TrainConfig)}
    assert paths.PROJECT_ROOT == ROOT


def test_a_job_that_fails_before_its_start_is_failed_not_queued(tmp_path, monkeypatch):
    """A job whose process exits before writing its own ``start`` (here: its dataset vanished after the form
    validated it) leaves only the queue's ``queued`` event: the queue records the failure, so the run is
    ``failed`` (not ``queued`` while the app lives, nor ``interrupted`` after)."""
    from backend.index.ingest import status_of
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path / "home"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    cfg = TrainConfig(dataset=str(data), steps=1, n_eval=0, run_id="vanished-data")
    data.unlink()
    q = jobs.JobQueue(max_running=1, logs_dir=tmp_path / "logs")
    try:
        job = q.wait(q.submit(cfg).job_id, timeout=120)
    finally:
        q.shutdown()
    assert job.status == "failed" and "does not exist" in job.message
    assert status_of(job.run_dir) == "failed"


# ---------------------------------------------------------------------------------------------- trace mode
def test_overlay_legend_says_which_mode_the_gradient_metrics_are_in():
    """Alignment, dot, share and magnitude are of a position's piece in position mode and of the token's own
    loss gradient in token mode: the legend says which; metrics that are not gradients say nothing."""
    def legend_of(df: pd.DataFrame, metric: str) -> str:
        return overlay.render(df, overlay.METRICS[metric]).split('class="tv-text"', 1)[0]

    pos = tokens_frame(["Q", ":", " 4", "."], [0.1, -0.2, 0.3, -0.1], n_prompt=2)
    tok = pos.assign(mode="token")
    for metric in ("alignment", "dot", "share", "magnitude"):
        want = f'<span class="tv-mode">({html.escape(overlay.MODE_DESCRIPTIONS["position"])})</span>'
        assert want in legend_of(pos, metric)
        assert "token mode: the gradient of this token&#x27;s own loss" in legend_of(tok, metric)
        assert "position mode" not in legend_of(tok, metric)
    assert "later tokens&#x27; losses through attention" in legend_of(pos, "alignment")
    for metric in ("loss", "prob"):
        assert "tv-mode" not in legend_of(pos, metric)
    assert "tv-mode" not in legend_of(pos.drop(columns="mode"), "alignment")


def test_training_summary_puts_accuracy_before_and_after_side_by_side():
    from tokviz.tabs.training import eval_md
    greedy = pd.DataFrame({"correct": [True, False, True, True]})
    assert eval_md(greedy, {"accuracy": 0.25, "n": 4}) == ("eval accuracy (greedy, 4 items): before training 25.0% "
                                                           "→ after 75.0%")
    assert eval_md(greedy, None) == ("eval accuracy (greedy, 4 items): before training not measured (train with "
                                     "`--eval-before`) → after 75.0%")
    assert eval_md(greedy.iloc[:0], None) == "no evaluation"
