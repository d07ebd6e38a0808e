"""Runs that die: the start event names the process, a heartbeat comes while it runs, a run whose process is
gone is `interrupted` (a queued one is not), `resume` refuses what it cannot continue, `clean` lists, asks and
removes failed and interrupted runs (and drops them from the index)."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from backend import index
from backend.__main__ import main as cli
from backend.dev.synth import SynthConfig, make_run
from backend.index import queries
from backend.index.ingest import STALE_S, run_status, status_of
from backend.jobs.train import TrainConfig
from backend.store import rundir
from backend.store.rundir import RunDir, process_identity, queue_config, read_events
from tests.conftest import index_held_elsewhere, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path))
    yield tmp_path
    index.close_shared()
    for path in list(rundir._HEARTBEATS):          # runs this test left "running": stop their heartbeats
        if path.is_relative_to(tmp_path.resolve()):
            RunDir(path=path, run_id=path.name).stop_heartbeat()


def _heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("heartbeat ")]


# ---- the writer's identity and its heartbeat --------------------------------------------------------------

def test_start_event_names_the_process_and_a_heartbeat_comes_until_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    rd = RunDir.create(kind="train", name="hb", config={}, root=tmp_path, run_id="hb")
    start = read_events(rd.path)[0]
    assert start["type"] == "start" and start["pid"] == os.getpid() and start["host"] == socket.gethostname()
    assert start["proc_start"] is not None       # Linux: /proc gives the start time, so a reused pid is told apart
    wait_for(lambda: sum(e["type"] == "heartbeat" for e in read_events(rd.path)) >= 3, 30, "three heartbeats")
    assert status_of(rd.path) == "running"
    rd.finish({"steps": 1})
    assert not any(t.name == "heartbeat hb" for t in _heartbeat_threads())      # stopped by finish
    events = read_events(rd.path)
    assert events[-1]["type"] == "done"          # nothing after it: the thread was joined before "done"
    assert status_of(rd.path) == "finished"


def test_fail_from_another_rundir_object_stops_the_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    rd = RunDir.create(kind="train", name="hb", config={}, root=tmp_path, run_id="hb2")
    assert any(t.name == "heartbeat hb2" for t in _heartbeat_threads())
    RunDir(path=tmp_path / "hb2", run_id="hb2").fail(RuntimeError("boom"))
    assert not any(t.name == "heartbeat hb2" for t in _heartbeat_threads())
    assert read_events(rd.path)[-1]["type"] == "error" and status_of(rd.path) == "failed"


def test_event_lines_stay_whole_with_a_heartbeat_and_threads_writing_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.001)
    rd = RunDir.create(kind="train", name="busy", config={}, root=tmp_path, run_id="busy")
    payload = "x" * 5000                   # long lines: a torn or interleaved write would show as bad JSON

    def writer(k: int) -> None:
        for i in range(50):
            rd.event("progress", writer=k, i=i, payload=payload)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rd.finish({"steps": 0})
    lines = (rd.path / rundir.EVENTS).read_text().splitlines()
    events = [json.loads(line) for line in lines]          # every line is one whole JSON object
    got = sorted((e["writer"], e["i"]) for e in events if e["type"] == "progress")
    assert got == sorted((k, i) for k in range(4) for i in range(50))
    assert all(e["payload"] == payload for e in events if e["type"] == "progress")


# ---- interrupted -----------------------------------------------------------------------------------------

LIVE_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from backend.dev.synth import SynthConfig, make_run
    make_run(SynthConfig.tiny(finished=False), {runs!r}, run_id="victim")
    print("ready", flush=True)
    time.sleep(600)
""")


def test_a_killed_run_is_interrupted_and_keeps_its_steps(home):
    runs = home / "runs"
    proc = subprocess.Popen([sys.executable, "-c", LIVE_RUN.format(root=str(ROOT), runs=str(runs))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        con = index.connect()
        assert index.ingest_run(con, runs / "victim").status == "running"           # its process is there
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert status_of(runs / "victim") == "interrupted"
    res = index.ingest_run(con, runs / "victim")
    assert res.action == "ingested" and res.status == "interrupted"     # the status change is a new fingerprint
    assert queries.list_runs(con).set_index("run_id").loc["victim", "status"] == "interrupted"
    assert queries.traced_steps("victim", con) == [5, 10, 20]            # what it wrote stays browsable


def _start(now: float, **ident) -> dict:
    return {"time": now - 3600, "type": "start", **{**process_identity(), **ident}}


def test_status_rules_for_pid_reuse_reboot_and_other_hosts():
    now = time.time()
    me = process_identity()
    assert run_status([_start(now)], now) == "running"
    assert run_status([_start(now, proc_start=me["proc_start"] + 1)], now) == "interrupted"   # pid reused
    assert run_status([_start(now, boot_id="another-boot")], now) == "interrupted"          # rebooted since
    assert run_status([_start(now), {"time": now, "type": "error", "error": "x"}], now) == "failed"
    # another host: only the heartbeat can tell; the last event of any type counts
    far = dict(host="elsewhere.example", pid=12345)
    assert run_status([_start(now, **far), {"time": now - 30, "type": "heartbeat"}], now) == "running"
    assert run_status([_start(now, **far), {"time": now - STALE_S - 1, "type": "heartbeat"}], now) == "interrupted"
    # a resumed run: what counts is its last start, not the failure before it
    assert run_status([_start(now), {"time": now, "type": "error", "error": "x"}, _start(now)], now) == "running"
    # a run written before pids were recorded: nothing to tell by, so it stays running as before
    assert run_status([{"time": now - 10 * STALE_S, "type": "start"}], now) == "running"


def test_a_queued_run_is_queued_not_interrupted(home):
    run = home / "runs" / "waiting"
    queue_config(run, "train", TrainConfig(run_id="waiting", steps=2))
    assert read_events(run)[-1]["type"] == "queued"
    assert status_of(run) == "queued"                      # no start, no heartbeat yet, the queue's process lives
    ev = read_events(run)
    ev[-1]["proc_start"] += 1                              # the queue that held it is gone: it will never start
    assert run_status(ev) == "interrupted"


# ---- resume refuses what it cannot continue ----------------------------------------------------------------

def test_resume_refuses_running_finished_and_checkpointless_runs(home, capsys):
    runs = home / "runs"
    live = RunDir.create(kind="train", name="live", config=TrainConfig().to_dict(), root=runs, run_id="live")
    try:
        assert cli(["resume", str(live.path)]) == 2
        assert f"is running (pid {os.getpid()} on {socket.gethostname()})" in capsys.readouterr().err
    finally:
        live.fail(RuntimeError("stopped by the test"))
    assert cli(["resume", str(live.path)]) == 2                      # failed, but it never saved a checkpoint
    assert "no checkpoint to resume from" in capsys.readouterr().err
    done = make_run(SynthConfig.tiny(), runs, run_id="done")
    assert cli(["resume", str(done)]) == 2
    assert "is finished" in capsys.readouterr().err


# ---- clean ---------------------------------------------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _runs_to_clean(runs: Path) -> dict[str, Path]:
    out = {"finished": make_run(SynthConfig.tiny(), runs, run_id="finished"),
           "running": make_run(SynthConfig.tiny(finished=False), runs, run_id="running")}      # this process
    failed = RunDir.create(kind="train", name="f", config={}, root=runs, run_id="failed")
    failed.fail(RuntimeError("CUDA out of memory"))
    out["failed"] = failed.path
    gone = make_run(SynthConfig.tiny(finished=False), runs, run_id="gone")
    RunDir(path=gone, run_id="gone").stop_heartbeat()
    ev = (gone / rundir.EVENTS).read_text().replace(f'"boot_id": "{process_identity()["boot_id"]}"',
                                                     '"boot_id": "a-former-boot"')
    (gone / rundir.EVENTS).write_text(ev)                 # written before a reboot: its process is gone
    out["gone"] = gone
    assert {k: status_of(p) for k, p in out.items()} == {"finished": "finished", "running": "running",
                                                        "failed": "failed", "gone": "interrupted"}
    return out


def test_clean_lists_asks_and_removes_failed_and_interrupted(home, monkeypatch, capsys):
    runs = _runs_to_clean(home / "runs")
    con = index.connect()
    index.ingest_all(con)
    con.close()

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))        # no terminal: refuse
    assert cli(["clean"]) == 2
    out = capsys.readouterr()
    assert "failed" in out.out and "interrupted" in out.out and "gone" in out.out
    assert "finished " not in out.out and "running " not in out.out
    assert "--yes" in out.err
    assert all(p.exists() for p in runs.values())

    monkeypatch.setattr(sys, "stdin", _Tty("n\n"))             # asked, says no
    assert cli(["clean"]) == 1
    assert all(p.exists() for p in runs.values())

    monkeypatch.setattr(sys, "stdin", _Tty("y\n"))             # asked, says yes
    assert cli(["clean"]) == 0
    assert "remove these 2 run directories?" in capsys.readouterr().out
    assert {k for k, p in runs.items() if p.exists()} == {"finished", "running"}
    con = index.connect(read_only=True)
    assert sorted(queries.list_runs(con)["run_id"]) == ["finished", "running"]      # dropped from the index
    con.close()
    assert cli(["clean", "--yes"]) == 0
    assert "nothing to clean" in capsys.readouterr().out


def test_clean_yes_while_the_app_holds_the_index(home, capsys):
    runs = _runs_to_clean(home / "runs")
    con = index.connect()
    index.ingest_all(con)
    con.close()
    with index_held_elsewhere(home / "tokviz.duckdb"):
        assert cli(["clean", "--yes"]) == 0
    assert "index is in use" in capsys.readouterr().out
    assert not runs["failed"].exists() and not runs["gone"].exists()
    con = index.connect()
    assert {r.action for r in index.ingest_all(con) if r.run_id in ("failed", "gone")} == {"removed"}
