"""The ``compare-schemes`` entry: run the child train runs as processes, follow them, then compute the results.

    python -m backend compare-schemes --schemes sft,antiop --seeds 3 --steps 60      # see compare_schemes.py

Each child is ``python -m backend train --config <child>/config.json`` (or ``python -m backend resume <child>``
for a failed child with a checkpoint), in this process's process group: the queue's cancel (SIGINT, then SIGKILL,
to the group) reaches them too, and an interrupt here stops them before the comparison records its failure.
The comparison's events carry its progress (runs done / total, the running runs' steps, an ETA); its
``compare/runs.parquet`` lists the children from the start, so the index groups them while they run. Once all
finished, every child's eval records (greedy and ``eval_k`` samples on the same items) give the results
(backend.analysis.intervals), written to ``compare/results.parquet`` and the manifest. No torch in this process.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from backend.analysis.intervals import paired_bootstrap, verdict
from backend.jobs.compare_schemes import (
    COMPARE_RESULTS,
    COMPARE_RUNS,
    KIND,
    plan,
    seeds_of,
    settings_hash,
)
from backend.jobs.queue import max_jobs_from_env, progress_of
from backend.jobs.train import TrainConfig
from backend.store import paths
from backend.store.rundir import (
    CHILDREN,
    CONFIG,
    MANIFEST,
    RunDir,
    queue_config,
    read_config,
    rows_to_table,
)

POLL_S = 0.5
EVENT_EVERY_S = 2.0       # at most one progress event this often, when a step was made (and when a run ends)
LEVEL = 0.95              # the intervals' confidence level
STOP_GRACE_S = 10.0       # SIGINT to the children first (they record their failure), then SIGKILL


class ChildRunsFailed(RuntimeError):
    """Some child runs did not finish (their logs say why); running the comparison again restarts them."""


@dataclass
class Child:
    cfg: TrainConfig
    path: Path
    device: str = ""
    status: str = "planned"          # planned, reused, running, finished, failed, cancelled
    command: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    started: float | None = None
    seconds: float = 0.0
    step: int = 0


def run(cfg, progress: bool = True) -> Path:
    """Run a comparison (a ``CompareSchemesConfig``); returns its run directory."""
    root = paths.runs_dir(cfg.runs_root)
    on_term = _interrupt_on_sigterm()
    rd = RunDir.create(KIND, cfg.name, cfg.to_dict(), root=root, run_id=cfg.run_id or None)
    children: list[Child] = []
    try:
        children = [_prepare(c, root) for c in plan(cfg)]
        for i, c in enumerate(children):
            c.device = cfg.devices[i % len(cfg.devices)] if cfg.devices else ""
        _write_runs(rd, children)
        # the app ingests them with the comparison; relative, so a copied data root still finds them
        rd.write_json(CHILDREN, [os.path.relpath(c.path, rd.path) for c in children])
        parallel = cfg.parallel or max_jobs_from_env()
        rd.event("plan", runs=len(children), reused=sum(c.status == "reused" for c in children), parallel=parallel,
                 children=[c.cfg.run_id for c in children])
        t0 = time.time()
        _execute(rd, cfg, children, parallel, progress)
        failed = [c for c in children if c.status != "finished" and c.status != "reused"]
        _write_runs(rd, children)
        if failed:
            raise ChildRunsFailed(f"{len(failed)} of {len(children)} runs did not finish: "
                               + ", ".join(f"{c.cfg.run_id} ({c.status}, log {_log(rd, c)})" for c in failed)
                               + "; run the same comparison again to restart them")
        manifest = results(rd, cfg, children)
        manifest["wall_s"] = round(time.time() - t0, 2)
        _write_runs(rd, children)
        rd.finish(manifest)
        return rd.path
    except BaseException as e:                   # a failure, a cancel (SIGINT / SIGTERM): recorded, then re-raised
        _close_failed(rd, children, e)
        raise
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def _close_failed(rd: RunDir, children: list[Child], e: BaseException) -> None:
    """Stop the children still running, write their states and mark the comparison failed with ``e``."""
    _stop(children)
    if children:
        _write_runs(rd, children)
    rd.fail(e)


def _interrupt_on_sigterm():
    """SIGTERM (a `kill`, a container stop) raises KeyboardInterrupt here, so the children are stopped and the
    failure recorded as for a cancel; returns the handler it replaced (None off the main thread: tests)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")
    return signal.signal(signal.SIGTERM, interrupt)


# ---- preparing: reuse finished children, restart failed ones ------------------------------------------------

def _prepare(child: TrainConfig, root: Path) -> Child:
    """A Child for this config: ``reused`` when its run directory holds a finished run of the same settings;
    else the command that (re)starts it. A child another process is running is refused (ValueError)."""
    from backend.index.ingest import status_of
    path = root / child.run_id
    py = [sys.executable, "-m", "backend"]
    c = Child(cfg=child, path=path)
    if (path / CONFIG).exists():
        saved = read_config(path / CONFIG)
        if settings_hash(TrainConfig.from_dict(saved)) != settings_hash(child):
            raise ValueError(f"{path} holds a run of other settings under the id {child.run_id}; move it away")
        status = status_of(path)
        if status == "finished":
            c.status = "reused"
            return c
        if status in ("running", "queued"):
            raise ValueError(f"run {child.run_id} is {status} in another process (another comparison with the "
                             "same settings?); wait for it or cancel it first")
        from_ckpt = sorted((path / "checkpoint").glob("step_*.pt"))
        if from_ckpt:           # failed or interrupted: continue it (bit-identical on CPU, backend.jobs.resume)
            c.command = py + ["resume", str(path), "--quiet"]
            return c
        shutil.rmtree(path)     # failed before its first checkpoint: nothing worth keeping
    queue_config(path, "train", child)
    c.command = py + ["train", "--quiet", "--config", str(path / CONFIG)]
    return c


# ---- running -------------------------------------------------------------------------------------------------

def _log(rd: RunDir, c: Child) -> Path:
    return rd.path / "logs" / f"{c.cfg.run_id}.log"


def _start(rd: RunDir, c: Child, parallel: int) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKVIZ_HOME": str(paths.data_root())}
    if c.device:
        env["CUDA_VISIBLE_DEVICES"] = c.device
    if parallel > 1 and "OMP_NUM_THREADS" not in os.environ:     # share the cores instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    log = _log(rd, c)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(c.command)}\n".encode())
        f.flush()
        # same process group as this one: a cancel of the comparison's group stops its children too
        c.proc = subprocess.Popen(c.command, cwd=paths.PROJECT_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
    c.status, c.started = "running", time.time()
    rd.event("run_started", child=c.cfg.run_id, scheme=c.cfg.scheme, seed=c.cfg.seed, device=c.device)


def _execute(rd: RunDir, cfg, children: list[Child], parallel: int, progress: bool) -> None:
    """Start the planned children, ``parallel`` at a time, until all ended; progress events on the way."""
    from tqdm.auto import tqdm
    todo = [c for c in children if c.status == "planned"]
    total_steps = cfg.steps * len(children)
    bar = tqdm(total=total_steps, desc="compare-schemes", unit="step", disable=not progress)
    last_steps = -1
    t0, last_event, done_steps_at_start = time.time(), 0.0, cfg.steps * sum(c.status == "reused" for c in children)
    while True:
        running = [c for c in children if c.status == "running"]
        while todo and len(running) < parallel:
            c = todo.pop(0)
            _start(rd, c, parallel)
            running.append(c)
        ended = False
        for c in running:
            p = progress_of(c.path)
            if p.get("phase") == "training":       # while it evaluates, "step" counts generations
                c.step = int(p.get("step") or c.step)
            rc = c.proc.poll()
            if rc is None:
                continue
            c.seconds = time.time() - (c.started or time.time())
            c.status = "finished" if rc == 0 and (c.path / MANIFEST).exists() else "failed"
            c.step = cfg.steps if c.status == "finished" else c.step
            c.proc, ended = None, True
            rd.event("run_ended", child=c.cfg.run_id, status=c.status, seconds=round(c.seconds, 2))
        steps = sum(cfg.steps if c.status in ("reused", "finished") else c.step for c in children)
        bar.n = steps
        bar.refresh()
        now = time.time()
        if ended or (steps != last_steps and now - last_event >= EVENT_EVERY_S):
            last_event, last_steps = now, steps
            done = sum(c.status in ("reused", "finished") for c in children)
            rate = (steps - done_steps_at_start) / (now - t0) if now > t0 else 0.0
            eta = (total_steps - steps) / rate if rate > 0 else None
            current = [{"run": c.cfg.run_id, "step": c.step} for c in children if c.status == "running"]
            rd.event("progress", step=steps, total=total_steps, eta_s=None if eta is None else round(eta, 1),
                     runs_done=done, runs_failed=sum(c.status == "failed" for c in children),
                     runs_total=len(children), current=current)
        if not todo and not any(c.status == "running" for c in children):
            break
        time.sleep(POLL_S)
    bar.close()


def _stop(children: list[Child]) -> None:
    """Stop running children: SIGINT (each records its own failure), SIGKILL after STOP_GRACE_S."""
    live = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for c in live:
        c.proc.send_signal(signal.SIGINT)
    deadline = time.time() + STOP_GRACE_S
    for c in live:
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()
        c.status = "cancelled"


def _write_runs(rd: RunDir, children: list[Child]) -> None:
    acc = {c.cfg.run_id: _accuracies(c.path) for c in children if c.status in ("reused", "finished")}
    nan = (float("nan"), float("nan"))
    rd.write_table("compare/runs.parquet", rows_to_table({
        "run_id": [rd.run_id] * len(children), "child_run_id": [c.cfg.run_id for c in children],
        "scheme": [c.cfg.scheme for c in children], "seed": [c.cfg.seed for c in children],
        "status": [c.status for c in children], "device": [c.device for c in children],
        "greedy_accuracy": [acc.get(c.cfg.run_id, nan)[0] for c in children],
        "sampled_accuracy": [acc.get(c.cfg.run_id, nan)[1] for c in children],
        "seconds": [c.seconds for c in children]}, COMPARE_RUNS))


# ---- results ---------------------------------------------------------------------------------------------------

def _eval_table(path: Path):
    f = path / "eval" / "rank0.parquet"
    if not f.exists():
        raise ValueError(f"run {path.name} has no eval results ({f}); a comparison needs n_eval >= 1")
    return pq.read_table(f, columns=["sample_idx", "sample_k", "answer", "correct"]).to_pandas()


def _accuracies(path: Path) -> tuple[float, float]:
    t = _eval_table(path)
    greedy, sampled = t[t.sample_k < 0], t[t.sample_k >= 0]
    return float(greedy.correct.mean()), float(sampled.correct.mean()) if len(sampled) else float("nan")


def score_arrays(paths_by_cell: dict[tuple[str, int], Path], schemes: list[str], seeds: list[int]
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """(greedy, sampled, k): arrays (S, J, I) of per-item scores (greedy exact match 0/1; the mean over the k
    samples), from the eval records of the run of each (scheme, seed). ValueError unless every run was
    evaluated on the same items (same answers, same order) with the same k."""
    S, J = len(schemes), len(seeds)
    ref = None
    greedy = sampled = None
    k = None
    for si, s in enumerate(schemes):
        for ji, seed in enumerate(seeds):
            t = _eval_table(paths_by_cell[(s, seed)])
            g = t[t.sample_k < 0].sort_values("sample_idx")
            items = list(zip(g.sample_idx, g.answer))
            if ref is None:
                ref = items
                greedy, sampled = np.zeros((S, J, len(items))), np.zeros((S, J, len(items)))
            elif items != ref:
                raise ValueError(f"run of {s} seed {seed} was evaluated on other items than the first run: "
                                 "the comparison's protocol needs the same held-out items everywhere")
            smp = t[t.sample_k >= 0]
            kk = int(smp.sample_k.max()) + 1 if len(smp) else 0
            if k is None:
                k = kk
            elif kk != k:
                raise ValueError(f"run of {s} seed {seed} drew {kk} samples per item, the first run {k}")
            greedy[si, ji] = g.correct.to_numpy(dtype=float)
            if kk:
                per_item = smp.groupby("sample_idx").correct.mean().sort_index()
                sampled[si, ji] = per_item.to_numpy(dtype=float)
    return greedy, sampled, int(k or 0)


def accuracy_by_step(paths_by_cell: dict[tuple[str, int], Path], schemes: list[str], seeds: list[int],
                     steps: int) -> dict[str, list[dict]]:
    """Per scheme, per evaluated step (``--eval-every``'s and the last): greedy and sampled accuracy, the mean
    over seeds (each seed's accuracy over the items). ValueError unless every run was evaluated at the same
    steps, each time on the same items as the first run's final eval."""
    from backend.lm import eval_steps  # no torch there: it reads and writes Parquet only
    out: dict[str, list[dict]] = {}
    ref_steps = ref_items = None
    for s in schemes:
        per: dict[int, list[tuple[float, float]]] = {}
        for seed in seeds:
            path = paths_by_cell[(s, seed)]
            final = _eval_table(path)
            if ref_items is None:
                ref_items = sorted(zip(final[final.sample_k < 0].sample_idx, final[final.sample_k < 0].answer))
            t = eval_steps.records(path)
            at = sorted(int(x) for x in t.step.unique())
            if ref_steps is None:
                ref_steps = at
            elif at != ref_steps:
                raise ValueError(f"run of {s} seed {seed} was evaluated at steps {at}, the first run at {ref_steps}")
            for step, g in [*t.groupby("step"), (steps, final)]:
                greedy = g[g.sample_k < 0]
                if sorted(zip(greedy.sample_idx, greedy.answer)) != ref_items:
                    raise ValueError(f"run of {s} seed {seed} was evaluated at step {step} on other items than "
                                     "the first run: the comparison's protocol needs the same held-out items")
                sampled = g[g.sample_k >= 0]
                per.setdefault(int(step), []).append(
                    (float(greedy.correct.mean()), float(sampled.correct.mean()) if len(sampled) else float("nan")))
        out[s] = [{"step": step, "greedy": float(np.mean([a for a, _ in v])),
                   "sampled": float(np.mean([b for _, b in v])), "n_seeds": len(v)} for step, v in sorted(per.items())]
    return out


def results(rd: RunDir, cfg, children: list[Child]) -> dict:
    """Compute and write ``compare/results.parquet``; returns the manifest (per scheme, per metric: mean,
    ci_low, ci_high, delta_vs_baseline {delta, ci_low, ci_high, verdict}; the protocol; the runs)."""
    schemes, seeds = list(cfg.schemes), seeds_of(cfg)
    cells = {(c.cfg.scheme, c.cfg.seed): c.path for c in children}
    greedy, sampled, k = score_arrays(cells, schemes, seeds)
    b = schemes.index(cfg.baseline)
    out: dict = {s: {} for s in schemes}
    cols: dict[str, list] = {f.name: [] for f in COMPARE_RESULTS}
    for metric, scores in (("greedy", greedy), ("sampled", sampled)):
        r = paired_bootstrap(scores, baseline=b, n_boot=cfg.n_boot, seed=0, level=LEVEL)
        for i, s in enumerate(schemes):
            v = "baseline" if i == b else verdict(r.delta_low[i], r.delta_high[i])
            out[s][metric] = {"mean": float(r.mean[i]), "ci_low": float(r.ci_low[i]), "ci_high": float(r.ci_high[i]),
                              "delta_vs_baseline": {"delta": float(r.delta[i]), "ci_low": float(r.delta_low[i]),
                                                    "ci_high": float(r.delta_high[i]), "verdict": v}}
            for key, val in (("run_id", rd.run_id), ("scheme", s), ("metric", metric), ("mean", r.mean[i]),
                             ("ci_low", r.ci_low[i]), ("ci_high", r.ci_high[i]), ("delta", r.delta[i]),
                             ("delta_low", r.delta_low[i]), ("delta_high", r.delta_high[i]), ("verdict", v),
                             ("n_seeds", len(seeds)), ("n_items", scores.shape[2])):
                cols[key].append(val)
    rd.write_table("compare/results.parquet", rows_to_table(cols, COMPARE_RESULTS))
    by_step = accuracy_by_step(cells, schemes, seeds, cfg.steps)
    protocol = {
        "items": int(greedy.shape[2]), "task": cfg.task, "task_params": cfg.task_params, "data_seed": cfg.data_seed,
        "greedy": "exact match of the greedy (temperature 0) answer",
        "sampled": f"mean exact match over k={k} samples at temperature {cfg.eval_temperature} (top_k 0, top_p 1)",
        "k_samples": k, "temperature": cfg.eval_temperature, "max_new_tokens": cfg.eval_max_new_tokens,
        "sampling_seed": "the run's seed (seed j of every scheme draws from the same stream)",
        "interval": (f"{LEVEL:.0%} percentile interval, paired bootstrap over seeds and items "
                     f"({cfg.n_boot} replicates; every scheme shares each replicate's draw)"),
        "verdict": "better / worse when the delta's interval excludes 0, else not distinguishable",
        "eval_every": cfg.eval_every, "eval_steps": sorted({r["step"] for rs in by_step.values() for r in rs})}
    return {"baseline": cfg.baseline, "schemes": out, "protocol": protocol, "seeds": seeds,
            "accuracy_by_step": by_step,
            "runs": [{"run_id": c.cfg.run_id, "scheme": c.cfg.scheme, "seed": c.cfg.seed, "status": c.status,
                      "seconds": round(c.seconds, 2)} for c in children],
            "report": report_text(out, cfg.baseline, protocol)}


def _cell(d: dict) -> str:
    return f"{d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def _delta_cell(d: dict) -> str:
    return "(baseline)" if d["verdict"] == "baseline" else f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def report_text(out: dict, baseline: str, protocol: dict) -> str:
    """The results as a Markdown table (what the CLI prints and docs/schemes.md shows)."""
    sampled = f"sampled acc (k={protocol['k_samples']}, T={protocol['temperature']:g})"
    head = (f"| scheme | greedy acc [95% CI] | delta vs {baseline} [95% CI] | {sampled} [95% CI] "
            f"| delta vs {baseline} [95% CI] | verdict (greedy / sampled) |")
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for s, m in out.items():
        g, p = m["greedy"], m["sampled"]
        lines.append(f"| {s} | {_cell(g)} | {_delta_cell(g['delta_vs_baseline'])} | {_cell(p)} | "
                     f"{_delta_cell(p['delta_vs_baseline'])} | {g['delta_vs_baseline']['verdict']} / "
                     f"{p['delta_vs_baseline']['verdict']} |")
    return "\n".join(lines)
