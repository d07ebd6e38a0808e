"""Concentration: Lorenz curves of response-token gradient magnitude (several steps, or several runs,
overlaid), the Gini coefficient over training, and the fraction of tokens that holds 50/80/90% of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from backend.analysis import analyses, figures
from backend.index import memo, queries
from tokviz import concurrency
from tokviz.common import At, ExportRow, export_zip, for_display, require_run_step, table, user_errors
from tokviz.context import AppContext
from tokviz.header import Page

STAT_COLS = ["run", "step", "n", "gini", "tokens_for_50pct", "tokens_for_80pct", "tokens_for_90pct"]


@dataclass
class ConcentrationTab:
    steps: gr.Dropdown
    runs: gr.Dropdown
    lorenz: gr.Plot
    over_training: gr.Plot
    stats: gr.Dataframe
    export: ExportRow

    @property
    def inputs(self) -> list:
        return [self.steps, self.runs]

    @property
    def outputs(self) -> list:
        return [self.steps, self.lorenz, self.over_training, self.stats]


def build(ctx: AppContext) -> ConcentrationTab:
    with gr.Row():
        steps = gr.Dropdown(label="Lorenz curves at these traced steps (the header's step when empty)",
                            multiselect=True, choices=[], elem_id="tv-conc-steps", scale=2,
                            allow_custom_value=True)
        runs = gr.Dropdown(label="Overlay other runs (each at its last traced step)", multiselect=True, choices=[],
                           elem_id="tv-conc-runs", scale=3, allow_custom_value=True)
    with gr.Row():
        lorenz = gr.Plot(label="Lorenz curves", elem_id="tv-lorenz")
        over = gr.Plot(label="Gini and tokens for 50/80/90% over training", elem_id="tv-gini")
    stats = gr.Dataframe(headers=STAT_COLS, interactive=False, label="Concentration per run and step",
                         max_height=300, elem_id="tv-conc-stats")
    return ConcentrationTab(steps, runs, lorenz, over, stats, ExportRow())


def _label(run_id: str) -> str:
    info = queries.run_info(run_id).iloc[0]
    return str(info["name"] or run_id)


def make_figures(run_id: str, step: int, steps: list[int] | None, others: list[str] | None
                 ) -> tuple[dict[str, go.Figure], pd.DataFrame]:
    """Lorenz curves (the run at ``steps``, or at ``step``, plus each other run at its last step), and the
    concentration stats at every traced step of every run shown."""
    runs = [run_id] + [r for r in (others or []) if r != run_id]
    labels = {r: _label(r) for r in runs}
    if len(set(labels.values())) < len(labels):
        labels = {r: r for r in runs}
    lorenz, stats, modes = [], [], []
    for r in runs:
        traced = queries.traced_steps(r)
        if not traced:
            raise ValueError(f"run {r!r} has no traced steps to measure")
        frames = {s: analyses.run("concentration", r, s) for s in traced}
        for s in traced:
            stats.append(frames[s]["stats"].assign(run=labels[r], step=s))
            modes.append(frames[s]["mode"])
        at = [s for s in (steps or [step]) if s in traced] if r == run_id else [traced[-1]]
        for s in at:
            fr = frames[s]
            name = f"{labels[r]} · step {s}" if len(runs) > 1 else f"step {s}"
            lorenz.append((fr["lorenz"].assign(run=name), fr["stats"].assign(run=name)))
    lz = pd.concat([a for a, _ in lorenz], ignore_index=True)
    lz_stats = pd.concat([b for _, b in lorenz], ignore_index=True)
    all_stats = pd.concat(stats, ignore_index=True)
    over = all_stats if len(runs) > 1 else all_stats.drop(columns="run")
    mode = pd.concat(modes, ignore_index=True)     # the titles name the trace mode(s) of the runs shown
    figs = {"lorenz": figures.name_mode(figures.lorenz_curve(lz, lz_stats), mode), "concentration_over_training":
            figures.name_mode(figures.concentration_over_training(over), mode)}
    return figs, all_stats[STAT_COLS]


def render(run_id: str | None, step: int | None, steps: list[int] | None, others: list[str] | None
           ) -> tuple[list, dict]:
    run_id, step = require_run_step(run_id, step)
    traced = queries.traced_steps(run_id)
    steps = [s for s in (steps or []) if s in traced]
    figs, stats = shown(run_id, step, steps, others)
    return [gr.update(choices=traced, value=steps)] + list(figs) + [stats], {}


@memo.cached(entries=32)
def shown(run_id: str, step: int, steps: list[int], others: list[str] | None
          ) -> tuple[tuple[go.Figure, ...], pd.DataFrame]:
    """``make_figures`` as the tab shows them (cached: shared between sessions, not to be modified)."""
    figs, stats = make_figures(run_id, step, list(steps), list(others or []))
    return tuple(for_display(f) for f in figs.values()), table(stats)


def render_tab(t: ConcentrationTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    return render(at.run, at.step, got[t.steps], got[t.runs])


def wire(t: ConcentrationTab, page: Page) -> None:
    run, step = page.header.run, page.header.step
    page.follow_runs(t.runs)

    @user_errors
    def update(run_id, step_, steps, others):
        values, _ = render(run_id, step_, steps, others)
        return values[1:]

    for c in (t.steps, t.runs):
        c.input(update, [run, step, t.steps, t.runs], [t.lorenz, t.over_training, t.stats],
                api_name="concentration" if c is t.steps else None,
                api_visibility="public" if c is t.steps else "private", **concurrency.RENDER)

    @user_errors
    def export(run_id, step_, steps, others):
        run_id, step_ = require_run_step(run_id, step_)
        figs, _ = make_figures(run_id, step_, steps, others)
        return export_zip(figs, f"{run_id}-step{step_}-concentration")

    t.export.button.click(export, [run, step, t.steps, t.runs], t.export.file, api_visibility="private",
                          **concurrency.EXPORT)
