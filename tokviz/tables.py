"""HTML tables of tokens in context (Tokens, Influence, Sketches and the token table): every text escaped, each
row carrying its sample and position so that a click opens the token in Inspect (the tabs' ``TABLE_JS``).

    rows = token_rows(df, cols)          # df: sample_idx, position, token, context_before[, context_after], ...
    html = table(cols, rows, caption_html)

``cols``: (header, column, number format, or None for text); the column "token" shows the token in bold between
its context before and after.
"""
from __future__ import annotations

import html
import math
from typing import Iterable

import pandas as pd

from tokviz.overlay import show_token, token_html

Cols = Iterable[tuple[str, str, str | None]]


def cell(v: object, fmt: str | None) -> str:
    """One value: text escaped (``fmt`` None), a number formatted, a missing number as "–"."""
    if fmt is None:
        return html.escape(str(v), quote=True)
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(int(v), fmt) if fmt == "d" else format(float(v), fmt)


def token_rows(df: pd.DataFrame, cols: Cols) -> list[str]:
    """One ``<tr>`` per row of ``df``."""
    cols = list(cols)
    out = []
    for r in df.itertuples(index=False):
        cells = []
        for _, col, fmt in cols:
            if col == "token":
                cells.append(f'<td class="ctx">{token_html(str(r.context_before))}<b>'
                             f'{html.escape(show_token(str(r.token)), quote=True)}</b>'
                             f'{token_html(str(getattr(r, "context_after", "")))}</td>')
            else:
                cells.append(f'<td class="{"" if fmt is None else "n"}">{cell(getattr(r, col), fmt)}</td>')
        out.append(f'<tr data-sample="{int(r.sample_idx)}" data-pos="{int(r.position)}">{"".join(cells)}</tr>')
    return out


def table(cols: Cols, rows: list[str], caption: str, cls: str = "tv-surprise", cap_attrs: str = "") -> str:
    """The caption (HTML: escape what goes in it) and the table of ``rows`` under ``cols``' headers."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in cols)
    return (f'<div class="tv-surprise-cap"{cap_attrs}>{caption}</div>'
            f'<div class="tv-surprise-box"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')
