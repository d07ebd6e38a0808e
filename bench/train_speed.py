"""Training throughput of a plain LoRA step on the default model, and its memory peak.

    python bench/train_speed.py                     # default model, CPU, batch 16
    python bench/train_speed.py --scheme antiop --batch-size 32 --json

Side by side in one process, on the same batches:
- baseline: the Hugging Face path, ``model(**batch, labels=labels).loss.backward()`` + AdamW step;
- ours: ``backend.lm.loss.forward_loss`` under the chosen scheme + the same optimizer step.
Steps alternate (baseline, ours) on each batch so that a busy machine slows both alike. It prints tokens/s
(all tokens, and response tokens) for both, their ratio, and the memory peak: CUDA's ``max_memory_allocated``
per path on a GPU, the process's peak RSS on CPU (one number for both paths: coarse, but honest).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from backend.lm.data import collate, encode_examples  # noqa: E402
from backend.lm.loss import forward_loss  # noqa: E402
from backend.lm.models import apply_lora, load_model_and_tokenizer  # noqa: E402
from backend.lm.schemes import get_scheme  # noqa: E402
from backend.lm.tasks import get_task  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step_fn, batches, warmup: int, device) -> list[float]:
    times = []
    for i, b in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step_fn(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scheme", default="sft")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    model = apply_lora(model, r=8, alpha=16)
    model.train()
    device = next(model.parameters()).device
    train, _ = get_task("arith").generate(0, args.batch_size * (args.steps + args.warmup), 0)
    enc = encode_examples(tok, train, 256)
    batches = [{k: v.to(device) for k, v in collate(enc[i:i + args.batch_size], tok.pad_token_id).items()}
               for i in range(0, len(enc), args.batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    scheme = get_scheme(args.scheme)
    sp = scheme.resolve_params({})

    def baseline(b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours(b):
        forward_loss(model, b, scheme, sp).total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Interleaved (baseline step, ours step) on the same batch, so a busy machine slows both alike.
    paths = {"baseline_hf": baseline, "ours_" + args.scheme: ours}
    times: dict[str, list[float]] = {k: [] for k in paths}
    peak: dict[str, float | None] = {k: None for k in paths}
    for i, b in enumerate(batches):
        for name, fn in paths.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time_steps(fn, [b], 0, device)[0]
            if i >= args.warmup:
                times[name].append(t)
                if device.type == "cuda":
                    peak[name] = max(peak[name] or 0.0, torch.cuda.max_memory_allocated() / 2**20)
    measured = batches[args.warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in measured)
    resp = sum(int((b["labels"][:, 1:] != -100).sum()) for b in measured)
    results = {name: {"step_s_median": statistics.median(ts), "tokens_per_s": tokens / sum(ts),
                      "response_tokens_per_s": resp / sum(ts), "peak_mem_mb": peak[name]}
               for name, ts in times.items()}
    base, ours_r = results["baseline_hf"], results["ours_" + args.scheme]
    summary = {"device": str(device), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
               "trainable_params": sum(p.numel() for p in params), "results": results,
               "ours_over_baseline_time": ours_r["step_s_median"] / base["step_s_median"],
               "tokens_per_s": ours_r["tokens_per_s"], "peak_rss_mb": peak_rss_mb()}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{summary['trainable_params']} LoRA params, {args.steps} timed steps")
    print(f"{'path':<16}{'step (median)':>15}{'tokens/s':>12}{'resp tok/s':>12}{'peak mem':>14}")
    for name, r in results.items():
        mem = f"{r['peak_mem_mb']:.0f} MB" if r["peak_mem_mb"] is not None else "see RSS"
        print(f"{name:<16}{r['step_s_median'] * 1000:>12.1f} ms{r['tokens_per_s']:>12.0f}"
              f"{r['response_tokens_per_s']:>12.0f}{mem:>14}")
    print(f"ours / baseline step time: {summary['ours_over_baseline_time']:.3f}x; process peak RSS "
          f"{summary['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
