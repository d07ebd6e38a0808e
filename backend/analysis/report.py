"""``analyze`` and ``compare``: run the analyses, write summary.json, the tables and every figure.

    python -m backend analyze RUN_DIR [--out DIR] [--step N]     # -> RUN_DIR/analysis/
    python -m backend compare RUN_A RUN_B [...] [--out DIR]      # -> <data root>/comparisons/<stamp>/

    summary = analyze(run_path)                # the headline numbers (also in analysis/summary.json)
    table = compare([run_a, run_b])            # the summaries side by side (rows: keys, columns: runs)

A run is named by its directory or by its run id under ``<data root>/runs``. It is ingested into the index
first if new or changed; when another process (the app) holds the index, a private in-memory index is used
instead, and the command says so. Figures go out as standalone HTML always, and as PNG and PDF through
kaleido and a Chromium browser where both are installed (otherwise static export is skipped, with a message).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import duckdb
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from backend import index
from backend.analysis import analyses, figures
from backend.index import queries
from backend.store import paths
from backend.store.rundir import atomic_write_json, find_run

SUMMARY = "summary.json"
ANALYSIS_DIR = "analysis"
STATIC_FORMATS = ("png", "pdf")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

class StaticExportUnavailable(RuntimeError):
    """PNG/PDF export was required (``static=True``) but kaleido or a browser is missing."""


# ------------------------------------------------------------------------------------------------ runs
@contextmanager
def index_with(run_paths: Sequence[Path], index_path: str | Path | None = None
               ) -> Iterator[tuple[duckdb.DuckDBPyConnection, list[str]]]:
    """A connection to an index holding these runs (ingested now if new or changed), and their run ids.
    Inside the app, its shared connection; when another process holds the index file, a private
    in-memory index."""
    try:
        con = index.shared(index_path) if index.shared_path_held(index_path) else index.connect(index_path)
    except index.IndexLockedError as e:
        print(f"note: {e}\nnote: using a private in-memory index for this command instead", file=sys.stderr)
        con = index.connect(index.MEMORY)
    try:
        ids = [index.ingest_run(con, p).run_id for p in run_paths]
        yield con, ids
    finally:
        con.close()


# ------------------------------------------------------------------------------------------------ summary
def summarize(run_id: str, step: int | None, results: dict[str, analyses.Frames]) -> dict:
    """The headline numbers of one run at ``step`` from the frames of ``analyses.run_all``: the summary its
    kind registers (``analyses.register_summary``, e.g. in ``backend.analysis.trace``), after the run id and
    step, and followed by the definitions of its keys."""
    kinds = sorted({analyses.get(name).kind for name in results})
    if len(kinds) != 1:
        raise ValueError(f"summarize needs the frames of one job kind's analyses, got kinds {kinds or 'none'}")
    head = {"run_id": run_id, "step": None if step is None else int(step)}
    summ = analyses.summary(kinds[0])
    if summ is None:
        return head
    missing = [n for n in summ.needs if n not in results]
    if missing:
        raise ValueError(f"the {kinds[0]} summary needs the analyses {', '.join(missing)}; results have "
                         f"{', '.join(results)}")
    return {**head, **summ.fn(step, results), "definitions": summ.definitions}


# ------------------------------------------------------------------------------------------------ export
def static_export_status() -> tuple[bool, str]:
    """Whether PNG/PDF export can run here (kaleido installed and a Chromium/Chrome found), and why not."""
    if importlib.util.find_spec("kaleido") is None:
        return False, "kaleido is not installed (pip install kaleido)"
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).exists():
        return True, env
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return True, found
    return False, ("no Chromium or Chrome found for kaleido (apt-get install chromium, or set BROWSER_PATH)")


def export_figures(figs: dict[str, go.Figure], out: Path, static: bool | None = None,
                   html_js: str = "inline") -> dict:
    """Write each figure as ``<name>.html`` (always) and ``<name>.png`` / ``.pdf`` (static export).

    ``static``: None exports when possible and otherwise skips with a message on stderr; True requires it
    (StaticExportUnavailable otherwise); False skips it. ``html_js``: "inline" makes every HTML file standalone,
    "directory" writes plotly.min.js once beside them. Returns {"figures": {name: [files]}, "static_export": str}.
    """
    if html_js not in ("inline", "directory"):
        raise ValueError(f"html_js must be 'inline' or 'directory', got {html_js!r}")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    for name, fig in figs.items():
        f = out / f"{name}.html"
        fig.write_html(f, include_plotlyjs=True if html_js == "inline" else "directory", full_html=True)
        files[name] = [f.name]
    ok, why = static_export_status()
    if static is False:
        status = "skipped: static export turned off"
    elif not ok:
        if static:
            raise StaticExportUnavailable(f"static figure export was required but is unavailable: {why}")
        status = f"skipped: {why}"
        print(f"note: PNG/PDF export skipped ({why}); HTML figures written to {out}", file=sys.stderr)
    else:
        targets = [(fig, out / f"{name}.{fmt}") for name, fig in figs.items() for fmt in STATIC_FORMATS]
        pio.write_images([t[0] for t in targets], [t[1] for t in targets],
                         width=[t[0].layout.width or figures.WIDTH for t in targets],
                         height=[t[0].layout.height or figures.HEIGHT for t in targets])
        for name in figs:
            files[name] += [f"{name}.{fmt}" for fmt in STATIC_FORMATS]
        status = "ok"
    return {"figures": files, "static_export": status}


def _write_tables(results: dict[str, analyses.Frames], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, frames in results.items():
        for key, df in frames.items():
            df.to_csv(out / f"{name}.{key}.csv", index=False)


# ------------------------------------------------------------------------------------------------ analyze
def analyze(run: str | os.PathLike, out: str | os.PathLike | None = None, step: int | None = None, *,
            index_path: str | Path | None = None, params: analyses.AnalysisParams | None = None,
            static: bool | None = None, html_js: str = "inline") -> dict:
    """Run the analyses of the run's kind on one run; write ``summary.json``, ``tables/*.csv`` and every
    figure to ``out`` (default ``RUN_DIR/analysis``). Returns the summary."""
    run_path = find_run(run)
    out_dir = Path(out) if out is not None else run_path / ANALYSIS_DIR
    with index_with([run_path], index_path) as (con, (run_id,)):
        s = analyses.resolve_step(con, run_id, step)
        results = analyses.run_all(run_id, s, params, con=con)
        info = queries.run_info(run_id, con).iloc[0]
    if not results:
        raise ValueError(f"run {run_id!r} (a {info.get('kind')!r} run) has no analysis that applies to it: a scheme "
                         "comparison is read on the app's Schemes tab, a train run's trace analyses need a traced "
                         "run (--trace-every N)")
    summary = {"name": info["name"], "status": info["status"], "run_path": str(run_path),
               **summarize(run_id, s, results)}
    figs = {name: figures.build(name, frames) for name, frames in results.items()}
    exported = export_figures(figs, out_dir, static, html_js)
    _write_tables(results, out_dir / "tables")
    summary.update(exported, generated_at=datetime.now(timezone.utc).isoformat())
    atomic_write_json(out_dir / SUMMARY, summary)
    return summary


# ------------------------------------------------------------------------------------------------ compare
def _labels(infos: list[pd.Series]) -> list[str]:
    names = [str(i["name"] or i["run_id"]) for i in infos]
    return names if len(set(names)) == len(names) else [str(i["run_id"]) for i in infos]


def compare_indexed(run_ids: Sequence[str], step: int | None = None, params: analyses.AnalysisParams | None = None,
                    con: duckdb.DuckDBPyConnection | None = None
                    ) -> tuple[dict[str, go.Figure], pd.DataFrame, dict[str, dict]]:
    """The cross-run figures (those of the kind's analyses registered with ``compare=True``, overlaid, plus
    ``summary_table``), the side-by-side summary table (rows: summary keys, columns: run labels) and the
    summaries, for runs of one kind already in the index; each run at ``step`` if given, else at its last
    traced step. Writes nothing (the app shows these)."""
    if len(run_ids) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(run_ids)}")
    if len(set(run_ids)) != len(run_ids):
        raise ValueError(f"the same run is named twice: {list(run_ids)}")
    with queries.cursor(con) as cur:
        infos = [queries.run_info(i, cur).iloc[0] for i in run_ids]
        labels = _labels(infos)
        kinds = sorted({str(i["kind"]) for i in infos})
        if len(kinds) != 1:
            raise ValueError(f"compare needs runs of one job kind, got {', '.join(kinds)}")
        kind_names = analyses.names(kinds[0])
        overlaid = [n for n in kind_names if analyses.get(n).compare]
        kind_summary = analyses.summary(kinds[0])
        summary_needs = kind_summary.needs if kind_summary is not None else ()
        # the analyses compare needs: the overlaid figures and what the kind's summary reads, in registry order
        needs = [n for n in kind_names if n in overlaid or n in summary_needs]

        def one(rid: str) -> tuple[int | None, dict[str, analyses.Frames]]:
            # a cursor per thread: DuckDB runs the runs' queries side by side (it releases the GIL)
            c = cur.cursor()
            try:
                s = analyses.resolve_step(c, rid, step)
                return s, analyses.run_all(rid, s, params, con=c, only=needs)
            finally:
                c.close()

        with ThreadPoolExecutor(max_workers=min(len(run_ids), os.cpu_count() or 1)) as pool:
            done = list(pool.map(one, run_ids))
        per_run, summaries = {}, {}
        for rid, label, info, (s, frames) in zip(run_ids, labels, infos, done):
            per_run[label] = frames
            summaries[label] = {**summarize(rid, s, frames), **eval_accuracy(info)}
    figs = {}
    for name in overlaid:
        keys = per_run[labels[0]][name].keys()
        # the run column categorical in the runs' order: every figure gives a run the same colour
        # (figures.run_color), also one where an earlier run has no rows
        merged = {k: pd.concat([per_run[lab][name][k].assign(run=lab) for lab in labels], ignore_index=True)
                  .astype({"run": pd.CategoricalDtype(labels)}) for k in keys}
        figs[name] = figures.build(name, merged)
    flat = {lab: {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in summ.items()
                  if k != "definitions"} for lab, summ in summaries.items()}
    table = pd.DataFrame(flat)
    table.index.name = "metric"
    figs["summary_table"] = figures.summary_table(table)
    return figs, table, summaries


def eval_accuracy(info: pd.Series) -> dict:
    """A run's final held-out accuracy from its manifest (greedy, and sampled when it drew samples), so a
    summary names it next to the run's mode and step; {} for a run without evaluation."""
    m = json.loads(info["manifest_json"]) if isinstance(info.get("manifest_json"), str) else {}
    ev = m.get("eval") if isinstance(m.get("eval"), dict) else {}
    return {k: ev[key] for k, key in (("eval_accuracy", "accuracy"), ("eval_sampled_accuracy", "sampled_accuracy"))
            if key in ev}


def comparability(summaries: dict[str, dict]) -> list[str]:
    """What makes runs' numbers not comparable side by side: traced in different modes (a position's piece of
    the update vs a token's own gradient), or summarised at different steps. One line per problem; [] if none."""
    out = []
    modes = {lab: s.get("mode") for lab, s in summaries.items()}
    if len(set(modes.values())) > 1:
        out.append("runs traced in different modes: " + ", ".join(f"{lab}: {m}" for lab, m in modes.items())
                   + " (alignment, dot and opposing tokens mean different things in each mode)")
    steps = {lab: s.get("step") for lab, s in summaries.items()}
    if len(set(steps.values())) > 1:
        out.append("runs compared at different steps: " + ", ".join(f"{lab}: step {st}" for lab, st in steps.items())
                   + " (pick a step all runs traced for a like-for-like comparison)")
    return out


def compare(runs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, step: int | None = None, *,
            index_path: str | Path | None = None, params: analyses.AnalysisParams | None = None,
            static: bool | None = None, html_js: str = "inline") -> pd.DataFrame:
    """Compare runs (each at ``step`` if given, else at its last traced step): the cross-run figures
    overlaid, and their summaries side by side (``summary.csv``, ``summary.json``, ``summary_table`` figure).
    Returns the side-by-side table (rows: summary keys, columns: runs)."""
    if len(runs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(runs)}")
    run_paths = [find_run(r) for r in runs]
    out_dir = (Path(out) if out is not None else
               paths.data_root() / "comparisons" / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    with index_with(run_paths, index_path) as (con, ids):
        figs, table, summaries = compare_indexed(ids, step, params, con)
    labels = list(table.columns)
    exported = export_figures(figs, out_dir, static, html_js)
    table.to_csv(out_dir / "summary.csv")
    atomic_write_json(out_dir / SUMMARY, {"runs": labels, "run_ids": ids, "summaries": summaries, **exported,
                                          "generated_at": datetime.now(timezone.utc).isoformat()})
    return table


# ------------------------------------------------------------------------------------------------ CLI
def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", type=Path, default=None, help="output folder")
    ap.add_argument("--step", type=int, default=None, help="traced step for step-scoped analyses (default: last)")
    ap.add_argument("--index", default=None, help="index file, or :memory: (default: data root/tokviz.duckdb)")
    ap.add_argument("--module", default=None, help="layer x position heatmap: one module type (default: all)")
    ap.add_argument("--static", choices=("auto", "on", "off"), default="auto",
                    help="PNG/PDF export: auto (when kaleido + Chromium exist), on (required), off")
    ap.add_argument("--html-js", choices=("inline", "directory"), default="inline",
                    help="inline: each HTML standalone; directory: one plotly.min.js beside them")


# what "opposing tokens" (opposing_fraction, the opposing side of surprising_tokens) are in each trace mode
OPPOSING_MEANS = {
    "position": ("position mode: an opposing token is a position whose piece of the update points against the "
                 "batch gradient; it includes gradients of later tokens' losses through attention"),
    "token": "token mode: an opposing token is one whose own loss gradient points against the batch gradient",
    "mixed": ("mixed modes: traced steps differ in mode (position: a position's piece of the update, including "
              "later tokens' losses through attention; token: the token's own loss gradient)"),
}


def _run_cli(fn: Callable[..., dict | pd.DataFrame], args: argparse.Namespace, target: object) -> int:
    static = {"auto": None, "on": True, "off": False}[args.static]
    try:
        result = fn(target, args.out, args.step, index_path=args.index, static=static, html_js=args.html_js,
                    params=analyses.AnalysisParams(module=args.module))
    except (ValueError, index.TokvizIndexError, StaticExportUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, dict):
        keys = ("run_id", "step", "mode", "mean_alignment", "opposing_fraction", "gini", "tokens_for_80pct",
                "positional_decay_slope", "dominant_module", "opposing_module", "lag1_autocorr", "static_export")
        for k in keys:
            print(f"{k:<24} {result.get(k)}")
        if result.get("mode") in OPPOSING_MEANS:
            print(OPPOSING_MEANS[str(result["mode"])])
    else:
        print(result.to_string())
    return 0


def main_analyze(argv: list[str]) -> int:
    """``python -m backend analyze RUN_DIR [--out DIR] [--step N] ...`` (argv: what follows ``analyze``)."""
    ap = argparse.ArgumentParser(prog="python -m backend analyze",
                                 description="Run the analyses of a run; write summary.json and figures.")
    ap.add_argument("run", help="run directory, or run id under the data root")
    _common(ap)
    args = ap.parse_args(argv)
    return _run_cli(analyze, args, args.run)


def main_compare(argv: list[str]) -> int:
    """``python -m backend compare RUN_A RUN_B [...] [--out DIR]`` (argv: what follows ``compare``)."""
    ap = argparse.ArgumentParser(prog="python -m backend compare",
                                 description="Overlay the cross-run figures of several runs; summaries side by side.")
    ap.add_argument("runs", nargs="+", help="run directories or run ids (two or more)")
    _common(ap)
    args = ap.parse_args(argv)
    return _run_cli(compare, args, args.runs)


def main(argv: list[str]) -> int:
    """``analyze ...`` or ``compare ...``: argv starts with the subcommand name."""
    commands = {"analyze": main_analyze, "compare": main_compare}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m backend {{{'|'.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
