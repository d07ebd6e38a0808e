"""Tokens: alignment by token category, magnitude vs alignment, autocorrelation along the response,
positional decay, the most surprising tokens, and the table of every response token (sorted, filtered and paged
on the server: ``tokviz.token_table``). A row click in either table opens that token in Inspect."""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Mapping

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from backend.analysis import analyses, figures
from backend.index import memo
from tokviz import concurrency, tables, token_table
from tokviz.common import At, ExportRow, export_zip, for_display, require_run_step, user_errors
from tokviz.context import AppContext
from tokviz.header import Page

NAMES = ("category_breakdown", "magnitude_alignment", "autocorrelation", "positional_decay")
# the surprising-tokens table: (header, column, number format or None for text)
SURPRISE_COLS = [("", "rank", "d"), ("sample", "sample_idx", "d"), ("position", "position", "d"),
                 ("token in context", "token", None), ("category", "category", None),
                 ("alignment", "alignment", "+.4f"), ("magnitude", "magnitude", ".4g"), ("loss", "loss", ".4g"),
                 ("p", "prob", ".3f")]
# The table is HTML, not a gr.Dataframe: Gradio's table took ~0.3 s of the tab's first render in the browser
# for 30 rows. A row click is sent to the server as the HTML component's click event with the row's token.
TABLE_CSS = """
.tv-surprise { width: 100%; border-collapse: collapse; font-size: 13px; }
.tv-surprise th { text-align: left; font-weight: 600; border-bottom: 2px solid #ccc; padding: 4px 8px; }
.tv-surprise td { border-bottom: 1px solid #eee; padding: 3px 8px; vertical-align: top; }
.tv-surprise td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.tv-surprise tr[data-pos] { cursor: pointer; }
.tv-surprise tr[data-pos]:hover { background: #f3f6fa; }
.tv-surprise tr.kind td { font-weight: 600; background: #fafafa; padding-top: 10px; }
.tv-surprise .ctx { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; white-space: pre-wrap;
                    word-break: break-word; color: #666; }
.tv-surprise .ctx b { color: #111; background: #fde8c8; border-radius: 2px; font-weight: 600; }
.tv-surprise .ctx .nl { opacity: .45; }
.tv-surprise-box { max-height: 460px; overflow-y: auto; }
.tv-surprise-cap { font-weight: 600; margin-bottom: .4em; }
"""
TABLE_JS = """
element.addEventListener('click', (e) => {
  const row = e.target.closest('tr[data-pos]');
  if (row) trigger('click', {sample: parseInt(row.dataset.sample), position: parseInt(row.dataset.pos)});
});
"""


@dataclass
class TokensTab:
    category: gr.Plot
    scatter: gr.Plot
    autocorr: gr.Plot
    decay: gr.Plot
    surprising: gr.HTML
    export: ExportRow
    table: token_table.TokenTable

    @property
    def inputs(self) -> list:
        return self.table.controls

    @property
    def outputs(self) -> list:
        return [self.category, self.scatter, self.autocorr, self.decay, self.surprising, self.table.html,
                self.table.page]

    @property
    def token_links(self) -> list[gr.HTML]:
        """The HTML tables whose row click (``{sample, position}``) opens a token in Inspect (``tokviz.ui``)."""
        return [self.surprising, self.table.html]


def build(ctx: AppContext) -> TokensTab:
    with gr.Row():
        cat = gr.Plot(label="By category", elem_id="tv-category")
        sc = gr.Plot(label="Magnitude vs alignment", elem_id="tv-scatter")
    with gr.Row():
        ac = gr.Plot(label="Autocorrelation", elem_id="tv-autocorr")
        pd_ = gr.Plot(label="Positional decay", elem_id="tv-decay")
    surprising = gr.HTML("", css_template=TABLE_CSS, js_on_load=TABLE_JS, elem_id="tv-surprising")
    export = ExportRow()
    # closed until asked for: its controls, mounted with the tab, added ~0.25 s to the tab's first draw
    with gr.Accordion(token_table.TITLE, open=False, elem_id="tv-tt-box"):
        table = token_table.build(TABLE_CSS, TABLE_JS)
    return TokensTab(cat, sc, ac, pd_, surprising, export, table)


# points drawn in the magnitude/alignment scatter (Pearson r and the slope use every token): an SVG scatter of
# 4,000 markers takes longer to draw than the rest of the tab, and 1,500 took ~0.2 s of its first render
SCATTER_POINTS = 1000


def compute(run_id: str, step: int) -> tuple[dict[str, go.Figure], pd.DataFrame]:
    params = analyses.AnalysisParams(scatter_points=SCATTER_POINTS)
    results = analyses.run_all(run_id, step, params, only=list(NAMES) + ["surprising_tokens"])
    figs = {n: figures.build(n, results[n]) for n in NAMES}
    figs["surprising_tokens"] = figures.build("surprising_tokens", results["surprising_tokens"])
    return figs, results["surprising_tokens"]["tokens"]


def context_table(df: pd.DataFrame, cols: list, groups: dict[str, str], caption: str, empty: str) -> str:
    """Listed tokens in context (``tokviz.tables``), grouped by ``df.kind``: a labelled row per group (labels from
    ``groups``); ``empty``: what to say when there is none."""
    if df.empty:
        return f'<div class="tv-surprise-box">{html.escape(empty)}</div>'
    rows = []
    for kind, g in df.groupby("kind", sort=False):
        rows.append(f'<tr class="kind"><td colspan="{len(cols)}">{html.escape(groups.get(kind, kind))}</td></tr>')
        rows += tables.token_rows(g, cols)
    return tables.table(cols, rows, html.escape(caption))


def surprising_html(df: pd.DataFrame) -> str:
    """The surprising tokens: opposing then aligned, in context (``context_table``)."""
    return context_table(df, SURPRISE_COLS, {"opposing": "most opposing (lowest alignment)",
                                             "aligned": "most aligned (highest alignment)"},
                         "Most opposing and most aligned response tokens: click a row to open the token in Inspect.",
                         "no response tokens with an alignment at this step")


@memo.cached(entries=32)
def shown(run_id: str, step: int) -> tuple[tuple[go.Figure, ...], str]:
    """The figures as the tab shows them and the surprising tokens' table (cached: shared between sessions, not
    to be modified)."""
    figs, surprising = compute(run_id, step)
    return tuple(for_display(figs[n]) for n in NAMES), surprising_html(surprising)


def render(run_id: str | None, step: int | None, table_controls: list | None = None) -> tuple[list, dict]:
    """The tab's outputs for (run, step); ``table_controls``: the token table's control values (default: its
    first page, by sample)."""
    run_id, step = require_run_step(run_id, step)
    figs, surprising = shown(run_id, step)
    values = table_controls or ["sample", False, [], "", token_table.NO_RANGE, "", "", 50, 1]
    try:
        table_html, page = token_table.render(run_id, step, *values)
    except ValueError as e:      # a control of the table's own (a range end that is no number): the figures still show
        table_html, page = f'<div class="tv-surprise-cap">⚠️ {html.escape(str(e))}</div>', gr.skip()
    return [*figs, surprising, table_html, page], {}


def render_tab(t: TokensTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    return render(at.run, at.step, [got[c] for c in t.table.controls[:-1]] + [1])     # a new run/step: page 1


def wire(t: TokensTab, page: Page) -> None:
    """The export; a click on a surprising token (opening it in Inspect) is wired by the app (tokviz.ui)."""
    run, step = page.header.run, page.header.step

    @user_errors
    def export(run_id, step_):
        run_id, step_ = require_run_step(run_id, step_)
        figs, _ = compute(run_id, step_)
        return export_zip(figs, f"{run_id}-step{step_}-tokens")

    t.export.button.click(export, [run, step], t.export.file, api_visibility="private", **concurrency.EXPORT)
    token_table.wire(t.table, page)
