"""Tokens: alignment by token category, magnitude vs alignment, autocorrelation along the response,
positional decay, and the most surprising tokens (a row click opens that token in Inspect)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import plotly.graph_objects as go

from backend import analyses, figures
from tokviz.common import ExportRow, export_zip, for_display, require_run_step, table, user_errors
from tokviz.overlay import _show

NAMES = ("category_breakdown", "magnitude_alignment", "autocorrelation", "positional_decay")
SURPRISE_COLS = ["kind", "rank", "sample_idx", "position", "token", "category", "alignment", "magnitude", "loss",
                 "prob", "context_before", "context_after"]


@dataclass
class TokensTab:
    category: gr.Plot
    scatter: gr.Plot
    autocorr: gr.Plot
    decay: gr.Plot
    surprising: gr.Dataframe
    export: ExportRow

    @property
    def inputs(self) -> list:
        return []

    @property
    def outputs(self) -> list:
        return [self.category, self.scatter, self.autocorr, self.decay, self.surprising]


def build() -> TokensTab:
    with gr.Row():
        cat = gr.Plot(label="By category", elem_id="tv-category")
        sc = gr.Plot(label="Magnitude vs alignment", elem_id="tv-scatter")
    with gr.Row():
        ac = gr.Plot(label="Autocorrelation", elem_id="tv-autocorr")
        pd_ = gr.Plot(label="Positional decay", elem_id="tv-decay")
    surprising = gr.Dataframe(headers=SURPRISE_COLS, interactive=False, max_height=420, elem_id="tv-surprising",
                              label="Most opposing and most aligned tokens: click a row to open it in Inspect")
    return TokensTab(cat, sc, ac, pd_, surprising, ExportRow())


# points drawn in the magnitude/alignment scatter (Pearson r and the slope use every token): an SVG scatter of
# 4,000 markers takes longer to draw than the rest of the tab
SCATTER_POINTS = 1500


def compute(run_id: str, step: int) -> tuple[dict[str, go.Figure], object]:
    params = analyses.AnalysisParams(scatter_points=SCATTER_POINTS)
    results = analyses.run_all(run_id, step, params, only=list(NAMES) + ["surprising_tokens"])
    figs = {n: figures.build(n, results[n]) for n in NAMES}
    surprising = results["surprising_tokens"]["tokens"].copy()
    figs["surprising_tokens"] = figures.build("surprising_tokens", results["surprising_tokens"])
    for c in ("token", "context_before", "context_after"):
        surprising[c] = surprising[c].map(lambda s: _show(str(s))[1:-1] if c != "token" else _show(str(s)))
    return figs, table(surprising[SURPRISE_COLS])


def render(run_id: str | None, step: int | None) -> tuple[list, dict]:
    run_id, step = require_run_step(run_id, step)
    figs, surprising = compute(run_id, step)
    return [for_display(figs[n]) for n in NAMES] + [surprising], {}


def wire(t: TokensTab, run: gr.Dropdown, step: gr.Dropdown) -> None:
    @user_errors
    def export(run_id, step_):
        run_id, step_ = require_run_step(run_id, step_)
        figs, _ = compute(run_id, step_)
        return export_zip(figs, f"{run_id}-step{step_}-tokens")

    t.export.button.click(export, [run, step], t.export.file, api_visibility="private")
