"""The scripts in examples/ run as a user runs them (``python examples/X.py``, the package importable as after
``pip install -e .``), on the embedded default with tiny settings and gradient accumulation 2: each finishes,
leaves a manifest, and its traced steps verify against the naive reference and index. The README's "Tracing
your own Trainer" code is an excerpt of examples/trace_trainer.py, line for line."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.index import db
from backend.index.ingest import ingest_run
from backend.trace import store as trace_store
from backend.trace.verify import TOL, failures, verify_step

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# 4 optimizer steps of 2 micro-batches of 2, traced at steps 2 and 4 (one sequence: the naive reference that
# verify runs costs one autograd call per position and LoRA layer)
TINY = ["--steps", "4", "--every", "2", "--n-train", "16", "--batch-size", "2", "--grad-accum", "2",
        "--trace-sequences", "1"]


def run_example(script: str, tmp: Path, run_id: str) -> Path:
    """Run ``examples/<script>`` in a fresh process from ``tmp`` (not the checkout) with the checkout on
    PYTHONPATH, as an installed package would be; returns its run directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKVIZ_HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *TINY, "--run-id", run_id], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp / "home" / "runs" / run_id
    assert f"traced run: {run}" in proc.stdout
    return run


def check_run(run: Path, tmp: Path) -> None:
    """The run finished (manifest), its last traced step verifies at the float32 tolerance, and it indexes."""
    assert (run / "manifest.json").exists()
    assert trace_store.traced_steps(run) == [2, 4]
    # the traced G is the update the Trainer applied: both micro-batches, its num_items_in_batch normalisation
    trace = json.loads((run / "manifest.json").read_text())["trace"]
    cos = {step: c["grad_cosine_applied"] for step, c in trace.items()}
    assert sorted(cos) == ["2", "4"] and all(v >= 1 - 1e-6 for v in cos.values()), cos
    torch.set_num_threads(1)
    report = verify_step(run, 4)                 # the last step: the adapter has moved from its initial zeros
    assert failures(report, TOL) == [], report["errors"]
    con = db.connect(tmp / "index.duckdb")
    try:
        res = ingest_run(con, run)
        n_tokens = con.execute("SELECT count(*) FROM tokens WHERE run_id = ?", [res.run_id]).fetchone()[0]
        steps = con.execute("SELECT DISTINCT step FROM tokens WHERE run_id = ? ORDER BY step",
                            [res.run_id]).fetchall()
    finally:
        con.close()
    assert (res.action, res.status) == ("ingested", "finished")
    shard_rows = sum(trace_store.read_step(run, s).num_rows for s in (2, 4))
    assert n_tokens == shard_rows > 0 and steps == [(2,), (4,)]


def test_trainer_example_runs_traces_verifies_and_indexes(tmp_path):
    check_run(run_example("trace_trainer.py", tmp_path, "example-trainer"), tmp_path)


@pytest.mark.slow          # ~12 s of CPU; tests/test_chat_template.py runs an SFTTrainer step in the fast set
def test_sft_trainer_example_runs_traces_verifies_and_indexes(tmp_path):
    pytest.importorskip("trl")
    check_run(run_example("trace_sft_trainer.py", tmp_path, "example-sft"), tmp_path)


def test_readme_trainer_snippet_is_an_excerpt_of_the_example():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Tracing your own Trainer"):]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    script = {line.strip() for line in (EXAMPLES / "trace_trainer.py").read_text().splitlines()}
    code = [line.strip() for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#") and line.strip() != "..."]
    assert len(code) >= 5, block
    missing = [line for line in code if line not in script]
    assert not missing, f"README lines not in examples/trace_trainer.py: {missing}"
