"""Write traced steps into a run directory, and read them back.

    save_step_state(rd, step, model, res, rank)   # trace/state/step_000020/: adapter + batch + trace.json
    write_step(rd, step, res, rank)               # trace/tokens/step_000020.rank0.parquet, trace/token_modules/...
    store_step(rd, step, model, res, rank)        # both, state first

Every file is written atomically (temp file + rename), so a run killed at any point keeps every completed step
readable and never shows a half-written file; shards are written after the state, so a step whose shards
exist can always be recomputed by ``python -m backend verify``. Float values are float32; a value that is not
defined (the alignment of a zero gradient, a share in token mode, a magnitude not computed) is null.

State of a step (``trace/state/step_{step:06d}/``):
- ``adapter.safetensors`` (rank 0): every trainable LoRA tensor by parameter name, as the step saw them;
- ``batch.rank{r}.safetensors``: input_ids, attention_mask, labels, sample_idx (the traced rows), the scheme
  weights and label mask of the traced pass, the RNG state the pass started from (dropout replay);
- ``trace.rank{r}.json``: trace config, scheme and resolved parameters, network mode, attention kernel,
  micro-batch sizes, world size, sketch seed, traced module names, checks.

With an eval batch (influence, ``backend.trace.influence``) the step also has ``trace/influence``,
``trace/influence_modules`` and ``trace/influence_steps`` shards (written before the tokens shard) and its batch
file holds the eval batch (``eval_input_ids``, ``eval_attention_mask``, ``eval_labels``). With gradient sketches
(``sketch_dim``, ``backend.trace.sketch``) it has ``trace/token_sketches`` shards, also written before the tokens shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from backend.store import schema
from backend.store.rundir import RunDir, atomic_write_bytes, atomic_write_json
from backend.trace.core import TraceResult
from backend.trace.sites import lora_parameters

TOKENS_DIR = "trace/tokens"
MODULES_DIR = "trace/token_modules"
STATE_DIR = "trace/state"
INFLUENCE_DIR = "trace/influence"
INFLUENCE_MODULES_DIR = "trace/influence_modules"
INFLUENCE_STEPS_DIR = "trace/influence_steps"
SKETCHES_DIR = "trace/token_sketches"


def shard_name(step: int, rank: int) -> str:
    return f"step_{step:06d}.rank{rank}.parquet"


def state_dir(run_path: Path, step: int) -> Path:
    return Path(run_path) / STATE_DIR / f"step_{step:06d}"


def state_steps(run_path: Path) -> list[int]:
    """The steps whose state (step state and adapter) the run saved, ascending."""
    return sorted(int(p.name.split("_")[1]) for p in (Path(run_path) / STATE_DIR).glob("step_*")
                  if (p / "trace.rank0.json").exists())


def _column(values: Any, typ: pa.DataType) -> pa.Array:
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return pa.array(values, type=typ, from_pandas=True)           # NaN -> null
    if isinstance(values, np.ndarray) and values.dtype == object:
        return pa.array(values.tolist(), type=typ)                     # None -> null
    return pa.array(values, type=typ)


def _table(columns: dict[str, Any], sch: pa.Schema) -> pa.Table:
    missing = [f.name for f in sch if f.name not in columns]
    extra = [k for k in columns if sch.get_field_index(k) < 0]
    assert not missing and not extra, f"columns do not match {sch.metadata[schema.TABLE_KEY]!r}: " \
                                      f"missing {missing}, unexpected {extra}"
    arrays = [_column(columns[f.name], f.type) for f in sch]
    return pa.Table.from_arrays(arrays, schema=sch)


def write_step(rd: RunDir, step: int, result: TraceResult, rank: int = 0) -> tuple[Path, Path]:
    """Write the step's ``tokens`` and ``token_modules`` shards of this rank; returns their paths."""
    n = len(result.tokens["dot"])
    tokens = dict(result.tokens, run_id=np.full(n, rd.run_id, dtype=object), step=np.full(n, step, np.int32),
                  rank=np.full(n, rank, np.int16))
    m = len(result.modules["dot"])
    modules = dict(result.modules, run_id=np.full(m, rd.run_id, dtype=object), step=np.full(m, step, np.int32))
    if m == 0:
        modules = {f.name: np.zeros(0, dtype=object) for f in schema.TOKEN_MODULES} | {"step": np.zeros(0, np.int32)}
    if result.influence is not None:                  # before the tokens shard, whose presence means complete
        write_influence(rd, step, result.influence, rank)
    if result.sketch is not None:                     # likewise
        write_sketches(rd, step, result, rank)
    p1 = rd.write_table(f"{TOKENS_DIR}/{shard_name(step, rank)}", _table(tokens, schema.TOKENS))
    p2 = rd.write_table(f"{MODULES_DIR}/{shard_name(step, rank)}", _table(modules, schema.TOKEN_MODULES))
    return p1, p2


def write_influence(rd: RunDir, step: int, infl: dict, rank: int = 0) -> None:
    """The step's ``influence``, ``influence_modules`` and ``influence_steps`` shards of this rank."""
    n = len(infl["tokens"]["influence"])
    tokens = dict(infl["tokens"], run_id=np.full(n, rd.run_id, dtype=object), step=np.full(n, step, np.int32),
                  rank=np.full(n, rank, np.int16))
    m = len(infl["modules"]["influence"])
    if m:
        modules = dict(infl["modules"], run_id=np.full(m, rd.run_id, dtype=object), step=np.full(m, step, np.int32))
    else:
        modules = ({f.name: np.zeros(0, dtype=object) for f in schema.INFLUENCE_MODULES}
                   | {"step": np.zeros(0, np.int32)})
    st = infl["step"]
    steps = {f.name: [st.get(f.name)] for f in schema.INFLUENCE_STEPS} | {"run_id": [rd.run_id], "step": [step],
                                                                          "rank": [rank]}
    rd.write_table(f"{INFLUENCE_DIR}/{shard_name(step, rank)}", _table(tokens, schema.INFLUENCE))
    rd.write_table(f"{INFLUENCE_MODULES_DIR}/{shard_name(step, rank)}", _table(modules, schema.INFLUENCE_MODULES))
    rd.write_table(f"{INFLUENCE_STEPS_DIR}/{shard_name(step, rank)}", _table(steps, schema.INFLUENCE_STEPS))


def sketch_columns(sketch: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """(rows, k) float32 sketches -> (unit vectors as a list<float16> array, null for a zero sketch; float32 norms)."""
    sk = np.asarray(sketch, dtype=np.float64)
    norm = np.linalg.norm(sk, axis=1)
    unit = (sk / np.where(norm > 0, norm, 1.0)[:, None]).astype(np.float16)
    n, k = sk.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    mask = pa.array(norm == 0) if n and not (norm > 0).all() else None
    values = pa.ListArray.from_arrays(offsets, pa.array(unit.reshape(-1), type=pa.float16()), mask=mask)
    return values, norm.astype(np.float32)


def write_sketches(rd: RunDir, step: int, result: TraceResult, rank: int = 0) -> Path:
    """The step's ``token_sketches`` shard of this rank: one row per tokens row (same sample_idx, position)."""
    n = len(result.tokens["dot"])
    assert result.sketch.shape[0] == n, f"{result.sketch.shape[0]} sketches for {n} token rows"
    values, norm = sketch_columns(result.sketch)
    cols = {"run_id": pa.array(np.full(n, rd.run_id, dtype=object), pa.string()),
            "step": pa.array(np.full(n, step, np.int32)),
            "sample_idx": pa.array(result.tokens["sample_idx"], pa.int32()),
            "position": pa.array(result.tokens["position"], pa.int32()),
            "rank": pa.array(np.full(n, rank, np.int16)),
            "sketch": values, "sketch_norm": pa.array(norm, pa.float32())}
    table = pa.Table.from_arrays([cols[f.name] for f in schema.TOKEN_SKETCHES], schema=schema.TOKEN_SKETCHES)
    return rd.write_table(f"{SKETCHES_DIR}/{shard_name(step, rank)}", table)


def read_sketches(run_path: Path, step: int) -> tuple[pa.Table, np.ndarray]:
    """All ranks' ``token_sketches`` rows of one step and their (rows, k) float32 sketches (unit x norm; zero rows
    where the sketch was null)."""
    files = sorted((Path(run_path) / SKETCHES_DIR).glob(f"step_{step:06d}.rank*.parquet"))
    if not files:
        raise ValueError(f"{run_path}: no token_sketches shards for step {step} (traced without --trace-sketch-dim?)")
    t = pa.concat_tables([pq.read_table(f) for f in files])
    col = t.column("sketch").combine_chunks()
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    k = int(pc.max(pc.list_value_length(col)).as_py() or 0)
    out = np.zeros((t.num_rows, k), dtype=np.float32)
    if valid.any():
        flat = col.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
        out[valid] = flat.astype(np.float32).reshape(-1, k)
    out *= t.column("sketch_norm").to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
    return t, out


def save_step_state(rd: RunDir, step: int, model: torch.nn.Module, result: TraceResult, rank: int = 0) -> Path:
    """Save what ``verify`` needs to recompute the step. Call it before the optimizer changes the weights."""
    d = state_dir(rd.path, step)
    if rank == 0:
        adapter = {k: v.detach().cpu().contiguous() for k, v in lora_parameters(model).items()}
        atomic_write_bytes(d / "adapter.safetensors", st_save(adapter))
    tensors = {k: v.contiguous() for k, v in result.state["tensors"].items()}
    atomic_write_bytes(d / f"batch.rank{rank}.safetensors", st_save(tensors))
    atomic_write_json(d / f"trace.rank{rank}.json", result.state["meta"])
    return d


def store_step(rd: RunDir, step: int, model: torch.nn.Module, result: TraceResult, rank: int = 0) -> None:
    """``save_step_state`` then ``write_step``: the shards' presence means the step is complete."""
    save_step_state(rd, step, model, result, rank)
    write_step(rd, step, result, rank)


# ---- reading back ----------------------------------------------------------------------------------------

def traced_steps(run_path: Path) -> list[int]:
    """Steps with at least one complete tokens shard (temp files of a killed writer are ignored)."""
    files = (Path(run_path) / TOKENS_DIR).glob("step_*.rank*.parquet")
    return sorted({int(f.name.split(".")[0].split("_")[1]) for f in files})


def read_step(run_path: Path, step: int, table: str = "tokens") -> pa.Table:
    """All ranks' shards of one step's ``tokens`` or ``token_modules`` table."""
    sub = {"tokens": TOKENS_DIR, "token_modules": MODULES_DIR}
    if table not in sub:
        raise ValueError(f"table must be one of {', '.join(sub)}, got {table!r}")
    files = sorted((Path(run_path) / sub[table]).glob(f"step_{step:06d}.rank*.parquet"))
    if not files:
        raise ValueError(f"{run_path}: no {table} shards for step {step}; traced steps: "
                         f"{traced_steps(run_path) or 'none'}")
    return pa.concat_tables([pq.read_table(f) for f in files])


def load_step_state(run_path: Path, step: int) -> dict:
    """{"adapter": {name: tensor}, "ranks": [{"tensors": ..., "meta": ...}, ...]} of a saved step."""
    d = state_dir(run_path, step)
    if not (d / "trace.rank0.json").exists():
        if not Path(run_path).is_dir():
            raise ValueError(f"{run_path}: no such run directory")
        saved = state_steps(run_path)
        raise ValueError(f"{run_path}: no saved state for step {step}; steps with one: {saved or 'none (untraced run)'}")
    meta0 = json.loads((d / "trace.rank0.json").read_text())
    ranks = []
    for r in range(meta0["world_size"]):
        bf, mf = d / f"batch.rank{r}.safetensors", d / f"trace.rank{r}.json"
        if not (bf.exists() and mf.exists()):
            raise ValueError(f"{d}: rank {r} of {meta0['world_size']} has no saved batch ({bf.name}, {mf.name})")
        ranks.append({"tensors": st_load(bf.read_bytes()), "meta": json.loads(mf.read_text())})
    af = d / "adapter.safetensors"
    if not af.exists():
        raise ValueError(f"{d}: adapter.safetensors is missing")
    return {"adapter": st_load(af.read_bytes()), "ranks": ranks}
