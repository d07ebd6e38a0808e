"""tokviz web app: ``python app.py`` serves on http://localhost:7860 (GRADIO_SERVER_PORT overrides); also the
hosted Space's entry point. The app is built in ``tokviz/`` (see tokviz/ui.py)."""
from __future__ import annotations

from tokviz import cli


def main() -> None:
    cli.serve_app()       # host and port from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (tokviz/cli.py)


if __name__ == "__main__":
    main()
