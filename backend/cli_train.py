"""``python -m backend train``: flags generated from TrainConfig (see backend.config), then backend.train.train.

    python -m backend train --task arith --scheme antiop --scheme-params clip_mult=2 --steps 200
    python -m backend train --config run.yaml --trace-every 20
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from backend.config import TrainConfig, add_config_args, config_from_args


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, TrainConfig)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"error: invalid config: {e}", file=sys.stderr)
        return 2
    from backend.models import HubUnreachableError
    from backend.train import train
    try:
        run = train(cfg, progress=not args.quiet)
    except (ValueError, FileNotFoundError, HubUnreachableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    manifest = json.loads((run / "manifest.json").read_text())
    ev = manifest.get("eval", {})
    acc = f", eval accuracy {ev['accuracy']:.3f} (n={ev['n']})" if "accuracy" in ev else ""
    print(f"run finished: {run}{acc}")
    return 0
