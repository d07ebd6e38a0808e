"""Ready for a GPU: the tracer's checks in bf16 and float32 on CUDA (marked ``gpu``: run with ``pytest -m gpu`` on a
machine with one; skipped without CUDA), the same code on CPU in the default run, and the GPU bench script run on a
tiny shape so that it is known to work before an accelerator is lent."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.trace import TraceConfig, trace_batch
from backend.trace.verify import TOL, TOL_HALF, compare, failures, reference
from tests._tiny_lora import tiny_batch, tiny_lora_model

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


@pytest.mark.slow
def test_the_gpu_bench_runs_on_a_tiny_shape():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_trace.py"), "--smoke", "--device", "cpu",
                          "--dtype", "fp32", "--no-memory", "--json"], capture_output=True, text=True, timeout=900,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])["rows"][0]
    assert row["shape"] == "smoke" and row["targets"] == "all-linear"
    assert row["plain_step_s"] > 0 and row["position_time_ratio"] > 0 and row["token_time_ratio"] > 0
