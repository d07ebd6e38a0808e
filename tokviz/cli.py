"""The ``tokviz`` console script (installed by ``pip install -e .``; see pyproject.toml).

    tokviz app [--host 0.0.0.0] [--port 7860]     # the web app, as ``python app.py``
    tokviz train --task arith --steps 200         # every other command is ``python -m backend ...``
    tokviz verify data/runs/<run_id> --step 20

``app`` is the only command of its own; everything else goes to ``backend.__main__.main`` unchanged, so the two
command lines cannot drift apart. Nothing heavy is imported before the command is known: ``tokviz train --help``
does not load Gradio, and ``tokviz app`` does not load torch.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

APP_HELP = "serve the web app on http://localhost:7860 (what `python app.py` does)"


def serve_app(host: str | None = None, port: int | None = None) -> None:
    """Build and serve the web app; ``host``/``port`` default to $GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT,
    else 0.0.0.0:7860. Blocks until the server stops."""
    host = host or os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0")
    port = port if port is not None else _port(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    from tokviz.ui import build_app, serve  # Gradio loads only once the arguments are known to be good
    # SIGTERM (docker stop, a Space restart) exits like Ctrl-C, so the exit handlers stop the jobs this app
    # launched instead of leaving them running on their own
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    serve(build_app(), server_name=host, server_port=port)


def _port(value: str) -> int:
    """A TCP port number from text; ValueError naming the allowed range otherwise."""
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"port {value!r} is not an integer; allowed: 1..65535") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside the allowed range 1..65535")
    return port


def _port_arg(value: str) -> int:
    try:
        return _port(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tokviz`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "app":
        ap = argparse.ArgumentParser(prog="tokviz app", description=APP_HELP)
        ap.add_argument("--host", default=None, help="interface to bind (default $GRADIO_SERVER_NAME or 0.0.0.0)")
        ap.add_argument("--port", type=_port_arg, default=None,
                        help="port (default $GRADIO_SERVER_PORT or 7860)")
        args = ap.parse_args(argv[1:])
        serve_app(args.host, args.port)
        return 0
    from backend.__main__ import main as backend_main
    if not argv or argv[0] in ("-h", "--help"):
        print(f"tokviz app: {APP_HELP}\ntokviz COMMAND: the same as `python -m backend COMMAND`:\n")
    return backend_main(argv)


if __name__ == "__main__":
    sys.exit(main())
