"""The shipped demo runs say what the README says they do: the run a new user lands on, and influence."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

RUNS = Path(__file__).resolve().parent.parent / "data" / "runs"


def _runs() -> list[dict]:
    out = []
    for cfg in RUNS.glob("*/config.json"):
        c = json.loads(cfg.read_text())
        man = cfg.parent / "manifest.json"
        m = json.loads(man.read_text()) if man.exists() else {}
        out.append({"run_id": c["run_id"], "created_at": c["created_at"], "kind": c["kind"],
                    "mode": (m.get("trace") or {}).get("mode"), "steps": (m.get("trace") or {}).get("steps")})
    return sorted(out, key=lambda r: (r["created_at"], r["run_id"]), reverse=True)


def test_the_first_run_a_new_user_lands_on_is_a_position_mode_trace():
    """The app opens the newest traced run (tokviz/ui.py wire_deep_link): on the shipped data that must be a
    position-mode run, where prompt tokens have pieces and the overlay reads as the README explains."""
    traced = [r for r in _runs() if r["steps"]]
    assert traced, "no traced demo run in data/runs"
    assert traced[0]["run_id"] == "demo-sft-position" and traced[0]["mode"] == "position", traced[0]


@pytest.mark.parametrize("run", ["demo-sft-position", "demo-antiop-position", "demo-dft-token"])
def test_train_demos_have_influence_at_every_traced_step(run):
    path = RUNS / run
    steps = json.loads((path / "manifest.json").read_text())["trace"]["steps"]
    files = sorted((path / "trace" / "influence_steps").glob("*.parquet"))
    assert [int(f.name[5:11]) for f in files] == steps
    for f in files:
        row = pq.read_table(f).to_pylist()[0]
        assert row["eval_examples"] == 32 and -1 <= row["eval_cosine"] <= 1
        assert row["influence_sum_rel_err"] is None or row["influence_sum_rel_err"] < 1e-5
        tok = f.parent.parent / "tokens" / f.name
        assert pq.read_table(path / "trace" / "influence" / f.name).num_rows == pq.read_table(tok).num_rows
