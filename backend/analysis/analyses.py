"""The registry of analyses: each entry is a function of (run, step) returning DataFrames, together with its
figure, the job kind whose runs it reads, and whether ``compare`` overlays it across runs.

    from backend.analysis import analyses
    frames = analyses.run("concentration", run_id, step=None, con=con)   # {"lorenz": df, "stats": df}
    fig = analyses.get("concentration").figure(frames)                  # its figure (also figures.build)
    everything = analyses.run_all(run_id, con=con)                      # {name: {frame: df}}, the run's kind
    analyses.names(kind="train")                                        # registry order

**Adding an analysis = one function with its ``@register(name, title, scope, figure=...)`` line in its
kind's module** (``backend.analysis.trace`` for ``train`` runs; a job kind lists its modules in
``JobSpec.analyses``), e.g. in ``trace.py``, whose ``register`` binds kind="train" (and adds the trace mode
to every analysis's frames, so each title can name it):

    @register("concentration", "Concentration of gradient magnitude", "step",
              figure=lambda f: figures.lorenz_curve(f["lorenz"], f["stats"]), compare=True)
    def concentration(con, run_id, step, p: AnalysisParams) -> Frames: ...

Every function has one signature, ``fn(con, run_id, step, params) -> {name: DataFrame}``,
and its ``figure`` builds one plotly figure from those frames (``backend.analysis.figures`` holds the pure
builders). ``compare=True``: the figure overlays several runs when its frames carry a ``run`` column.
A kind may also register, with ``@register_summary``, the headline numbers ``analyze`` and ``compare`` report.

The registry fills itself: on first use it imports the modules named by the job kinds' ``JobSpec.analyses``
(``backend.jobs.registry``). Scope "run" looks at every step of the run, "step" at one. Steps are those of the
kind's ``steps_table`` (for ``train``: its traced steps); ``step`` given is checked against them, else the
last is used; a kind without steps gets ``step`` unchanged (None).
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Callable, Sequence

import duckdb
import pandas as pd

from backend.index import queries, sql
from backend.jobs import registry

if TYPE_CHECKING:
    import plotly.graph_objects as go

Frames = dict[str, pd.DataFrame]
_LIST_MAX = 20      # steps listed in an error message


@dataclass(frozen=True)
class AnalysisParams:
    """Settings of the analyses (each reads the ones it needs); out-of-range values raise ValueError."""
    n_bins: int = field(default=20, metadata={"help": "position bins (positional decay, heatmaps)"})
    top_k: int = field(default=15, metadata={"help": "tokens per side in surprising_tokens"})
    context_tokens: int = field(default=8, metadata={"help": "tokens of context shown before a token"})
    max_lag: int = field(default=30, metadata={"help": "largest lag of the autocorrelation"})
    module: str | None = field(default=None, metadata={"help": "layer_position_heatmap: one module type"})
    scatter_points: int = field(default=4000, metadata={"help": "points kept for the scatter (all in r)"})
    lorenz_points: int = field(default=1001, metadata={"help": "points kept of the Lorenz curve"})
    n_extremes: int = field(default=5, metadata={"help": "top and bottom modules listed per stage"})

    def __post_init__(self) -> None:
        for name, lo, hi in (("n_bins", 1, 1000), ("top_k", 1, 1000), ("context_tokens", 0, 200),
                             ("max_lag", 1, 1000), ("scatter_points", 10, 10**6), ("lorenz_points", 3, 10**6),
                             ("n_extremes", 1, 1000)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")


AnalysisFn = Callable[[duckdb.DuckDBPyConnection, str, int | None, AnalysisParams], Frames]
FigureFn = Callable[[Frames], "go.Figure"]
SummaryFn = Callable[[int | None, dict[str, Frames]], dict[str, object]]
AvailableFn = Callable[[duckdb.DuckDBPyConnection, str], bool]


@dataclass(frozen=True)
class Analysis:
    """One analysis: everything the app, ``analyze`` and ``compare`` need to know about it."""
    name: str
    title: str
    scope: str          # "run": every step of the run; "step": one step
    fn: AnalysisFn
    description: str    # the function's docstring
    figure: FigureFn    # its frames -> one figure
    kind: str           # the job kind whose runs it reads (backend.jobs.registry)
    compare: bool       # compare overlays its figure across runs (the builder reads the ``run`` column)
    # whether a run of the kind has what it reads (None: every run has); run_all skips it for one that has not
    available: AvailableFn | None = None


@dataclass(frozen=True)
class Summary:
    """The headline numbers of a run of one kind: ``fn(step, results)`` over the frames of the analyses
    named in ``needs``; ``definitions`` says what the main keys mean."""
    kind: str
    needs: tuple[str, ...]
    fn: SummaryFn
    definitions: dict[str, str]


# filled by the kinds' analysis modules as they are imported; read them through names()/get()/summary()
ANALYSES: dict[str, Analysis] = {}
SUMMARIES: dict[str, Summary] = {}      # by job kind: its summary, if it has one
_loaded: set[str] = set()               # analysis modules already imported and checked
_lock = threading.Lock()                # compare runs analyses from several threads


def register(name: str, title: str, scope: str, *, kind: str, figure: FigureFn,
             compare: bool = False, available: AvailableFn | None = None) -> Callable[[AnalysisFn], AnalysisFn]:
    """Decorator: register ``fn`` as the analysis ``name`` of runs of job kind ``kind``, drawn by ``figure``.
    A kind's module usually binds its kind once: ``register = partial(analyses.register, kind=KIND)``.
    ``available(con, run_id)``: for an analysis of data only some runs of the kind record (influence), whether
    the run has it; ``run_all`` (and ``analyze``) then skip it for runs without, and ``fn`` asked by name
    raises the ValueError saying how to get the data."""
    assert scope in ("run", "step"), f"scope must be 'run' or 'step', got {scope!r}"
    assert callable(figure), f"analysis {name!r}: figure must be a function of its frames"

    def deco(fn: AnalysisFn) -> AnalysisFn:
        assert name not in ANALYSES, f"analysis {name!r} registered twice"
        ANALYSES[name] = Analysis(name, title, scope, fn, (fn.__doc__ or "").strip(), figure, kind, compare,
                                  available)
        return fn
    return deco


def register_summary(kind: str, *, needs: Sequence[str], definitions: dict[str, str] | None = None
                     ) -> Callable[[SummaryFn], SummaryFn]:
    """Decorator: register ``fn(step, results) -> dict`` as the summary of runs of ``kind``; ``results`` holds
    the frames of (at least) the analyses named in ``needs``, all of that kind."""
    def deco(fn: SummaryFn) -> SummaryFn:
        assert kind not in SUMMARIES, f"a summary of kind {kind!r} registered twice"
        SUMMARIES[kind] = Summary(kind, tuple(needs), fn, dict(definitions or {}))
        return fn
    return deco


def _registry() -> dict[str, Analysis]:
    """The analyses of the registered job kinds, after importing each kind's analysis modules (once)."""
    kinds = registry.kinds()
    pending = [(spec, m) for spec in kinds.values() for m in spec.analyses if m not in _loaded]
    if pending:
        with _lock:
            for spec, module in pending:
                if module in _loaded:
                    continue
                try:
                    importlib.import_module(module)
                except ModuleNotFoundError as e:
                    raise ImportError(f"job kind {spec.name!r} lists the analysis module {module!r}: {e}") from e
                # a module registers for the kind that lists it: catches a typo in register(..., kind=...)
                for a in ANALYSES.values():
                    assert a.fn.__module__ != module or a.kind == spec.name, \
                        f"analysis {a.name!r} in {module} says kind {a.kind!r}, but job kind {spec.name!r} lists it"
                _loaded.add(module)
    # an analysis of a kind no longer registered (a plugin's, after $TOKVIZ_JOB_KINDS changed) stays hidden
    return {n: a for n, a in ANALYSES.items() if a.kind in kinds}


def names(kind: str | None = None, run_id: str | None = None,
          con: duckdb.DuckDBPyConnection | None = None) -> list[str]:
    """Registered analysis names, in registry order: every kind's, or those of job kind ``kind``; with
    ``run_id``, only those available for that indexed run (``register(..., available=...)``)."""
    if kind is not None:
        registry.get(kind)              # ValueError listing the kinds
    found = [a for a in _registry().values() if kind is None or a.kind == kind]
    if run_id is not None and any(a.available for a in found):
        with queries.cursor(con) as cur:
            found = [a for a in found if a.available is None or a.available(cur, run_id)]
    return [a.name for a in found]


def get(name: str) -> Analysis:
    """The analysis called ``name``; ValueError listing the names otherwise."""
    entries = _registry()
    if name not in entries:
        raise ValueError(f"unknown analysis {name!r}; available: {', '.join(entries)}")
    return entries[name]


def summary(kind: str) -> Summary | None:
    """The summary registered for job kind ``kind`` (None if it has none)."""
    names(kind)                         # loads the kind's modules; ValueError for an unknown kind
    return SUMMARIES.get(kind)


def _run_kind(con: duckdb.DuckDBPyConnection, run_id: str) -> registry.JobSpec:
    """The job kind of an indexed run (ValueError naming the indexed runs for an unknown one)."""
    kind = queries.run_kind(run_id, con)
    kinds = registry.kinds()
    if kind not in kinds:
        raise ValueError(f"run {run_id!r} is of job kind {kind!r}, which is not registered; kinds: {', '.join(kinds)}")
    return kinds[kind]


def _resolve(con: duckdb.DuckDBPyConnection, spec: registry.JobSpec, run_id: str, step: int | None) -> int | None:
    if spec.steps_table is None:
        return step
    steps = [int(r[0]) for r in con.execute(sql.distinct_steps(spec.steps_table), [run_id]).fetchall()]
    if not steps:
        table = next(t for t in spec.tables if t.name == spec.steps_table)
        raise ValueError(f"run {run_id!r} has no traced steps in the index "
                         f"(no {PurePosixPath(table.glob).parent} shards)")
    if step is None:
        return steps[-1]
    if step not in steps:
        listed = ", ".join(str(s) for s in steps[:_LIST_MAX])
        more = f", ... ({len(steps)} in all)" if len(steps) > _LIST_MAX else ""
        raise ValueError(f"step {step} is not a traced step of run {run_id!r}; traced steps: {listed}{more}")
    return step


def resolve_step(con: duckdb.DuckDBPyConnection, run_id: str, step: int | None) -> int | None:
    """``step`` checked against the steps of the run's kind (the distinct steps of its ``steps_table``: for a
    train run, its traced steps), or the last of them when None; a kind without steps returns ``step``."""
    return _resolve(con, _run_kind(con, run_id), run_id, step)


def _of_kind(analysis: Analysis, spec: registry.JobSpec, run_id: str) -> Analysis:
    if analysis.kind != spec.name:
        raise ValueError(f"analysis {analysis.name!r} reads {analysis.kind} runs; run {run_id!r} is a "
                         f"{spec.name} run (its analyses: {', '.join(names(spec.name)) or 'none'})")
    return analysis


def run(name: str, run_id: str, step: int | None = None, params: AnalysisParams | None = None,
        con: duckdb.DuckDBPyConnection | None = None) -> Frames:
    """Run one analysis on a run (at ``step``, default: the run's last step)."""
    analysis = get(name)
    with queries.cursor(con) as cur:
        spec = _run_kind(cur, run_id)
        _of_kind(analysis, spec, run_id)
        return analysis.fn(cur, run_id, _resolve(cur, spec, run_id, step), params or AnalysisParams())


def run_all(run_id: str, step: int | None = None, params: AnalysisParams | None = None,
            con: duckdb.DuckDBPyConnection | None = None, only: list[str] | None = None) -> dict[str, Frames]:
    """Run every analysis of the run's kind available for it (``names(kind, run_id)``), in registry order, or
    those named in ``only``, in that order."""
    params = params or AnalysisParams()
    with queries.cursor(con) as cur:
        spec = _run_kind(cur, run_id)
        selected = [get(n) for n in (only if only is not None else names(spec.name, run_id, cur))]
        for a in selected:
            _of_kind(a, spec, run_id)
        s = _resolve(cur, spec, run_id, step)
        return {a.name: a.fn(cur, run_id, s, params) for a in selected}
