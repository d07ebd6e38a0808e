#!/usr/bin/env bash
# Everything a lent GPU should run, in one call, each part's output in its own file as soon as it is done:
#
#     bash bench/gpu_check.sh                  # on the device tool: results under $OUT; elsewhere ./gpu-check/
#     GPU_CHECK_SHAPES=0.5b bash bench/gpu_check.sh
#     GPU_CHECK_SHAPES=smoke GPU_CHECK_BENCH_ARGS="--smoke --device cpu --dtype fp32 --no-memory" PYTHON=python \
#         bash bench/gpu_check.sh              # the script itself on a CPU (tests/test_gpu.py runs this)
#
# 1. env.txt: nvidia-smi, Python and the versions of torch, transformers, peft, flash_attn (a missing package
#    is named there, not fatal);
# 2. pytest_gpu.log: `pytest -m gpu` (the tracer against the naive reference on CUDA in float32 and bf16, the
#    sketches of every kind, position mode under flash-attention-2 when flash_attn is installed);
# 3. gpu_trace_<shape>.json / .err: `bench/gpu_trace.py --json`, one shape per process (a shape that runs out of
#    time or memory loses only its own row), each under GPU_CHECK_BENCH_TIMEOUT seconds (default 200).
#
# Budget: a session's device time is 15 minutes, the machine's start included. Not yet run on a GPU: estimated a
# minute for the tests and 1-3 minutes per shape on an H200; one `run` with timeout_s=560 still leaves time to
# fetch the files if the estimate is off (each shape stops at its timeout).
# Needs only torch, transformers, peft, numpy, pandas, pyarrow and pytest (no duckdb, gradio or a hub).
set -u -o pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-gpu-check}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

{
    date -u
    nvidia-smi || echo "nvidia-smi: not found"
    "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "numpy", "pandas", "pyarrow", "pytest", "flash_attn"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as e:
        print(name, "MISSING:", e)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$DEST/env.txt" 2>&1
cat "$DEST/env.txt"

"$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$DEST/pytest_gpu.log"
tests_rc=$?

bench_rc=0
for shape in ${GPU_CHECK_SHAPES:-0.5b 1.5b}; do
    timeout "${GPU_CHECK_BENCH_TIMEOUT:-200}" "$PY" bench/gpu_trace.py --shapes "$shape" --json ${GPU_CHECK_BENCH_ARGS:-} \
        > "$DEST/gpu_trace_$shape.json" 2> "$DEST/gpu_trace_$shape.err"
    rc=$?
    echo "gpu_trace $shape: exit $rc"; tail -c 1500 "$DEST/gpu_trace_$shape.json"; echo
    [ "$rc" -ne 0 ] && { bench_rc=$rc; tail -n 20 "$DEST/gpu_trace_$shape.err"; }
done
echo "tests exit $tests_rc, bench exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
