"""Influence: which training tokens help or hurt the held-out (eval) loss at a traced step of a run trained with
``--influence-eval N`` (``backend.analysis.influence``): the step's cos(G, G_eval), the tokens that help and hurt
most (a row click opens the token in Inspect), influence by category, the aligned-vs-helpful quadrants, and the
same over training. A run without influence gets a line saying how to record it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from backend.analysis import analyses, figures
from backend.analysis.influence import HOW
from tokviz import concurrency
from tokviz.common import At, ExportRow, empty_figure, export_zip, for_display, require_run_step, user_errors
from tokviz.context import AppContext
from tokviz.header import Page
from tokviz.tabs.tokens import TABLE_CSS, TABLE_JS, context_table

NAMES = ("influence_over_training", "influence_quadrants", "influence_by_category", "influence_tokens")
SIGN = ("Influence = ⟨the token's part of the update, G_eval⟩, G_eval the gradient of the mean held-out loss: "
        "a plain SGD step changes the eval loss by −lr × influence, so **positive helps** (lowers the eval loss) "
        "and negative hurts.")
# the help/hurt table: (header, column, number format or None for text)
COLS = [("", "rank", "d"), ("sample", "sample_idx", "d"), ("position", "position", "d"),
        ("token in context", "token", None), ("category", "category", None), ("influence", "influence", "+.4g"),
        ("influence alignment", "influence_alignment", "+.4f"), ("alignment with G", "alignment", "+.4f"),
        ("loss", "loss", ".4g")]
SCATTER_POINTS = 1000       # points drawn in the quadrant scatter (the counts use every token): see tokens.py


@dataclass
class InfluenceTab:
    summary: gr.Markdown
    over_training: gr.Plot
    quadrants: gr.Plot
    category: gr.Plot
    tokens: gr.Plot
    table: gr.HTML
    export: ExportRow

    @property
    def inputs(self) -> list:
        return []

    @property
    def outputs(self) -> list:
        return [self.summary, self.over_training, self.quadrants, self.category, self.tokens, self.table]

    @property
    def token_links(self) -> list[gr.HTML]:
        """The HTML tables whose row click (``{sample, position}``) opens a token in Inspect (``tokviz.ui``)."""
        return [self.table]


def build(ctx: AppContext) -> InfluenceTab:
    summary = gr.Markdown("", elem_id="tv-infl-summary")
    with gr.Row():
        over = gr.Plot(label="Over training", elem_id="tv-infl-over")
        quads = gr.Plot(label="Aligned vs helpful", elem_id="tv-infl-quadrants")
    with gr.Row():
        cat = gr.Plot(label="By category", elem_id="tv-infl-category")
        tok = gr.Plot(label="Help and hurt most", elem_id="tv-infl-tokens")
    table = gr.HTML("", css_template=TABLE_CSS, js_on_load=TABLE_JS, elem_id="tv-infl-table")
    return InfluenceTab(summary, over, quads, cat, tok, table, ExportRow())


def available(run_id: str) -> bool:
    """Whether the run recorded influence (the analyses' own ``available`` check)."""
    return "influence_tokens" in analyses.names("train", run_id=run_id)


def compute(run_id: str, step: int) -> tuple[dict[str, go.Figure], dict[str, analyses.Frames]]:
    params = analyses.AnalysisParams(scatter_points=SCATTER_POINTS)
    results = analyses.run_all(run_id, step, params, only=list(NAMES))
    return {n: figures.build(n, results[n]) for n in NAMES}, results


def summary_md(steps: pd.DataFrame, step: int) -> str:
    """The step's headline: cos(G, G_eval), <G, G_eval>, the eval loss and set; then what the sign means."""
    at = steps[steps["step"] == step]
    if at.empty:
        return f"Step {step} has no influence row.\n\n{SIGN}"
    r = at.iloc[0]
    helps = "helps" if r["g_dot_eval"] > 0 else "hurts"
    return (f"**Step {step}**: cos(G, G_eval) = **{r['eval_cosine']:+.4f}**, ⟨G, G_eval⟩ = {r['g_dot_eval']:+.4g} "
            f"(the whole update {helps} the eval loss to first order); eval loss {r['eval_loss']:.4f} over "
            f"{int(r['eval_examples'])} held-out examples ({int(r['eval_tokens'])} response tokens), "
            f"‖G_eval‖ = {r['eval_grad_norm']:.4g}; {r['frac_hurts']:.1%} of the response tokens hurt, "
            f"{int(r['n_aligned_hurts'])} of them aligned with G.\n\n{SIGN}")


def table_html(df: pd.DataFrame) -> str:
    """The tokens that help most, then those that hurt most, each in its context (``tokens.context_table``)."""
    return context_table(df, COLS, {"helps": "help most (largest influence: lower the eval loss)",
                                    "hurts": "hurt most (most negative influence: raise the eval loss)"},
                         "Training tokens that help and hurt the held-out loss most: click a row to open the token "
                         "in Inspect.", "no response token with a non-zero influence at this step")


def render(run_id: str | None, step: int | None) -> tuple[list, dict]:
    """The tab's outputs for (run, step); for a run without influence, a line saying how to record it."""
    run_id, step = require_run_step(run_id, step)
    if not available(run_id):
        blank = for_display(empty_figure("no influence data in this run"))
        return [f"⚠️ Run `{run_id}` has no influence data: {HOW}.\n\n{SIGN}", blank, blank, blank, blank, ""], {}
    figs, results = compute(run_id, step)
    return ([summary_md(results["influence_over_training"]["steps"], step)]
            + [for_display(figs[n]) for n in NAMES] + [table_html(results["influence_tokens"]["tokens"])], {})


def render_tab(t: InfluenceTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    return render(at.run, at.step)


def wire(t: InfluenceTab, page: Page) -> None:
    """The export; a click on a row of the table (opening the token in Inspect) is wired by the app (tokviz.ui)."""
    run, step = page.header.run, page.header.step

    @user_errors
    def export(run_id, step_):
        run_id, step_ = require_run_step(run_id, step_)
        figs, _ = compute(run_id, step_)
        return export_zip(figs, f"{run_id}-step{step_}-influence")

    t.export.button.click(export, [run, step], t.export.file, api_visibility="private", **concurrency.EXPORT)
