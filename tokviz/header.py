"""The header above the tabs: which run and traced step the analysis tabs show, a refresh of the run list,
and the "copy link" button (the address bar always holds the deep link of what is shown). Also what the tabs
share with the page around them: ``Page`` (what a tab's wiring may use) and ``Shown`` (what a page shows,
kept on the server).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import gradio as gr
import pandas as pd

from backend.index import queries
from tokviz.context import AppContext
from tokviz.links import HOME

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
    bits += _lora_and_attention(info)
    n = int(info["n_traced_steps"]) if pd.notna(info["n_traced_steps"]) else 0
    n_tok = int(info["n_tokens"]) if pd.notna(info["n_tokens"]) else 0      # NULL for a kind without tokens
    bits.append(f"{n} traced step{'s' if n != 1 else ''}, {n_tok:,} token records")
    return f"**{info['name'] or run_id}** (`{run_id}`) · " + " · ".join(bits)


def step_note(run_id: str | None, asked: object, step: int | None) -> str:
    """The notice line's note when a run change could not keep the traced step (``asked``) the header showed
    (the new run did not trace it) and moved to ``step`` instead; "" when it kept it or there was none."""
    if asked in (None, "") or step is None or str(asked) == str(step):
        return ""
    return f"ℹ️ step {asked} was not traced in {run_id}; showing step {step}."


def _lora_and_attention(info: pd.Series) -> list[str]:
    """The LoRA targets the run adapted (its manifest; while running, its config) and, when a traced step ran
    another attention kernel than the model's (token mode's forward-mode passes run tokviz_jvp, or eager), which."""
    manifest = json.loads(info["manifest_json"]) if isinstance(info.get("manifest_json"), str) else {}
    config = json.loads(info["config_json"]).get("config", {}) if isinstance(info.get("config_json"), str) else {}
    targets = manifest.get("lora_targets") or config.get("lora_targets")
    out = [f"LoRA `{', '.join(map(str, targets))}`"] if isinstance(targets, list) and targets else []
    checks = (manifest.get("trace") or {}).get("checks") if isinstance(manifest.get("trace"), dict) else None
    switched = {(c.get("attn_implementation_used"), c.get("attn_implementation_model")) for c in checks or []
                if isinstance(c, dict) and c.get("attn_implementation_used") != c.get("attn_implementation_model")}
    out += [f"traced with `{u}` attention (the model's: `{m}`)" for u, m in sorted(switched, key=str)]
    return out


class Shown:
    """What one page shows, kept on the server: the tab on screen, the header's run and step, and which
    (run, step, generation) each tab was last rendered for.

    One per browser session (the page's ``gr.State``), changed in place rather than returned, so an event sees
    what another one set while that one is still running. A tab switch sets ``tab`` as it starts; renders hold
    ``lock``, so the renders of one page run one at a time and each reads the header as the one before left
    it. A run change that fires while a tab switch renders therefore draws the tab now on screen, and a tab
    switch that fires while a run change renders draws the new run. Every event that moves the header's run
    or step records it here (``moved``).
    """

    def __init__(self, tab: str = HOME, run: str | None = None, step: int | None = None,
                 rendered: dict[str, str] | None = None) -> None:
        self.tab = tab
        self.run = run
        self.step = step
        self.rendered = dict(rendered or {})
        self.lock = threading.RLock()

    def __deepcopy__(self, memo: dict) -> "Shown":
        """gr.State copies its value for each session; the copy gets a lock of its own (locks do not copy)."""
        return Shown(self.tab, self.run, self.step, self.rendered)

    def moved(self, run: str | None, step: int | None) -> None:
        """The header now shows (run, step): every tab is stale until it renders again."""
        self.run, self.step, self.rendered = run, step, {}

    def key(self, generation: int) -> str:
        return f"{self.run}|{self.step}|{generation}"

    def is_rendered(self, tab: str, generation: int) -> bool:
        return self.rendered.get(tab) == self.key(generation)

    def mark(self, tab: str, generation: int) -> None:
        self.rendered[tab] = self.key(generation)


@dataclass
class Polled:
    """Components a tab keeps live through the app's poll: ``update(values of inputs, tab on screen)`` returns
    updates by output component (empty: nothing to update)."""
    inputs: list
    outputs: list
    update: Callable[[Mapping[Any, Any], str], dict]


@dataclass
class Page:
    """What a tab's wiring may use besides its own components, by name: the same object for every tab."""
    ctx: AppContext
    header: Header
    tabs: gr.Tabs               # the tab strip: ``gr.Tabs(selected=name)`` as an output opens a tab
    shown: gr.State             # a Shown: the tab on screen, the header's run and step, what each tab shows
    generation: gr.State        # the index generation the page's run lists show
    run_lists: list[tuple[gr.Dropdown, bool]] = field(default_factory=list)    # (dropdown, traced runs only)
    polled: list[Polled] = field(default_factory=list)

    def follow_runs(self, dropdown: gr.Dropdown, traced_only: bool = False) -> None:
        """Keep ``dropdown``'s choices the indexed runs (only those with traced steps if ``traced_only``), from
        the page's load on and whenever runs are indexed."""
        self.run_lists.append((dropdown, traced_only))

    def keep_live(self, inputs: list, outputs: list, update: Callable[[Mapping[Any, Any], str], dict]) -> None:
        """Have the app's poll call ``update(values of inputs by component, tab on screen)`` and apply the
        updates it returns (by output component)."""
        self.polled.append(Polled(inputs, outputs, update))
