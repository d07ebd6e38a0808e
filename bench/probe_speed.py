"""Probe vectors per second: batched (one forward and a batched backward per rollout) against the baseline
(one forward, then one backward per position), side by side on the same rollouts.

    python bench/probe_speed.py                          # embedded default model on CPU, 32 positions per rollout
    python bench/probe_speed.py --json                   # one JSON object
    python bench/probe_speed.py --model Qwen/Qwen2.5-1.5B --device cuda --seq-len 320 --positions 64

Rollouts are random token sequences of ``--seq-len`` tokens (the cost does not depend on the tokens); each
rollout differentiates ``--positions`` positions spread over its second half (the generated part). The two
variants alternate rollout by rollout so load on a shared machine hits them alike. Time: wall clock on CUDA
(synchronised), this process's CPU time on CPU. ``max_rel_err``: the largest ||batched - loop|| / ||loop|| over
all vectors. ``ratio`` is against that baseline, which already shares one forward per rollout (so on a small
CPU model the forward bounds it); ``ratio_vs_naive`` is against a forward and a backward per position (what
the probe never does), on the first rollout only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.lm.models import load_model_and_tokenizer  # noqa: E402
from backend.probe.grads import resolve_site, row_gradients, row_gradients_loop  # noqa: E402


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--param", default="mlp.down_proj.weight")
    ap.add_argument("--row", type=int, default=0)
    ap.add_argument("--rollouts", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--positions", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=32, help="cotangents per batched backward")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    model.requires_grad_(False)
    model.eval()
    dev = next(model.parameters()).device
    site = resolve_site(model, args.layer, args.param, args.row)
    if args.positions > args.seq_len // 2:
        raise ValueError(f"--positions {args.positions} must be at most half of --seq-len {args.seq_len}")
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rollouts = [torch.randint(0, vocab, (args.seq_len,), generator=g) for _ in range(args.rollouts)]
    half = args.seq_len // 2
    positions = torch.linspace(half - 1, args.seq_len - 2, args.positions).round().long()     # (K,) distinct
    assert len(set(positions.tolist())) == args.positions, "positions must be distinct"
    row_gradients(model, site, rollouts[0], positions, chunk=args.chunk)                   # warm-up
    row_gradients_loop(model, site, rollouts[0], positions)
    t_batched = t_loop = 0.0
    max_rel = 0.0
    for ids in rollouts:
        t0 = _clock(dev)
        vb, _ = row_gradients(model, site, ids, positions, chunk=args.chunk)               # (K, d)
        t1 = _clock(dev)
        vl, _ = row_gradients_loop(model, site, ids, positions)                            # (K, d)
        t2 = _clock(dev)
        t_batched += t1 - t0
        t_loop += t2 - t1
        rel = ((vb - vl).norm(dim=1) / vl.norm(dim=1).clamp_min(1e-30)).max().item()
        max_rel = max(max_rel, rel)
    t0 = _clock(dev)
    for k in range(args.positions):             # naive: a forward and a backward per position
        row_gradients_loop(model, site, rollouts[0], positions[k:k + 1])
    t_naive = (_clock(dev) - t0) / args.positions
    n = args.rollouts * args.positions
    res = {"model": args.model, "device": str(dev), "site": site.name, "row_dim": site.row_dim,
           "rollouts": args.rollouts, "seq_len": args.seq_len, "positions_per_rollout": args.positions,
           "chunk": args.chunk, "threads": torch.get_num_threads(), "clock": "wall" if dev.type == "cuda" else "cpu",
           "batched_vectors_per_s": n / t_batched, "loop_vectors_per_s": n / t_loop,
           "ratio": t_loop / t_batched, "max_rel_err": max_rel, "naive_vectors_per_s": 1 / t_naive,
           "ratio_vs_naive": n / t_batched * t_naive}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{site.name} row {args.row} (d = {site.row_dim}), {args.rollouts} rollouts x {args.positions} "
              f"positions, {args.seq_len} tokens, {res['clock']} time, {res['threads']} threads")
        print(f"  batched          {res['batched_vectors_per_s']:10.1f} vectors/s")
        print(f"  per-position     {res['loop_vectors_per_s']:10.1f} vectors/s")
        print(f"  naive (fwd+bwd)  {res['naive_vectors_per_s']:10.1f} vectors/s")
        print(f"  ratio            {res['ratio']:10.2f}x    max_rel_err {max_rel:.2e}    "
              f"vs naive {res['ratio_vs_naive']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
