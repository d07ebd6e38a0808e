"""tokviz web app: ``python app.py`` serves on http://localhost:7860 (GRADIO_SERVER_PORT overrides); also the
hosted Space's entry point. The app is built in ``tokviz/`` (see tokviz/ui.py)."""
from __future__ import annotations

import os

from tokviz.ui import build_app, serve


def main() -> None:
    demo = build_app()
    serve(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
          server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))


if __name__ == "__main__":
    main()
