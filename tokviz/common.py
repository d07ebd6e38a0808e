"""Small pieces every tab uses: user errors shown as messages, figure display and export, choices, and what a
tab renders for.

    @user_errors
    def render(run_id, step): ...            # a ValueError becomes a message in the page, not a traceback

    export = ExportRow()                     # a button and a file slot: the tab's figures as PNG + HTML
    At(ctx, "r1", 20, generation=3)          # what a tab renders for: the header's run and traced step
"""
from __future__ import annotations

import functools
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import gradio as gr
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from backend import index
from backend.analysis import report
from backend.index import queries
from tokviz.context import AppContext

F = TypeVar("F", bound=Callable)
PLOT_HEIGHT = 460


@dataclass(frozen=True)
class At:
    """What a tab renders for: the header's run and traced step, the index generation the page has seen (it
    changes when runs are indexed again: a cache key), and the app context (run lists, settings)."""
    ctx: AppContext
    run: str | None
    step: int | None
    generation: int = 0


def user_errors(fn: F) -> F:
    """Show what a user can act on (a ValueError or an index error, e.g. an unknown run or a bad number) as a
    message in the page; anything else is a bug and propagates."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, index.TokvizIndexError) as e:
            raise gr.Error(str(e), print_exception=False) from e
    return wrapper  # type: ignore[return-value]


def for_display(fig: go.Figure, height: int | None = None) -> go.Figure:
    """A figure sized by the page (the builders fix the export size): autosized width, given height."""
    h = height or min(fig.layout.height or PLOT_HEIGHT, 900)
    fig.update_layout(width=None, autosize=True, height=h, margin=dict(l=60, r=30, t=60, b=50))
    return fig


def step_choices(run_id: str | None) -> list[int]:
    return queries.traced_steps(run_id) if run_id else []


def as_int(v: object, what: str) -> int | None:
    """A dropdown or number value as an int (None stays None); ValueError naming ``what`` otherwise."""
    if v is None or v == "":
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be a whole number, got {v!r}") from e
    if not f.is_integer():
        raise ValueError(f"{what} must be a whole number, got {v!r}")
    return int(f)


def pick_step(run_id: str | None, step: object) -> int | None:
    """``step`` if the run traced it, else its last traced step (None for a run without a trace)."""
    steps = step_choices(run_id)
    if not steps:
        return None
    step = as_int(step, "step")
    return step if step in steps else steps[-1]


def require_run_step(run_id: str | None, step: int | None) -> tuple[str, int]:
    if not run_id:
        raise ValueError("choose a run first (no run is selected)")
    step = as_int(step, "step")
    if step is None:
        raise ValueError(f"no traced step chosen (run {run_id!r} may have none: then only Training has something "
                         "to show)")
    return run_id, step


def empty_figure(message: str) -> go.Figure:
    """A blank figure that says why it is blank (the template is backend.analysis.figures.TEMPLATE, plotly's
    default)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=15))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(height=240, margin=dict(l=20, r=20, t=20, b=20))
    return fig


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "figure"


def export_zip(figs: dict[str, go.Figure], stem: str) -> gr.File:
    """The figures as one zip: ``<name>.html`` each (standalone) and ``<name>.png`` (and PDF) where static
    export works here (kaleido and a Chromium); a ``README.txt`` in the zip says what was skipped. Returns
    the update that shows the zip in an ExportRow's file slot."""
    out = Path(tempfile.mkdtemp(prefix="tokviz-export-"))
    figdir = out / "figures"
    result = report.export_figures({_safe_name(k): v for k, v in figs.items()}, figdir, static=None)
    zpath = out / f"{_safe_name(stem)}.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(figdir.iterdir()):
            z.write(f, f.name)
        z.writestr("README.txt", f"tokviz figures: {stem}\nstatic export (PNG/PDF): {result['static_export']}\n")
    return gr.File(value=str(zpath), visible=True)


class ExportRow:
    """A button that packs the tab's figures (PNG + HTML) and the file slot it fills."""

    def __init__(self, label: str = "Export figures (PNG + HTML)") -> None:
        with gr.Row():
            self.button = gr.Button(label, size="sm", variant="secondary", scale=0, min_width=240)
            self.file = gr.File(label="figures (zip)", visible=False, scale=1, interactive=False)


def table(df: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """A DataFrame ready to show: floats to ``digits`` significant digits (a magnitude of 3e-5 stays 3e-05,
    not 0), no index."""
    out = df.copy()
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):      # float32 as float64 first: 0.0069, not 0.0068999
            a = out[c].astype("float64").to_numpy()
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                mag = np.where(np.isfinite(a) & (a != 0), np.floor(np.log10(np.abs(a))), 0)
                scale = 10.0 ** (digits - 1 - mag)
                out[c] = np.round(a * scale) / scale
    return out.reset_index(drop=True)


def labels_of(choices: Iterable[tuple[str, object]]) -> dict[object, str]:
    return {v: k for k, v in choices}
