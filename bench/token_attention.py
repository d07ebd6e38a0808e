"""Token mode's attention: the plain training step, token-mode dot with eager attention and with the blockwise
forward-mode attention (backend.trace.attention_jvp), side by side in one run.

    python bench/token_attention.py                     # table: 30M-param Qwen2 shape, B=4, T 128/512/1024
    python bench/token_attention.py --json              # one JSON object (token_time_ratio_t1024, ...)
    python bench/token_attention.py --seq-lens 128 --long none --repeats 3     # a quick look

Model: a Qwen2 shape from config with random weights (hidden 512, 8 layers, 8 query / 2 key-value heads,
intermediate 1536, vocab 8192: about 28M parameters), LoRA r=8 on q/k/v/o (lora_A and lora_B random), SDPA for
the plain step; batch of --batch sequences of T tokens, the first quarter prompt. Token dot: ``trace_batch`` in
token mode, magnitude none, no module rows (G by one backward, then one JVP of every token's loss along G).
Long sequences (--long, default 2048 and 4096): the tiny default model (data/models/tiny-arith, else its shape at
random), token dot with the new attention only, one run each (eager at 2048 for comparison unless --long-eager none).

Time: this process's CPU time (``time.process_time``: other jobs on a shared machine barely move it), medians of
--repeats interleaved rounds after one warm-up each, torch threads fixed (--threads, default 1).
Memory: peak RSS of a fresh subprocess per variant and T: the model and batch are built, the kernel's high-water
mark is reset (/proc/self/clear_refs 5), the variant runs once, and the peak is VmHWM minus the RSS before the call
(``*_peak_mb``; ``*_rss_peak_mb`` is the process's whole peak). CPU only; ratios are over the plain step's.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.lm.loss import forward_loss  # noqa: E402
from backend.lm.schemes import get_scheme  # noqa: E402
from backend.store import paths  # noqa: E402
from backend.trace import TraceConfig, trace_batch  # noqa: E402
from backend.trace import core as trace_core  # noqa: E402
from backend.trace.attention_jvp import NAME  # noqa: E402
from bench.trace_speed import make_batch, qwen2_shape, timed  # noqa: E402

VARIANTS = ("plain", "eager", NAME)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_model(kind: str):
    """(peft model, description): kind "30m" (Qwen2 shape at random) or "tiny" (the default model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    if kind == "30m":
        base, name = qwen2_shape("medium", max_position_embeddings=8192), \
            "Qwen2 shape, hidden 512, 8 layers (random weights)"
    elif (paths.DEFAULT_MODEL_DIR / "config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(paths.DEFAULT_MODEL_DIR, dtype=torch.float32,
                                                    attn_implementation="sdpa")
        name = "data/models/tiny-arith"
    else:
        base, name = qwen2_shape("tiny"), "tiny random Qwen2 (tiny-arith shape)"
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:                     # peft starts lora_B at zero: random A and B, a trained-like state
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.train()
    n_par = sum(p.numel() for p in base.parameters())
    return model, f"{name}, {n_par / 1e6:.1f}M params"


@contextmanager
def attention(variant: str) -> Iterator[None]:
    """Token mode with eager attention (what main did before) or with the blockwise one (the default)."""
    keep = trace_core.token_attention
    if variant == "eager":
        trace_core.token_attention = lambda model: "eager"
    try:
        yield
    finally:
        trace_core.token_attention = keep


def runner(model, batch: dict, variant: str) -> Callable[[], None]:
    scheme = get_scheme("sft")
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TraceConfig(mode="token", magnitude="none", module_rows=False, max_sequences=batch["input_ids"].shape[0])

    def plain() -> None:
        out = forward_loss(model, batch, scheme, {})
        out.total.backward()
        for p in params:
            p.grad = None

    def token() -> None:
        with attention(variant):
            res = trace_batch(model, batch, scheme, {}, cfg)
        assert res.checks["attn_implementation_used"] == variant, res.checks["attn_implementation_used"]
    return plain if variant == "plain" else token


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(args: argparse.Namespace) -> dict:
    """One variant once in this (fresh) process: peak RSS growth and CPU seconds."""
    torch.set_num_threads(args.threads)
    model, _ = build_model(args.model)
    batch = make_batch(model.config.vocab_size, args.batch, args.child_seq_len, "cpu", 1)
    fn = runner(model, batch, args.child)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")          # reset the high-water mark (VmHWM) to the RSS now
    before = _status_kb("VmRSS")
    t = time.process_time()
    fn()
    secs = time.process_time() - t
    return {"peak_mb": (_status_kb("VmHWM") - before) / 1024, "rss_peak_mb": _status_kb("VmHWM") / 1024,
            "seconds": secs}


def in_subprocess(model: str, variant: str, T: int, batch: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--child-seq-len", str(T),
           "--model", model, "--batch", str(batch), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} at T={T} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(seq_lens: list[int], batch: int = 4, repeats: int = 3, threads: int = 1, longs: tuple = (),
            eager_longs: tuple = ()) -> tuple[dict, list[dict]]:
    """The --json keys and the table's rows: the 30M shape at ``seq_lens`` (time ratios in this process, memory in
    fresh subprocesses), then the tiny model at ``longs`` (one run each in a fresh subprocess). ``threads`` is
    set for this process and its subprocesses."""
    torch.set_num_threads(threads)
    model, desc = build_model("30m")
    res: dict = {"model": desc, "batch": batch, "threads": threads, "lora_r": 8, "targets": TARGETS,
                 "time": "process CPU time, median", "memory": "peak RSS growth, fresh subprocess per variant"}
    rows = []
    for T in seq_lens:
        tb = make_batch(model.config.vocab_size, batch, T, "cpu", 1)
        t = timed({v: runner(model, tb, v) for v in VARIANTS}, repeats, "cpu")
        mem = {v: in_subprocess("30m", v, T, batch, threads) for v in VARIANTS}
        for v in VARIANTS:
            rows.append({"T": T, "variant": v, "time": t[v], "ratio": t[v] / t["plain"], "mem": mem[v]["peak_mb"],
                         "mem_ratio": mem[v]["peak_mb"] / mem["plain"]["peak_mb"], "rss": mem[v]["rss_peak_mb"]})
        for v, key in (("eager", "token_eager"), (NAME, "token")):
            res[f"{key}_time_ratio_t{T}"] = t[v] / t["plain"]
            res[f"{key}_memory_ratio_t{T}"] = mem[v]["peak_mb"] / mem["plain"]["peak_mb"]
            res[f"{key}_peak_mb_t{T}"] = mem[v]["peak_mb"]
        res[f"plain_step_s_t{T}"] = t["plain"]
        res[f"plain_peak_mb_t{T}"] = mem["plain"]["peak_mb"]
    for T in longs:
        for v in ("plain", NAME) + (("eager",) if T in eager_longs else ()):
            m = in_subprocess("tiny", v, T, batch, threads)
            key = {"plain": "plain", NAME: "token", "eager": "token_eager"}[v]
            res.update({f"tiny_{key}_rss_peak_mb_t{T}": m["rss_peak_mb"], f"tiny_{key}_peak_mb_t{T}": m["peak_mb"],
                        f"tiny_{key}_s_t{T}": m["seconds"]})
            rows.append({"T": T, "variant": f"tiny: {v}", "time": m["seconds"], "ratio": float("nan"),
                         "mem": m["peak_mb"], "mem_ratio": float("nan"), "rss": m["rss_peak_mb"]})
    return res, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512, 1024])
    ap.add_argument("--long", default="2048,4096", help="T on the tiny model, comma separated, or 'none'")
    ap.add_argument("--long-eager", default="2048", help="T of --long also run with eager attention, or 'none'")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", default="30m", help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-seq-len", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    ints = (lambda s: () if s == "none" else tuple(int(x) for x in s.split(",")))
    res, rows = measure(args.seq_lens, args.batch, args.repeats, args.threads, ints(args.long), ints(args.long_eager))
    desc = res["model"]
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{desc}, B={args.batch}, {args.threads} thread(s); time: CPU s (median of {args.repeats}); memory: peak "
          "RSS growth of one call in a fresh process")
    print(f"{'T':>6} {'variant':<18}{'time s':>9}{'x plain':>9}{'peak MB':>10}{'x plain':>9}{'RSS peak MB':>13}")
    for r in rows:
        print(f"{r['T']:>6} {r['variant']:<18}{r['time']:>9.2f}{r['ratio']:>9.2f}{r['mem']:>10.0f}"
              f"{r['mem_ratio']:>9.2f}{r['rss']:>13.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
