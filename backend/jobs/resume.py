"""``python -m backend resume RUN_DIR``: continue an interrupted (or failed) train run from its latest checkpoint.

    python -m backend resume data/runs/20261130-010203-train-sft-ab12
    python -m backend resume RUN_DIR --quiet          # no progress bar

The run goes on in its own directory with the config it was started with (backend.lm.trainer.resume); on CPU
its losses and final adapter are bit-identical to those of a run that was never interrupted. A run still
running, queued or finished is refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend.store.rundir import CONFIG, find_run, read_events

RESUMABLE = ("interrupted", "failed")


def check_resumable(run_dir: Path) -> None:
    """ValueError unless ``run_dir`` is a run directory whose process is gone without finishing."""
    from backend.index.ingest import status_of
    if not (run_dir / CONFIG).exists():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG})")
    status = status_of(run_dir)
    if status not in RESUMABLE:
        start = next((e for e in reversed(read_events(run_dir)) if e.get("type") in ("start", "queued")), {})
        who = f" (pid {start['pid']} on {start.get('host')})" if status in ("running", "queued") and "pid" in start \
            else ""
        raise ValueError(f"{run_dir} is {status}{who}; resume continues runs that are "
                         f"{' or '.join(RESUMABLE)}")


def main(argv: list[str]) -> int:
    """``python -m backend resume RUN_DIR [--quiet]`` (argv: what follows ``resume``)."""
    ap = argparse.ArgumentParser(prog="python -m backend resume", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="the run directory to continue, or its run id (under the runs root)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        run_dir = find_run(args.run_dir)
        check_resumable(run_dir)
        from backend.lm.trainer import resume  # torch: only once the run is known to be resumable
        run = resume(run_dir, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run finished: {run}")
    return 0
