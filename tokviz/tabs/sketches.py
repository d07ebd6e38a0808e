"""Sketches: the directions of the tokens' gradient pieces at a traced step of a run trained with
``--trace-sketch-dim K`` (``backend.analysis.sketches``): a 2-D PCA of the step's sketches coloured by category,
alignment or sample (hover: the token in context), and "tokens whose gradient points like this one": the top-k
cosine neighbours of a chosen token (a row click opens it in Inspect). A run without sketches gets a line saying
how to record them."""
from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from backend.analysis import analyses, sketches
from backend.index import queries
from tokviz import concurrency, tables
from tokviz.common import At, as_int, empty_figure, for_display, require_run_step, user_errors
from tokviz.context import AppContext
from tokviz.header import Page
from tokviz.tabs.tokens import TABLE_CSS, TABLE_JS

COLS = [("", "rank", "d"), ("sample", "sample_idx", "d"), ("position", "position", "d"),
        ("token in context", "token", None), ("category", "category", None), ("cosine", "cosine", "+.3f"),
        ("alignment with G", "alignment", "+.4f"), ("magnitude", "magnitude", ".4g")]
SCATTER_POINTS = 1500


@dataclass
class SketchesTab:
    summary: gr.Markdown
    color: gr.Radio
    pca: gr.Plot
    sample: gr.Number
    position: gr.Number
    top_k: gr.Number
    find: gr.Button
    table: gr.HTML

    @property
    def inputs(self) -> list:
        return [self.color]

    @property
    def outputs(self) -> list:
        return [self.summary, self.pca, self.table]

    @property
    def token_links(self) -> list[gr.HTML]:
        """The neighbours table: a row click (``{sample, position}``) opens the token in Inspect (tokviz.ui)."""
        return [self.table]


def build(ctx: AppContext) -> SketchesTab:
    summary = gr.Markdown("", elem_id="tv-sk-summary")
    color = gr.Radio(list(sketches.COLOR_BY), value="category", label="Colour by", elem_id="tv-sk-color")
    pca = gr.Plot(label="PCA of the gradient sketches", elem_id="tv-sk-pca")
    with gr.Row():
        sample = gr.Number(label="sample", precision=0, elem_id="tv-sk-sample")
        position = gr.Number(label="position", precision=0, elem_id="tv-sk-position")
        top_k = gr.Number(value=10, label="neighbours", precision=0, minimum=1, maximum=200, elem_id="tv-sk-k")
        find = gr.Button("Tokens whose gradient points like this one", elem_id="tv-sk-find")
    table = gr.HTML("", css_template=TABLE_CSS, js_on_load=TABLE_JS, elem_id="tv-sk-table")
    return SketchesTab(summary, color, pca, sample, position, top_k, find, table)


def available(run_id: str) -> bool:
    return "sketch_pca" in analyses.names("train", run_id=run_id)


def summary_md(frames: analyses.Frames, step: int, kind: str = "gaussian") -> str:
    """The step's sketch summary; ``kind``: the run's projection (``trace_sketch_kind``), which sets the error."""
    info = frames["info"].iloc[0]
    k = int(info["k"])
    bound = sketches.error_bound(kind, k)
    error = (f"with an error of standard deviation at most {bound:.2f} (the {kind} projection's worst case, one "
             f"LoRA matrix; about 1/√k = {k ** -0.5:.2f} when the piece spreads over many)" if bound is not None else
             "with an error that does not fall below a floor set by the activations (the sparse projection: "
             "docs/sketches.md)")
    return (f"**Step {step}**: {int(info['n'])} traced positions, sketches of dimension k = {k}. Each point is the "
            f"direction of a token's piece of the update (PCA of the unit sketches). Sketch cosines estimate the "
            f"pieces' cosines {error}.")


def neighbours_html(df: pd.DataFrame, sample: int, position: int) -> str:
    """The neighbours, each token in its context (text escaped); a row click opens it in Inspect."""
    if df.empty:
        return '<div class="tv-surprise-box">no other traced position with a sketch at this step</div>'
    caption = (f"Tokens whose gradient piece points most like that of sample {sample}, position {position} "
               "(cosine of the sketches): click a row to open the token in Inspect.")
    rows = tables.token_rows(df.assign(rank=range(1, len(df) + 1)), COLS)
    return tables.table(COLS, rows, html.escape(caption))


def render(run_id: str | None, step: int | None, color: str = "category") -> tuple[list, dict]:
    """The tab's outputs for (run, step); for a run without sketches, a line saying how to record them."""
    run_id, step = require_run_step(run_id, step)
    if not available(run_id):
        blank = for_display(empty_figure("no gradient sketches in this run"))
        return [f"⚠️ Run `{run_id}` has no gradient sketches: {sketches.HOW}.", blank, ""], {}
    frames = analyses.run("sketch_pca", run_id, step, analyses.AnalysisParams(scatter_points=SCATTER_POINTS))
    kind = sketches.run_sketch_kind(None, run_id)
    return [summary_md(frames, step, kind), for_display(sketches.pca_figure(frames, color or "category")), ""], {}


def render_tab(t: SketchesTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    return render(at.run, at.step, got[t.color])


def find_neighbours(run_id: str | None, step: int | None, sample: Any, position: Any, top_k: Any) -> str:
    run_id, step = require_run_step(run_id, step)
    s, p, k = as_int(sample, "sample"), as_int(position, "position"), as_int(top_k, "neighbours")
    if s is None or p is None:
        raise ValueError("enter a sample and a position (a traced token of this step) first")
    with queries.cursor(None) as cur:
        df = sketches.neighbours(cur, run_id, step, s, p, k or 10)
    return neighbours_html(df, s, p)


def wire(t: SketchesTab, page: Page) -> None:
    """Colour changes redraw the PCA; the button lists the chosen token's neighbours. A click on a neighbour
    (opening it in Inspect) is wired by the app (tokviz.ui)."""
    run, step = page.header.run, page.header.step

    @user_errors
    def recolor(run_id, step_, color):
        run_id, step_ = require_run_step(run_id, step_)
        if not available(run_id):
            return gr.skip()
        return render(run_id, step_, color)[0][1]

    t.color.change(recolor, [run, step, t.color], t.pca, api_visibility="private", **concurrency.RENDER)
    t.find.click(user_errors(find_neighbours), [run, step, t.sample, t.position, t.top_k], t.table,
                 api_visibility="private", **concurrency.RENDER)
