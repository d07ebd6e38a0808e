"""The Training tab's panel of embedding token gradients (a train run with ``--embgrad-every N``): the metrics
over the recorded steps and a bar chart of the top tokens at a chosen step, with their text."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from backend.analysis import embgrad
from tokviz import concurrency
from tokviz.common import as_int, empty_figure, for_display, user_errors
from tokviz.header import Page

NONE = "this run recorded no embedding gradients (train with --embgrad-every N)"


@dataclass
class EmbgradPanel:
    step: gr.Dropdown
    metrics: gr.Plot
    top: gr.Plot

    @property
    def inputs(self) -> list:
        return [self.step]

    @property
    def outputs(self) -> list:
        return [self.step, self.metrics, self.top]


def build() -> EmbgradPanel:
    with gr.Accordion("Embedding token gradients ||dL/dE_v||", open=True, elem_id="tv-embgrad-box"):
        step = gr.Dropdown(label="Top tokens at step", choices=[], elem_id="tv-embgrad-step",
                           allow_custom_value=True)
        metrics = gr.Plot(label="Metrics over training", elem_id="tv-embgrad-metrics")
        top = gr.Plot(label="Top tokens", elem_id="tv-embgrad-top")
    return EmbgradPanel(step, metrics, top)


def render(run_id: str, step: object) -> list:
    """Values for the panel's outputs: the step list, the metrics, the top tokens at ``step`` (default: last)."""
    steps_df = embgrad.embgrad_steps(run_id)
    if steps_df.empty:
        return [gr.update(choices=[], value=None), empty_figure(NONE), empty_figure(NONE)]
    steps = [int(s) for s in steps_df["step"]]
    s = as_int(step, "step")
    s = s if s in steps else steps[-1]
    return [gr.update(choices=steps, value=s), for_display(embgrad.metrics_figure(steps_df)),
            for_display(embgrad.top_tokens_figure(embgrad.top_tokens(run_id, s), s))]


def wire(p: EmbgradPanel, page: Page) -> None:
    @user_errors
    def on_step(run_id, step):
        if not run_id:
            raise ValueError("choose a run first")
        return render(run_id, step)[2]

    p.step.input(on_step, [page.header.run, p.step], p.top, api_visibility="private", **concurrency.RENDER)
