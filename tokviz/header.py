"""The header above the tabs: which run and traced step the analysis tabs show, a refresh of the run list,
and the "copy link" button (the address bar always holds the deep link of what is shown)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from backend.index import queries
from tokviz.context import AppContext

TITLE = ("<div class='tv-title'><b>tokviz</b> · which tokens drive a LoRA fine-tuning update? "
         "<span>per-token gradient alignment, magnitude and share of the batch update</span></div>")
TITLE_CSS = """.tv-title { font-size: 1.25em; padding: .2em 0 .1em; }
.tv-title span { color: #666; font-size: .75em; }"""


@dataclass
class Header:
    run: gr.Dropdown
    step: gr.Dropdown
    refresh: gr.Button
    copy: gr.Button
    link: gr.Textbox
    query: gr.Textbox       # the deep link's query string; a JS listener puts it in the address bar
    info: gr.Markdown
    notice: gr.Markdown     # why the tab on screen has nothing (new) to show, if so


def build(ctx: AppContext) -> Header:
    gr.HTML(TITLE, css_template=TITLE_CSS, js_on_load=None)
    with gr.Row(equal_height=True):
        run = gr.Dropdown(label="Run", choices=ctx.run_choices(), value=None, elem_id="tv-run", scale=6,
                          allow_custom_value=True)
        step = gr.Dropdown(label="Traced step", choices=[], elem_id="tv-step", scale=1, min_width=120,
                           allow_custom_value=True)
        refresh = gr.Button("↻ Refresh runs", size="sm", elem_id="tv-refresh", scale=0, min_width=130)
        copy = gr.Button("🔗 Copy link", size="sm", elem_id="tv-copy", scale=0, min_width=120)
    with gr.Row():
        info = gr.Markdown("", elem_id="tv-run-info")
        link = gr.Textbox(label="Link to this view", visible=False, interactive=False, elem_id="tv-link",
                          buttons=["copy"])
    notice = gr.Markdown("", elem_id="tv-notice")
    query = gr.Textbox(visible="hidden", elem_id="tv-query")
    return Header(run, step, refresh, copy, link, query, info, notice)


def run_info_md(run_id: str | None) -> str:
    if not run_id:
        return "No run selected: launch one on the Launch tab, or put run directories under the data root."
    info = queries.run_info(run_id).iloc[0]
    bits = [f"status **{info['status']}**"]
    for k in ("model", "dataset", "scheme"):
        if isinstance(info[k], str) and info[k]:
            bits.append(f"{k} `{info[k]}`")
    n = int(info["n_traced_steps"]) if pd.notna(info["n_traced_steps"]) else 0
    bits.append(f"{n} traced step{'s' if n != 1 else ''}, {int(info['n_tokens'] or 0):,} token records")
    return f"**{info['name'] or run_id}** (`{run_id}`) · " + " · ".join(bits)
