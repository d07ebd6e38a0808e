"""The first page of the app, until the analysis tabs land: what tokviz is and how to train from the CLI."""
from __future__ import annotations

import gradio as gr

INTRO = """
# tokviz
**Which tokens drive a fine-tuning update?** Per-token gradient analysis of LoRA fine-tuning.

The token inspector and the analysis tabs are being built. Today the backend trains the embedded tiny Qwen2
model under any token-weighting scheme:

```
python -m backend train --task arith --scheme antiop --steps 200
```
"""


def build() -> gr.Blocks:
    with gr.Blocks(title="tokviz") as demo:
        gr.Markdown(INTRO)
    return demo
