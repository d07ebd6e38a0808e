"""The tracer on real model shapes, one command for a lent GPU: plain step, position trace, token dot, side by side.

    python bench/gpu_trace.py --json                        # 0.5B- and 1.5B-shaped Qwen2, B=8, T=2048, bf16, cuda
    python bench/gpu_trace.py --shapes 0.5b --seq-len 4096  # one shape, longer sequences
    python bench/gpu_trace.py --smoke --device cpu --json   # a tiny shape on CPU: checks the script runs (tests)

Models are Qwen2ForCausalLM built from config with random weights (no hub), LoRA r=16 on every linear layer of
the decoder (q/k/v/o, gate/up/down), lora_B random (a trained-like state). Per shape, medians over --repeats
interleaved rounds (``bench/trace_speed.py``'s ``timed``: wall time with CUDA synchronisation, process CPU time
on CPU) and peak memory above what was allocated before each call:

- plain step: forward + backward of the cross-entropy (sft) loss, LoRA gradients into ``.grad``;
- position trace: ``trace_batch`` in position mode over every sequence (hooks, factored products, statistics);
- sketch: the same with per-position gradient sketches (``--sketch-dim``, the default kind): ``sketch_time_ratio``;
- token dot: token mode, magnitudes none, no module rows, over ``--token-sequences`` sequences (one JVP along G:
  forward-mode through the tokviz_jvp attention, backend.trace.attention_jvp).

Ratios divide by the plain step. Nothing is asserted: numbers are printed (``--json``: one object).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.lm.loss import forward_loss  # noqa: E402
from backend.lm.schemes import get_scheme  # noqa: E402
from backend.trace import TraceConfig, trace_batch  # noqa: E402
from bench.trace_speed import make_batch, peak_memory, timed  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen2.5 shapes (hidden, intermediate, layers, heads, kv heads, tied embeddings); vocabulary 151,936
SHAPES = {"0.5b": (896, 4864, 24, 14, 2, True), "1.5b": (1536, 8960, 28, 12, 2, True),
          "smoke": (64, 128, 2, 4, 2, True)}


def build(shape: str, r: int, dtype: torch.dtype, device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    hidden, inter, layers, heads, kv, tied = SHAPES[shape]
    vocab = 512 if shape == "smoke" else 151936
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                      max_position_embeddings=32768, attn_implementation="sdpa")
    with torch.device(device):                      # initialised where it runs, not on the CPU and then moved
        base = Qwen2ForCausalLM(cfg).to(dtype)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.to(device).train()
    return model, sum(p.numel() for p in base.parameters())


def measure(shape: str, args: argparse.Namespace) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model, n_par = build(shape, args.r, dtype, args.device)
    vocab = model.config.vocab_size
    scheme = get_scheme("sft")
    params = [p for p in model.parameters() if p.requires_grad]
    B, T = args.batch, args.seq_len
    batch = make_batch(vocab, B, T, args.device, 0)

    def plain(b=batch):
        out = forward_loss(model, b, scheme, {})
        out.total.backward()
        for p in params:
            p.grad = None

    pos_cfg = TraceConfig(mode="position", max_sequences=B)
    sk_cfg = TraceConfig(mode="position", max_sequences=B, sketch_dim=args.sketch_dim)
    fns = {"plain": plain, "position": lambda: trace_batch(model, batch, scheme, {}, pos_cfg),
           "sketch": lambda: trace_batch(model, batch, scheme, {}, sk_cfg)}
    res: dict = {"shape": shape, "params_m": round(n_par / 1e6, 1), "batch": B, "seq_len": T, "lora_r": args.r,
                 "targets": "all-linear", "dtype": args.dtype}
    t = timed(fns, args.repeats, args.device)
    res.update(plain_step_s=t["plain"], position_trace_s=t["position"], position_time_ratio=t["position"] / t["plain"],
               sketch_dim=args.sketch_dim, sketch_kind=sk_cfg.sketch_kind, sketch_trace_s=t["sketch"],
               sketch_time_ratio=t["sketch"] / t["plain"])
    mem = (lambda fn: peak_memory(fn, args.device)) if not args.no_memory else (lambda fn: float("nan"))
    m_plain, m_pos = mem(plain), mem(fns["position"])
    res.update(plain_peak_mb=m_plain / 2**20, position_peak_mb=m_pos / 2**20, position_memory_ratio=m_pos / m_plain)
    if not args.skip_token:
        nt = min(args.token_sequences, B)
        tb = {k: v[:nt] for k, v in batch.items()}
        tok_cfg = TraceConfig(mode="token", magnitude="none", module_rows=False, max_sequences=nt)
        t2 = timed({"plain": lambda: plain(tb), "dot": lambda: trace_batch(model, tb, scheme, {}, tok_cfg)},
                   max(1, args.repeats // 2), args.device)
        m_plain2 = mem(lambda: plain(tb))
        m_dot = mem(lambda: trace_batch(model, tb, scheme, {}, tok_cfg))
        res.update(token_sequences=nt, token_dot_s=t2["dot"], token_time_ratio=t2["dot"] / t2["plain"],
                   token_peak_mb=m_dot / 2**20, token_memory_ratio=m_dot / m_plain2)
    return res


def free(device: str) -> None:
    """After a shape: its model is out of scope; give its memory back before the next one is built."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", type=lambda s: s.split(","), default=["0.5b", "1.5b"],
                    help=f"comma separated, of: {', '.join(SHAPES)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--token-sequences", type=int, default=2, help="sequences of the token-mode trace")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sketch-dim", type=int, default=128, help="the position trace with per-position sketches")
    ap.add_argument("--skip-token", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the tiny 'smoke' shape, B=2, T=64, 1 repeat")
    ap.add_argument("--no-memory", action="store_true", help="skip peak memory (on CPU it runs the profiler: slow)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shapes, args.batch, args.seq_len, args.repeats = ["smoke"], 2, 64, 1
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible; on CPU use --smoke --device cpu")
    t0 = time.perf_counter()
    out = {"device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
           "torch": torch.__version__, "rows": []}
    for s in args.shapes:
        out["rows"].append(measure(s, args))
        free(args.device)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(out).replace("NaN", "null"))
        return 0
    print(f"device {out['device']}, torch {out['torch']}, {out['seconds']} s")
    for r in out["rows"]:
        print(f"{r['shape']:>6} {r['params_m']:>8.1f}M  B={r['batch']} T={r['seq_len']}  plain {r['plain_step_s']:.3f} s"
              f"  position x{r['position_time_ratio']:.2f} (mem x{r['position_memory_ratio']:.2f})"
              f"  sketch k={r['sketch_dim']} x{r['sketch_time_ratio']:.2f}"
              + (f"  token dot x{r['token_time_ratio']:.2f} (mem x{r['token_memory_ratio']:.2f}, "
                 f"{r['token_sequences']} seq)" if "token_time_ratio" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
