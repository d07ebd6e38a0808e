"""The tokviz command line: ``python -m backend COMMAND ...``.

    python -m backend train --task arith --scheme antiop --steps 200      # a job kind (backend.jobs.registry)
    python -m backend verify RUN_DIR --step 20
    python -m backend index [--rebuild]
    python -m backend analyze RUN_DIR
    python -m backend compare RUN_A RUN_B
    python -m backend build-demo-model
    python -m backend resume RUN_DIR
    python -m backend clean [--yes]

Every job kind of the registry is a command (flags from its config dataclass); the tools below are the rest.
This file only dispatches, so ``--help`` stays fast.
"""
from __future__ import annotations

import importlib
import sys

# tool -> (module, one-line help); the module exposes main(argv) -> int
TOOLS: dict[str, tuple[str, str]] = {
    "verify": ("backend.trace.verify", "recompute a traced step with a naive reference and compare"),
    "index": ("backend.index.ingest", "ingest run directories into the DuckDB index"),
    "analyze": ("backend.analysis.report", "the analyses of one run: summary.json and figures"),
    "compare": ("backend.analysis.report", "cross-run figures and a summary table"),
    "build-demo-model": ("backend.dev.demo_model", "rebuild the embedded tiny models under data/models/"),
    "resume": ("backend.jobs.resume", "continue an interrupted train run from its latest checkpoint"),
    "clean": ("backend.jobs.clean", "remove failed and interrupted runs (after asking; --yes to skip)"),
    "publish": ("backend.publish", "write selected runs and the app as a folder ready to push as a Docker Space"),
    "probe-merge": ("backend.probe.merge", "merge the shards of a probe (--shard i/n runs), re-bucketing globally"),
}


def main(argv: list[str] | None = None) -> int:
    from backend.jobs import registry
    argv = list(sys.argv[1:] if argv is None else argv)
    kinds = registry.kinds()
    if not argv or argv[0] in ("-h", "--help"):
        lines = ([f"  {name:<18} {spec.help}" for name, spec in kinds.items()]
                 + [f"  {name:<18} {help_}" for name, (_, help_) in TOOLS.items()])
        print("usage: python -m backend COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in kinds:
        from backend.jobs import cli
        return cli.main(kinds[cmd], rest)
    if cmd not in TOOLS:
        print(f"unknown command {cmd!r}; available: {', '.join(list(kinds) + list(TOOLS))}", file=sys.stderr)
        return 2
    module = importlib.import_module(TOOLS[cmd][0])
    if cmd in ("analyze", "compare"):
        return int(module.main([cmd] + rest) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
