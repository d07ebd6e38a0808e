"""Tracer speed and memory against a plain LoRA step and the naive per-token loop, measured side by side.

    python bench/trace_speed.py                         # default model (data/models/tiny-arith) on CPU: a table
    python bench/trace_speed.py --json                  # one JSON object
    python bench/trace_speed.py --device cuda           # a 0.5B-shaped Qwen2 with random weights
    python bench/trace_speed.py --model medium          # CPU, hidden 512 x 8 layers: a small real model's width

Rows (medians over --repeats, the variants interleaved so load on the machine hits them alike):
- plain step: forward + backward of the scheme loss (what training does), LoRA gradients into ``.grad``;
- position trace: ``trace_batch`` in position mode on the same batch: hooks, factored products, every
  statistic, the result columns (a re-run also forks the RNG and restores module modes);
- token dot: ``trace_batch`` in token mode, magnitude none, no module rows: G + one JVP;
- naive loop: one backward per token (``retain_graph``) and the dot of each g_t with G (and ||g_t||);
- token exact: token mode with exact magnitudes (batched backward in chunks) and module rows;
- influence (position mode): the position trace with an eval batch of --eval-batch sequences (G_eval: one
  forward + backward of the eval loss, and one more factored product per LoRA matrix); ``influence_time_ratio``
  is a traced training step with influence over one without (each = the plain step + its trace re-run),
  ``influence_trace_ratio`` the trace alone with over without;
- position + sketch: the position trace with per-position gradient sketches (--sketch-dim, default 128), once
  per projection (``sketch_kind`` gaussian, gaussian-full, sparse: ``sketch_<kind>_time_ratio`` etc., and the rms
  relative error of the squared sketch norm against the exact squared magnitude, one projection draw);
  ``sketch_time_ratio`` is the default kind's over the plain step, ``sketch_trace_ratio`` over the trace without;
- with --token-attention: token dot at T=1024 on a 28.5M Qwen2 shape (bench/token_attention.py), its attention
  (tokviz_jvp) and eager side by side: ``token_time_ratio_t1024``, ``token_memory_ratio_t1024`` (targets <= 4, 1.5)
  and ``token_eager_*``;
- token sketch k: sketched magnitudes, error against the exact ones (the k directions are shared by all tokens,
  so their errors are correlated: the rms over one step's tokens is one draw, not an average over draws).
Time: wall clock on CUDA; on CPU this process's CPU time, which other jobs on a shared machine barely move.
Peak memory: on CUDA ``max_memory_allocated`` above what was allocated before the call; on CPU the peak of
tensor memory allocated during the call (the PyTorch profiler's memory timeline). Ratios are against the plain
step on the same batch.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.lm.loss import forward_loss  # noqa: E402
from backend.lm.schemes import get_scheme  # noqa: E402
from backend.store import paths  # noqa: E402
from backend.trace import TraceConfig, discover_lora_modules, trace_batch  # noqa: E402
from backend.trace.config import SKETCH_KINDS  # noqa: E402
from backend.trace.token import token_loss  # noqa: E402

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Qwen2 shapes built with random weights (``qwen2_shape``): the default model's, when it is not built, and a
# small real model's width (28.5M parameters), where per-op overheads weigh less (bench/token_attention.py too)
QWEN2_SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "medium": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2),
}


def qwen2_shape(shape: str, **kw: object):
    """A randomly initialised Qwen2ForCausalLM of ``QWEN2_SHAPES[shape]`` (tied embeddings, SDPA attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**QWEN2_SHAPES[shape], tie_word_embeddings=True, attn_implementation="sdpa",
                                        **kw))


def build_model(args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    tok = None
    if args.device.startswith("cuda"):
        cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=4096, attn_implementation="sdpa")
        base, name = Qwen2ForCausalLM(cfg).to(dtype), "Qwen2 0.5B-shaped (random weights)"
    elif args.model == "medium":       # the width of a small real model, on CPU: per-op overheads weigh less
        base, name = qwen2_shape("medium").to(dtype), "Qwen2 shape, hidden 512, 8 layers (random weights)"
    elif (paths.DEFAULT_MODEL_DIR / "config.json").exists() and args.model == "default":
        from transformers import AutoTokenizer
        base = AutoModelForCausalLM.from_pretrained(paths.DEFAULT_MODEL_DIR, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(paths.DEFAULT_MODEL_DIR)
        name = "data/models/tiny-arith"
    else:
        base, name = qwen2_shape("tiny").to(dtype), "tiny random Qwen2 (tiny-arith shape)"
    model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=args.targets,
                                            task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:                     # peft starts lora_B at zero: random A and B, a trained-like state
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.to(args.device).train()
    n_par = sum(p.numel() for p in base.parameters())
    return model, tok, f"{name}, {n_par / 1e6:.1f}M params, {base.config._attn_implementation}"


def make_batch(vocab: int, B: int, T: int, device: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 4] = -100                                  # a prompt: the first quarter
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                         "labels": labels, "sample_idx": torch.arange(B)}.items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(device: str) -> float:
    """CPU: this process's CPU time (other jobs on a shared machine barely move it); CUDA: wall time."""
    return time.perf_counter() if device.startswith("cuda") else time.process_time()


def timed(fns: dict[str, Callable], repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function, interleaved over ``repeats`` rounds after one warm-up each."""
    for f in fns.values():
        f()
    gc.collect()                          # the first full collection after loading: not part of either step
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t = clock(device)
            f()
            sync(device)
            times[k].append(clock(device) - t)
    return {k: statistics.median(v) for k, v in times.items()}


def once(fn: Callable, device: str) -> tuple[float, object]:
    sync(device)
    t = clock(device)
    out = fn()
    sync(device)
    return clock(device) - t, out


def peak_memory(fn: Callable, device: str) -> float:
    """Peak bytes allocated by ``fn`` above what was allocated before it."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    cur = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type != "cpu" or action == Action.PREEXISTING:
            continue
        cur += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, cur)
    return float(peak)


def naive_token_loop(model, batch, scheme, sites) -> dict[str, torch.Tensor]:
    """G by a plain backward, then one backward per token: dot <g_t, G> and ||g_t|| (float64)."""
    params = [s.param for s in sites]
    out = forward_loss(model, batch, scheme, {})
    G = [g.double() for g in torch.autograd.grad(out.total, params, retain_graph=True)]
    losses = token_loss(out.logits[:, :-1], batch["input_ids"][:, 1:])          # the tracer's l_t
    B, T1 = losses.shape
    dot = torch.zeros(B, T1, dtype=torch.float64)
    mag = torch.zeros(B, T1, dtype=torch.float64)
    for b in range(B):
        for t in range(T1):
            g = torch.autograd.grad(losses[b, t], params, retain_graph=True)
            dot[b, t] = sum(float((gi.double() * Gi).sum()) for gi, Gi in zip(g, G))
            mag[b, t] = sum(float(gi.double().square().sum()) for gi in g) ** 0.5
    return {"dot": dot, "magnitude": mag, "g_norm": torch.tensor(sum(float(g.square().sum()) for g in G) ** 0.5)}


def grid(res, B: int, T: int, col: str) -> torch.Tensor:
    out = torch.full((B, T - 1), float("nan"), dtype=torch.float64)
    out[torch.as_tensor(res.tokens["sample_idx"], dtype=torch.long),
        torch.as_tensor(res.tokens["position"], dtype=torch.long)] = torch.as_tensor(res.tokens[col]).double()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default", choices=("default", "random", "medium"),
                    help="'default' (tiny-arith if built), 'random' (its shape, random weights) or 'medium' "
                         "(a 28.5M Qwen2 shape: hidden 512, 8 layers, random weights)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--batch", type=int, default=None, help="position mode sequences (default 8)")
    ap.add_argument("--seq-len", type=int, default=None, help="position mode tokens per sequence (128 CPU, 512 GPU)")
    ap.add_argument("--eval-batch", type=int, default=None, help="influence: eval sequences (default: half of --batch)")
    ap.add_argument("--token-batch", type=int, default=2)
    ap.add_argument("--token-seq-len", type=int, default=256)
    ap.add_argument("--r", type=int, default=None, help="LoRA rank (8 CPU, 16 GPU)")
    ap.add_argument("--targets", type=lambda s: s.split(","), default=DEFAULT_TARGETS,
                    help="LoRA target modules, comma separated (default: the project's q,k,v,o; 'all' adds MLP)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--sketch-k", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 256])
    ap.add_argument("--sketch-dim", type=int, default=128, help="position mode: per-position sketch dimension")
    ap.add_argument("--skip-naive", action="store_true", help="leave out the naive per-token loop (slow)")
    ap.add_argument("--skip-token", action="store_true", help="position mode only")
    ap.add_argument("--token-attention", action="store_true",
                    help="also token mode's attention at T=1024 (bench/token_attention.py, a 28.5M Qwen2 shape, "
                         "B=4: token_time_ratio_t1024 / token_memory_ratio_t1024 and the eager ones; ~7 CPU min)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.targets == ["all"]:
        args.targets = ALL_TARGETS
    args.batch = args.batch or 8
    args.seq_len = args.seq_len or (512 if gpu else 128)
    args.r = args.r or (16 if gpu else 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, desc = build_model(args)
    vocab = model.config.vocab_size
    scheme = get_scheme("sft")
    sites = discover_lora_modules(model)
    rows: list[dict] = []
    res: dict = {"model": desc, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                 "lora_r": args.r, "targets": args.targets, "lora_matrices": len(sites)}

    # ---- position mode against the plain step -------------------------------------------------------------
    pb = make_batch(vocab, args.batch, args.seq_len, args.device, 0)
    params = [p for p in model.parameters() if p.requires_grad]

    def plain(batch=pb):
        out = forward_loss(model, batch, scheme, {})
        out.total.backward()
        for p in params:
            p.grad = None

    pos_cfg = TraceConfig(mode="position", max_sequences=args.batch)

    def position():
        trace_batch(model, pb, scheme, {}, pos_cfg, tok)

    t = timed({"plain": plain, "position": position}, args.repeats, args.device)
    m_plain, m_pos = peak_memory(plain, args.device), peak_memory(position, args.device)
    n_pos = args.batch * args.seq_len
    rows.append(dict(mode="plain step", tokens=n_pos, time=t["plain"], ratio=1.0, mem=m_plain, mem_ratio=1.0))
    rows.append(dict(mode="position trace", tokens=n_pos, time=t["position"], ratio=t["position"] / t["plain"],
                     mem=m_pos, mem_ratio=m_pos / m_plain))
    res.update(position_time_ratio=t["position"] / t["plain"], position_memory_ratio=m_pos / m_plain,
               plain_step_s=t["plain"], position_trace_s=t["position"])

    # ---- influence: the position trace with an eval batch --------------------------------------------------
    E = args.eval_batch or max(1, args.batch // 2)
    eb = make_batch(vocab, E, args.seq_len, args.device, 2)

    def influence():
        trace_batch(model, pb, scheme, {}, pos_cfg, tok, eval_batch=eb)

    ti = timed({"plain": plain, "position": position, "influence": influence}, args.repeats, args.device)
    step, step_inf = ti["plain"] + ti["position"], ti["plain"] + ti["influence"]
    m_inf = peak_memory(influence, args.device)
    rows.append(dict(mode=f"position + influence (eval {E})", tokens=n_pos, time=ti["influence"],
                     ratio=ti["influence"] / ti["plain"], mem=m_inf, mem_ratio=m_inf / m_plain,
                     note=f"traced step {step_inf / step:.2f}x, trace {ti['influence'] / ti['position']:.2f}x"))
    res.update(influence_time_ratio=step_inf / step, influence_trace_ratio=ti["influence"] / ti["position"],
               influence_eval_sequences=E)

    # ---- per-position gradient sketches: the position trace with sketch_dim k, every projection ------------
    sk_cfgs = {kind: TraceConfig(mode="position", max_sequences=args.batch, sketch_dim=args.sketch_dim,
                                 sketch_kind=kind) for kind in SKETCH_KINDS}
    runs = {f"sketch_{kind}": (lambda c=c: trace_batch(model, pb, scheme, {}, c, tok)) for kind, c in sk_cfgs.items()}
    ts = timed({"plain": plain, "position": position, **runs}, args.repeats, args.device)
    default = TraceConfig().sketch_kind
    for kind, c in sk_cfgs.items():
        t_k = ts[f"sketch_{kind}"]
        m_sk = peak_memory(runs[f"sketch_{kind}"], args.device)
        out = trace_batch(model, pb, scheme, {}, c, tok)
        # one projection draw: the squared sketch norm against the exact squared magnitude of each piece
        rel = (torch.as_tensor(out.sketch).double().square().sum(1)
               / torch.as_tensor(out.tokens["magnitude"]).double().square() - 1)
        err = float(rel.square().mean().sqrt())
        rows.append(dict(mode=f"position + {kind} sketch (k={args.sketch_dim})", tokens=n_pos, time=t_k,
                         ratio=t_k / ts["plain"], mem=m_sk, mem_ratio=m_sk / m_plain,
                         note=f"trace {t_k / ts['position']:.2f}x the trace without; ||sk||^2 rms rel err {err:.3f}"))
        res.update({f"sketch_{kind}_time_ratio": t_k / ts["plain"], f"sketch_{kind}_trace_ratio": t_k / ts["position"],
                    f"sketch_{kind}_memory_ratio": m_sk / m_plain, f"sketch_{kind}_norm_rms_rel_err": err})
    res.update(sketch_time_ratio=res[f"sketch_{default}_time_ratio"], sketch_kind=default,
               sketch_trace_ratio=res[f"sketch_{default}_trace_ratio"],
               sketch_memory_ratio=res[f"sketch_{default}_memory_ratio"], sketch_dim=args.sketch_dim)

    # ---- token mode ----------------------------------------------------------------------------------------
    if args.token_attention:           # the long-sequence keys, side by side with eager (one measurement)
        from bench.token_attention import measure
        ta, _ = measure([1024], batch=4, repeats=3, threads=args.threads or 1)
        res.update({k: v for k, v in ta.items() if k.endswith("_t1024")})
        torch.set_num_threads(res["threads"])
    if args.skip_token:
        args.sketch_k = []
        return report(res, rows, args, desc, sites)
    B, T = args.token_batch, args.token_seq_len
    tb = make_batch(vocab, B, T, args.device, 1)
    n_tok = B * (T - 1)
    dot_cfg = TraceConfig(mode="token", magnitude="none", module_rows=False, max_sequences=B)
    exact_cfg = TraceConfig(mode="token", magnitude="exact", module_rows=True, max_sequences=B)
    reps = max(3, args.repeats // 3)
    t2 = timed({"plain": lambda: plain(tb), "dot": lambda: trace_batch(model, tb, scheme, {}, dot_cfg, tok)},
               reps, args.device)
    # CPU: the profiler's timeline counts functorch's forward-mode wrappers as allocations (several times the
    # process's real growth), so token-mode memory is measured on CUDA only
    m_plain2 = peak_memory(lambda: plain(tb), args.device)
    m_dot = peak_memory(lambda: trace_batch(model, tb, scheme, {}, dot_cfg, tok), args.device) if gpu else float("nan")
    rows.append(dict(mode="plain step", tokens=n_tok, time=t2["plain"], ratio=1.0, mem=m_plain2, mem_ratio=1.0))
    rows.append(dict(mode="token dot (JVP)", tokens=n_tok, time=t2["dot"], ratio=t2["dot"] / t2["plain"],
                     mem=m_dot, mem_ratio=m_dot / m_plain2))
    t_exact, exact = once(lambda: trace_batch(model, tb, scheme, {}, exact_cfg, tok), args.device)
    # (the CPU memory timeline of the long exact run would itself take gigabytes: measured on CUDA only)
    m_exact = (peak_memory(lambda: trace_batch(model, tb, scheme, {}, exact_cfg, tok), args.device) if gpu
               else float("nan"))
    rows.append(dict(mode="token exact magnitudes", tokens=n_tok, time=t_exact, ratio=t_exact / t2["plain"],
                     mem=m_exact, mem_ratio=m_exact / m_plain2))
    ours_dot = trace_batch(model, tb, scheme, {}, dot_cfg, tok)
    exact_mag = grid(exact, B, T, "magnitude")
    res.update(token_dot_s=t2["dot"], token_exact_s=t_exact, token_plain_step_s=t2["plain"])
    if not args.skip_naive:
        model.eval()                                             # the trace runs without dropout: so does the loop
        t_naive, naive = once(lambda: naive_token_loop(model, tb, scheme, sites), args.device)
        model.train()
        rows.append(dict(mode="naive loop (1 backward/token)", tokens=n_tok, time=t_naive,
                         ratio=t_naive / t2["plain"], mem=float("nan"), mem_ratio=float("nan")))
        scale = naive["magnitude"] * float(naive["g_norm"])
        err = ((grid(ours_dot, B, T, "dot") - naive["dot"]).abs() / scale.clamp_min(1e-30))
        res.update(token_dot_speedup=t_naive / t2["dot"], token_dot_max_rel_err=float(err.max()),
                   token_dot_max_rel_err_vs_largest=float((grid(ours_dot, B, T, "dot") - naive["dot"]).abs().max()
                                                          / naive["dot"].abs().max()),
                   token_exact_speedup=t_naive / t_exact,
                   token_exact_magnitude_max_rel_err=float(((exact_mag - naive["magnitude"]).abs()
                                                            / naive["magnitude"]).max()),
                   naive_loop_s=t_naive)
    for k in args.sketch_k:
        cfg = TraceConfig(mode="token", magnitude="sketch", sketch_k=k, module_rows=False, max_sequences=B)
        ts, sk = once(lambda: trace_batch(model, tb, scheme, {}, cfg, tok), args.device)
        rel = ((grid(sk, B, T, "magnitude") - exact_mag) / exact_mag).flatten()
        rel = rel[~rel.isnan()]
        res[f"sketch_k{k}_rms_rel_err"] = float(rel.square().mean().sqrt())
        res[f"sketch_k{k}_max_rel_err"] = float(rel.abs().max())
        res[f"sketch_k{k}_s"] = ts
        rows.append(dict(mode=f"token sketch k={k}", tokens=n_tok, time=ts, ratio=ts / t2["plain"],
                         mem=float("nan"), mem_ratio=float("nan"),
                         note=f"rms rel err {res[f'sketch_k{k}_rms_rel_err']:.3f} "
                              f"(sqrt(1/2k) = {(0.5 / k) ** 0.5:.3f})"))
    return report(res, rows, args, desc, sites)


def _finite(o):
    """NaN -> None, so --json prints strict JSON."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    if isinstance(o, float) and o != o:
        return None
    return o


def report(res: dict, rows: list[dict], args: argparse.Namespace, desc: str, sites: list) -> int:
    gpu = args.device.startswith("cuda")
    res["rows"] = rows
    if args.json:
        print(json.dumps(_finite(res)))
        return 0
    print(f"model: {desc}; device {args.device}, {args.dtype}, {res['threads']} threads; LoRA r={args.r} on "
          f"{','.join(args.targets)} ({len(sites)} matrices)")
    print(f"{'mode':<32}{'tokens':>8}{'time ms':>11}{'x plain':>9}{'peak MB':>10}{'x plain':>9}  note"
          f"   (time: {'wall' if gpu else 'process CPU'})")
    for r in rows:
        print(f"{r['mode']:<32}{r['tokens']:>8}{r['time'] * 1e3:>11.1f}{r['ratio']:>9.2f}{r['mem'] / 2**20:>10.1f}"
              f"{r['mem_ratio']:>9.2f}  {r.get('note', '')}")
    keys = [k for k in res if k.endswith(("ratio", "speedup", "err"))]
    for k in keys:
        print(f"{k}: {res[k]:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
