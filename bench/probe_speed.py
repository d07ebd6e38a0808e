"""Probe vectors per second: batched (one forward and one backward per rollout, or a batched one) against the
baseline (one forward, then one backward per position), side by side on the same rollouts, per probed site.

    python bench/probe_speed.py                          # embedded default model on CPU, 32 positions per rollout
    python bench/probe_speed.py --json --threads 1       # one JSON object
    python bench/probe_speed.py --model Qwen/Qwen2.5-1.5B --device cuda --seq-len 320 --positions 64

Sites (``--sites``, default: the default probe's weight, then two that are not per-position): each row times
the path ``row_gradients`` takes there (``Site.path``: "diagonal", one plain backward for all positions, when
the weight is per-position in the last layer; else "vmap", one backward batched over K one-hot cotangents) and,
at a diagonal site, the vmap path too. Rollouts are random token sequences of ``--seq-len`` tokens (the cost
does not depend on the tokens); each differentiates ``--positions`` positions spread over its second half (the
generated part). The variants alternate rollout by rollout so load on a shared machine hits them alike. Time:
wall clock on CUDA (synchronised), this process's CPU time on CPU. ``max_rel_err``: the largest
||batched - loop|| / ||loop|| over all vectors. ``ratio`` is against that baseline, which already shares one
forward per rollout; ``ratio_vs_naive`` is against a forward and a backward per position (what the probe never
does), on the first rollout only. The top-level ``ratio`` / ``max_rel_err`` are the first site's.
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


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)).max().item()


def bench_site(model: torch.nn.Module, spec: str, rollouts: list[torch.Tensor], positions: torch.Tensor,
               args: argparse.Namespace, dev: torch.device) -> dict:
    """One ``LAYER:PARAM`` site: its default path (and at a diagonal site the vmap path) against the loop."""
    layer, _, param = spec.partition(":")
    if not param or not layer.lstrip("-").isdigit():
        raise ValueError(f"--sites entry {spec!r} is not LAYER:PARAM, e.g. -1:mlp.down_proj.weight")
    site = resolve_site(model, int(layer), param, args.row)
    paths = [site.path] + (["vmap"] if site.path == "diagonal" else [])
    variants = {p: (lambda ids, p=p: row_gradients(model, site, ids, positions, chunk=args.chunk, path=p))
                for p in paths}
    variants["loop"] = lambda ids: row_gradients_loop(model, site, ids, positions)
    for fn in variants.values():                                               # warm-up
        fn(rollouts[0])
    t = dict.fromkeys(variants, 0.0)
    err = dict.fromkeys(paths, 0.0)
    for ids in rollouts:
        got = {}
        for name, fn in variants.items():
            t0 = _clock(dev)
            got[name], _ = fn(ids)                                             # (K, d)
            t[name] += _clock(dev) - t0
        for p in paths:
            err[p] = max(err[p], _rel(got[p], got["loop"]))
    t0 = _clock(dev)
    for k in range(args.positions):             # naive: a forward and a backward per position
        row_gradients_loop(model, site, rollouts[0], positions[k:k + 1])
    t_naive = (_clock(dev) - t0) / args.positions
    n = len(rollouts) * args.positions
    res = {"site": site.name, "row_dim": site.row_dim, "path": site.path,
           "batched_vectors_per_s": n / t[site.path], "loop_vectors_per_s": n / t["loop"],
           "ratio": t["loop"] / t[site.path], "max_rel_err": err[site.path],
           "naive_vectors_per_s": 1 / t_naive, "ratio_vs_naive": n / t[site.path] * t_naive}
    if site.path == "diagonal":
        res |= {"vmap_vectors_per_s": n / t["vmap"], "vmap_ratio": t["loop"] / t["vmap"],
                "vmap_max_rel_err": err["vmap"]}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--sites", default="-1:mlp.down_proj.weight,-1:self_attn.k_proj.weight,0:mlp.down_proj.weight",
                    help="comma-separated LAYER:PARAM (the first: the default probe's weight); "
                         "write --sites=-1:... as the value starts with -")
    ap.add_argument("--row", type=int, default=0)
    ap.add_argument("--rollouts", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--positions", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=32, help="positions per backward")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    model.requires_grad_(False)
    model.eval()
    dev = next(model.parameters()).device
    if args.positions > args.seq_len // 2:
        raise ValueError(f"--positions {args.positions} must be at most half of --seq-len {args.seq_len}")
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rollouts = [torch.randint(0, vocab, (args.seq_len,), generator=g) for _ in range(args.rollouts)]
    half = args.seq_len // 2
    positions = torch.linspace(half - 1, args.seq_len - 2, args.positions).round().long()     # (K,) distinct
    assert len(set(positions.tolist())) == args.positions, "positions must be distinct"
    sites = [bench_site(model, spec, rollouts, positions, args, dev) for spec in args.sites.split(",")]
    res = {"model": args.model, "device": str(dev), "rollouts": args.rollouts, "seq_len": args.seq_len,
           "positions_per_rollout": args.positions, "chunk": args.chunk, "threads": torch.get_num_threads(),
           "clock": "wall" if dev.type == "cuda" else "cpu", "row": args.row,
           **{k: sites[0][k] for k in ("site", "path", "ratio", "max_rel_err")}, "sites": sites}
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"row {args.row}, {args.rollouts} rollouts x {args.positions} positions, {args.seq_len} tokens, "
          f"{res['clock']} time, {res['threads']} threads; vectors/s and ratio to one backward per position")
    for r in sites:
        print(f"  {r['site']} (d = {r['row_dim']})")
        print(f"    {r['path']:<9} {r['batched_vectors_per_s']:10.1f}  x{r['ratio']:6.2f}  "
              f"max_rel_err {r['max_rel_err']:.1e}  (x{r['ratio_vs_naive']:.1f} vs a forward+backward each)")
        if "vmap_ratio" in r:
            print(f"    {'vmap':<9} {r['vmap_vectors_per_s']:10.1f}  x{r['vmap_ratio']:6.2f}  "
                  f"max_rel_err {r['vmap_max_rel_err']:.1e}")
        print(f"    {'loop':<9} {r['loop_vectors_per_s']:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
