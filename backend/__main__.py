"""The tokviz command line: ``python -m backend COMMAND ...``.

    python -m backend train --task arith --scheme antiop --steps 200
    python -m backend build-demo-model
    python -m backend verify RUN_DIR --step 20
    python -m backend index [--rebuild]
    python -m backend analyze RUN_DIR
    python -m backend compare RUN_A RUN_B

Each command lives in its own module; this file only dispatches, so ``--help`` stays fast.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help); the module exposes main(argv) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("backend.cli_train", "LoRA SFT under a token-weighting scheme, optionally traced"),
    "build-demo-model": ("backend.demo_model", "rebuild the embedded tiny models under data/models/"),
    "verify": ("backend.verify", "recompute a traced step with a naive reference and compare"),
    "index": ("backend.index", "ingest run directories into the DuckDB index"),
    "analyze": ("backend.report", "the trace analyses of one run: summary.json and figures"),
    "compare": ("backend.report", "cross-run figures and a summary table"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: python -m backend COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"unknown command {cmd!r}; available: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    if cmd in ("analyze", "compare"):
        return int(module.main([cmd] + rest) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
