"""``python -m backend probe-merge``: merge the shards of a probe into one run, with global entropy buckets.

    python -m backend probe --shard 0/2 --run-id p.s0 ...  &  python -m backend probe --shard 1/2 --run-id p.s1 ...
    python -m backend probe-merge data/runs/p.s0 data/runs/p.s1 --run-id p

Each shard (a finished probe run with ``shard`` = i/n) holds the vectors of every generated token of its
prompts. The merge concatenates the shards' tokens and rollouts, cuts the entropy buckets on all of them
(per model, as one unsharded run does), picks the positions with the same seeded rule, and keeps those
vectors: the merged run equals the unsharded one (tests/test_probe.py). No torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from backend.jobs.probe import VECTORS_FILE, ProbeConfig, parse_shard
from backend.probe.output import write_probe
from backend.probe.select import rebucket
from backend.store.rundir import CONFIG, MANIFEST, RunDir, read_config

PER_SHARD = ("shard", "run_id", "name", "runs_root", "device", "grad_chunk")    # may differ between shards


def _shard(path: Path) -> tuple[dict, int, int]:
    if not (path / CONFIG).is_file():
        raise ValueError(f"{path} is not a run directory (no {CONFIG})")
    if not (path / MANIFEST).is_file():
        raise ValueError(f"{path} is not a finished run (no {MANIFEST}); merge finished shards only")
    rec = json.loads((path / CONFIG).read_text())
    if rec.get("kind") != "probe":
        raise ValueError(f"{path} is a {rec.get('kind')!r} run, not a probe shard")
    cfg = read_config(path / CONFIG)
    i, n = parse_shard(cfg.get("shard", ""))
    if n == 1:
        raise ValueError(f"{path} is an unsharded probe (shard ''): nothing to merge")
    return cfg, i, n


def merge(shards: list[Path], run_id: str = "", name: str = "", runs_root: Path | None = None) -> Path:
    """Merge finished probe shards (every i of one i/n, once each, same settings) into a new run."""
    if not shards:
        raise ValueError("give the run directories of the shards to merge")
    infos = sorted((_shard(Path(p)) + (Path(p),) for p in shards), key=lambda x: x[1])
    n = infos[0][2]
    got = [i for _, i, m, _ in infos]
    if any(m != n for _, _, m, _ in infos) or got != list(range(n)):
        raise ValueError(f"shards must be 0/{n} .. {n - 1}/{n}, each once; got "
                         f"{', '.join(c.get('shard', '') for c, *_ in infos)}")
    first = {k: v for k, v in infos[0][0].items() if k not in PER_SHARD}
    for cfg, i, _, path in infos[1:]:
        diff = sorted(k for k in set(first) | set(cfg) if k not in PER_SHARD and cfg.get(k) != first.get(k))
        if diff:
            raise ValueError(f"shard {path} was run with other settings than {infos[0][3]}: {', '.join(diff)}")
    tokens, rollouts, vectors, logps, offset = [], [], [], [], 0
    for _, _, _, path in infos:
        t = pq.read_table(path / "probe/tokens.parquet").to_pandas()
        v = np.load(path / VECTORS_FILE, mmap_mode="r")          # only the picked rows are read below
        assert (t["vector_idx"] >= 0).all() and len(t) == len(v), \
            f"{path}: a shard holds the vector of every generated token"
        lp = np.empty(len(v), dtype=np.float32)
        lp[t["vector_idx"].to_numpy()] = t["logp"].to_numpy()
        t = t.assign(src_idx=t["vector_idx"].to_numpy() + offset)
        tokens.append(t.drop(columns=["run_id", "vector_idx", "bucket", "picked", "logp"]))
        rollouts.append(pq.read_table(path / "probe/rollouts.parquet").to_pandas().drop(columns="run_id"))
        vectors.append(v)
        logps.append(lp)
        offset += len(v)
    cfg = ProbeConfig.from_dict({**first, "shard": "", "run_id": run_id, "name": name or first.get("name", ""),
                                 "runs_root": str(runs_root) if runs_root else ""})
    merged, bounds = rebucket(pd.concat(tokens, ignore_index=True), cfg.n_buckets, cfg.per_bucket, cfg.seed)
    # gather the picked vectors shard by shard (a shard holds every token's: most are not kept)
    src = merged["src_idx"].to_numpy()
    need = np.unique(src[merged["picked"].to_numpy()])                       # rows of the concatenation
    starts = np.cumsum([0] + [len(v) for v in vectors])
    kept = np.empty((len(need), vectors[0].shape[1]), dtype=np.float32)
    for k, v in enumerate(vectors):
        sel = (need >= starts[k]) & (need < starts[k + 1])
        kept[sel] = v[need[sel] - starts[k]]
    remap = np.full(starts[-1], -1, dtype=np.int64)
    remap[need] = np.arange(len(need))
    merged = merged.assign(src_idx=np.where(src >= 0, remap[np.clip(src, 0, None)], -1))
    logp = np.concatenate(logps)[need]
    rd = RunDir.create(kind="probe", name=cfg.name, config=cfg.to_dict(),
                       root=runs_root, run_id=run_id or None)
    try:
        summary = write_probe(rd, merged, pd.concat(rollouts, ignore_index=True), kept, logp,
                              bounds, cfg.n_buckets, keep="picked")
        site = {k: v for k, v in json.loads((infos[0][3] / MANIFEST).read_text()).items()
                if k in ("site", "row", "layer", "grad_path")}          # the same in every shard (same settings)
        rd.finish({**summary, **site, "shard": "", "buckets": "global", "merged_shards": n,
                   "merged_from": [str(p) for *_, p in infos]})
    except BaseException as e:
        rd.fail(e)
        raise
    return rd.path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend probe-merge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", nargs="+", help="the shards' run directories")
    ap.add_argument("--run-id", default="", help="the merged run's id (default: a new one)")
    ap.add_argument("--name", default="", help="its name (default: the shards')")
    ap.add_argument("--runs-root", default="", help="where it goes (default: <data root>/runs)")
    args = ap.parse_args(argv)
    try:
        out = merge([Path(p) for p in args.shards], args.run_id, args.name,
                    Path(args.runs_root) if args.runs_root else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged probe: {out}")
    return 0
