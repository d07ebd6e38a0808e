"""``python -m backend publish``: a Space folder with exactly the chosen runs, slimmed, that starts and renders
them (the command's own check, through the published app's API), refusing what is too large or misnamed."""
from __future__ import annotations

import json

import pytest

from backend.publish import main, parse_size
from backend.store import paths

DEMO = paths.DEFAULT_MODEL_DIR.parent.parent / "runs"


@pytest.mark.slow          # starts the published app (~20 s)
def test_two_runs_publish_slimmed_and_the_published_app_lists_and_renders_exactly_them(tmp_path, capsys):
    out = tmp_path / "space"
    assert main(["demo-sft-position", str(DEMO / "demo-dft-token"), "--out", str(out), "--title", "Two runs"]) == 0
    text = capsys.readouterr().out
    assert "check passed: the published app lists exactly the 2 runs" in text and "left out adapter/" in text
    assert sorted(p.name for p in (out / "data" / "runs").iterdir()) == ["demo-dft-token", "demo-sft-position"]
    run = out / "data" / "runs" / "demo-sft-position"
    assert (run / "manifest.json").exists() and any((run / "trace" / "tokens").iterdir())
    assert not (run / "adapter").exists() and not (run / "trace" / "state").exists()
    assert not (run / "checkpoint").exists() and not (out / "data" / "tokviz.duckdb").exists()
    assert {"app.py", "Dockerfile", "requirements.txt", "tokviz", "backend"} <= {p.name for p in out.iterdir()}
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\ntitle: \"Two runs\"\n") and "sdk: \"docker\"" in readme
    assert "TOKVIZ_READONLY=1" in (out / "Dockerfile").read_text()
    assert "TOKVIZ_OPEN_RUN=demo-sft-position" in (out / "Dockerfile").read_text()


def test_a_comparison_publishes_with_its_runs_and_options_add_what_they_name(tmp_path, capsys):
    out = tmp_path / "space"
    assert main(["demo-schemes", "--out", str(out), "--no-check", "--with-state"]) == 0
    runs = sorted(p.name for p in (out / "data" / "runs").iterdir())
    children = json.loads((DEMO / "demo-schemes" / "children.json").read_text())
    assert len(runs) == 1 + len(children) == 13
    child = next(p for p in (out / "data" / "runs").iterdir() if p.name.startswith("demo-schemes-sft"))
    assert (child / "trace" / "state").exists() and not (child / "adapter").exists()


def test_too_large_a_space_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "space"
    assert main(["demo-sft-position", "demo-antiop-position", "--out", str(out), "--max-size", "1M"]) == 2
    err = capsys.readouterr().err
    assert "over --max-size 1.0 MB" in err and "largest runs: demo-" in err and not out.exists()


@pytest.mark.parametrize("args, why", [
    (["no-such-run"], "not a run directory"), (["../x"], "run"),
    (["demo-sft-position", "--max-size", "lots"], "K, M or G")])
def test_bad_input_is_named(tmp_path, capsys, args, why):
    assert main([*args, "--out", str(tmp_path / "s"), "--no-check"]) == 2
    assert why in capsys.readouterr().err


def test_an_existing_folder_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "mine.txt").write_text("keep")
    assert main(["demo-sft-position", "--out", str(tmp_path / "s"), "--no-check"]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "s" / "mine.txt").read_text() == "keep"
    assert parse_size("1G") == 1 << 30 and parse_size("500M") == 500 << 20
