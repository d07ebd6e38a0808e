"""Compare runs: the cross-run figures (alignment over training, positional decay, Lorenz curves, token
categories, module types, autocorrelation) overlaid, and the summaries side by side, for any runs chosen
(each at its last traced step). The six figures are drawn as one grid (``figures.grid``): the browser draws one
figure of six panels ~0.35 s faster than six figures; the export holds them one by one."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd
import plotly.io as pio
from gradio.components.plot import PlotData
from plotly.graph_objects import Figure

from backend import figures, report
from tokviz.common import ExportRow, export_zip, for_display, user_errors

@dataclass
class CompareTab:
    runs: gr.Dropdown
    button: gr.Button
    grid: gr.Plot                    # figures.COMPARE as one grid figure
    summary: gr.Dataframe
    export: ExportRow

    @property
    def inputs(self) -> list:
        return [self.runs]

    @property
    def outputs(self) -> list:
        return [self.runs, self.grid, self.summary]


def build() -> CompareTab:
    with gr.Row(equal_height=True):
        runs = gr.Dropdown(label="Runs to compare (two or more)", multiselect=True, choices=[], elem_id="tv-cmp-runs",
                           scale=5, allow_custom_value=True)
        button = gr.Button("Compare", variant="primary", scale=0, min_width=140, elem_id="tv-cmp-go")
    grid = gr.Plot(label="Runs overlaid", elem_id="tv-cmp-grid")
    summary = gr.Dataframe(interactive=False, label="Summary by run", max_height=520, elem_id="tv-cmp-summary",
                           wrap=True)
    return CompareTab(runs, button, grid, summary, ExportRow())


def default_runs(run_id: str | None, choices: list[tuple[str, str]]) -> list[str]:
    """The header's run and the newest other traced run."""
    ids = [v for _, v in choices]
    picked = [run_id] if run_id in ids else []
    return picked + [i for i in ids if i not in picked][: 2 - len(picked)]


def compare(run_ids: list[str]) -> tuple[dict, pd.DataFrame]:
    if not run_ids or len(run_ids) < 2:
        raise ValueError("choose at least two runs to compare")
    figs, tbl, _ = report.compare_indexed(list(run_ids))
    return figs, tbl.map(_fmt).reset_index()


def grid_figure(figs: dict[str, Figure]) -> PlotData:
    """The six comparison figures as one grid, sized by the page (the legend below the panels). Sent as the
    grid's JSON: its parts were validated when each figure was built."""
    d = figures.grid([figs[n] for n in figures.COMPARE])
    d["layout"].update(autosize=True, height=1320)
    return PlotData(type="plotly", plot=pio.to_json(d, validate=False))


def summary_update(tbl: pd.DataFrame) -> gr.Dataframe:
    """The summary table with fixed column widths (a long cell, e.g. the per-category JSON, would otherwise
    widen every column to the page and hide all runs but the first behind a scroll)."""
    return gr.Dataframe(value=tbl, column_widths=["230px"] + ["360px"] * (len(tbl.columns) - 1))


def _fmt(v: object) -> str:
    """A summary value as a short string (4 significant digits for numbers)."""
    if isinstance(v, float):
        return "" if v != v else f"{v:.4g}"
    return "" if v is None else str(v)


def render(run_id: str | None, step: int | None, runs: list[str] | None, choices: list[tuple[str, str]]
           ) -> tuple[list, dict]:
    runs = [r for r in (runs or []) if r in {v for _, v in choices}] or default_runs(run_id, choices)
    if len(runs) < 2:
        return [gr.update(choices=choices, value=runs), gr.skip(), pd.DataFrame()], \
            {"notice": "⚠️ Compare runs needs at least two runs with traced steps"}
    figs, tbl = compare(runs)
    return [gr.update(choices=choices, value=runs), grid_figure(figs), summary_update(tbl)], {}


def wire(t: CompareTab) -> None:
    @user_errors
    def go(runs):
        figs, tbl = compare(runs)
        return grid_figure(figs), summary_update(tbl)

    t.button.click(go, [t.runs], [t.grid, t.summary], api_name="compare_runs")

    @user_errors
    def export(runs):
        figs, _ = compare(runs)
        return export_zip(figs, "compare-" + "-vs-".join(r[:24] for r in runs))

    t.export.button.click(export, [t.runs], t.export.file, api_visibility="private")
