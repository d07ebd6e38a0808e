"""``python -m backend KIND``: any job kind's command line, with flags generated from its config dataclass.

    python -m backend train --task arith --scheme antiop --scheme-params clip_mult=2 --steps 200
    python -m backend train --config run.yaml --trace-every 20      # a YAML/JSON file, or a run's config.json
    python -m backend train --help                                  # every field, its default, range or choices

Bad input (a value out of range, a missing file, an unreachable hub) is one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from backend.jobs.config import add_config_args, config_from_args
from backend.jobs.registry import JobSpec


def main(spec: JobSpec, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m backend {spec.name}",
                                     description=f"{spec.help}. " + (spec.config.__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, spec.config)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the finished run's manifest as one JSON object")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, spec.config)
    except ValueError as e:
        print(f"error: invalid config: {e}", file=sys.stderr)
        return 2
    try:
        run = spec.run(cfg, progress=not args.quiet)
    except spec.error_types() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:       # under torchrun, rank 0 reports
        return 0
    manifest = json.loads((run / "manifest.json").read_text())
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    if isinstance(manifest.get("report"), str):      # a kind's results as text (compare-schemes: its table)
        print(manifest["report"])
    ev = manifest.get("eval", {})
    acc = f", eval accuracy {ev['accuracy']:.3f} (n={ev['n']})" if isinstance(ev, dict) and "accuracy" in ev else ""
    print(f"run finished: {run}{acc}")
    return 0
