"""``python -m backend verify``: recomputes a stored step naively; exit 0 within 1e-4, 1 above, 2 when unusable."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from backend.lm.models import apply_lora, load_model_and_tokenizer
from backend.store.rundir import RunDir
from backend.trace import TraceConfig, trace_batch
from backend.trace import store as trace_store
from backend.trace.verify import main
from tests._tiny_lora import ALL_TARGETS, randomise_lora, save_tiny_model, tiny_batch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory with traced steps 5 (position, dropout on), 10 (token, exact), 15 (token, sketch)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("verify")
    model_dir = save_tiny_model(tmp / "model", "llama")
    config = {"model": model_dir, "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1, "lora_targets": ALL_TARGETS,
              "dtype": "fp32", "attn_implementation": "sdpa", "scheme": "antiop", "scheme_params": {}}
    rd = RunDir.create(kind="train", name="verify", config=config, root=tmp / "runs")
    model, tok = load_model_and_tokenizer(model_dir, dtype="fp32", device="cpu", attn_implementation="sdpa")
    model = apply_lora(model, r=4, alpha=8.0, dropout=0.1, targets=ALL_TARGETS)
    for step, cfg in ((5, TraceConfig(mode="position", dropout=True)), (10, TraceConfig(mode="token")),
                      (15, TraceConfig(mode="token", magnitude="sketch", sketch_k=8, micro_batch_size=2))):
        randomise_lora(model, seed=step)                               # a different adapter at every step
        res = trace_batch(model, tiny_batch(seed=step), "antiop", {"clip_mult": 0.5}, cfg, tok, step=step)
        trace_store.store_step(rd, step, model, res)
    return rd.path


@pytest.mark.parametrize("step", [5, 10, 15])
def test_verify_passes_on_a_good_run(run, step, capsys):
    assert main([str(run), "--step", str(step)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "dot" in out and "magnitude" in out and "alignment" in out


def test_verify_fails_on_a_tampered_value(run, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    shard = bad / "trace" / "tokens" / trace_store.shard_name(5, 0)
    t = pq.read_table(shard)
    dot = t["dot"].to_pylist()
    i = max(range(len(dot)), key=lambda j: abs(dot[j]))
    dot[i] *= 1.001                                                     # one value, 0.1 %
    t = t.set_column(t.schema.get_field_index("dot"), t.schema.field("dot"), pa.array(dot, pa.float32()))
    pq.write_table(t, shard)
    assert main([str(bad), "--step", "5"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_fails_on_a_tampered_adapter(run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    f = trace_store.state_dir(bad, 10) / "adapter.safetensors"
    tensors = load_file(f)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, f)
    assert main([str(bad), "--step", "10"]) == 1


def test_verify_usage_errors_exit_2(run, tmp_path, capsys):
    assert main([str(run), "--step", "7"]) == 2
    err = capsys.readouterr().err
    saved = sorted(int(p.name.split("_")[1]) for p in trace_store.state_dir(run, 1).parent.glob("step_*"))
    assert "no saved state for step 7" in err and f"steps with one: {saved}" in err and saved
    assert main([str(tmp_path), "--step", "5"]) == 2
    assert "steps with one: none (untraced run)" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--step", "5"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main([str(run), "--step", "10", "--tol", "-1"]) == 2
    assert "--tol must be > 0, got -1.0" in capsys.readouterr().err


def test_verify_cli_through_the_dispatcher(run):
    proc = subprocess.run([sys.executable, "-m", "backend", "verify", str(run), "--step", "5", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["errors"]["dot"] < 1e-4 and report["mode"] == "position"


def test_verify_names_the_model_dtype_and_the_tolerance_it_chose(tmp_path, capsys):
    """A bf16 model whose LoRA factors are float32: verify says both dtypes and takes the half-precision
    tolerance (it used to print the LoRA dtype as the run's and hold bf16 rounding to 1e-4)."""
    torch.set_num_threads(1)
    model_dir = save_tiny_model(tmp_path / "model", "qwen2")
    config = {"model": model_dir, "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "lora_targets": ALL_TARGETS,
              "dtype": "bf16", "attn_implementation": "sdpa", "scheme": "sft", "scheme_params": {}}
    rd = RunDir.create(kind="train", name="bf16", config=config, root=tmp_path / "runs")
    model, tok = load_model_and_tokenizer(model_dir, dtype="bf16", device="cpu", attn_implementation="sdpa")
    model = apply_lora(model, r=4, alpha=8.0, targets=ALL_TARGETS)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()                                     # LoRA factors in float32, as peft may keep them
    randomise_lora(model, seed=3)
    res = trace_batch(model, tiny_batch(), "sft", {}, TraceConfig(mode="position"), tok, step=3)
    trace_store.store_step(rd, 3, model, res)
    assert main([str(rd.path), "--step", "3"]) == 0
    out = capsys.readouterr().out
    assert "model dtype bfloat16" in out and "LoRA dtype float32" in out and "tolerance 0.02" in out
