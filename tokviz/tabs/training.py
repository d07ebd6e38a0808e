"""Training: the loss curve (scheme loss, cross-entropy, learning rate), alignment of response tokens over
the traced steps, gradient norms, and the run's evaluation and config."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from backend.analysis import analyses, figures
from backend.index import memo, queries
from tokviz import concurrency
from tokviz.common import At, ExportRow, empty_figure, export_zip, for_display, user_errors
from tokviz.context import AppContext
from tokviz.header import Page
from tokviz.tabs import embgrad_panel


@dataclass
class TrainingTab:
    summary: gr.Markdown
    loss: gr.Plot
    evolution: gr.Plot
    magnitude: gr.Plot
    config: gr.JSON
    export: ExportRow
    embgrad: embgrad_panel.EmbgradPanel

    @property
    def inputs(self) -> list:
        return self.embgrad.inputs

    @property
    def outputs(self) -> list:
        return [self.summary, self.loss, self.evolution, self.magnitude, self.config] + self.embgrad.outputs


def build(ctx: AppContext) -> TrainingTab:
    summary = gr.Markdown("", elem_id="tv-train-summary")
    loss = gr.Plot(label="Loss", elem_id="tv-loss")
    with gr.Row():
        evolution = gr.Plot(label="Alignment over training", elem_id="tv-evolution")
        magnitude = gr.Plot(label="Gradient magnitude", elem_id="tv-magnitude")
    emb = embgrad_panel.build()
    with gr.Accordion("Run config and manifest", open=False):
        config = gr.JSON(label="config.json and manifest.json", elem_id="tv-config")
    return TrainingTab(summary, loss, evolution, magnitude, config, ExportRow(), emb)


def make_figures(run_id: str) -> dict[str, go.Figure]:
    figs = {"loss_curve": figures.loss_curve(queries.train_steps(run_id))}
    if queries.traced_steps(run_id):
        res = analyses.run_all(run_id, only=["alignment_evolution", "gradient_magnitude"])
        figs["alignment_evolution"] = figures.build("alignment_evolution", res["alignment_evolution"])
        figs["gradient_magnitude"] = figures.build("gradient_magnitude", res["gradient_magnitude"])
    return figs


def eval_md(greedy: pd.DataFrame, before: dict | None) -> str:
    """Greedy eval accuracy after training, beside the accuracy before it when the run measured that, else a word
    on how to (the base model's evaluation is off by default: it costs a second evaluation pass)."""
    if not len(greedy):
        return "no evaluation"
    after = f"{greedy['correct'].mean():.1%}"
    if isinstance(before, dict) and before.get("accuracy") is not None:
        return (f"eval accuracy (greedy, {len(greedy)} items): before training {before['accuracy']:.1%} → "
                f"after {after}")
    return (f"eval accuracy (greedy, {len(greedy)} items): before training not measured (train with "
            f"`--eval-before`) → after {after}")


def summary_md(run_id: str) -> tuple[str, dict]:
    info = queries.run_info(run_id).iloc[0]
    manifest = json.loads(info["manifest_json"]) if isinstance(info["manifest_json"], str) else {}
    config = json.loads(info["config_json"]) if isinstance(info["config_json"], str) else {}
    ev = queries.eval_rows(run_id)
    greedy = ev[ev["sample_k"] == -1] if len(ev) else ev
    acc = eval_md(greedy, manifest.get("eval_before"))
    steps = queries.train_steps(run_id)
    last = f"{steps['loss'].iloc[-1]:.4f} at step {int(steps['step'].iloc[-1])}" if len(steps) else "no steps"
    cfg = config.get("config", {}) if isinstance(config.get("config"), dict) else {}
    data = info["dataset"] or cfg.get("dataset") or cfg.get("task")
    data = f" · data `{data}`" if isinstance(data, str) and data else ""      # unknown: left out, not "?"
    md = (f"**{info['name'] or run_id}** · status **{info['status']}** · model `{info['model']}`{data} · scheme "
          f"`{info['scheme']}` · final loss {last} · {acc}")
    return md, {"config": config, "manifest": manifest}


@memo.cached(entries=32)
def shown(run_id: str) -> tuple[str, go.Figure, go.Figure, go.Figure, dict]:
    """The summary line, the three figures as the tab shows them and the run's config (cached: shared between
    sessions, not to be modified)."""
    figs = make_figures(run_id)
    md, cfg = summary_md(run_id)
    none = empty_figure("this run has no traced steps")
    return (md, for_display(figs["loss_curve"]),
            for_display(figs["alignment_evolution"]) if "alignment_evolution" in figs else none,
            for_display(figs["gradient_magnitude"]) if "gradient_magnitude" in figs else none, cfg)


def render(run_id: str | None, step: int | None, embgrad_step: object = None) -> tuple[list, dict]:
    if not run_id:
        raise ValueError("choose a run first (no run is selected)")
    return [*shown(run_id)] + embgrad_panel.render(run_id, embgrad_step), {}


def render_tab(t: TrainingTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    return render(at.run, at.step, got[t.embgrad.step])


def wire(t: TrainingTab, page: Page) -> None:
    embgrad_panel.wire(t.embgrad, page)

    @user_errors
    def export(run_id):
        if not run_id:
            raise ValueError("choose a run first")
        return export_zip(make_figures(run_id), f"{run_id}-training")

    t.export.button.click(export, [page.header.run], t.export.file, api_visibility="private",
                          **concurrency.EXPORT)
