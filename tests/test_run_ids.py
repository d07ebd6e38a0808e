"""Run ids name run directories: whatever builds one (the CLI, a YAML file, the queue, RunDir.create, the HF
callback through RunDir.create) refuses an id that could leave the runs folder, before anything is written.

    pytest tests/test_run_ids.py
"""
from __future__ import annotations

import pytest

from backend.jobs import cli, registry
from backend.jobs.train import TrainConfig
from backend.store.rundir import RunDir, check_run_id, new_run_id, queue_config

ESCAPES = ["../esc", "../../esc", "..", ".hidden", "sub/../../esc", "/abs/esc"]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("run_id", ESCAPES)
def test_rundir_create_refuses_unsafe_ids_and_writes_nothing(run_id, tmp_path):
    runs = tmp_path / "a" / "runs"
    runs.mkdir(parents=True)
    for is_writer in (True, False):
        with pytest.raises(ValueError, match="is not allowed: a run id is letters, digits"):
            RunDir.create("train", "x", {}, root=runs, run_id=run_id, is_writer=is_writer)
    assert _files(tmp_path) == ["a", "a/runs"]


def test_queue_config_refuses_an_unsafe_id_set_after_validation(tmp_path):
    cfg = TrainConfig(steps=1)
    cfg.run_id = "../esc"            # dataclasses are mutable: the writer checks again
    with pytest.raises(ValueError, match=r"run_id '\.\./esc' is not allowed"):
        queue_config(tmp_path / "runs" / "x", "train", cfg)
    assert _files(tmp_path) == []


def test_new_run_ids_are_safe_whatever_the_name():
    for name in ("", "demo", "../../etc", "a/b\\c", "caf\u00e9 \u2603", ".hidden", "x" * 300, "--rf"):
        rid = new_run_id("train", name)
        assert check_run_id(rid) == rid
        assert rid.split("-")[2] == "train" and len(rid) <= 128
    assert "caf-" in new_run_id("train", "caf\u00e9 x")            # non-ASCII letters become '-'


def test_cli_refuses_an_unsafe_run_id_before_writing(tmp_path, capsys):
    runs = tmp_path / "a" / "runs"
    rc = cli.main(registry.get("train"), ["--run-id", "../../esc", "--runs-root", str(runs), "--steps", "1"])
    assert rc == 2
    assert "error: invalid config: run_id '../../esc' is not allowed" in capsys.readouterr().err
    assert _files(tmp_path) == []
