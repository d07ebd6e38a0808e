"""The registry of job kinds: a new kind is its module plus one registry line, and the CLI, the queue, ingest,
the analyses and the Launch form pick it up with no other edit (tests/toy_kind.py is such a kind)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend import index
from backend.analysis import analyses, figures
from backend.jobs import registry
from backend.jobs.queue import JobQueue

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def toy_kind(monkeypatch, tmp_path):
    """The one registry line: TOKVIZ_JOB_KINDS names the toy module (the queue's jobs inherit it)."""
    monkeypatch.setenv(registry.ENV_KINDS, "tests.toy_kind")
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path / "home"))
    yield registry.get("toy")


def test_a_new_kind_is_launched_ingested_queried_and_rendered(toy_kind, tmp_path):
    from tokviz.tabs.launch import config_from_form, form_fields

    assert [f.name for f in form_fields("toy")][:3] == ["name", "n", "scale"]      # the Launch form has it
    cfg = config_from_form({"name": "t", "n": 7, "scale": 2.5}, kind="toy")
    q = JobQueue(max_running=1, logs_dir=tmp_path / "logs")
    try:
        job = q.wait(q.submit(cfg).job_id, timeout=300)
    finally:
        q.shutdown()
    assert job.status == "finished", q.log_tail(job.job_id)
    assert job.argv[-4:] == ["toy", "--quiet", "--config", str(job.run_dir / "config.json")]

    con = index.connect(tmp_path / "index.duckdb")
    try:
        res = index.ingest_run(con, job.run_dir)
        assert res.action == "ingested" and res.rows == {"toy_values": 7}
        run = con.execute("SELECT kind, status, n_toy_values, n_traced_steps FROM runs").fetchall()
        assert run == [("toy", "finished", 7, 0)]
        frames = analyses.run("toy_running_sum", job.run_id, con=con)
    finally:
        con.close()
    want = np.cumsum(2.5 * np.arange(7))                       # hand-computed: sum of scale * i up to i
    np.testing.assert_allclose(frames["values"]["running_sum"].to_numpy(), want, rtol=1e-6)
    fig = figures.build("toy_running_sum", frames)
    np.testing.assert_allclose(np.asarray(fig.data[0].y, dtype=float), want, rtol=1e-6)


def test_the_command_line_lists_and_runs_a_registered_kind(toy_kind, tmp_path):
    env = {**__import__("os").environ}
    out = subprocess.run([sys.executable, "-m", "backend", "--help"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert "toy" in out.stdout and "a toy job kind (tests)" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "backend", "toy", "--n", "0", "--quiet"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "n=0 is outside the allowed range [1, 10000]" in bad.stderr


def test_unknown_kinds_and_bad_registry_lines_are_named(monkeypatch):
    with pytest.raises(ValueError, match="unknown job kind 'no-such-kind'; kinds: train"):
        registry.get("no-such-kind")
    monkeypatch.setenv(registry.ENV_KINDS, "tests.no_such_kind_module")
    with pytest.raises(ValueError, match="job kind module 'tests.no_such_kind_module'"):
        registry.kinds()


def test_train_help_names_the_schemes_and_tasks():
    out = subprocess.run([sys.executable, "-m", "backend", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    text = " ".join(out.stdout.split())
    assert "token-weighting scheme: sft, dft, asft, topk, antiop, lr, rho1, entropy" in text
    assert "built-in task: arith, modadd" in text
