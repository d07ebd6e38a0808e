"""The Launch tab's "Publish runs as a Space" panel: ``backend.publish`` for runs chosen in the app.

    p = build(ctx)            # inside the Launch tab
    wire(p, page)             # page.follow_runs keeps the run list current

The folder goes to ``<data root>/spaces/<name>`` (a name, never a path), written and then checked by starting
the published app, as ``python -m backend publish`` does. In a read-only app only the owner's admin token
publishes (it writes under the data root).
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from backend import publish
from backend.index import queries
from tokviz import concurrency
from tokviz.context import AppContext
from tokviz.header import Page

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class PublishPanel:
    runs: gr.Dropdown
    title: gr.Textbox
    name: gr.Textbox
    adapters: gr.Checkbox
    state: gr.Checkbox
    check: gr.Checkbox
    token: gr.Textbox
    button: gr.Button
    result: gr.Markdown


def build(ctx: AppContext) -> PublishPanel:
    s = ctx.settings
    with gr.Accordion("Publish runs as a Space", open=False, elem_id="tv-publish"):
        gr.Markdown("Writes the chosen runs (slimmed) and this app to `<data root>/spaces/NAME`, a folder ready to "
                    "push as a Docker Space, then starts it to check it (`python -m backend publish`; README: Share "
                    "your runs).")
        runs = gr.Dropdown(label="Runs", choices=ctx.run_choices(), multiselect=True, allow_custom_value=True,
                           elem_id="tv-publish-runs")
        with gr.Row():
            title = gr.Textbox(label="Space title", value="tokviz runs", elem_id="tv-publish-title")
            name = gr.Textbox(label="Folder name", placeholder="my-space", elem_id="tv-publish-name")
        with gr.Row():
            adapters = gr.Checkbox(label="with adapters", value=False)
            state = gr.Checkbox(label="with verify state", value=False)
            check = gr.Checkbox(label="start it to check it", value=True)
        token = gr.Textbox(label="Admin token", type="password", visible=s.readonly and bool(s.admin_token))
        button = gr.Button("Publish", elem_id="tv-publish-go", interactive=not s.readonly or bool(s.admin_token))
        result = gr.Markdown("", elem_id="tv-publish-result")
    return PublishPanel(runs, title, name, adapters, state, check, token, button, result)


def run_publish(ctx: AppContext, run_ids: list[str], title: str, name: str, adapters: bool, state: bool,
                check: bool, token: str | None) -> str:
    """Publish ``run_ids`` to ``<data root>/spaces/<name>``; Markdown of what was written and checked. Raises
    PermissionError (read-only without the admin token) and ValueError (bad name, no runs, too large...)."""
    if not ctx.settings.may_launch(token):
        raise PermissionError("this app is read-only: publishing is disabled"
                              + (" (wrong or missing admin token)" if ctx.settings.admin_token else ""))
    if not run_ids:
        raise ValueError("choose at least one run to publish")
    name = (name or "").strip()
    if not _NAME.match(name) or ".." in name:
        raise ValueError(f"folder name {name!r}: use letters, digits, '.', '_' and '-' (a name, not a path)")
    known = {v for _, v in ctx.run_choices()}
    unknown = [r for r in run_ids if r not in known]
    if unknown:
        raise ValueError(f"runs {unknown} are not in the index; indexed: {', '.join(sorted(known)) or 'none'}")
    runs = [Path(str(queries.run_info(r).iloc[0]["path"])) for r in run_ids]
    out = ctx.settings.data_root / "spaces" / name
    res = publish.publish(runs, out, title.strip() or "tokviz runs", adapters, state)
    lines = [f"Wrote `{html.escape(str(out))}` ({publish._mb(res['total'])}; opens on `{res['open_run']}`):"]
    lines += [f"- `{html.escape(rid)}` {publish._mb(n)}" for rid, n in res["runs"].items()]
    if check:
        problems = publish.check(out, list(res["runs"]))
        lines.append("**Check failed**: " + html.escape("; ".join(problems)) if problems else
                     f"Check passed: the published app lists exactly these {len(res['runs'])} runs and renders them.")
    return "\n".join(lines)


def wire(p: PublishPanel, page: Page) -> None:
    page.follow_runs(p.runs)
    ctx = page.ctx

    def go(run_ids, title, name, adapters, state, check, token):
        try:
            return run_publish(ctx, run_ids or [], title, name, adapters, state, check, token)
        except (ValueError, PermissionError) as e:
            return f"⚠️ {html.escape(str(e))}"

    p.button.click(go, [p.runs, p.title, p.name, p.adapters, p.state, p.check, p.token], p.result,
                   api_name="publish", **concurrency.EXPORT)
