"""What a scheme comparison costs per child run, against the same train run launched alone.

    python bench/compare_speed.py                          # sft,topk x 2 seeds, 10 steps, embedded default model
    python bench/compare_speed.py --schemes sft,topk,antiop,lr --seeds 3 --steps 40 --json

Side by side in one invocation, on the same settings:
- baseline: ``python -m backend train --config <child config>`` for one child of the comparison (its exact
  config, in another runs root), timed as a process: once before the comparison and once after, so a busy
  machine slows both alike (the mean of the two is the reference);
- ours: ``python -m backend compare-schemes ... --json`` (schemes x seeds, one child process at a time unless
  ``--parallel``), timed as a process; each child's wall time comes from the comparison's manifest (the time
  from starting its process to seeing it end, polled every 0.5 s).

It prints the wall time of every child run and of the whole comparison, and three ratios: the same run (scheme
and seed of the lone one) inside the comparison over the lone train run (what running inside a comparison costs a
run), the mean child run over the lone run (children differ in scheme and seed, so in eval lengths: a rougher
figure), and the whole comparison over (number of runs x the lone train run) (adds the planning, the polling,
the bootstrap intervals and the process start of the comparison itself); and the same for CPU time (user +
system of every process, the comparison's children included), which a busy machine inflates much less than wall
time (the ratio to trust on a shared machine). No tracing by default
(``--trace-every`` adds it to every run, the lone one included)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.jobs.compare_schemes import CompareSchemesConfig, child_config  # noqa: E402
from backend.store.rundir import queue_config  # noqa: E402


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of a command run to completion; CPU: user + system of the process and
    every descendant it waited for (a comparison waits for its child runs), so a busy machine inflates it much
    less than the wall time. Raises with its stderr if it fails."""
    t, cpu = time.perf_counter(), _children_cpu()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    dt, dcpu = time.perf_counter() - t, _children_cpu() - cpu
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return dt, dcpu, p.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="sft,topk")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--eval-k", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-max-new-tokens", type=int, default=32)
    ap.add_argument("--trace-every", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=1, help="child runs at a time in the comparison")
    ap.add_argument("--workdir", default="", help="where the runs go (default: a temporary directory)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tokviz-compare-bench-"))
    env = {**os.environ, "TOKVIZ_HOME": str(work), "PYTHONUNBUFFERED": "1"}
    shared = dict(steps=args.steps, n_train=args.n_train, n_eval=args.n_eval, eval_k=args.eval_k,
                  batch_size=args.batch_size, eval_max_new_tokens=args.eval_max_new_tokens,
                  trace_every=args.trace_every, checkpoint_every=0)
    schemes = args.schemes.split(",")
    cfg = CompareSchemesConfig(name="bench", schemes=schemes, seeds=args.seeds, parallel=args.parallel,
                               runs_root=str(work / "cmp"), **shared)
    py = [sys.executable, "-m", "backend"]

    def lone(tag: str) -> tuple[float, float]:
        child = child_config(cfg, schemes[0], cfg.first_seed)
        child.runs_root = str(work / f"lone-{tag}")
        path = Path(child.runs_root) / child.run_id
        queue_config(path, "train", child)
        return timed(py + ["train", "--quiet", "--config", str(path / "config.json")], env)[:2]

    (lone_before, cpu_before) = lone("before")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in shared.items()]
    total, total_cpu, out = timed(py + ["compare-schemes", "--name", "bench", "--schemes", args.schemes, "--seeds",
                             str(args.seeds), "--parallel", str(args.parallel), "--runs-root", str(work / "cmp"),
                             "--quiet", "--json", *flags], env)
    (lone_after, cpu_after) = lone("after")
    manifest = json.loads(out)
    runs = [{"run": r["run_id"], "scheme": r["scheme"], "seed": r["seed"], "seconds": r["seconds"]}
            for r in manifest["runs"]]
    lone_s, lone_cpu = (lone_before + lone_after) / 2, (cpu_before + cpu_after) / 2
    mean_child = sum(r["seconds"] for r in runs) / len(runs)
    same = next(r["seconds"] for r in runs if r["scheme"] == schemes[0] and r["seed"] == cfg.first_seed)
    summary = {
        "settings": {**shared, "schemes": schemes, "seeds": args.seeds, "parallel": args.parallel,
                     "cpu_count": os.cpu_count()},
        "lone_train_s": {"before": round(lone_before, 2), "after": round(lone_after, 2), "mean": round(lone_s, 2)},
        "lone_train_cpu_s": {"before": round(cpu_before, 2), "after": round(cpu_after, 2),
                             "mean": round(lone_cpu, 2)},
        "comparison_cpu_s": round(total_cpu, 2),
        "cpu_over_runs_x_lone_train": round(total_cpu / (len(runs) * lone_cpu), 3),
        "children": runs, "child_mean_s": round(mean_child, 2), "comparison_total_s": round(total, 2),
        "comparison_wall_s_manifest": manifest.get("wall_s"),
        "same_child_in_comparison_s": round(same, 2),
        "same_child_over_lone_train": round(same / lone_s, 3),
        "child_over_lone_train": round(mean_child / lone_s, 3),
        "total_over_runs_x_lone_train": round(total / (len(runs) * lone_s), 3),
        "workdir": str(work),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{len(schemes)} schemes x {args.seeds} seeds, {args.steps} steps, parallel {args.parallel}; "
          f"runs under {work}")
    print(f"{'run':<44}{'seconds':>10}")
    for r in runs:
        print(f"{r['run']:<44}{r['seconds']:>10.1f}")
    print(f"{'lone train (mean of before/after)':<44}{lone_s:>10.1f}")
    print(f"{'comparison, total':<44}{total:>10.1f}")
    print(f"CPU (user + system): lone train {lone_cpu:.1f} s, comparison {total_cpu:.1f} s = "
          f"{summary['cpu_over_runs_x_lone_train']:.3f}x ({len(runs)} x lone train)")
    print(f"the lone run's config in the comparison / lone train: {summary['same_child_over_lone_train']:.3f}x")
    print(f"mean child run / lone train: {summary['child_over_lone_train']:.3f}x; comparison / ({len(runs)} x lone "
          f"train): {summary['total_over_runs_x_lone_train']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
