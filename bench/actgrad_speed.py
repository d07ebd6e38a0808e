"""Activation-gradient and embedding-gradient costs against a plain LoRA training step, side by side in one run.

    python bench/actgrad_speed.py                   # the embedded default + LoRA on CPU: a table
    python bench/actgrad_speed.py --json            # one JSON object
    python bench/actgrad_speed.py --device cuda     # a 0.5B-shaped Qwen2 with random weights, bf16

Rows (medians over --repeats, the variants interleaved so load on the machine hits them alike), one batch:
- plain step: forward + backward of the sft loss, LoRA gradients into ``.grad`` (what training does);
- actgrad: what the ``actgrad`` job does per batch (``backend.grads.actgrad_run.batch_grads``): hooks on every
  decoder layer, one forward, one backward to the embedding output, ||dL/dh|| at every (layer, position) and
  the vectors at one target per sample, copied to the host. ``actgrad_time_ratio`` = actgrad / plain (target
  <= 1.3);
- embgrad step: the plain step with the embedding hook armed (``backend.grads.embgrad``), plus the per-step
  work of a recorded step (n_v over the vocabulary and the metrics; Parquet writing not included).
  ``embgrad_time_ratio`` = embgrad step / plain step (target <= 1.05).
Time: wall clock with synchronisation on CUDA; on CPU this process's CPU time (other jobs on a shared machine
barely move it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.analysis import embgrad_metrics  # noqa: E402
from backend.grads.actgrad_run import batch_grads, ce_forward  # noqa: E402
from backend.grads.embgrad import EmbeddingGradHook  # noqa: E402
from backend.grads.hooks import decoder_layers  # noqa: E402
from backend.lm.loss import forward_loss  # noqa: E402
from backend.lm.schemes import get_scheme  # noqa: E402


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, str]:
    """(LoRA model, batch, description)."""
    from backend.lm.models import apply_lora
    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        from transformers import Qwen2Config, Qwen2ForCausalLM
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=4096, attn_implementation="sdpa")
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).to(args.device)
        B, T = args.batch_size, args.seq_len
        ids = torch.randint(0, cfg.vocab_size, (B, T), device=args.device)
        labels = ids.clone()
        labels[:, : T // 4] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        name = f"Qwen2 0.5B-shaped (random weights), bf16, batch {B} x {T}"
    else:
        from backend.lm.data import collate, encode_examples
        from backend.lm.models import load_model_and_tokenizer
        from backend.lm.tasks import get_task
        model, tok = load_model_and_tokenizer("default", device="cpu")
        _, ev = get_task("arith").generate(0, 0, args.batch_size)
        batch = collate(encode_examples(tok, ev, 256), tok.pad_token_id)
        name = f"embedded tiny-arith, fp32, batch {args.batch_size} x {batch['input_ids'].shape[1]}"
    model = apply_lora(model, r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]).eval()
    return model, batch, name


def timed(fn: Callable[[], None], cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512, help="CUDA only (CPU: the arith samples' length)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, batch, name = build(args)
    scheme = get_scheme("sft")
    layers = list(range(len(decoder_layers(model))))
    n_resp = int((batch["labels"][:, 1:] != -100).sum())
    at = [(b, int(batch["attention_mask"][b].sum()) - 2) for b in range(batch["input_ids"].shape[0])]
    params = [p for p in model.parameters() if p.requires_grad]
    hook = EmbeddingGradHook(model)

    def plain() -> None:
        forward_loss(model, batch, scheme, {}).total.backward()
        for p in params:
            p.grad = None

    def actgrad() -> None:
        batch_grads(model, batch, layers, at, ce_forward(n_resp))

    def embgrad() -> None:
        hook.armed = True
        forward_loss(model, batch, scheme, {}).total.backward()
        hook.armed = False
        n = hook.sums.norms(hook.vocab_size)
        embgrad_metrics.step_metrics(n)
        hook.sums = type(hook.sums)()
        for p in params:
            p.grad = None

    variants = {"plain": plain, "actgrad": actgrad, "embgrad": embgrad}
    for fn in variants.values():        # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            times[k].append(timed(fn, cuda))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}      # the least disturbed run of each: a check on the medians
    out = {"model": name, "device": args.device, "repeats": args.repeats, "layers": len(layers),
           "plain_s": med["plain"], "actgrad_s": med["actgrad"], "embgrad_s": med["embgrad"],
           "actgrad_time_ratio": med["actgrad"] / med["plain"], "embgrad_time_ratio": med["embgrad"] / med["plain"],
           "actgrad_time_ratio_min": low["actgrad"] / low["plain"],
           "embgrad_time_ratio_min": low["embgrad"] / low["plain"],
           "targets": {"actgrad_time_ratio": 1.3, "embgrad_time_ratio": 1.05},
           "time": "wall clock (synchronised)" if cuda else "process CPU time"}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{name} on {args.device}, median of {args.repeats}:")
        for k in variants:
            print(f"  {k:<8} {med[k] * 1e3:9.2f} ms   x{med[k] / med['plain']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
