"""What a traced training step costs against a plain one, per trace mode, beside the estimate printed before a run's
first traced step (backend.trace.config.trace_cost), on a random-init model of a family and size you choose.

    python bench/trace_cost.py                                  # Qwen2, hidden 384, 6 layers, vocab 32000 (~22M)
    python bench/trace_cost.py --family llama --hidden 256 --layers 4 --json

A traced step = the plain step (forward + backward of the batch, LoRA gradients into ``.grad``) plus the trace
re-run (``trace_batch``), as ``python -m backend train --trace-every N`` does at a traced step; the batch is the
train defaults' (16 sequences, 4 traced, LoRA r 8 on q/k/v/o). Variants: position mode; token mode with
``--trace-magnitude auto`` (what it chose is printed); token mode exact; token mode sketch k=64 with module rows.
Times: this process's CPU time (other jobs on a shared machine barely move it), the median of --repeats, the
variants interleaved. Ratios are traced step / plain step, measured and estimated.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.lm.loss import forward_loss
from backend.lm.schemes import get_scheme
from backend.trace import TraceConfig, discover_lora_modules, trace_batch
from backend.trace.config import StepShape, plan_cost, trace_cost


def build(args: argparse.Namespace):
    import transformers
    from peft import LoraConfig, get_peft_model
    heads = max(2, args.hidden // 64)
    kw = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
              num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=2 if heads % 2 == 0
              else 1, max_position_embeddings=4 * args.seq_len, attn_implementation="sdpa")
    cls = {"qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral", "qwen3": "Qwen3"}[args.family]
    if args.family == "qwen3":
        kw["head_dim"] = args.hidden // heads
    torch.manual_seed(0)
    base = getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**kw))
    n_params = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                 "o_proj"]))
    return model, n_params, f"{cls} random init, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"


def make_batch(args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(0)
    B, T = args.batch, args.seq_len
    ids = torch.randint(3, args.vocab, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    labels[:, :T // 3] = -100                                   # a prompt third, then the response
    return {"input_ids": ids, "attention_mask": am, "labels": labels, "sample_idx": torch.arange(B)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="qwen2", choices=("qwen2", "llama", "mistral", "qwen3"))
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--traced", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, n_params, desc = build(args)
    batch = make_batch(args)
    scheme = get_scheme("sft")
    sites = discover_lora_modules(model)
    S = min(args.traced, args.batch)
    shape = StepShape(n_sites=len(sites), batch_sequences=args.batch, traced_sequences=S,
                      positions=float(args.seq_len - 1), seq_len=args.seq_len, n_params=n_params)
    auto_cfg, _, auto_msg = plan_cost(TraceConfig(mode="token", max_sequences=S), shape, auto=True)
    variants = {"position": TraceConfig(mode="position", max_sequences=S),
                "token auto": auto_cfg,
                "token exact": TraceConfig(mode="token", magnitude="exact", max_sequences=S),
                "token sketch k=64": TraceConfig(mode="token", magnitude="sketch", sketch_k=64, max_sequences=S)}

    def plain() -> None:
        out = forward_loss(model, batch, scheme, {})
        out.total.backward()
        model.zero_grad(set_to_none=True)

    fns = {"plain step": plain}
    for name, cfg in variants.items():
        fns[name] = (lambda c=cfg: (trace_batch(model, batch, scheme, {}, c), plain()))
    plain()                                                     # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, f in fns.items():                                # interleaved: load hits every variant alike
            t0 = time.process_time()
            f()
            times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"variant": k, "seconds": round(med[k], 3), "measured_ratio": round(med[k] / med["plain step"], 2),
             "estimated_ratio": round(trace_cost(variants[k], shape), 2) if k in variants else 1.0}
            for k in fns]
    result = {"model": desc, "n_params": n_params, "batch": args.batch, "traced": S, "seq_len": args.seq_len,
              "lora_matrices": len(sites), "auto_chose": auto_msg, "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{desc}: {n_params / 1e6:.1f}M parameters; batch {args.batch} x {args.seq_len} tokens, {S} traced, "
          f"{len(sites)} LoRA matrices, {torch.get_num_threads()} threads")
    print(f"auto: {auto_msg}")
    print(f"{'variant':<20} {'CPU s':>8} {'measured x':>11} {'estimated x':>12}")
    for r in rows:
        print(f"{r['variant']:<20} {r['seconds']:>8.2f} {r['measured_ratio']:>11.1f} {r['estimated_ratio']:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
