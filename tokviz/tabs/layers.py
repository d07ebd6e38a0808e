"""Layers & positions: layer x position heatmap (all modules or one), step x position heatmap, module-type
comparison, LoRA A/B magnitudes, and (opened on demand: it scans every module row of several steps) each
(layer, module)'s share of the update early, midway and late in training."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import gradio as gr
import plotly.graph_objects as go

from backend.analysis import analyses, figures
from backend.index import memo, queries
from tokviz import concurrency
from tokviz.common import At, ExportRow, export_zip, for_display, require_run_step, user_errors
from tokviz.context import AppContext
from tokviz.header import Page

ALL = "all modules"


@dataclass
class LayersTab:
    module: gr.Dropdown
    layer_position: gr.Plot
    step_position: gr.Plot
    module_types: gr.Plot
    lora_ab: gr.Plot
    more: gr.Accordion
    more_open: gr.State
    contribution: gr.Plot
    export: ExportRow

    @property
    def inputs(self) -> list:
        return [self.module, self.more_open]

    @property
    def outputs(self) -> list:
        return [self.module, self.layer_position, self.step_position, self.module_types, self.lora_ab,
                self.contribution]


def build(ctx: AppContext) -> LayersTab:
    module = gr.Dropdown(label="Layer x position heatmap: module type", choices=[ALL], value=ALL,
                         elem_id="tv-layers-module", allow_custom_value=True)
    with gr.Row():
        lp = gr.Plot(label="Layer x response position", elem_id="tv-layer-position")
        sp = gr.Plot(label="Step x response position", elem_id="tv-step-position")
    with gr.Row():
        mt = gr.Plot(label="Module types", elem_id="tv-module-types")
        ab = gr.Plot(label="LoRA A vs B", elem_id="tv-lora-ab")
    with gr.Accordion("Share of the update per layer and module, early / middle / late in training", open=False,
                      elem_id="tv-contribution-box") as more:
        contribution = gr.Plot(label="Share of the update per layer and module", elem_id="tv-contribution")
    return LayersTab(module, lp, sp, mt, ab, more, gr.State(False), contribution, ExportRow())


QUICK = ("layer_position_heatmap", "step_position_heatmap", "module_types", "lora_ab")
SLOW = "layer_module_contribution"


def make_figures(run_id: str, step: int, module: str | None, with_contribution: bool = True
                 ) -> dict[str, go.Figure]:
    params = analyses.AnalysisParams(module=None if module in (None, ALL) else module)
    names = list(QUICK) + ([SLOW] if with_contribution else [])
    results = analyses.run_all(run_id, step, params, only=names)
    return {n: figures.build(n, results[n]) for n in names}


def render(run_id: str | None, step: int | None, module: str | None, more_open: bool = False
           ) -> tuple[list, dict]:
    run_id, step = require_run_step(run_id, step)
    mods = queries.module_names(run_id, step)
    if module not in mods:
        module = ALL
    figs = shown(run_id, step, module, bool(more_open))
    contribution = figs[SLOW] if SLOW in figs else gr.skip()
    return [gr.update(choices=[ALL] + mods, value=module)] + [figs[n] for n in QUICK] + [contribution], {}


@memo.cached(entries=32)
def shown(run_id: str, step: int, module: str | None, with_contribution: bool) -> dict[str, go.Figure]:
    """``make_figures`` sized for the page (cached: shared between sessions, not to be modified)."""
    return {n: for_display(f) for n, f in make_figures(run_id, step, module, with_contribution).items()}


@memo.cached(entries=32)
def position_heatmap(run_id: str, step: int, module: str | None) -> go.Figure:
    """The layer x position heatmap of one module (None or ALL: every module), sized for the page (cached)."""
    params = analyses.AnalysisParams(module=None if module in (None, ALL) else module)
    return for_display(figures.build("layer_position_heatmap",
                                     analyses.run("layer_position_heatmap", run_id, step, params)))


def render_tab(t: LayersTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    return render(at.run, at.step, got[t.module], got[t.more_open])


def wire(t: LayersTab, page: Page) -> None:
    run, step = page.header.run, page.header.step

    @user_errors
    def on_module(run_id, step_, module):
        run_id, step_ = require_run_step(run_id, step_)
        return position_heatmap(run_id, step_, module)

    t.module.input(on_module, [run, step, t.module], t.layer_position, api_name="layer_position_heatmap",
                   **concurrency.RENDER)

    @user_errors
    def on_expand(run_id, step_):
        run_id, step_ = require_run_step(run_id, step_)
        return True, for_display(figures.build(SLOW, analyses.run(SLOW, run_id, step_)))

    t.more.expand(on_expand, [run, step], [t.more_open, t.contribution], api_name="layer_module_contribution",
                  **concurrency.RENDER)
    t.more.collapse(lambda: False, None, t.more_open, api_visibility="private", show_progress="hidden",
                    **concurrency.UI)

    @user_errors
    def export(run_id, step_, module):
        run_id, step_ = require_run_step(run_id, step_)
        return export_zip(make_figures(run_id, step_, module), f"{run_id}-step{step_}-layers")

    t.export.button.click(export, [run, step, t.module], t.export.file, api_visibility="private",
                          **concurrency.EXPORT)
