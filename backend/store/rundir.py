"""A run directory: config.json, events.jsonl, Parquet shards written atomically, manifest.json last.

    rd = RunDir.create(kind="train", name="demo", config=cfg.to_dict())
    rd.event("progress", step=3, total=100, loss=1.2)
    rd.write_table("trace/tokens/step_000020.rank0.parquet", rows, schema.TOKENS)
    rd.finish(summary)          # writes manifest.json: its existence means the run completed

A crash never corrupts what is already written: every file goes to a temp name first and is renamed into
place, so a reader sees either the whole file or nothing. The ``start`` event names the writing process
(``process_identity``: pid, host, boot, start time) and a daemon thread appends a ``heartbeat`` event every
HEARTBEAT_S seconds until ``finish``/``fail``, so a reader can tell a run whose process died (``kill -9``, a
reboot) from one still going (``process_alive``; backend.index.ingest calls it ``interrupted``).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
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
HEARTBEAT_S = 30.0          # seconds between heartbeat events of a running job


# A run id names a folder directly under the runs root and appears in URLs, command lines and SQL results:
# ASCII letters, digits, '-', '_' and '.', with no '..' anywhere and not starting with '.' (no hidden folders,
# no '.' or '..') or '-' (it would read as an option on a command line), so ``root / run_id`` never leaves root.
RUN_ID_MAX = 128
_RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")       # whole string (fullmatch: no trailing newline)
RUN_ID_RULE = (f"letters, digits, '-', '_' and '.' (1 to {RUN_ID_MAX} characters), not starting with '.' or '-', "
               "without '..'")


def check_run_id(run_id: str, what: str = "run_id") -> str:
    """Return ``run_id`` if it is a safe run id (see ``RUN_ID_RULE``); ValueError naming ``what`` otherwise."""
    if not isinstance(run_id, str) or not (0 < len(run_id) <= RUN_ID_MAX and _RUN_ID.fullmatch(run_id)) \
            or ".." in run_id:
        raise ValueError(f"{what} {run_id!r} is not allowed: a run id is {RUN_ID_RULE}")
    return run_id


def _slug(text: str, limit: int) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in text)[:limit].strip("-")


def new_run_id(kind: str, name: str = "") -> str:
    """``<UTC time>-<kind>[-<name slug>]-<4 hex digits>``; always passes ``check_run_id``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = _slug(name, 40)
    parts = [stamp, _slug(kind, 40) or "run"] + ([slug] if slug else []) + [secrets.token_hex(2)]
    return check_run_id("-".join(parts))


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
    check_run_id(cfg.run_id)
    if (path / MANIFEST).exists() or (path / CONFIG).exists():
        raise ValueError(f"run directory {path} already exists; choose another run id")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / CONFIG, config_record(cfg.run_id, kind, getattr(cfg, "name", ""), cfg.to_dict()))
    # who queued it (the app): a queued run whose queue is gone will never start
    RunDir(path, cfg.run_id).event("queued", kind=kind, **process_identity())


def find_run(run: str | os.PathLike) -> Path:
    """A run directory given as a path (absolute, or relative to here), relative to the data root (what the app's
    forms confine paths to), or as a run id under ``<data root>/runs``; ValueError naming where it looked."""
    p = Path(run).expanduser()
    tries = [p, paths.data_root() / p]
    try:
        tries.append(paths.runs_dir() / check_run_id(str(run), "run"))
    except ValueError:
        pass                                     # not a run id: only the paths
    tries = list(dict.fromkeys(tries))
    for t in tries:
        if (t / CONFIG).is_file():
            return t.resolve()
    raise ValueError(f"{str(run)!r} is not a run directory (no {CONFIG} in {', '.join(map(str, tries))}); give a "
                     f"run directory or a run id under {paths.runs_dir()}")


def read_config_record(path: Path) -> tuple[str | None, dict]:
    """(kind, job config) of a config file: a run's ``config.json`` (its kind and ``config`` entry) or a plain
    mapping of field: value (YAML or JSON; kind None). ValueError naming the file otherwise."""
    import yaml

    from backend.store.yamltext import load_yaml
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        d = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML or JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value, got {type(d).__name__}")
    if isinstance(d.get("config"), dict) and "kind" in d and "run_id" in d:      # a run's config.json
        return d["kind"], d["config"]
    return None, d


def read_config(path: Path) -> dict:
    """The job config in a config file (``read_config_record`` without the kind)."""
    return read_config_record(path)[1]


@dataclass
class RunDir:
    path: Path
    run_id: str
    is_writer: bool = True    # under DDP only rank 0 writes config/events/manifest

    @classmethod
    def create(cls, kind: str, name: str, config: dict, root: Path | None = None, run_id: str | None = None,
               is_writer: bool = True) -> "RunDir":
        root = paths.runs_dir(root)
        run_id = check_run_id(run_id) if run_id else new_run_id(kind, name)
        path = root / run_id
        rd = cls(path=path, run_id=run_id, is_writer=is_writer)
        if is_writer:
            if (path / MANIFEST).exists():
                raise ValueError(f"run directory {path} already holds a finished run; choose another run id")
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path / CONFIG, config_record(run_id, kind, name, config))
            rd.event("start", kind=kind, name=name, **process_identity())
            rd.start_heartbeat()
        return rd

    @classmethod
    def reopen(cls, path: Path, **fields: Any) -> "RunDir":
        """Continue writing an existing run directory from this process (``resume``): a new ``start`` event
        with this process's identity (and ``fields``), and a heartbeat. config.json stays as it is."""
        path = Path(path)
        if not (path / CONFIG).exists():
            raise ValueError(f"{path} is not a run directory (no {CONFIG})")
        if (path / MANIFEST).exists():
            raise ValueError(f"run directory {path} already holds a finished run; nothing to continue")
        run_id = json.loads((path / CONFIG).read_text())["run_id"]
        rd = cls(path=path, run_id=run_id)
        rd.event("start", **fields, **process_identity())
        rd.start_heartbeat()
        return rd

    def event(self, type_: str, **fields: Any) -> None:
        """Append one progress event (a JSON line); a UI tails this file. Safe from several threads of this
        process (the heartbeat): each line goes in one ``write`` on an O_APPEND descriptor under a lock."""
        if not self.is_writer:
            return
        rec = {"time": time.time(), "type": type_, **fields}
        line = (json.dumps(rec, default=_json_default) + "\n").encode()
        with _EVENTS_LOCK:
            fd = os.open(self.path / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                n = os.write(fd, line)
            finally:
                os.close(fd)
            hb = _HEARTBEATS.get(self.path.resolve()) if _HEARTBEATS else None
            if hb is not None:
                hb.last = time.monotonic()
        assert n == len(line), f"short write to {self.path / EVENTS}: {n} of {len(line)} bytes"

    def start_heartbeat(self, every: float | None = None) -> None:
        """Append a ``heartbeat`` event from a daemon thread whenever ``every`` seconds (default HEARTBEAT_S)
        went by without any event, until ``finish``/``fail``/``stop_heartbeat``: a reader on another host tells
        a live job from a dead one by its last event's time, however long one step or an evaluation takes."""
        if not self.is_writer:
            return
        key = self.path.resolve()
        with _EVENTS_LOCK:
            if key in _HEARTBEATS:
                return
            hb = _Heartbeat(self, HEARTBEAT_S if every is None else every)
            _HEARTBEATS[key] = hb
        hb.thread.start()

    def stop_heartbeat(self) -> None:
        """Stop this run's heartbeat (any RunDir object of the same directory in this process)."""
        with _EVENTS_LOCK:
            hb = _HEARTBEATS.pop(self.path.resolve(), None)
        if hb is not None:
            hb.stop.set()
            if hb.thread is not threading.current_thread():
                hb.thread.join()

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
        self.stop_heartbeat()
        self.event("done", **{k: v for k, v in manifest.items() if isinstance(v, (int, float, str, bool))})
        atomic_write_json(self.path / MANIFEST, {"run_id": self.run_id, "schema_version": SCHEMA_VERSION,
                                                 "finished_at": datetime.now(timezone.utc).isoformat(),
                                                 **manifest})

    def fail(self, error: BaseException) -> None:
        """Record a failure as an event (no manifest: the run stays unfinished)."""
        self.stop_heartbeat()
        self.event("error", error=f"{type(error).__name__}: {error}")


_EVENTS_LOCK = threading.Lock()             # event lines of every run of this process, and _HEARTBEATS
_HEARTBEATS: dict[Path, "_Heartbeat"] = {}  # run directory -> its running heartbeat


class _Heartbeat:
    def __init__(self, rd: RunDir, every: float):
        if every <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {every}")
        self.rd, self.every, self.stop = rd, every, threading.Event()
        self.last = time.monotonic()      # when this process last wrote an event of the run (under _EVENTS_LOCK)
        self.thread = threading.Thread(target=self._loop, name=f"heartbeat {rd.run_id}", daemon=True)

    def _loop(self) -> None:
        # progress events already say the job lives: a heartbeat only fills gaps of `every` seconds
        while not self.stop.wait(max(0.0, self.last + self.every - time.monotonic())):
            if time.monotonic() < self.last + self.every:
                continue
            try:
                self.rd.event("heartbeat")
            except FileNotFoundError:
                if self.rd.path.is_dir():
                    raise
                return          # the run directory was removed under us: nothing left to report


# ---- which process writes a run, and is it still there -------------------------------------------------------

def _boot_id() -> str | None:
    f = Path("/proc/sys/kernel/random/boot_id")     # Linux: changes at every boot, so pids of a former boot don't count
    return f.read_text().strip() if f.exists() else None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process from /proc (Linux), None if absent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    rest = text[text.rindex(")") + 2:].split()      # after "pid (comm) ": state is field 3, starttime field 22
    return rest[0], int(rest[19])


def process_identity(pid: int | None = None) -> dict:
    """What tells this process (or ``pid``) apart from any later one: pid, host, boot id, and its start time
    in clock ticks since boot (``proc_start``; None where /proc is not there)."""
    pid = os.getpid() if pid is None else pid
    st = _proc_stat(pid) if Path("/proc").is_dir() else None
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(),
            "proc_start": st[1] if st is not None else None}


def process_alive(ident: dict) -> bool | None:
    """Whether the process an identity (``process_identity``) names still runs: None when it cannot be told
    from here (another host, or no pid recorded); False when its pid is gone, a zombie, or now another
    process (other start time, or the machine rebooted since)."""
    pid, host = ident.get("pid"), ident.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    if ident.get("boot_id") and _boot_id() and ident["boot_id"] != _boot_id():
        return False
    if Path("/proc").is_dir():
        st = _proc_stat(pid)
        if st is None or st[0] in ("Z", "X"):
            return False
        return ident.get("proc_start") is None or st[1] == ident["proc_start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True         # it exists, owned by someone else
    return True


CHILDREN = "children.json"      # a run that runs other runs (a scheme comparison) lists their directories here


def child_runs(run_path: Path) -> list[Path]:
    """The run directories a run owns (its ``children.json``: a JSON list of paths, relative to the run's
    directory or absolute), [] if it has none."""
    f = Path(run_path) / CHILDREN
    if not f.exists():
        return []
    listed = json.loads(f.read_text())
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise ValueError(f"{f}: expected a JSON list of run directory paths")
    return [(Path(run_path) / p).resolve() for p in listed]


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
