"""tokviz web app: ``python app.py`` serves on http://localhost:7860 (also the hosted Space entry point).

The tabs (token inspector, analyses, launching jobs) are built from ``tokviz/``; until they land this page
says what the backend can already do.
"""
from __future__ import annotations

import os

import gradio as gr

from tokviz.placeholder import build


def main() -> None:
    demo = build()
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))


if __name__ == "__main__":
    main()
