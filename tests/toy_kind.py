"""A toy job kind, as a user would add one: this module and one registry line (``TOKVIZ_JOB_KINDS=tests.toy_kind``
stands for that line in ``backend.jobs.registry.KIND_MODULES``). Used by tests/test_job_kinds.py.

    python -m backend toy --n 5 --scale 2      # with TOKVIZ_JOB_KINDS=tests.toy_kind

It writes one table (``toy_values``: i, value = scale * i) and has one analysis with its figure (the running
sum of the values).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pyarrow as pa

from backend.analysis.analyses import register
from backend.jobs.config import JobConfig, option
from backend.jobs.registry import JobSpec, TableSpec
from backend.store.rundir import RunDir, rows_to_table
from backend.store.schema import table_schema


@dataclass
class ToyConfig(JobConfig):
    """Write n values scale * i, i = 0..n-1."""
    name: str = option("", "a short human name for the run")
    n: int = option(5, "how many values", range=(1, 10_000, False, False))
    scale: float = option(1.0, "value = scale * i", range=(0.0, 1e6, True, False))
    runs_root: str = option("", "where run directories go (default: <data root>/runs)")
    run_id: str = option("", "explicit run id")


TOY_VALUES = table_schema("toy_values", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("i", pa.int32(), nullable=False),
    pa.field("value", pa.float32()),
])


def run(cfg: ToyConfig, progress: bool = True) -> Path:
    rd = RunDir.create(kind="toy", name=cfg.name, config=cfg.to_dict(),
                       root=Path(cfg.runs_root) if cfg.runs_root else None, run_id=cfg.run_id or None)
    i = np.arange(cfg.n, dtype=np.int32)
    for k in range(cfg.n):
        rd.event("progress", step=k + 1, total=cfg.n)
    rd.write_table("toy/values.parquet", rows_to_table(
        {"run_id": [rd.run_id] * cfg.n, "i": i, "value": (cfg.scale * i).astype(np.float32)}, TOY_VALUES))
    rd.finish({"n": cfg.n})
    return rd.path


JOB = JobSpec(name="toy", help="a toy job kind (tests)", config=ToyConfig, entry="tests.toy_kind:run",
              tables=(TableSpec("toy_values", TOY_VALUES, "toy/*.parquet"),), analyses=("tests.toy_kind",),
              launch_fields=("name", "n", "scale"))

# the kind's own query (its module owns the SQL of its analyses)
RUNNING_SUM = """SELECT i, value, sum(value) OVER (ORDER BY i) AS running_sum FROM toy_values
WHERE run_id = ? ORDER BY i"""


def running_sum_figure(frames: dict[str, pd.DataFrame]) -> go.Figure:
    df = frames["values"]
    fig = go.Figure(go.Scatter(x=df["i"], y=df["running_sum"], mode="lines+markers", name="running sum"))
    fig.update_layout(title="Running sum", xaxis_title="i", yaxis_title="sum of values up to i")
    return fig


@register("toy_running_sum", "Running sum of the toy values", "run", figure=running_sum_figure, kind="toy")
def toy_running_sum(con, run_id: str, step: int | None, p) -> dict[str, pd.DataFrame]:
    """The values and their running sum."""
    return {"values": con.execute(RUNNING_SUM, [run_id]).df()}
