"""Compare runs: the cross-run figures (alignment over training, positional decay, Lorenz curves, token
categories, module types, autocorrelation) overlaid, and the summaries side by side, for any runs chosen
(each at its last traced step)."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from backend import figures, report
from tokviz.common import ExportRow, export_zip, for_display, user_errors

TITLES = {"alignment_evolution": "Alignment over training", "positional_decay": "Positional decay",
          "concentration": "Lorenz curves", "category_breakdown": "Token categories",
          "module_types": "Module types", "autocorrelation": "Autocorrelation"}


@dataclass
class CompareTab:
    runs: gr.Dropdown
    button: gr.Button
    plots: tuple[gr.Plot, ...]       # one per figures.COMPARE entry, in that order
    summary: gr.Dataframe
    export: ExportRow

    @property
    def inputs(self) -> list:
        return [self.runs]

    @property
    def outputs(self) -> list:
        return [self.runs, *self.plots, self.summary]


def build() -> CompareTab:
    with gr.Row(equal_height=True):
        runs = gr.Dropdown(label="Runs to compare (two or more)", multiselect=True, choices=[], elem_id="tv-cmp-runs",
                           scale=5, allow_custom_value=True)
        button = gr.Button("Compare", variant="primary", scale=0, min_width=140, elem_id="tv-cmp-go")
    plots = []
    names = list(figures.COMPARE)
    for i in range(0, len(names), 2):
        with gr.Row():
            for n in names[i:i + 2]:
                plots.append(gr.Plot(label=TITLES.get(n, n), elem_id=f"tv-cmp-{n}"))
    summary = gr.Dataframe(interactive=False, label="Summary by run", max_height=520, elem_id="tv-cmp-summary",
                           wrap=True)
    return CompareTab(runs, button, tuple(plots), summary, ExportRow())


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
        empty = [gr.skip()] * len(figures.COMPARE)
        return [gr.update(choices=choices, value=runs), *empty, pd.DataFrame()], \
            {"notice": "⚠️ Compare runs needs at least two runs with traced steps"}
    figs, tbl = compare(runs)
    return [gr.update(choices=choices, value=runs)] + [for_display(figs[n]) for n in figures.COMPARE] + \
        [summary_update(tbl)], {}


def wire(t: CompareTab) -> None:
    @user_errors
    def go(runs):
        figs, tbl = compare(runs)
        return [for_display(figs[n]) for n in figures.COMPARE] + [summary_update(tbl)]

    t.button.click(go, [t.runs], [*t.plots, t.summary], api_name="compare_runs")

    @user_errors
    def export(runs):
        figs, _ = compare(runs)
        return export_zip(figs, "compare-" + "-vs-".join(r[:24] for r in runs))

    t.export.button.click(export, [t.runs], t.export.file, api_visibility="private")
