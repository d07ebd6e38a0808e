"""Compare runs: the cross-run figures (alignment over training, positional decay, Lorenz curves, token
categories, module types, autocorrelation) overlaid, and the summaries side by side, for any runs chosen
(each at its last traced step). A run has one colour, by its place in the list, in every panel and in the
summary's first row (``figures.run_color``); in the module-type panel its lora_B bars are hatched. The six
figures are drawn as one grid (``figures.grid``) and the summary as an HTML table: in the browser one figure
of six panels drew ~0.13 s faster than six figures, and the HTML table ~0.28 s faster than a gr.Dataframe. The
export holds the figures one by one."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any, Mapping

import gradio as gr
import pandas as pd
import plotly.io as pio
from gradio.components.plot import PlotData
from plotly.graph_objects import Figure

from backend.analysis import figures, report
from backend.index import memo
from tokviz import concurrency
from tokviz.common import At, ExportRow, export_zip, user_errors
from tokviz.context import AppContext
from tokviz.header import Page
from tokviz.links import Focus


@dataclass
class CompareTab:
    runs: gr.Dropdown
    button: gr.Button
    grid: gr.Plot                    # the overlaid figures (analyses with compare=True) as one grid
    summary: gr.HTML
    export: ExportRow

    @property
    def inputs(self) -> list:
        return [self.runs]

    @property
    def outputs(self) -> list:
        return [self.runs, self.grid, self.summary]


def build(ctx: AppContext) -> CompareTab:
    with gr.Row(equal_height=True):
        runs = gr.Dropdown(label="Runs to compare (two or more)", multiselect=True, choices=[], elem_id="tv-cmp-runs",
                           scale=5, allow_custom_value=True)
        button = gr.Button("Compare", variant="primary", scale=0, min_width=140, elem_id="tv-cmp-go")
    grid = gr.Plot(label="Runs overlaid", elem_id="tv-cmp-grid")
    summary = gr.HTML("", css_template=SUMMARY_CSS, elem_id="tv-cmp-summary")
    return CompareTab(runs, button, grid, summary, ExportRow())


def default_runs(run_id: str | None, choices: list[tuple[str, str]]) -> list[str]:
    """The header's run and the newest other traced run."""
    ids = [v for _, v in choices]
    picked = [run_id] if run_id in ids else []
    return picked + [i for i in ids if i not in picked][: 2 - len(picked)]


def compare(run_ids: list[str]) -> tuple[dict, pd.DataFrame]:
    if not run_ids or len(run_ids) < 2:
        raise ValueError("choose at least two runs to compare")
    figs, tbl, summaries = report.compare_indexed(list(run_ids))
    return figs, tbl.map(_fmt).reset_index(), report.comparability(summaries)


@memo.cached(entries=16)
def compared(runs: tuple[str, ...]) -> tuple[PlotData, str]:
    """(the figures' grid, the summary table's HTML) of ``compare(runs)``, as the tab shows them (cached)."""
    figs, tbl, flags = compare(list(runs))
    return grid_figure(figs), summary_html(tbl, flags)


def grid_figure(figs: dict[str, Figure]) -> PlotData:
    """The six comparison figures as one grid, sized by the page (the legend below the panels). Sent as the
    grid's JSON: its parts were validated when each figure was built."""
    d = figures.grid([fig for name, fig in figs.items() if name != "summary_table"])
    d["layout"].update(autosize=True, height=1320)
    return PlotData(type="plotly", plot=pio.to_json(d, validate=False))


SUMMARY_CSS = """
.tv-sum-cap { font-weight: 600; margin: .6em 0 .4em; }
.tv-cmp-flag { background: #fff4d6; border-left: 4px solid #e0a800; padding: 4px 8px; margin: .3em 0; }
.tv-sum-box { max-height: 560px; overflow: auto; }
.tv-sum { border-collapse: collapse; font-size: 13px; table-layout: fixed; }
.tv-sum th, .tv-sum td { border-bottom: 1px solid #eee; padding: 3px 10px; text-align: left; vertical-align: top;
                         width: 320px; overflow-wrap: anywhere; }
.tv-sum th:first-child, .tv-sum td:first-child { width: 220px; font-family: ui-monospace, Menlo, monospace; }
.tv-sum th { border-bottom: 2px solid #ccc; font-weight: 600; }
"""


def _cell(v: str) -> str:
    """A summary cell: a JSON object (per-category values) as 'key value · key value', numbers shortened."""
    if v.startswith("{"):
        try:
            obj = json.loads(v)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            v = " · ".join(f"{k} {_fmt(x) if isinstance(x, float) else x}" for k, x in obj.items())
    return html.escape(v, quote=True)


def summary_html(tbl: pd.DataFrame, flags: list[str] = ()) -> str:
    """The side-by-side summary (a ``metric`` column, then one column per run) as an HTML table, every text
    escaped (run names are user text), after a warning per reason the runs are not comparable (``flags``).
    HTML rather than gr.Dataframe: it draws in a fraction of the time."""
    warn = "".join(f'<div class="tv-cmp-flag">⚠️ {html.escape(f)}</div>' for f in flags)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in tbl.columns)
    # a first row with each run's colour: the colour it has in every panel of the grid (figures.run_color)
    body = "<tr><td>colour in the figures</td>" + "".join(f"<td>{_swatch(i)}</td>" for i in range(len(tbl.columns) - 1))
    body += "</tr>" + "".join("<tr>" + "".join(f"<td>{_cell(str(v))}</td>" for v in row) + "</tr>"
                   for row in tbl.itertuples(index=False))
    return (warn + '<div class="tv-sum-cap">Summary by run</div><div class="tv-sum-box"><table class="tv-sum"><thead>'
            f"<tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _swatch(i: int) -> str:
    """A small square of the ``i``-th run's colour."""
    return (f'<span class="tv-run-swatch" style="display:inline-block;width:10px;height:10px;margin-right:6px;'
            f'background:{figures.PALETTE[i % len(figures.PALETTE)]}"></span>')


def _fmt(v: object) -> str:
    """A summary value as a short string (4 significant digits for numbers)."""
    if isinstance(v, float):
        return "" if v != v else f"{v:.4g}"
    return "" if v is None else str(v)


def render(run_id: str | None, step: int | None, runs: list[str] | None, choices: list[tuple[str, str]]
           ) -> tuple[list, dict]:
    ids = {v for _, v in choices}
    unknown = [r for r in (runs or []) if r not in ids]       # a deep link's, or a run no longer indexed
    runs = [r for r in (runs or []) if r in ids]
    if len(runs) < 2:
        runs = default_runs(run_id, choices) if not runs else runs + [
            r for r in default_runs(run_id, choices) if r not in runs][: 2 - len(runs)]
    shown = html.escape(", ".join(map(repr, unknown)), quote=False)      # the notice is Markdown
    note = f"⚠️ Compare: no traced run {shown} in the index; comparing {', '.join(runs)}." if unknown else ""
    if len(runs) < 2:
        return [gr.update(choices=choices, value=runs), gr.skip(), ""], \
            {"notice": "⚠️ Compare runs needs at least two runs with traced steps"}
    grid, summary = compared(tuple(runs))
    return [gr.update(choices=choices, value=runs), grid, summary], \
        {"runs": tuple(runs), **({"notice": note} if note else {})}


def link_inputs(t: CompareTab) -> dict[str, gr.components.Component]:
    """The deep link's runs are the runs chosen."""
    return {"runs": t.runs}


def render_tab(t: CompareTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    return render(at.run, at.step, got[t.runs], at.ctx.run_choices(traced_only=True))


def wire(t: CompareTab, page: Page) -> None:
    page.follow_runs(t.runs, traced_only=True)

    @user_errors
    def go(runs):
        return compared(tuple(runs or ()))

    t.button.click(go, [t.runs], [t.grid, t.summary], api_name="compare_runs", **concurrency.RENDER)
    # the address bar follows the runs chosen (they are drawn on "Compare")
    t.runs.input(lambda run, step, runs: Focus("compare", run, step, runs=Focus.field("runs", runs)).query(),
                 [page.header.run, page.header.step, t.runs], page.header.query, api_visibility="private",
                 show_progress="hidden", queue=False, **concurrency.UI)

    @user_errors
    def export(runs):
        figs, _, _ = compare(runs)
        return export_zip(figs, "compare-" + "-vs-".join(r[:24] for r in runs))

    t.export.button.click(export, [t.runs], t.export.file, api_visibility="private", **concurrency.EXPORT)
