"""``python -m backend clean``: remove the run directories of failed and interrupted runs, after asking.

    python -m backend clean                  # lists them and asks (refuses without a terminal to ask on)
    python -m backend clean --yes            # no question
    python -m backend clean --runs DIR --index FILE

A run counts as failed when it recorded an error, as interrupted when its process is gone without one
(backend.index.ingest.run_status). Removed runs leave the index too when this process can open it; while the
app holds it, the app (or a later ``python -m backend index``) drops runs whose directory is gone.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from backend.store import paths

CLEANABLE = ("failed", "interrupted")


def cleanable_runs(runs_root: Path | None = None) -> list[tuple[Path, str]]:
    """(run directory, status) of every failed or interrupted run under ``runs_root``."""
    from backend.index.ingest import find_runs, status_of
    out = []
    for run in find_runs(runs_root):
        try:
            status = status_of(run)
        except ValueError as e:        # a corrupt events file: say which run, don't guess its status
            print(f"skipped {run}: {e}", file=sys.stderr)
            continue
        if status in CLEANABLE:
            out.append((run, status))
    return out


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _confirm(n: int) -> bool | None:
    """The user's answer, or None when there is no terminal to ask on."""
    if sys.stdin is None or not sys.stdin.isatty():
        return None
    answer = input(f"remove these {n} run director{'y' if n == 1 else 'ies'}? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def main(argv: list[str]) -> int:
    """``python -m backend clean [--yes] [--runs DIR] [--index FILE]`` (argv: what follows ``clean``)."""
    ap = argparse.ArgumentParser(prog="python -m backend clean", description=__doc__.split("\n")[0])
    ap.add_argument("--yes", "-y", action="store_true", help="remove without asking")
    ap.add_argument("--runs", type=Path, default=None, help="folder of run directories (default: data root/runs)")
    ap.add_argument("--index", type=Path, default=None, help="index file (default: data root/tokviz.duckdb)")
    args = ap.parse_args(argv)
    runs = cleanable_runs(args.runs)
    if not runs:
        print("nothing to clean: no failed or interrupted runs")
        return 0
    for run, status in runs:
        print(f"{status:<12} {run.name}  ({_size(run) / 2**20:.1f} MiB)  {run}")
    if not args.yes:
        ok = _confirm(len(runs))
        if ok is None:
            print("error: no terminal to ask on; pass --yes to remove them", file=sys.stderr)
            return 2
        if not ok:
            print("nothing removed")
            return 1
    for run, _status in runs:
        shutil.rmtree(run)
    print(f"removed {len(runs)} run director{'y' if len(runs) == 1 else 'ies'}")
    _prune_index(args.index)
    return 0


def _prune_index(index: Path | None) -> None:
    from backend.index import db
    from backend.index.ingest import prune_missing
    target = Path(index) if index is not None else paths.index_path()
    if not target.exists():
        return
    try:
        con = db.connect(target)
    except db.IndexLockedError as e:
        print(f"the index is in use ({e}); the app drops the removed runs at its next ingest, or run "
              "`python -m backend index` once it is closed")
        return
    try:
        removed = prune_missing(con)
    finally:
        con.close()
    print(f"index: dropped {len(removed)} run(s) whose directory is gone")
