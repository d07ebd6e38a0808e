"""A run directory: config.json, events.jsonl, Parquet shards written atomically, manifest.json last.

    rd = RunDir.create(kind="train", name="demo", config=cfg.to_dict())
    rd.event("progress", step=3, total=100, loss=1.2)
    rd.write_table("trace/tokens/step_000020.rank0.parquet", rows, schema.TOKENS)
    rd.finish(summary)          # writes manifest.json: its existence means the run completed

A crash never corrupts what is already written: every file goes to a temp name first and is renamed into
place, so a reader sees either the whole file or nothing.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from backend.store import paths
from backend.store.schema import SCHEMA_VERSION

MANIFEST = "manifest.json"
CONFIG = "config.json"
EVENTS = "events.jsonl"


def new_run_id(kind: str, name: str = "") -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40].strip("-")
    parts = [stamp, kind] + ([slug] if slug else []) + [secrets.token_hex(2)]
    return "-".join(parts)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):          # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def rows_to_table(columns: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly ``schema`` from a dict of column arrays (lists, numpy arrays)."""
    missing = [f.name for f in schema if f.name not in columns]
    extra = [k for k in columns if schema.get_field_index(k) < 0]
    assert not missing and not extra, f"columns do not match schema: missing {missing}, unexpected {extra}"
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def config_record(run_id: str, kind: str, name: str, config: dict) -> dict:
    """What ``config.json`` holds: the run's identity and its job config (``config``)."""
    return {"run_id": run_id, "kind": kind, "name": name, "schema_version": SCHEMA_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(), "config": config}


def queue_config(path: Path, kind: str, cfg: Any) -> None:
    """Write a queued job's ``config.json`` (the job reads it back with ``--config``) and a ``queued`` event.
    ``cfg``: a job config (backend.jobs.config.JobConfig) with its run_id set."""
    if (path / MANIFEST).exists() or (path / CONFIG).exists():
        raise ValueError(f"run directory {path} already exists; choose another run id")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / CONFIG, config_record(cfg.run_id, kind, getattr(cfg, "name", ""), cfg.to_dict()))
    RunDir(path, cfg.run_id).event("queued", kind=kind)


def read_config(path: Path) -> dict:
    """The job config in a config file: a run's ``config.json`` (its ``config`` entry) or a plain mapping of
    field: value (YAML or JSON). ValueError naming the file otherwise."""
    import yaml
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML or JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(d).__name__}")
    if isinstance(d.get("config"), dict) and "kind" in d and "run_id" in d:      # a run's config.json
        return d["config"]
    return d


@dataclass
class RunDir:
    path: Path
    run_id: str
    is_writer: bool = True    # under DDP only rank 0 writes config/events/manifest

    @classmethod
    def create(cls, kind: str, name: str, config: dict, root: Path | None = None, run_id: str | None = None,
               is_writer: bool = True) -> "RunDir":
        root = Path(root) if root is not None else paths.runs_dir()
        run_id = run_id or new_run_id(kind, name)
        path = root / run_id
        rd = cls(path=path, run_id=run_id, is_writer=is_writer)
        if is_writer:
            if (path / MANIFEST).exists():
                raise ValueError(f"run directory {path} already holds a finished run; choose another run id")
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path / CONFIG, config_record(run_id, kind, name, config))
            rd.event("start", kind=kind, name=name)
        return rd

    def event(self, type_: str, **fields: Any) -> None:
        """Append one progress event (a JSON line); a UI tails this file."""
        if not self.is_writer:
            return
        rec = {"time": time.time(), "type": type_, **fields}
        line = json.dumps(rec, default=_json_default) + "\n"
        with open(self.path / EVENTS, "a") as f:
            f.write(line)
            f.flush()

    def write_table(self, relpath: str, table: pa.Table) -> Path:
        out = self.path / relpath
        write_parquet_atomic(out, table)
        return out

    def write_json(self, relpath: str, obj: Any) -> Path:
        out = self.path / relpath
        atomic_write_json(out, obj)
        return out

    def finish(self, manifest: dict) -> None:
        """Write manifest.json last: from now on the run counts as finished."""
        if not self.is_writer:
            return
        self.event("done", **{k: v for k, v in manifest.items() if isinstance(v, (int, float, str, bool))})
        atomic_write_json(self.path / MANIFEST, {"run_id": self.run_id, "schema_version": SCHEMA_VERSION,
                                                 "finished_at": datetime.now(timezone.utc).isoformat(),
                                                 **manifest})

    def fail(self, error: BaseException) -> None:
        """Record a failure as an event (no manifest: the run stays unfinished)."""
        self.event("error", error=f"{type(error).__name__}: {error}")


def read_events(run_path: Path) -> list[dict]:
    """All events of a run; a partially written last line (a crash mid-write) is left out."""
    f = Path(run_path) / EVENTS
    if not f.exists():
        return []
    out = []
    lines = f.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break   # torn last line from a crash mid-write: everything before it is intact
            raise ValueError(f"{f}: line {i + 1} is not valid JSON: {e}") from e
    return out
