"""SQL: a read-only console over the index for the questions no tab foresaw. One SELECT at a time, run in a
read-only transaction (the engine refuses any write), at most 10,000 rows, stopped after 10 s; results as a
table and a CSV download. Files: none on a read-only app (a hosted Space); the runs' Parquet files otherwise
(``queries.console_query``'s ``run_files``). Above the console: the index's tables and their columns (name and
type); the result table appears once a query has run (an empty grid showed a placeholder "1 2 3")."""
from __future__ import annotations

import html
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from backend.index import queries
from tokviz import concurrency
from tokviz.common import table, user_errors
from tokviz.context import AppContext
from tokviz.header import Page
from tokviz.links import Focus

EXAMPLES = {
    "Tables and columns": "SELECT table_name, column_name, data_type FROM information_schema.columns\n"
                          "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position",
    "Runs": "SELECT run_id, name, status, scheme, n_traced_steps, n_tokens, n_token_modules FROM runs",
    "Mean alignment per category and step": "SELECT run_id, step, category, count(*) AS n, avg(alignment) AS "
                                            "mean_alignment\nFROM tokens WHERE is_response\nGROUP BY ALL ORDER BY "
                                            "run_id, step, mean_alignment",
    "Most opposing modules": "SELECT run_id, step, layer, module, part, avg(alignment) AS mean_alignment, "
                             "count(*) AS n\nFROM token_modules GROUP BY ALL ORDER BY mean_alignment LIMIT 20",
    "Tokens carrying the most of the update": "SELECT run_id, step, sample_idx, position, token, share, alignment\n"
                                              "FROM tokens ORDER BY share DESC LIMIT 50",
}
DEFAULT = EXAMPLES["Mean alignment per category and step"]


@dataclass
class SqlTab:
    tables: gr.HTML
    example: gr.Dropdown
    query: gr.Code
    limit: gr.Number
    run: gr.Button
    message: gr.Markdown
    result: gr.Dataframe
    download: gr.DownloadButton


def build(ctx: AppContext) -> SqlTab:
    files = ("no file access" if ctx.settings.readonly
             else f"files: only the runs' own, below `{ctx.settings.data_root / 'runs'}`")
    gr.Markdown("Read-only SQL over the index (DuckDB): tables `runs`, `tokens`, `token_modules`, "
                f"`train_steps`, `eval`. One SELECT at a time; no network access; {files}.")
    columns = queries.index_columns()
    tables = gr.HTML(tables_html(columns), elem_id="tv-sql-tables")
    with gr.Row():
        example = gr.Dropdown(label="Examples", choices=list(EXAMPLES), value=None, scale=3, elem_id="tv-sql-example")
        limit = gr.Number(label="Max rows", value=1000, minimum=1, maximum=queries.CONSOLE_MAX_ROWS, precision=0,
                          scale=1, elem_id="tv-sql-limit")
    query = gr.Code(DEFAULT, language="sql", lines=6, label="SELECT ...", elem_id="tv-sql-query")
    with gr.Row():
        run = gr.Button("Run query", variant="primary", scale=0, min_width=160, elem_id="tv-sql-run")
        download = gr.DownloadButton("Download CSV", visible=False, scale=0, min_width=160, elem_id="tv-sql-csv")
    message = gr.Markdown("", elem_id="tv-sql-message")
    # hidden until a query has run: an empty grid shows a placeholder "1 2 3" header
    result = gr.Dataframe(interactive=False, max_height=520, label="Result", elem_id="tv-sql-result", visible=False)
    return SqlTab(tables, example, query, limit, run, message, result, download)


def link_inputs(t: SqlTab) -> dict[str, gr.components.Component]:
    """The deep link's SQL text is the console's (put in the editor on load, never run)."""
    return {"sql": t.query}


def tables_html(columns: pd.DataFrame) -> str:
    """The index's tables, one line each: its name, then every column's name and type (all text escaped)."""
    if columns.empty:
        return "<div>the index has no tables yet</div>"
    lines = []
    for name, g in columns.groupby("table_name", sort=True):
        cols = " · ".join(f'<span class="col">{html.escape(str(c))}</span> <i>{html.escape(str(t))}</i>'
                          for c, t in zip(g.column_name, g.data_type))
        lines.append(f'<div class="tv-sql-table" data-table="{html.escape(str(name), quote=True)}">'
                     f"<b>{html.escape(str(name))}</b> ({cols})</div>")
    return (f'<details open><summary>Tables of the index ({columns.table_name.nunique()})</summary>'
            '<div style="font-size: 13px; line-height: 1.6; max-height: 260px; overflow-y: auto">'
            f'{"".join(lines)}</div></details>')


def run_query(query: str, limit: float | None, run_files: bool = False) -> tuple[str, pd.DataFrame, str]:
    """(message, table, CSV path) of one console query; ValueError for SQL the console refuses. ``run_files``:
    the query may read the runs' Parquet files (an app not in read-only mode)."""
    n = int(limit or 1000)
    df = queries.console_query(query or "", limit=n, run_files=run_files)
    out = Path(tempfile.mkdtemp(prefix="tokviz-sql-")) / "query.csv"
    df.to_csv(out, index=False)
    more = f" (the first {n}; raise Max rows for more)" if len(df) == n else ""
    return f"{len(df):,} row{'s' if len(df) != 1 else ''}{more}", table(df, 6), str(out)


def wire(t: SqlTab, page: Page) -> None:
    h = page.header
    # the address bar follows the console's text (on leaving the editor, and on picking an example); the
    # default text is left out of the link
    link = {"fn": lambda run, step, text: Focus("sql", run, step, sql=None if text == DEFAULT else text).query(),
            "inputs": [h.run, h.step, t.query], "outputs": h.query, "api_visibility": "private",
            "show_progress": "hidden", "queue": False, **concurrency.UI}
    t.example.input(lambda name: EXAMPLES.get(name, ""), t.example, t.query, api_visibility="private",
                    **concurrency.UI).then(**link)
    t.query.blur(**link)

    run_files = not page.ctx.settings.readonly      # a hosted Space's visitors read no file at all

    @user_errors
    def go(query, limit):
        msg, df, path = run_query(query, limit, run_files)
        return msg, df, gr.DownloadButton(value=path, visible=True)

    ran = t.run.click(go, [t.query, t.limit], [t.message, t.result, t.download], api_name="sql", **concurrency.SQL)
    # the result grid, hidden until now (the /sql API keeps its three outputs)
    ran.success(lambda: gr.Dataframe(visible=True), None, t.result, api_visibility="private", **concurrency.UI)
