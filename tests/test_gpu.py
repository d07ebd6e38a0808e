"""Ready for a GPU: the tracer's checks in bf16 and float32 on CUDA (marked ``gpu``: run with ``pytest -m gpu`` on a
machine with one; skipped without CUDA), the same code on CPU in the default run, and the GPU bench script run on a
tiny shape so that it is known to work before an accelerator is lent."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.trace import TraceConfig, trace_batch
from backend.trace.config import SKETCH_KINDS
from backend.trace.verify import TOL, TOL_HALF, compare, failures, reference
from tests._sketch_ref import max_rel, naive_sketch
from tests._tiny_lora import tiny_batch, tiny_lora_model
from tests.test_influence import naive_position_pieces

ROOT = Path(__file__).resolve().parent.parent
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu,
                                   pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# per quantity: float32 to TOL (1e-4, as on CPU); bf16 weights round every activation to 8 bits, both methods
# alike: TOL_HALF (2e-2), the tolerance `verify` picks for a half-precision step
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL), (torch.bfloat16, TOL_HALF)])
@pytest.mark.parametrize("mode", ["position", "token"])
def test_traces_match_the_naive_reference_on_the_device(device, dtype, tol, mode):
    import pandas as pd
    model = tiny_lora_model("qwen2").to(device=device, dtype=dtype)
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    res = trace_batch(model, batch, "sft", {}, TraceConfig(mode=mode), step=1)
    ref = reference(model, [res.state])
    errs = compare(pd.DataFrame(res.tokens).assign(rank=0), pd.DataFrame(res.modules).assign(rank=0), ref)
    bad = failures({"errors": errs, "checks_reference": ref["checks"], "checks_recorded": res.checks}, tol)
    assert not bad, bad
    assert errs["token_rows_unmatched"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash_attn is not installed")
def test_position_traces_under_flash_attention_2_match_the_naive_reference():
    """Position mode needs nothing of the attention kernel: under flash-attention-2 (bf16, padded batch) the trace
    and the naive reference, run under the same kernel, agree to the half-precision tolerance."""
    import pandas as pd
    model = tiny_lora_model("qwen2").to(device="cuda", dtype=torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    batch = {k: v.to("cuda") for k, v in tiny_batch().items()}
    res = trace_batch(model, batch, "sft", {}, TraceConfig(mode="position"), step=1)
    assert res.checks["attn_implementation_used"] == "flash_attention_2"
    ref = reference(model, [res.state])
    errs = compare(pd.DataFrame(res.tokens).assign(rank=0), pd.DataFrame(res.modules).assign(rank=0), ref)
    bad = failures({"errors": errs, "checks_reference": ref["checks"], "checks_recorded": res.checks}, TOL_HALF)
    assert not bad, bad


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_sketches_on_the_device_equal_the_projection_of_the_naive_pieces(device, kind):
    """Every sketch kind traced on the device (on CUDA the sparse kind takes its dense +-1 product path) against
    the projection of the pieces materialised on the CPU, in one micro-batch (lora_A sites grouped by input) and in
    two with only the first 3 sequences sketched (the given-G path): float32, to 1e-5 of the largest entry."""
    model = tiny_lora_model("qwen2")
    model.eval()
    batch = tiny_batch()
    sites, pieces = naive_position_pieces(model, batch, "sft", {})
    halves = [naive_position_pieces(model, {k: v[i:i + 2] for k, v in batch.items()}, "sft", {})[1] for i in (0, 2)]
    halved = [torch.cat([h0, h1]) / 2 for h0, h1 in zip(*halves)]        # a micro-batch's piece / 2 (mean loss)
    on_device = copy.deepcopy(model).to(device)
    dev_batch = {k: v.to(device) for k, v in batch.items()}
    for micro, traced, P in ((None, 8, pieces), (2, 3, halved)):
        cfg = TraceConfig(mode="position", sketch_dim=32, seed=5, sketch_kind=kind, micro_batch_size=micro,
                          max_sequences=traced)
        res = trace_batch(on_device, dev_batch, "sft", {}, cfg, step=1)
        b = torch.as_tensor(res.tokens["sample_idx"] - 100, dtype=torch.long)
        s = torch.as_tensor(res.tokens["position"], dtype=torch.long)
        assert len(set(b.tolist())) == min(traced, len(batch["input_ids"]))
        want = naive_sketch(sites, [p[b, s].double() for p in P], seed=5, k=32, kind=kind)
        assert max_rel(res.sketch, want) < 1e-5, (kind, micro)


@pytest.mark.slow
def test_the_gpu_check_script_runs_where_only_the_device_images_packages_are(tmp_path):
    """bench/gpu_check.sh, the one call a lent GPU gets, on a tiny shape on the CPU, with duckdb, gradio, trl and
    datasets made unimportable (the device image has none of them): the GPU tests import and skip, the bench writes
    its row, every file lands in $OUT."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nfor m in ('duckdb', 'gradio', 'trl', 'datasets'):\n    sys.modules[m] = None\n")
    out_dir = tmp_path / "out"
    env = {**os.environ, "OUT": str(out_dir), "PYTHON": sys.executable, "PYTHONPATH": str(site),
           "GPU_CHECK_SHAPES": "smoke", "GPU_CHECK_BENCH_ARGS": "--smoke --device cpu --dtype fp32 --no-memory"}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=900,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-2000:])
    assert sorted(p.name for p in out_dir.iterdir()) == ["env.txt", "gpu_trace_smoke.err", "gpu_trace_smoke.json",
                                                         "pytest_gpu.log"]
    log = (out_dir / "pytest_gpu.log").read_text()
    assert "error" not in log.lower() and ("skipped" in log or "passed" in log), log[-2000:]
    row = json.loads((out_dir / "gpu_trace_smoke.json").read_text().strip().splitlines()[-1])["rows"][0]
    assert row["shape"] == "smoke" and row["targets"] == "all-linear"
    assert row["plain_step_s"] > 0 and row["position_time_ratio"] > 0 and row["token_time_ratio"] > 0
    assert row["sketch_dim"] == 128 and row["sketch_time_ratio"] > 0
