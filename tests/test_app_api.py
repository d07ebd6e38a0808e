"""The running app through its public API (gradio_client), on synthetic runs: what each endpoint returns
against an independent computation from the Parquet shards, user errors as messages, HTML escaping of token
text, the read-only SQL console, and paths that try to leave the data root.

    pytest tests/test_app_api.py
"""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import plotly.io as pio
import pyarrow.parquet as pq
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from backend.analysis import metrics
from backend.dev.synth import read_shards
from tests.conftest import XSS_TOKENS, app_server

ENDPOINTS = {"/inspect_sample", "/inspect_token", "/previous_sample", "/next_sample", "/recolour",
             "/search_samples", "/concentration", "/layer_position_heatmap", "/compare_runs", "/sql", "/launch",
             "/cancel_job", "/refresh_runs"}


@pytest.fixture(scope="module")
def server(data_home):
    with app_server(data_home) as (url, ctx):
        yield url, ctx, Client(url, verbose=False)


@pytest.fixture(scope="module")
def shards(data_home):
    return {r: read_shards(data_home / "runs" / r, "tokens") for r in ("synth-sft", "synth-antiop")}


def test_public_endpoints(server):
    _, _, client = server
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert ENDPOINTS <= names


def test_inspect_sample_and_token_match_the_shards(server, shards):
    _, _, client = server
    tok = shards["synth-sft"]
    step = 10
    sample = int(sorted(tok[tok.step == step].sample_idx.unique())[1])
    html, token, title, _fig, near, query = client.predict("synth-sft", step, sample, "alignment", None,
                                                           api_name="/inspect_sample")
    rows = tok[(tok.step == step) & (tok.sample_idx == sample)].sort_values("position")
    assert html.count(' data-i=') == len(rows)             # one span per token record
    assert f'data-sample="synth-sft/{step}/{sample}"' in html
    assert token is None and query == f"?tab=inspect&run=synth-sft&step={step}&sample={sample}"
    pos = int(rows[rows.is_response].position.iloc[3])
    token, title, fig, near, query = client.predict("synth-sft", step, sample, pos, "heatmap: dot",
                                                    api_name="/inspect_token")
    row = rows[rows.position == pos].iloc[0]
    assert token == pos and f"alignment {row.alignment:.4f}" in title
    assert query.endswith(f"&token={pos}")
    table = dict(zip(near["headers"], zip(*near["data"])))
    assert "▶" in table[""] and pos in table["position"]
    # the breakdown heatmap's cells are the token's module rows, parts side by side
    plot = pio.from_json(fig["plot"])
    mods = read_shards(client_home(server) / "runs" / "synth-sft", "token_modules")
    m = mods[(mods.step == step) & (mods.sample_idx == sample) & (mods.position == pos)]
    z = decode(plot.data[0].z)
    assert z.shape == (m.layer.nunique(), m.module.nunique() * 2)
    np.testing.assert_allclose(np.nansum(z), m["dot"].astype(float).sum(), rtol=1e-5)


def decode(v) -> np.ndarray:
    """A plotly JSON array (plain lists, or typed {"dtype", "bdata", "shape"}, possibly one per row)."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(n) for n in str(v["shape"]).split(",")]) if "shape" in v else a
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], dict):
        return np.stack([decode(x) for x in v])
    return np.array(v, dtype=float)


def client_home(server):
    return server[1].settings.data_root


def test_next_and_previous_sample_cycle(server, shards):
    _, _, client = server
    ids = sorted(shards["synth-sft"].query("step == 5").sample_idx.unique())
    nxt = client.predict("synth-sft", 5, int(ids[-1]), "alignment", None, api_name="/next_sample")
    assert nxt[0] == ids[0]                                  # wraps around
    prev = client.predict("synth-sft", 5, int(ids[0]), "loss", None, api_name="/previous_sample")
    assert prev[0] == ids[-1]


def test_token_text_is_escaped(server):
    _, _, client = server
    html = client.predict("synth-antiop", 5, first_sample(server, "synth-antiop", 5), "alignment", None,
                          api_name="/inspect_sample")[0]
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&quot;window.__xss=2&quot;&gt;" in html


def first_sample(server, run: str, step: int) -> int:
    _, _, client = server
    html = client.predict(run, step, 0, "alignment", None, api_name="/next_sample")   # 0 is no sample: the first one
    return int(html[0])


def test_what_if_scheme_colours(server):
    _, _, client = server
    s = first_sample(server, "synth-sft", 20)
    html = client.predict("synth-sft", 20, s, "what-if:topk", None, api_name="/recolour")
    assert "weight scheme topk would give" in html and "would weigh" in html


def test_search_concentration_layers_compare(server, shards):
    _, _, client = server
    res = client.predict("synth-sft", "####", api_name="/search_samples")
    tok = shards["synth-sft"]
    texts = tok.sort_values("position").groupby(["step", "sample_idx"]).token.apply("".join)
    assert len(res["data"]) == int(texts.str.contains("####", regex=False).sum())
    lorenz, over, stats = client.predict("synth-sft", 20, [5, 20], [], api_name="/concentration")
    assert {t.name.split(" (")[0] for t in pio.from_json(lorenz["plot"]).data} >= {"step 5", "step 20"}
    st = dict(zip(stats["headers"], zip(*stats["data"])))
    resp = tok[tok.is_response & (tok.step == 20)].magnitude.to_numpy(dtype=np.float64)
    i = st["step"].index(20)
    assert st["gini"][i] == pytest.approx(metrics.gini(resp), abs=1e-4)
    heat = client.predict("synth-sft", 20, "v_proj", api_name="/layer_position_heatmap")
    assert "modules: v_proj" in pio.from_json(heat["plot"]).layout.title.text
    out = client.predict(["synth-sft", "synth-antiop"], api_name="/compare_runs")
    summary = out[-1]                                # an HTML table: metric, then a column per run
    assert "<th>metric</th><th>synthetic sft</th><th>synthetic antiop</th>" in summary
    assert "<td>gini</td>" in summary and "<td>synth-sft</td><td>synth-antiop</td>" in summary
    grid = pio.from_json(out[0]["plot"])             # the six figures as one grid, both runs in each panel
    assert len(grid.layout.annotations) >= 6 and {t.name for t in grid.data} >= {"synthetic sft", "synthetic antiop"}
    assert {t.xaxis for t in grid.data} == {"x", "x2", "x3", "x4", "x5", "x6"}


def test_module_names_of_a_step_and_what_exists_when_unknown(server, data_home):
    from backend.index import queries
    mods = read_shards(data_home / "runs" / "synth-sft", "token_modules")
    assert queries.module_names("synth-sft", 10) == sorted(mods[mods.step == 10].module.unique())
    with pytest.raises(ValueError, match="not a traced step.*traced steps: 5, 10, 20"):
        queries.module_names("synth-sft", 7)
    with pytest.raises(ValueError, match="not in the index.*synth-antiop, synth-sft"):
        queries.module_names("no-such-run", 10)


def test_user_errors_are_messages(server):
    _, _, client = server
    with pytest.raises(AppError, match="not in the index"):
        client.predict("no-such-run", 5, 0, "alignment", None, api_name="/inspect_sample")
    with pytest.raises(AppError, match="not a traced step"):
        client.predict("synth-sft", 7, 0, "alignment", None, api_name="/inspect_sample")
    with pytest.raises(AppError, match="compare needs|at least two"):
        client.predict(["synth-sft"], api_name="/compare_runs")


def test_sql_console_is_read_only(server, shards):
    _, _, client = server
    msg, table, download = client.predict("SELECT count(*) AS n FROM tokens WHERE run_id = 'synth-sft'", 10,
                                          api_name="/sql")
    assert table["data"] == [[len(shards["synth-sft"])]] and msg == "1 row"
    assert str(download["value"]).endswith(".csv")
    for bad, why in [("DROP TABLE tokens", "exactly one SELECT"), ("SELECT 1; SELECT 2", "exactly one SELECT"),
                     ("SELECT * FROM read_csv('/etc/passwd')", "disabled|Permission"),
                     ("SELECT * FROM read_parquet('../../**/*.parquet')", "disabled|Permission|outside"),
                     ("INSTALL httpfs", "exactly one SELECT"),
                     ("WITH x AS (DELETE FROM runs RETURNING *) SELECT * FROM x", "read-only"),
                     ("WITH x AS (UPDATE runs SET name = 'x' RETURNING *) SELECT * FROM x", "read-only")]:
        with pytest.raises(AppError, match=why):
            client.predict(bad, 10, api_name="/sql")
    _, table, _ = client.predict("SELECT run_id, name FROM runs ORDER BY run_id", 10, api_name="/sql")
    assert table["data"] == [["synth-antiop", "synthetic antiop"], ["synth-sft", "synthetic sft"]]


def test_sql_console_reads_the_runs_files_only(server, shards):
    """An app in normal mode: a run's Parquet shard is readable, a job log under the data root is not."""
    _, ctx, client = server
    root = ctx.settings.data_root
    shard = min((root / "runs" / "synth-sft" / "trace").rglob("*.parquet"))
    _, table, _ = client.predict(f"SELECT count(*) AS n FROM read_parquet('{shard}')", 10, api_name="/sql")
    assert table["data"] == [[pq.read_metadata(shard).num_rows]]
    (root / "jobs").mkdir(exist_ok=True)
    (root / "jobs" / "job9-x.log").write_text("$ python -m backend train --secret\n")
    for path in (root / "jobs" / "job9-x.log", root / "runs" / ".." / "jobs" / "job9-x.log"):
        with pytest.raises(AppError, match="disabled by configuration"):
            client.predict(f"SELECT content FROM read_text('{path}')", 10, api_name="/sql")


def test_paths_cannot_leave_the_data_root(server):
    url, ctx, client = server
    jobs_before = len(ctx.jobs.snapshot())
    for model in ("../../../etc", "/etc", "~", "x/../../y"):
        with pytest.raises(AppError, match="model"):
            client.predict(f"model: '{model}'\nsteps: 1", "", api_name="/launch")
    with pytest.raises(AppError, match="dataset"):
        client.predict("dataset: /etc/passwd\nsteps: 1", "", api_name="/launch")
    with pytest.raises(AppError, match="chosen by the app"):
        client.predict("runs_root: /tmp\nsteps: 1", "", api_name="/launch")
    with pytest.raises(AppError, match=r"run_id '\.\./\.\./escape' is not allowed"):
        client.predict("run_id: ../../escape\nsteps: 1", "", api_name="/launch")
    with pytest.raises(AppError, match="chosen by the app"):                 # a safe id is the app's to choose
        client.predict("run_id: mine\nsteps: 1", "", api_name="/launch")
    assert len(ctx.jobs.snapshot()) == jobs_before         # nothing was queued
    for path in ("/etc/passwd", str(ctx.settings.data_root / "tokviz.duckdb"), "../../../../etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=10)
        assert e.value.code in (403, 404)
    with pytest.raises(AppError, match="not in the index"):
        client.predict("../../etc/passwd", 5, 0, "alignment", None, api_name="/inspect_sample")


def test_invalid_config_is_refused_with_the_field_named(server):
    _, ctx, client = server
    jobs_before = len(ctx.jobs.snapshot())
    with pytest.raises(AppError, match=r"lora_r=0 is outside the allowed range"):
        client.predict("lora_r: 0", "", api_name="/launch")
    with pytest.raises(AppError, match="unknown config field"):
        client.predict("no_such_field: 1", "", api_name="/launch")
    # a value of the wrong type is refused naming the field, never turned into its text (or into 1 for true)
    for bad, msg in [("steps: true", "steps: expected int, got True"), ("steps: [1, 2]", r"steps: expected int"),
                     ("lora_targets: {q_proj: 1}", "lora_targets: expected list"),
                     ("task_params: [p, 13]", "task_params: expected dict"), ("name: [a, b]", "name: expected str")]:
        with pytest.raises(AppError, match=msg):
            client.predict(bad, "", api_name="/launch")
    assert len(ctx.jobs.snapshot()) == jobs_before


def test_launch_keeps_yaml_lists_dicts_and_numbers_typed(server):
    _, ctx, client = server
    config = ("name: typed\nsteps: 3\nn_train: 8\nn_eval: 0\nbatch_size: 2\nlr: 0.001\nchat_template: false\n"
              "lora_targets: [q_proj, v_proj]\ntask: modadd\ntask_params: {p: 13, train_fraction: 0.25}\n"
              "scheme: topk\nscheme_params: {keep_ratio: 0.5}\n")
    job_id = client.predict(config, "", api_name="/launch")
    job = ctx.jobs.get(job_id)
    saved = json.loads((job.run_dir / "config.json").read_text())     # written before the job is queued
    if job.status in ("queued", "running"):
        ctx.jobs.cancel(job_id, reason="test: only its config.json is checked")
    ctx.jobs.wait(job_id, timeout=60)
    cfg = saved["config"]
    assert cfg["lora_targets"] == ["q_proj", "v_proj"]
    assert cfg["task_params"] == {"p": 13, "train_fraction": 0.25}
    assert cfg["scheme_params"] == {"keep_ratio": 0.5}
    assert (cfg["steps"], cfg["n_train"], cfg["lr"], cfg["chat_template"]) == (3, 8, 0.001, False)
    assert type(cfg["steps"]) is int and type(cfg["lr"]) is float
    assert saved["kind"] == "train" and saved["run_id"] == job.run_id and job.run_dir.name == job.run_id


def test_xss_fixture_planted(data_home):
    tok = read_shards(data_home / "runs" / "synth-antiop", "tokens")
    assert set(XSS_TOKENS) <= set(tok.token)
