"""The token table of the Tokens tab: every response token of the run at the step, sorted, filtered and paged
on the server (``backend.index.token_table``); a row click opens the token in Inspect (wired by ``tokviz.ui``
with the surprising tokens' click: the table's rows carry ``data-sample`` / ``data-pos`` the same way).

    t = build()                                   # inside the Tokens tab
    html, page = render(run_id, step, *values)    # values: t.controls' values, in order
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from backend.index import token_table as tt
from backend.lm.categories import CATEGORIES
from tokviz import concurrency, tables
from tokviz.common import require_run_step, user_errors
from tokviz.header import Page

TITLE = "All response tokens: sort, filter and page them; click a row to open the token in Inspect"
SORT_LABELS = {"sample": "sample, position"} | {m: m for m in tt.METRICS}
PAGE_SIZES = (25, 50, 100, 200)
NO_RANGE = "(no range)"
# (header, column, number format or None for text); "token" is the token in its context
COLS = [("sample", "sample_idx", "d"), ("position", "position", "d"), ("token in context", "token", None),
        ("category", "category", None), ("loss", "loss", ".4g"), ("weight", "weight", ".3g"),
        ("alignment", "alignment", "+.4f"), ("dot", "dot", ".3e"), ("share", "share", ".3e"),
        ("magnitude", "magnitude", ".4g")]


@dataclass
class TokenTable:
    sort: gr.Dropdown
    descending: gr.Checkbox
    categories: gr.Dropdown
    text: gr.Textbox
    metric: gr.Dropdown
    lo: gr.Textbox
    hi: gr.Textbox
    size: gr.Dropdown
    page: gr.Number
    prev: gr.Button
    next: gr.Button
    html: gr.HTML

    @property
    def controls(self) -> list:
        """What a render reads besides run and step, in ``render``'s order."""
        return [self.sort, self.descending, self.categories, self.text, self.metric, self.lo, self.hi, self.size,
                self.page]


def build(css: str, js: str) -> TokenTable:
    """The table's controls and its HTML (styled and clickable like the surprising tokens: ``css``, ``js``)."""
    with gr.Row():
        sort = gr.Dropdown([(v, k) for k, v in SORT_LABELS.items()], value="sample", label="Sort by", scale=2,
                           elem_id="tv-tt-sort")
        desc = gr.Checkbox(value=False, label="Descending", scale=1, elem_id="tv-tt-desc")
        cats = gr.Dropdown(list(CATEGORIES), value=[], multiselect=True, label="Categories (none: all)", scale=3,
                           elem_id="tv-tt-categories")
        text = gr.Textbox(label="Token text contains", scale=2, elem_id="tv-tt-text")
    with gr.Row():
        metric = gr.Dropdown([NO_RANGE, *tt.METRICS], value=NO_RANGE, label="Value range of", scale=2,
                             elem_id="tv-tt-metric")
        # text, not gr.Number: an empty number box shows (and sends) 0, which would be a bound
        lo = gr.Textbox(label="min", placeholder="any", scale=1, elem_id="tv-tt-lo")
        hi = gr.Textbox(label="max", placeholder="any", scale=1, elem_id="tv-tt-hi")
        size = gr.Dropdown(list(PAGE_SIZES), value=50, label="Rows per page", scale=1, elem_id="tv-tt-size")
        prev = gr.Button("◀ previous", scale=1, min_width=100, elem_id="tv-tt-prev")
        page = gr.Number(1, label="Page", precision=0, minimum=1, scale=1, elem_id="tv-tt-page")
        nxt = gr.Button("next ▶", scale=1, min_width=100, elem_id="tv-tt-next")
    out = gr.HTML("", css_template=css, js_on_load=js, elem_id="tv-token-table")
    return TokenTable(sort, desc, cats, text, metric, lo, hi, size, page, prev, nxt, out)


def _bound(v: object, what: str) -> float | None:
    """A range end typed by the user: empty for none, else a number (ValueError naming the field)."""
    if v is None or str(v).strip() == "":
        return None
    try:
        return float(str(v).strip())
    except ValueError:
        raise ValueError(f"the range's {what} must be a number or empty, got {v!r}") from None


def query_of(sort: str | None, descending: bool | None, categories: list[str] | None, text: str | None,
             metric: str | None, lo: object, hi: object, size: object, page: float | None) -> tt.TableQuery:
    """The backend query of the controls' values (page numbers shown from 1); ValueError for bad values."""
    ranges = {}
    lo, hi = _bound(lo, "min"), _bound(hi, "max")
    if metric and metric != NO_RANGE and (lo is not None or hi is not None):
        ranges[metric] = (lo, hi)
    n = int(page or 1)
    if n < 1:
        raise ValueError(f"page must be >= 1, got {n}")
    return tt.TableQuery(sort=sort or "sample", descending=bool(descending), categories=tuple(categories or ()),
                         ranges=ranges, text=(text or "").strip(), page=n - 1, page_size=int(size or 50))


def page_html(p: tt.TokenPage) -> str:
    """A page as an HTML table (every text escaped); a row carries its sample and position for the click."""
    q = p.query
    order = SORT_LABELS[q.sort] + (" (descending)" if q.descending and q.sort != "sample" else "")
    cap = (f'{p.total:,} response token{"s" if p.total != 1 else ""} · page {p.page + 1:,} of {p.pages:,} · '
           f'sorted by {html.escape(order)}')
    if p.rows.empty:
        return f'<div class="tv-surprise-cap" data-total="{p.total}">{cap}</div><div>no tokens match</div>'
    return tables.table(COLS, tables.token_rows(p.rows, COLS), cap, cls="tv-surprise tv-token-table",
                        cap_attrs=f' data-total="{p.total}" data-page="{p.page + 1}"')


def render(run_id: str | None, step: int | None, *values: object) -> tuple[str, int]:
    """(the table's HTML, the page shown, from 1) for the controls' ``values`` (``TokenTable.controls``)."""
    run_id, step = require_run_step(run_id, step)
    p = tt.token_page(run_id, step, query_of(*values))
    return page_html(p), p.page + 1


def wire(t: TokenTable, page: Page) -> None:
    """A changed sort or filter shows the first page; previous / next / a page number move through the pages."""
    run, step = page.header.run, page.header.step
    inputs = [run, step, *t.controls]

    @user_errors
    def first_page(run_id, step_, *values):
        return render(run_id, step_, *values[:-1], 1)

    @user_errors
    def moved(delta: int, run_id, step_, *values):
        return render(run_id, step_, *values[:-1], max(1, int(values[-1] or 1) + delta))

    # the API's /token_table: the first page for (run, step, the controls' values)
    t.sort.input(first_page, inputs, [t.html, t.page], api_name="token_table", **concurrency.RENDER)
    for c in (t.descending, t.categories, t.metric, t.size):
        c.input(first_page, inputs, [t.html, t.page], api_visibility="private", **concurrency.RENDER)
    for c in (t.text, t.lo, t.hi):
        c.submit(first_page, inputs, [t.html, t.page], api_visibility="private", **concurrency.RENDER)
    t.page.submit(lambda *v: moved(0, *v), inputs, [t.html, t.page], api_visibility="private",
                  **concurrency.RENDER)
    t.prev.click(lambda *v: moved(-1, *v), inputs, [t.html, t.page], api_visibility="private", **concurrency.RENDER)
    t.next.click(lambda *v: moved(1, *v), inputs, [t.html, t.page], api_visibility="private", **concurrency.RENDER)
