"""tokviz web app: ``python app.py`` serves on http://localhost:7860 (GRADIO_SERVER_PORT overrides); also the
hosted Space's entry point. The app is built in ``tokviz/`` (see tokviz/ui.py)."""
from __future__ import annotations

import os
import signal
import sys

from tokviz.ui import build_app, serve


def main() -> None:
    # SIGTERM (docker stop, a Space restart) exits like Ctrl-C, so the exit handlers stop the jobs this app
    # launched instead of leaving them running on their own
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    demo = build_app()
    serve(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
          server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))


if __name__ == "__main__":
    main()
