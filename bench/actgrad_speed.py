"""Activation-gradient and embedding-gradient costs against a plain LoRA training step, side by side in one run.

    python bench/actgrad_speed.py                   # the embedded default + LoRA on CPU: a table
    python bench/actgrad_speed.py --json            # one JSON object
    python bench/actgrad_speed.py --device cuda     # a 0.5B-shaped Qwen2 with random weights, bf16

Rows (medians over --repeats, the variants interleaved so load on the machine hits them alike, their order
rotated each round so none always runs after the same one; the deeper model in a loop of its own, so the tiny
model's steps never follow its cache-evicting ones), one batch:
- plain step: forward + backward of the sft loss, LoRA gradients into ``.grad`` (what training does);
- actgrad: what the ``actgrad`` job does per batch (``backend.grads.actgrad_run.batch_grads``): hooks on every
  decoder layer, one forward, one backward to the embedding output, ||dL/dh|| at every (layer, position) and
  the vectors at one target per sample, copied to the host. ``actgrad_time_ratio`` = actgrad / plain (target
  <= 1.3);
- embgrad step: the plain step with the embedding hook armed (``backend.grads.embgrad``), plus the per-step
  work of a recorded step (n_v over the vocabulary and the metrics; Parquet writing not included).
  ``embgrad_time_ratio`` = embgrad step / plain step (target <= 1.05);
- input-grad floor: the plain step with only the embedding output made to require grad (what arming the hook
  costs before any of its own work: the backward then also runs through layer 0's input path, which a LoRA
  model with a frozen embedding never needs). ``embgrad_floor_ratio`` = floor / plain: the part of
  ``embgrad_time_ratio`` that no hook can avoid; the rest is the hook's own work (index_add, n_v, metrics);
- FLOPs (``torch.utils.flop_counter``: matmuls and attention, exact and free of timing noise): of the plain
  step, of the floor and of the embgrad step; ``embgrad_flops_ratio`` = embgrad / plain, the time ratio the
  hook would have if time went by FLOPs (on a busy shared CPU the time ratios move by a few % from run to run);
- deeper model (CPU, ``--deep-layers`` L, 0 = skip): a random-init model of the embedded default's shape but
  L decoder layers, same batch, plain vs embgrad step (``embgrad_time_ratio_deep``): layer 0's share of the
  step, and so that pass's, is about 1/L.
Time: wall clock with synchronisation on CUDA; on CPU this process's CPU time (other jobs on a shared machine
barely move it).
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.analysis import embgrad_metrics  # noqa: E402
from backend.grads.actgrad_run import batch_grads, ce_forward  # noqa: E402
from backend.grads.embgrad import EmbeddingGradHook, EmbGradRecorder  # noqa: E402
from backend.grads.hooks import decoder_layers  # noqa: E402
from backend.lm.loss import forward_loss  # noqa: E402
from backend.lm.schemes import get_scheme  # noqa: E402
from backend.store.rundir import RunDir  # noqa: E402


def deep_like(model: torch.nn.Module, n_layers: int) -> torch.nn.Module:
    """A random-init Qwen2 with ``model``'s shape but ``n_layers`` decoder layers, with the same LoRA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from backend.lm.models import apply_lora
    c = model.config
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=n_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                      tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings,
                      attn_implementation=c._attn_implementation)
    return apply_lora(Qwen2ForCausalLM(cfg), r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]).eval()


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, object, dict, str]:
    """(LoRA model, its tokenizer (None on CUDA: random weights), batch, description)."""
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
        tok = None
    else:
        from backend.lm.data import collate, encode_examples
        from backend.lm.models import load_model_and_tokenizer
        from backend.lm.tasks import get_task
        model, tok = load_model_and_tokenizer("default", device="cpu")
        _, ev = get_task("arith").generate(0, 0, args.batch_size)
        batch = collate(encode_examples(tok, ev, 256), tok.pad_token_id)
        name = f"embedded tiny-arith, fp32, batch {args.batch_size} x {batch['input_ids'].shape[1]}"
    model = apply_lora(model, r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]).eval()
    return model, tok, batch, name


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


def flops(fn: Callable[[], None]) -> int:
    """Matmul and attention FLOPs of one call of ``fn``."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def interleaved(variants: dict[str, Callable[[], None]], repeats: int, cuda: bool) -> dict[str, list[float]]:
    """Each variant's times over ``repeats`` rounds (after one warm-up call each); round r starts at variant
    r mod n, so a variant's predecessor (whose cache footprint it inherits) changes from round to round."""
    for fn in variants.values():
        fn()
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(timed(variants[k], cuda))
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512, help="CUDA only (CPU: the arith samples' length)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    ap.add_argument("--deep-layers", type=int, default=16, help="CPU: the deeper model's layers (0: skip it)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, tok, batch, name = build(args)
    scheme = get_scheme("sft")
    layers = list(range(len(decoder_layers(model))))
    n_resp = int((batch["labels"][:, 1:] != -100).sum())
    at = [(b, int(batch["attention_mask"][b].sum()) - 2) for b in range(batch["input_ids"].shape[0])]
    params = [p for p in model.parameters() if p.requires_grad]
    hook = EmbeddingGradHook(model)

    def step(m: torch.nn.Module, ps: list[torch.nn.Parameter]) -> None:
        forward_loss(m, batch, scheme, {}).total.backward()
        for p in ps:
            p.grad = None

    def plain() -> None:
        step(model, params)

    def actgrad() -> None:
        batch_grads(model, batch, layers, at, ce_forward(n_resp))

    def embgrad_step(h: EmbeddingGradHook, m: torch.nn.Module, ps: list[torch.nn.Parameter]) -> None:
        h.armed = True
        step(m, ps)
        h.armed = False
        n = h.sums.norms(h.vocab_size)
        embgrad_metrics.step_metrics(n)
        h.sums = type(h.sums)()

    def embgrad() -> None:
        embgrad_step(hook, model, params)

    def floor() -> None:
        # only what arming costs before the hook's own work: the embedding output requires grad
        h = hook.embedding.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True))
        try:
            step(model, params)
        finally:
            h.remove()

    variants = {"plain": plain, "actgrad": actgrad, "embgrad": embgrad, "floor": floor}
    if tok is not None:
        rd = RunDir.create(kind="train", name="bench", config={}, root=Path(tempfile.mkdtemp(prefix="tv-bench-")))
        rec = EmbGradRecorder(1, 0, model, tok, rd, True, None)
        steps = itertools.count()

        def embgrad_rec() -> None:
            rec.begin(next(steps))      # writes the step recorded before (its two tables), arms for this one
            step(model, params)
            # disarm, as the trainer's next begin() does for a step not recorded: no other variant runs armed
            rec.hook.armed = False

        variants["embgrad_rec"] = embgrad_rec
    times = interleaved(variants, args.repeats, cuda)
    fl = {k: flops(variants[k]) for k in ("plain", "floor", "embgrad")}
    if args.deep_layers and not cuda:
        deep = deep_like(model, args.deep_layers)
        deep_params = [p for p in deep.parameters() if p.requires_grad]
        deep_hook = EmbeddingGradHook(deep)
        deep_variants = {"plain_deep": lambda: step(deep, deep_params),
                         "embgrad_deep": lambda: embgrad_step(deep_hook, deep, deep_params)}
        times |= interleaved(deep_variants, args.repeats, cuda)
        fl |= {k: flops(fn) for k, fn in deep_variants.items()}
    if tok is not None:
        rec.finish({})
        shutil.rmtree(rd.path.parent)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}      # the least disturbed run of each: a check on the medians
    out = {"model": name, "device": args.device, "repeats": args.repeats, "layers": len(layers),
           "plain_s": med["plain"], "actgrad_s": med["actgrad"], "embgrad_s": med["embgrad"],
           "actgrad_time_ratio": med["actgrad"] / med["plain"], "embgrad_time_ratio": med["embgrad"] / med["plain"],
           "actgrad_time_ratio_min": low["actgrad"] / low["plain"],
           "embgrad_time_ratio_min": low["embgrad"] / low["plain"],
           "embgrad_floor_ratio": med["floor"] / med["plain"],
           "plain_gflops": fl["plain"] / 1e9, "embgrad_flops_ratio": fl["embgrad"] / fl["plain"],
           "embgrad_floor_flops_ratio": fl["floor"] / fl["plain"],
           **({"embgrad_time_ratio_with_writes": med["embgrad_rec"] / med["plain"]} if "embgrad_rec" in med else {}),
           "targets": {"actgrad_time_ratio": 1.3, "embgrad_time_ratio": 1.05},
           "time": "wall clock (synchronised)" if cuda else "process CPU time"}
    if "plain_deep" in med:
        out |= {"deep_layers": args.deep_layers, "plain_deep_s": med["plain_deep"],
                "embgrad_deep_s": med["embgrad_deep"],
                "embgrad_time_ratio_deep": med["embgrad_deep"] / med["plain_deep"],
                "embgrad_flops_ratio_deep": fl["embgrad_deep"] / fl["plain_deep"]}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{name} on {args.device}, median of {args.repeats}:")
        for k in times:
            ref = med["plain_deep"] if k.endswith("_deep") else med["plain"]
            print(f"  {k:<13} {med[k] * 1e3:9.2f} ms   x{med[k] / ref:.3f}")
        print("  FLOPs x plain: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items() if "flops_ratio" in k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
