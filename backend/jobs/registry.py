"""The registry of job kinds: everything the CLI, the queue, the Launch form, ingest and the run lists need to
know about a kind, in one ``JobSpec``.

    from backend.jobs import registry
    spec = registry.get("train")            # ValueError listing the kinds otherwise
    spec.config                             # its config dataclass (backend.jobs.config.JobConfig)
    spec.run(cfg, progress=True)            # its entry function (imported on first use: it may need torch)
    registry.tables()                       # every table any kind writes, by name

A kind is one module (its config dataclass, its ``JOB = JobSpec(...)``, its entry function, usually in a module
of its own that may import torch) and one line in ``KIND_MODULES`` below. ``TOKVIZ_JOB_KINDS`` (module names,
comma separated) adds kinds from outside the package: a plugin, or a test's toy kind; a job the queue launches
inherits the variable, so its process knows the kind too.

No torch and no gradio here: the web app imports this module at start.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import pyarrow as pa

# the modules that declare a kind (each exposes JOB: JobSpec); order = order in the CLI and the Launch form
KIND_MODULES: tuple[str, ...] = ("backend.jobs.train", "backend.jobs.actgrad", "backend.jobs.probe",
                                  "backend.jobs.compare_schemes")
ENV_KINDS = "TOKVIZ_JOB_KINDS"
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_TABLE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class TableSpec:
    """A table a job writes as Parquet shards and the index holds, keyed by ``run_id``.

    ``schema``: the Parquet contract (backend.store.schema); the index table has the same columns, plus
    ``derived`` ones computed at ingest: (name, DuckDB type, SELECT expression over the shard rows).
    ``glob``: the shards, relative to the run directory. ``order``: a sort key of a shard's path (the order
    rows are ingested in); it raises ValueError for a misnamed shard.
    """
    name: str
    schema: pa.Schema
    glob: str
    derived: tuple[tuple[str, str, str], ...] = ()
    order: Callable[[Path], object] | None = None

    def __post_init__(self) -> None:
        assert _TABLE.match(self.name), f"table name {self.name!r} must be lowercase letters, digits, _"
        assert self.schema.get_field_index("run_id") == 0, f"table {self.name}: the first column must be run_id"


@dataclass(frozen=True)
class DerivedTable:
    """An index table computed at ingest from a kind's tables (aggregates the app reads instead of raw rows).
    ``create``: its DDL (with run_id); ``fill``: an INSERT ... SELECT for one run, every ``?`` bound to
    the run id. Emptied with the run's rows."""
    name: str
    create: str
    fill: str


# which of a run's shards to ingest: (table -> shards) -> (table -> shards); for an unfinished run only
Completeness = Callable[[dict[str, list[Path]]], dict[str, list[Path]]]


@dataclass(frozen=True)
class JobSpec:
    """One job kind.

    ``name``: the CLI command (``python -m backend NAME``) and ``runs.kind`` in the index. ``config``: its
    config dataclass (a JobConfig subclass in a torch-free module). ``entry``: ``"module:function"``, the
    function ``(cfg, progress: bool) -> Path`` (the run directory) that does the work. ``tables``: what it
    writes; ``derived``: aggregates filled at ingest. ``complete``: for a run without manifest (running or
    crashed), which shards count (default: all). ``steps_table``: the table whose distinct ``step`` values
    are the run's analysable steps (None: the kind has no steps). ``analyses``: modules that register the
    kind's analyses (backend.analysis.analyses), imported when they are needed. ``launch_fields``: the config
    fields the Launch form shows up front (the rest go under "Advanced"); ``hidden_fields``: never on the form.
    """
    name: str
    help: str
    config: type
    entry: str
    tables: tuple[TableSpec, ...] = ()
    derived: tuple[DerivedTable, ...] = ()
    complete: Completeness | None = None
    steps_table: str | None = None
    analyses: tuple[str, ...] = ()
    launch_fields: tuple[str, ...] = ()
    hidden_fields: tuple[str, ...] = ("runs_root", "run_id")
    path_fields: tuple[str, ...] = ("runs_root",)        # config fields holding a path (confined by the app)
    model_fields: tuple[str, ...] = ()                   # a model: a hub id, a bare name, or a path (confined)
    user_errors: tuple[str, ...] = field(default=(), repr=False)   # "module:Class" errors the CLI prints plainly
    # field -> the value the Launch form starts from when it differs from the config's default (a form that, left
    # as it is, launches what most users want: the train kind's traces)
    form_defaults: dict = field(default_factory=dict, repr=False)
    # (SQL with ? for the run id, message): after the run's tables and aggregates are in, a row it returns makes
    # ingest refuse the run (the message and the first rows name what is wrong)
    ingest_checks: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        assert _NAME.match(self.name), f"job kind {self.name!r} must be lowercase letters, digits, - and _"
        assert ":" in self.entry, f"job kind {self.name}: entry must be 'module:function', got {self.entry!r}"
        have = {f.name for f in fields(self.config)}
        missing = {"run_id", "runs_root"} - have
        assert not missing, f"job kind {self.name}: its config needs the fields {sorted(missing)} (the queue sets them)"
        unknown = set(self.launch_fields + self.hidden_fields + self.path_fields + self.model_fields) - have
        assert not unknown, f"job kind {self.name}: fields {sorted(unknown)} are not in {self.config.__name__}"
        names = [t.name for t in self.tables]
        assert self.steps_table is None or self.steps_table in names, \
            f"job kind {self.name}: steps_table {self.steps_table!r} is not one of its tables {names}"

    def run(self, cfg: object, progress: bool = True) -> Path:
        """Run the job in this process (the CLI does; the queue runs ``python -m backend NAME``)."""
        return _load(self.entry)(cfg, progress=progress)

    def error_types(self) -> tuple[type[BaseException], ...]:
        """The exceptions that mean bad input or an unusable environment (printed without a traceback)."""
        return (ValueError, FileNotFoundError, PermissionError) + tuple(_load(e) for e in self.user_errors)


def _load(ref: str) -> object:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_cache: tuple[tuple[str, ...], dict[str, JobSpec]] | None = None     # (modules loaded, kinds)


def kinds() -> dict[str, JobSpec]:
    """Every registered kind by name: ``KIND_MODULES`` then ``$TOKVIZ_JOB_KINDS``, in order."""
    global _cache
    modules = KIND_MODULES + tuple(m.strip() for m in os.environ.get(ENV_KINDS, "").split(",") if m.strip())
    if _cache is None or _cache[0] != modules:
        found: dict[str, JobSpec] = {}
        for module in modules:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                raise ValueError(f"job kind module {module!r} (from KIND_MODULES or ${ENV_KINDS}) not found: {e}") from e
            spec = getattr(mod, "JOB", None)
            assert isinstance(spec, JobSpec), f"{module}.JOB must be a JobSpec, got {type(spec).__name__}"
            assert spec.name not in found, f"job kind {spec.name!r} registered twice"
            found[spec.name] = spec
        _check_tables(found.values())
        _cache = (modules, found)
    return _cache[1]


def get(name: str) -> JobSpec:
    """The kind called ``name``; ValueError listing the kinds otherwise."""
    ks = kinds()
    if name not in ks:
        raise ValueError(f"unknown job kind {name!r}; kinds: {', '.join(ks)}")
    return ks[name]


def for_config(cfg: object) -> JobSpec:
    """The kind whose config class ``cfg`` is an instance of; ValueError otherwise."""
    for spec in kinds().values():
        if type(cfg) is spec.config:
            return spec
    raise ValueError(f"{type(cfg).__name__} is not the config of a registered job kind; kinds: "
                     f"{', '.join(f'{k} ({s.config.__name__})' for k, s in kinds().items())}")


def tables() -> dict[str, TableSpec]:
    """Every table any kind writes, by name (a table two kinds write is one spec: _check_tables)."""
    return {t.name: t for spec in kinds().values() for t in spec.tables}


def derived_tables() -> dict[str, DerivedTable]:
    """Every derived (aggregate) table, by name."""
    return {t.name: t for spec in kinds().values() for t in spec.derived}


def _check_tables(specs) -> None:
    seen: dict[str, object] = {}
    for spec in specs:
        for t in list(spec.tables) + list(spec.derived):
            assert seen.setdefault(t.name, t) is t, \
                f"table {t.name!r} is declared by two kinds with different specs: share one TableSpec"
