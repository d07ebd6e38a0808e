"""Accuracy at intermediate steps of a train run: ``python -m backend train ... --eval-every N``.

    python -m backend train --task arith --steps 200 --eval-every 50 --eval-k 4
    python -m backend compare-schemes ... --eval-every 50       # every child, the same steps and items

After every N-th optimizer step (not the last: the final eval covers it) the main process evaluates the model as
the final eval does (``backend.lm.trainer.run_eval``: the same held-out items, greedy plus ``eval_k`` samples at
``eval_temperature``, the run's seed for the sampling stream) and writes the records to
``eval_steps/step_NNNNNN.rank0.parquet`` (schema ``eval_steps``: the eval table's columns plus ``step``), one file
per step, before that step's checkpoint: a resumed run keeps the evals it made and redoes those after its
checkpoint. The evaluation leaves training as it was (generation runs under a forked RNG, in eval mode, and the
model is put back in train mode), so a run with ``--eval-every`` trains bit-identically to one without. The
manifest's ``eval_steps`` lists per step: accuracy, sampled_accuracy (when eval_k > 0), n.

The trainer holds one ``StepEvaluator`` (``create``), calls ``after_step`` once per step and ``finish`` with the
manifest; it does nothing when ``eval_every`` is 0, off the main process, or without held-out items.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from backend.store import schema
from backend.store.rundir import RunDir, rows_to_table

DIR = "eval_steps"


def shard_name(step: int) -> str:
    return f"{DIR}/step_{step:06d}.rank0.parquet"


@dataclass
class StepEvaluator:
    every: int                   # 0: inactive
    steps: int                   # the run's last step (evaluated by the final eval, not here)
    rd: RunDir | None

    @classmethod
    def create(cls, cfg, rd: RunDir, info, ds) -> StepEvaluator:
        """Active when ``cfg.eval_every > 0``, on the main process, with held-out items."""
        active = cfg.eval_every > 0 and info.is_main and bool(ds.eval_examples)
        return cls(cfg.eval_every if active else 0, cfg.steps, rd if active else None)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < self.steps

    def after_step(self, step: int, evaluate: Callable[[], dict]) -> None:
        """At a due step: ``evaluate()`` (the trainer's run_eval, as for the final eval), records written."""
        if not self.due(step):
            return
        res = evaluate()
        write(self.rd, step, res)
        self.rd.event("eval", when="during", step=step, accuracy=res["accuracy"], n=res["n"],
                      sampled_accuracy=res.get("sampled_accuracy"))

    def finish(self, manifest: dict) -> None:
        """``manifest["eval_steps"]``: per evaluated step (from the files, so a resumed run lists all)."""
        if self.every:
            manifest["eval_steps"] = summaries(self.rd.path)


def write(rd: RunDir, step: int, res: dict) -> None:
    cols: dict[str, list] = {f.name: [] for f in schema.EVAL_STEPS}
    for r in res["records"]:
        for k in cols:
            cols[k].append(rd.run_id if k == "run_id" else step if k == "step" else r[k])
    rd.write_table(shard_name(step), rows_to_table(cols, schema.EVAL_STEPS))


def records(run_path: Path):
    """Every intermediate eval record of a run (a DataFrame; empty, with the columns, if it has none)."""
    files = sorted((Path(run_path) / DIR).glob("step_*.parquet"))
    if not files:
        return schema.EVAL_STEPS.empty_table().to_pandas()
    return pq.read_table([str(f) for f in files], schema=schema.EVAL_STEPS).to_pandas()


def summaries(run_path: Path) -> list[dict]:
    """Per evaluated step, ascending: step, accuracy (greedy), sampled_accuracy (None without samples), n."""
    t = records(run_path)
    out = []
    for step, g in t.groupby("step"):
        greedy, sampled = g[g.sample_k < 0], g[g.sample_k >= 0]
        out.append({"step": int(step), "accuracy": float(greedy.correct.mean()), "n": int(len(greedy)),
                    "sampled_accuracy": float(sampled.correct.mean()) if len(sampled) else None})
    return out
