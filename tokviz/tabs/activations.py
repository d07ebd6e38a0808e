"""Activations: where in depth the training signal lands, from an ``actgrad`` run (backend.jobs.actgrad): the
layers x tokens heatmap of ||dL/dh|| (one sample with its tokens, or all samples with digits as X), the norm
by layer, and the PCA of the gradients at a target position per layer, coloured by the answer or an operand.

It shows the header's run when that is an actgrad run (so ``?tab=activations&run=<actgrad run>`` links to it);
for a train run, the newest actgrad run made from it; otherwise the run picked in the tab's own list. "Compute"
queues an actgrad job on the header's train run with the adapter saved at the header's traced step (the final
adapter when it has none); it shows here when it has finished and is indexed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from backend.analysis import actgrad
from backend.index import queries
from tokviz import concurrency
from tokviz.common import At, ExportRow, as_int, export_zip, for_display, table, user_errors
from tokviz.context import AppContext, run_label
from tokviz.header import Page
from tokviz.links import Focus

NAME = "activations"
ALL = "all samples (digits as X)"
LAUNCH_HINT = ("no actgrad run in the index: launch one on the Launch tab (kind actgrad) or "
               "`python -m backend actgrad --run <train run dir> --samples 32`")


@dataclass
class ActivationsTab:
    compute: gr.Button
    token: gr.Textbox
    queued: gr.Markdown
    run: gr.Dropdown
    info: gr.Markdown
    sample: gr.Dropdown
    align: gr.Radio
    heatmap: gr.Plot
    layers: gr.Plot
    target: gr.Dropdown
    color: gr.Radio
    pca: gr.Plot
    skipped: gr.Dataframe
    export: ExportRow

    @property
    def inputs(self) -> list:
        return [self.run, self.sample, self.align, self.target, self.color]

    @property
    def outputs(self) -> list:
        return [self.run, self.info, self.sample, self.heatmap, self.layers, self.target, self.pca, self.skipped]


def build(ctx: AppContext) -> ActivationsTab:
    with gr.Row(equal_height=True):
        compute = gr.Button("Compute for the header's train run at its traced step", size="sm", scale=0,
                            min_width=360, elem_id="tv-act-compute")
        token = gr.Textbox(label="Admin token", type="password", visible=ctx.settings.readonly, scale=1,
                           elem_id="tv-act-token")
        queued = gr.Markdown("", elem_id="tv-act-queued")
    run = gr.Dropdown(label="Activation-gradient run", choices=[], elem_id="tv-act-run", allow_custom_value=True)
    info = gr.Markdown("", elem_id="tv-act-info")
    with gr.Row():
        sample = gr.Dropdown(label="Heatmap: sample", choices=[ALL], value=ALL, elem_id="tv-act-sample",
                             allow_custom_value=True)
        align = gr.Radio(label="Line samples up at", choices=list(actgrad.ALIGN), value="start",
                         elem_id="tv-act-align")
    heatmap = gr.Plot(label="||dL/dh|| per layer and token", elem_id="tv-act-heatmap")
    layers = gr.Plot(label="Norm by layer", elem_id="tv-act-layers")
    with gr.Row():
        target = gr.Dropdown(label="PCA: target", choices=[], elem_id="tv-act-target", allow_custom_value=True)
        color = gr.Radio(label="Colour by", choices=list(actgrad.COLOR_BY), value="answer", elem_id="tv-act-color")
    pca = gr.Plot(label="PCA of the target-position gradients", elem_id="tv-act-pca")
    skipped = gr.Dataframe(headers=["sample_idx", "target", "reason"], interactive=False, max_height=220,
                           label="Targets not found (these samples have no vector for that target)",
                           elem_id="tv-act-skipped")
    return ActivationsTab(compute, token, queued, run, info, sample, align, heatmap, layers, target, color, pca,
                          skipped, ExportRow())


# ------------------------------------------------------------------------------------------------ which run
def actgrad_runs() -> pd.DataFrame:
    runs = queries.list_runs()
    return runs[runs["kind"] == actgrad.KIND]


def _source_run(config_json: object) -> str | None:
    """The run id an actgrad run was made from (its ``run`` folder's name: run folders are named by id)."""
    cfg = json.loads(config_json).get("config", {}) if isinstance(config_json, str) else {}
    return Path(cfg["run"]).name if cfg.get("run") else None


def choose_run(header_run: str | None, picked: str | None) -> str:
    """The actgrad run to show (module docstring); ValueError when there is none."""
    runs = actgrad_runs()
    ids = list(runs["run_id"])
    if not ids:
        raise ValueError(LAUNCH_HINT)
    if header_run in ids:
        return header_run
    if header_run and picked not in ids:
        made = [r for r in ids if _source_run(queries.run_info(r).iloc[0]["config_json"]) == header_run]
        if made:
            return made[0]                         # list_runs is newest first
    return picked if picked in ids else ids[0]


def _choices() -> list[tuple[str, str]]:
    return [(run_label(r), r.run_id) for r in actgrad_runs().itertuples()]


# ------------------------------------------------------------------------------------------------ figures
def make_figures(run_id: str, sample: object, align: str, target: str | None, color: str
                 ) -> tuple[dict[str, go.Figure], dict]:
    """The tab's figures, and what it chose (samples, targets, the target shown, skipped rows)."""
    s = None if sample in (None, "", ALL) else as_int(sample, "sample")
    with queries.cursor(None) as cur:
        smp = actgrad.samples(cur, run_id)
        tg = actgrad.targets(cur, run_id)
        found = [t for t, n in zip(tg["target"], tg["found"]) if n > 0]
        target = target if target in found else (found[0] if found else None)
        figs = {"heatmap": actgrad.heatmap_figure(actgrad.heatmap_frames(cur, run_id, s, align)),
                "layer_norms": actgrad.layer_norms_figure(actgrad.actgrad_layer_norms(cur, run_id, None, None))}
        if target is not None:
            frames = actgrad.pca_frames(cur, run_id, target)
            frames["info"]["color"] = color if color in actgrad.COLOR_BY else "answer"
            figs["pca"] = actgrad.pca_figure(frames)
        skipped = actgrad.skipped(cur, run_id)
    return figs, {"samples": smp, "targets": tg, "target": target, "skipped": skipped, "sample": s}


def render(header_run: str | None, got: Mapping[str, Any]) -> tuple[list, dict]:
    run_id = choose_run(header_run, got.get("run"))
    figs, chose = make_figures(run_id, got.get("sample"), got.get("align") or "start", got.get("target"),
                               got.get("color") or "answer")
    smp, tg = chose["samples"], chose["targets"]
    info = queries.run_info(run_id).iloc[0]
    cfg = json.loads(info["config_json"]).get("config", {}) if isinstance(info["config_json"], str) else {}
    src = cfg.get("run") or cfg.get("model")
    lines = ", ".join(f"`{t}` {f}/{f + k}" for t, f, k in zip(tg["target"], tg["found"], tg["skipped"]))
    md = (f"**{info['name'] or run_id}** (`{run_id}`) · from `{src}`"
          f"{' step ' + str(cfg['adapter_step']) if cfg.get('adapter_step') else ''} · loss `{cfg.get('loss')}` · "
          f"{len(smp)} samples · targets found: {lines or 'none'}")
    samples = [ALL] + [str(i) for i in smp["sample_idx"]]
    sample = str(chose["sample"]) if chose["sample"] is not None else ALL
    none = go.Figure()
    none.add_annotation(text="no target was found in any sample: no vectors", showarrow=False)
    values = [gr.update(choices=_choices(), value=run_id), md, gr.update(choices=samples, value=sample),
              for_display(figs["heatmap"]), for_display(figs["layer_norms"]),
              gr.update(choices=list(tg["target"][tg["found"] > 0]), value=chose["target"]),
              for_display(figs["pca"]) if "pca" in figs else none, table(chose["skipped"])]
    return values, {"run": run_id}


def render_tab(t: ActivationsTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    return render(at.run, {"run": got[t.run], "sample": got[t.sample], "align": got[t.align],
                           "target": got[t.target], "color": got[t.color]})


def queue_job(ctx: AppContext, run_id: str | None, step: object, token: str | None) -> str:
    """Queue an actgrad job on train run ``run_id`` at traced step ``step`` (None: the final adapter); its job
    id. ValueError for no run or a run of another kind; PermissionError in a read-only app without the token."""
    from tokviz.tabs.launch import submit  # the Launch tab's path: permission, confinement, the queue
    if not run_id:
        raise ValueError("choose a train run in the header first")
    kind = queries.run_kind(run_id)
    if kind != "train":
        raise ValueError(f"run {run_id!r} is a {kind} run; choose a train run in the header (its adapter is used)")
    s = as_int(step, "step") or 0
    values = {"run": run_id, "adapter_step": s, "name": f"{run_id[:40]} step {s}" if s else f"{run_id[:40]} final"}
    return submit(ctx, values, None, token, kind=actgrad.KIND)


def wire(t: ActivationsTab, page: Page) -> None:
    h = page.header

    def on_compute(run_id, step, token):
        try:
            job_id = queue_job(page.ctx, run_id, step, token)
        except (ValueError, PermissionError) as e:
            return f"⚠️ {e}"
        return f"queued job `{job_id}` (progress on the Launch tab); it is listed above once it has finished"

    t.compute.click(on_compute, [h.run, h.step, t.token], t.queued, api_visibility="private", **concurrency.JOBS)

    @user_errors
    def redraw(run_id, sample, align, target, color):
        values, focus = render(None, {"run": run_id, "sample": sample, "align": align, "target": target,
                                      "color": color})
        return values + [Focus(NAME, focus["run"]).query()]

    for c in (t.run, t.sample, t.align, t.target, t.color):
        c.input(redraw, [t.run, t.sample, t.align, t.target, t.color], t.outputs + [h.query],
                api_visibility="private", show_progress="minimal", **concurrency.RENDER)

    @user_errors
    def export(run_id, sample, align, target, color):
        run_id = choose_run(None, run_id)
        figs, _ = make_figures(run_id, sample, align, target, color)
        return export_zip(figs, f"{run_id}-activations")

    t.export.button.click(export, [t.run, t.sample, t.align, t.target, t.color], t.export.file,
                          api_visibility="private", **concurrency.EXPORT)
