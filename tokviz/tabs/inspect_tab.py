"""Inspect: one sample at one traced step, token by token, coloured by a metric; a token's layer x module
breakdown and its neighbours; previous/next sample; search samples by text.

The run and step come from the header; this tab owns the sample, the metric and the selected token.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from html import escape
from typing import Any, Mapping
from urllib.parse import parse_qsl

import gradio as gr
import numpy as np
import pandas as pd

from backend.analysis import figures
from backend.index import memo, queries
from backend.lm.scheme_specs import WHAT_IF, what_if_weights
from tokviz import concurrency, overlay
from tokviz.common import (
    At,
    ExportRow,
    as_int,
    empty_figure,
    export_zip,
    for_display,
    require_run_step,
    table,
    user_errors,
)
from tokviz.context import AppContext
from tokviz.header import Page, Shown
from tokviz.links import DEFAULT_METRIC, VIEW_KEYS, Focus

VIEWS = tuple(VIEW_KEYS.values())       # "heatmap: dot", ..., "bars: dot per layer"; a link names them short
NEIGHBOURS = 6
NEIGHBOUR_COLS = ["", "position", "token", "category", "alignment", "share", "magnitude", "loss", "prob", "entropy",
                  "weight"]
SEARCH_COLS = ["step", "sample_idx", "n_tokens", "mean_alignment", "match"]
HINT = "*Click a token to see its gradient per layer and module, and its neighbours.*"
# what the overlay holds until the page's first render replaces it (the page is not blank meanwhile)
LOADING = '<div class="tv-empty tv-loading">⏳ loading the sample…</div>'


def metric_choices() -> list[tuple[str, str]]:
    base = [(m.label, m.name) for m in overlay.METRICS.values()]
    return base + [(f"what scheme {s} would weigh it", f"{overlay.WHAT_IF_PREFIX}{s}") for s in WHAT_IF]


@dataclass
class InspectTab:
    sample: gr.Dropdown
    prev: gr.Button
    next: gr.Button
    metric: gr.Dropdown
    search: gr.Textbox
    results: gr.Dataframe
    overlay: gr.HTML
    token: gr.Number
    view: gr.Radio
    title: gr.Markdown
    breakdown: gr.Plot
    neighbours: gr.Dataframe
    export: ExportRow

    @property
    def inputs(self) -> list:
        """Controls the header-driven render reads besides run and step."""
        return [self.sample, self.metric, self.token, self.view]

    @property
    def outputs(self) -> list:
        return [self.sample, self.overlay, self.token, self.title, self.breakdown, self.neighbours, self.metric,
                self.view]


def link_inputs(t: InspectTab) -> dict[str, gr.components.Component]:
    """The deep link's sample, token, metric and view are the tab's sample, selected token, colour metric and
    breakdown kind."""
    return {"sample": t.sample, "token": t.token, "metric": t.metric, "view": t.view}


def build(ctx: AppContext) -> InspectTab:
    with gr.Row(equal_height=True):
        sample = gr.Dropdown(label="Sample", choices=[], elem_id="tv-sample", scale=4, allow_custom_value=True)
        prev = gr.Button("◀ Previous", size="sm", elem_id="tv-prev", scale=0, min_width=110)
        nxt = gr.Button("Next ▶", size="sm", elem_id="tv-next", scale=0, min_width=110)
        metric = gr.Dropdown(label="Colour tokens by", choices=metric_choices(), value=DEFAULT_METRIC,
                             elem_id="tv-metric", scale=3)
    with gr.Accordion("Search samples by text", open=False):
        search = gr.Textbox(label="Text to find (case-insensitive, all traced steps)", elem_id="tv-search",
                            submit_btn="Search")
        results = gr.Dataframe(headers=SEARCH_COLS, interactive=False, max_height=220, elem_id="tv-results",
                               label="Matches: click a row to open it")
    ov = gr.HTML(LOADING, css_template=overlay.CSS, js_on_load=overlay.JS, elem_id="tv-overlay", min_height=120,
                 server_functions=[token_numbers])
    with gr.Row():
        token = gr.Number(label="Selected token (position): click a token above", precision=0, minimum=0,
                          elem_id="tv-token", scale=2)
        view = gr.Radio(VIEWS, value=VIEWS[0], label="Breakdown", elem_id="tv-view", scale=5)
    title = gr.Markdown("", elem_id="tv-token-title")
    with gr.Row():
        breakdown = gr.Plot(label="Per-layer x module breakdown", elem_id="tv-breakdown", scale=3)
        neighbours = gr.Dataframe(headers=NEIGHBOUR_COLS, interactive=False, label="Neighbours", max_height=420,
                                  elem_id="tv-neighbours", scale=2)
    export = ExportRow("Export the breakdown (PNG + HTML)")
    return InspectTab(sample, prev, nxt, metric, search, results, ov, token, view, title, breakdown, neighbours,
                      export)


# ---------------------------------------------------------------------------------------------- data -> views
def sample_choices(run_id: str, step: int) -> list[tuple[str, int]]:
    df = queries.step_samples(run_id, step, preview_chars=70)
    out = []
    for r in df.itertuples():
        align = "" if pd.isna(r.mean_alignment) else f" · align {r.mean_alignment:+.3f}"
        preview = str(r.preview).replace("\n", "⏎ ")
        out.append((f"#{r.sample_idx} · {r.n_tokens} tokens{align} · {preview}", int(r.sample_idx)))
    return out


@lru_cache(maxsize=16)
def _what_if_step(run_id: str, step: int, scheme: str, generation: int) -> pd.DataFrame:
    toks = queries.step_token_stats(run_id, step)
    return toks.assign(what_if=what_if_weights(toks, scheme))[["sample_idx", "position", "what_if"]]


def _what_if_values(run_id: str, step: int, sample: int, toks: pd.DataFrame, scheme: str, generation: int
                    ) -> pd.Series:
    w = _what_if_step(run_id, step, scheme, generation)
    w = w[w["sample_idx"] == sample].set_index("position")["what_if"]
    return toks["position"].map(w)


@memo.cached(entries=64)
def sample_tokens(run_id: str, step: int, sample: int) -> pd.DataFrame:
    """``queries.sample_tokens``, cached (the overlay, its tooltip numbers and a token's views read the same
    sample): shared, not to be modified."""
    return queries.sample_tokens(run_id, step, sample)


@memo.cached(entries=128)
def overlay_html(run_id: str, step: int, sample: int, metric: str, token: int | None, generation: int = 0) -> str:
    toks = sample_tokens(run_id, step, sample)
    key = (run_id, step, sample)
    if metric.startswith(overlay.WHAT_IF_PREFIX):
        scheme = metric[len(overlay.WHAT_IF_PREFIX):]
        values = _what_if_values(run_id, step, sample, toks, scheme, generation)
        return overlay.render(toks, overlay.what_if_metric(scheme), token, what_if=values, key=key,
                              note=f"What {scheme} would weigh each token, with its batch statistics over the "
                                   f"traced sequences of step {step} (prompt tokens: 0).")
    if metric not in overlay.METRICS:
        raise ValueError(f"unknown metric {metric!r}; available: {', '.join(m for _, m in metric_choices())}")
    m = overlay.METRICS[metric]
    note = "" if toks[m.column].notna().any() else f"this trace has no {m.column} values"
    return overlay.render(toks, m, token, key=key, note=note)


def token_numbers(key: list) -> str:
    """Every token's numbers of one sample as JSON: what the overlay's tooltip shows. The overlay's script
    calls this (a server function of its gr.HTML, which receives its arguments as one list: run, step,
    sample, metric) on the first hover of a sample, so switching samples does not carry them."""
    if not isinstance(key, (list, tuple)) or len(key) != 4:
        raise ValueError(f"token_numbers takes [run, step, sample, metric], got {key!r}")
    run_id, step, sample, metric = key
    step, sample = as_int(step, "step"), as_int(sample, "sample")
    toks = sample_tokens(run_id, step, sample)
    if str(metric).startswith(overlay.WHAT_IF_PREFIX):
        scheme = metric[len(overlay.WHAT_IF_PREFIX):]
        values = _what_if_values(run_id, step, sample, toks, scheme, 0).to_numpy(dtype=np.float64)
        return overlay.tip_data(toks, values, scheme)
    return overlay.tip_data(toks)


@memo.cached(entries=128)
def token_views(run_id: str, step: int, sample: int, token: int | None, view: str
                ) -> tuple[str, object, pd.DataFrame]:
    """(title, breakdown figure, neighbours table) of one token; blanks when no token is selected. Cached
    (``memo``): the figure and table are shared, not to be modified."""
    if token is None:       # no figure (not even an empty one): the page's first paint needs no plotting
        return HINT, None, pd.DataFrame(columns=NEIGHBOUR_COLS)
    toks = sample_tokens(run_id, step, sample)
    if token not in set(toks["position"]):
        raise ValueError(f"sample {sample} at step {step} has no token at position {token}; positions "
                         f"{int(toks['position'].min())}..{int(toks['position'].max())}")
    row = toks[toks["position"] == token].iloc[0]
    where = f"response token {int(row['resp_pos'])}" if row["is_response"] else "prompt token"
    title = (f"**Token #{token}** `{overlay.show_token(str(row['token']))}` · {where} · {row['category']} · "
             f"alignment {row['alignment']:.4f} · share {row['share']:.3%} · loss {row['loss']:.3f}"
             if pd.notna(row["alignment"]) and pd.notna(row["loss"]) and pd.notna(row["share"]) else
             f"**Token #{token}** `{overlay.show_token(str(row['token']))}` · {where} · {row['category']}")
    kind, value = breakdown_kind(view)
    rows = queries.token_breakdown(run_id, step, sample, token)
    fig = figures.token_breakdown(rows, value=value, kind=kind,
                                  title=f"Token #{token} {overlay.show_token(str(row['token']))}: {value} by layer "
                                        f"and module (step {step}, sample {sample})")
    i = int(np.flatnonzero(toks["position"].to_numpy() == token)[0])
    near = toks.iloc[max(0, i - NEIGHBOURS): i + NEIGHBOURS + 1].copy()
    near[""] = np.where(near["position"] == token, "▶", "")
    near["token"] = near["token"].map(lambda t: overlay.show_token(str(t)))
    return title, for_display(fig), table(near[NEIGHBOUR_COLS])


def breakdown_kind(view: str) -> tuple[str, str]:
    """(kind, value) of the breakdown figure a view (one of VIEWS) asks for."""
    return ("bars", "dot") if view.startswith("bars") else ("heatmap", view.split(": ")[1])


def breakdown_placeholder() -> object:
    """The breakdown plot before a token is selected: empty, with the hint."""
    return empty_figure("click a token to see its gradient per layer and module")


def render(run_id: str | None, step: int | None, sample: int | None, metric: str, token: int | None, view: str,
           generation: int = 0) -> tuple[list, dict]:
    """Everything the tab shows for (run, step); keeps ``sample`` (and ``token``) when the step has it (another
    scheme's run of one comparison traces the same samples at the same steps), else shows the step's first
    sample and says so in the header's notice line."""
    run_id, step = require_run_step(run_id, step)
    sample, token = as_int(sample, "sample"), as_int(token, "token")
    choices = sample_choices(run_id, step)
    ids = [c[1] for c in choices]
    if not ids:
        raise ValueError(f"step {step} of run {run_id!r} has no samples")
    asked = sample
    if sample not in ids:
        sample, token = ids[0], None
    notes = []
    if asked is not None and asked != sample:
        notes.append(f"ℹ️ Inspect: sample #{asked} was not traced at step {step} of {run_id}; showing "
                     f"sample #{sample}.")
    # a deep link's metric and view are anyone's text: an unknown one falls back to the default, and says so
    metric, view = metric or DEFAULT_METRIC, view or VIEWS[0]
    if metric not in {m for _, m in metric_choices()}:
        notes.append(f"⚠️ Inspect: no colour metric {escape(repr(metric), quote=False)}; showing "
                     f"{DEFAULT_METRIC}.")
        metric = DEFAULT_METRIC
    if view not in VIEWS:
        notes.append(f"⚠️ Inspect: no breakdown {escape(repr(view), quote=False)} (one of "
                     f"{', '.join(VIEW_KEYS)}); showing {VIEWS[0]}.")
        view = VIEWS[0]
    html = overlay_html(run_id, step, sample, metric, token, generation)
    title, fig, near = token_views(run_id, step, sample, token, view)
    values = [gr.update(choices=choices, value=sample), html, token, title, fig, near, metric, view]
    focus: dict = {"sample": sample, "token": token, "metric": metric, "view": view}
    if notes:
        focus["notice"] = " ".join(notes)
    return values, focus


def render_tab(t: InspectTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    return render(at.run, at.step, got[t.sample], got[t.metric], got[t.token], got[t.view], at.generation)


# ---------------------------------------------------------------------------------------------- events
# Each takes its event's inputs and returns its outputs (the last one, where there is one, the deep link of
# what the tab now shows: the header's query).
def link(run_id: str | None, step: int | None, sample: int | None, token: int | None) -> str:
    return Focus("inspect", run_id, step, sample, token).query()


def keep_choices(query: str | None, metric: str | None, view: str | None) -> object:
    """The deep link an Inspect event just set, with the colour metric and breakdown the tab shows (the public
    events' own link leaves them out: their inputs are part of the API). Unchanged: skipped."""
    focus = Focus.from_query(dict(parse_qsl(str(query or "").lstrip("?"))))
    if focus.tab != "inspect":
        return gr.skip()
    new = focus.with_(metric=Focus.field("metric", metric), view=Focus.field("view", view)).query()
    return new if new != query else gr.skip()


@user_errors
def show_sample(run_id, step, sample, metric, token, generation):
    """The overlay of another sample; the token views are cleared only if a token was selected (redrawing
    an empty figure on every switch would cost more than the overlay)."""
    run_id, step = require_run_step(run_id, step)
    sample = as_int(sample, "sample")
    if sample is None:
        raise ValueError("choose a sample")
    html = overlay_html(run_id, step, sample, metric, None, generation)
    views = token_views(run_id, step, sample, None, VIEWS[0]) if token is not None else (gr.skip(),) * 3
    return (html, None, *views, link(run_id, step, sample, None))


@user_errors
def step_sample(run_id, step, sample, metric, token, generation, delta: int):
    """The sample ``delta`` places after this one (wrapping around), shown."""
    run_id, step = require_run_step(run_id, step)
    ids = queries.step_samples(run_id, step, preview_chars=0)["sample_idx"].tolist()
    sample = as_int(sample, "sample")
    i = ids.index(sample) if sample in ids else -1
    new = ids[(i + delta) % len(ids)] if i >= 0 else ids[0]
    return (new,) + show_sample(run_id, step, new, metric, token, generation)


def previous_sample(run_id, step, sample, metric, token, generation):
    return step_sample(run_id, step, sample, metric, token, generation, -1)


def next_sample(run_id, step, sample, metric, token, generation):
    return step_sample(run_id, step, sample, metric, token, generation, +1)


@user_errors
def recolour(run_id, step, sample, metric, token, generation):
    run_id, step = require_run_step(run_id, step)
    sample = as_int(sample, "sample")
    if sample is None:
        return gr.skip()
    return overlay_html(run_id, step, sample, metric, as_int(token, "token"), generation)


@user_errors
def select_token(run_id, step, sample, token, view):
    run_id, step = require_run_step(run_id, step)
    sample, token = as_int(sample, "sample"), as_int(token, "token")
    if sample is None:
        raise ValueError("choose a sample first")
    title, fig, near = token_views(run_id, step, sample, token, view)
    return token, title, fig, near, link(run_id, step, sample, token)


def click_token(run_id, step, sample, view, evt: gr.EventData):
    """A click on a token of the overlay (its script sends the token's position)."""
    position = evt._data.get("position") if isinstance(evt._data, dict) else None
    if position is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    return select_token(run_id, step, sample, int(position), view)


@memo.cached(entries=64)
def search_table(run_id: str, text: str) -> pd.DataFrame:
    """The samples of the run whose text contains ``text`` (50 at most), with the match in context."""
    df = queries.search_samples(run_id, text.strip(), limit=50)
    low = text.lower()

    def snippet(s: str) -> str:
        i = s.lower().find(low)
        return s[max(0, i - 40): i + len(low) + 40].replace("\n", "⏎ ")
    df["match"] = df["text"].map(snippet)
    return table(df[SEARCH_COLS])


@user_errors
def search(run_id, text):
    if not run_id:
        raise ValueError("choose a run first")
    df = search_table(run_id, text or "")
    if df.empty:
        gr.Info(f"no sample of this run contains {text!r}")
    return df


@user_errors
def open_result(run_id, results: pd.DataFrame, metric, generation, shown: Shown, evt: gr.SelectData):
    """A search result opens: the header moves to its step and the tab shows its sample."""
    row = results.iloc[evt.index[0]]
    step, sample = int(row["step"]), int(row["sample_idx"])
    with shown.lock:
        values, focus = render(run_id, step, sample, metric, None, VIEWS[0], generation)
        shown.moved(run_id, step)
    return [step] + values + [link(run_id, step, focus["sample"], None)]


@user_errors
def export(run_id, step, sample, token, view):
    run_id, step = require_run_step(run_id, step)
    sample, token = as_int(sample, "sample"), as_int(token, "token")
    if sample is None or token is None:
        raise ValueError("select a token first: the export holds its breakdown figure")
    kind, value = breakdown_kind(view)
    fig = figures.token_breakdown(queries.token_breakdown(run_id, step, sample, token), value, kind)
    return export_zip({f"token_{token}_breakdown": fig}, f"{run_id}-step{step}-sample{sample}-token{token}")


# ---------------------------------------------------------------------------------------------- wiring
def wire(t: InspectTab, page: Page) -> None:
    """The tab's own events. Those that redraw part of the tab run without the queue (``fast``): one HTTP
    round trip instead of the queue's join + event stream, about half the latency of a sample switch; they are
    short, read-only and safe to run side by side."""
    run, step, query, gen = page.header.run, page.header.step, page.header.query, page.generation
    fast = {"show_progress": "hidden", "queue": False, **concurrency.RENDER}
    sample_in = [run, step, t.sample, t.metric, t.token, gen]
    sample_out = [t.overlay, t.token, t.title, t.breakdown, t.neighbours, query]
    token_in = [run, step, t.sample, t.token, t.view]
    token_out = [t.token, t.title, t.breakdown, t.neighbours, query]

    # after each event that sets the link (or changes the metric or view): the link gets the metric and view
    keep = {"fn": keep_choices, "inputs": [query, t.metric, t.view], "outputs": query,
            "api_visibility": "private", "show_progress": "hidden", "queue": False, **concurrency.UI}

    t.sample.input(show_sample, sample_in, sample_out, api_name="inspect_sample", **fast).then(**keep)
    t.prev.click(previous_sample, sample_in, [t.sample, *sample_out], api_name="previous_sample", **fast).then(**keep)
    t.next.click(next_sample, sample_in, [t.sample, *sample_out], api_name="next_sample", **fast).then(**keep)
    t.metric.input(recolour, sample_in, t.overlay, api_name="recolour", **fast).then(**keep)
    t.token.submit(select_token, token_in, token_out, api_name="inspect_token", **fast).then(**keep)
    t.view.input(select_token, token_in, token_out, api_visibility="private", **fast).then(**keep)
    t.overlay.click(click_token, [run, step, t.sample, t.view], token_out, api_visibility="private",
                    **fast).then(**keep)
    t.search.submit(search, [run, t.search], t.results, api_name="search_samples", **concurrency.RENDER)
    t.results.select(open_result, [run, t.results, t.metric, gen, page.shown], [step, *t.outputs, query],
                     api_visibility="private", **concurrency.RENDER).then(**keep)
    t.export.button.click(export, token_in, t.export.file, api_visibility="private", **concurrency.EXPORT)
