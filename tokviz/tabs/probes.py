"""Probes: how per-token policy gradients on one weight row are organised, from a ``probe`` run
(backend.jobs.probe; numbers defined in backend.analysis.probe and docs/probes.md).

Exp 1: participation ratio and rank95 per entropy bucket (base vs trained), cumulative-energy curves, the
cross-bucket |cos| of top singular vectors. Exp 2: cos(mean correct, mean incorrect) per prompt at top-entropy
tokens against the half-split noise floor. The 2-D PCA of the vectors: clicking a point shows its rollout
under the plot, the point's token marked. A table of rollouts: selecting a row shows the rollout with its tokens
coloured by entropy or bucket.

It shows the header's run when that is a probe run (``?tab=probes&run=<probe run>`` links to it), otherwise
the run picked in the tab's own list (the newest probe run at first).
"""
from __future__ import annotations

import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from backend.analysis import analyses, probe, probe_figures
from backend.index import queries
from tokviz import concurrency
from tokviz.common import (
    At,
    ExportRow,
    as_int,
    export_zip,
    for_display,
    table,
    user_errors,
)
from tokviz.context import AppContext
from tokviz.header import Page
from tokviz.links import Focus
from tokviz.overlay import show_token
from tokviz.probe_view import rollout_html

NAME = "probes"
LAUNCH_HINT = ("no probe run in the index: launch one on the Launch tab (kind probe) or "
               "`python -m backend probe --adapter <train run> --num-prompts 16`")
ROLLOUT_COLS = ["model", "prompt_idx", "sample_idx", "correct", "n_tokens", "mean_entropy", "answer", "extracted"]
# gr.Plot has no click event in Gradio 6: this caption's js listens to the plotly figure's own ``plotly_click``
# and sends the point's key (its customdata: model, prompt, sample, position; backend.analysis.probe_figures)
# as the caption's click event, as the Tokens tab's HTML table sends a row. The figure is redrawn on every
# update (its listeners may go with it), so the listener is (re)attached, once, whenever the plot's DOM changes.
PCA_CLICK_HINT = "<div class='tv-probe-pca-hint'>Click a point to read its rollout here.</div>"
PCA_CLICK_JS = """
(() => {   // own scope: Gradio's js_on_load scope already defines names such as watch
  const send = (ev) => {
    const p = ev && ev.points && ev.points[0];
    if (!p || !p.customdata) return;
    const c = p.customdata;
    trigger('click', {model: String(c[0]), prompt_idx: c[1], sample_idx: c[2], position: c[3]});
  };
  const attach = () => {
    const gd = document.querySelector('#tv-probe-pca .js-plotly-plot');
    if (!gd || typeof gd.on !== 'function') return;
    gd.removeListener('plotly_click', send);
    gd.on('plotly_click', send);
  };
  const observePlot = () => {
    const root = document.getElementById('tv-probe-pca');
    if (!root) return false;
    new MutationObserver(attach).observe(root, {childList: true, subtree: true});
    attach();
    return true;
  };
  if (!observePlot()) {
    const waiting = new MutationObserver(() => { if (observePlot()) waiting.disconnect(); });
    waiting.observe(document.body, {childList: true, subtree: true});
  }
})();
"""


@dataclass
class ProbesTab:
    run: gr.Dropdown
    info: gr.Markdown
    pr: gr.Plot
    energy: gr.Plot
    cosine: gr.Plot
    color: gr.Radio
    pca: gr.Plot
    pca_click: gr.HTML          # the caption whose js sends a clicked point's key (PCA_CLICK_JS)
    point: gr.HTML              # the rollout of the clicked point
    hist: gr.Plot
    bars: gr.Plot
    skipped: gr.Dataframe
    rollouts: gr.Dataframe
    token_color: gr.Radio
    rollout: gr.HTML
    selected: gr.State          # the rollouts row on screen (model, prompt_idx, sample_idx, ...)
    clicked: gr.State           # the PCA point on screen: [model, prompt_idx, sample_idx, position]
    export: ExportRow

    @property
    def inputs(self) -> list:
        return [self.run, self.color]

    @property
    def outputs(self) -> list:
        return [self.run, self.info, self.pr, self.energy, self.cosine, self.pca, self.point, self.clicked,
                self.hist, self.bars, self.skipped, self.rollouts]


def build(ctx: AppContext) -> ProbesTab:
    run = gr.Dropdown(label="Probe run", choices=[], elem_id="tv-probe-run", allow_custom_value=True)
    info = gr.Markdown("", elem_id="tv-probe-info")
    pr = gr.Plot(label="Exp 1: participation ratio and rank95 per entropy bucket", elem_id="tv-probe-pr")
    with gr.Row():
        energy = gr.Plot(label="Cumulative energy", elem_id="tv-probe-energy")
        cosine = gr.Plot(label="Cross-bucket |cos| of top singular vectors", elem_id="tv-probe-cosine")
    color = gr.Radio(label="PCA: colour by", choices=list(probe_figures.COLOR_BY), value="bucket",
                     elem_id="tv-probe-color")
    pca = gr.Plot(label="PCA of the gradient vectors", elem_id="tv-probe-pca")
    pca_click = gr.HTML(PCA_CLICK_HINT, js_on_load=PCA_CLICK_JS, elem_id="tv-probe-pca-click")
    point = gr.HTML("", elem_id="tv-probe-point")
    with gr.Row():
        hist = gr.Plot(label="Exp 2: correct vs incorrect direction", elem_id="tv-probe-hist")
        bars = gr.Plot(label="Exp 2 per prompt", elem_id="tv-probe-bars")
    skipped = gr.Dataframe(headers=["model", "prompt_idx", "n_correct", "n_incorrect", "why"], interactive=False,
                           max_height=200, label="Exp 2: prompts left out (too few top-bucket tokens on a side)",
                           elem_id="tv-probe-skipped")
    rollouts = gr.Dataframe(headers=ROLLOUT_COLS, interactive=False, max_height=320,
                            label="Rollouts (select a row to read it)", elem_id="tv-probe-rollouts")
    token_color = gr.Radio(label="Colour tokens by", choices=["entropy", "bucket"], value="entropy",
                           elem_id="tv-probe-token-color")
    rollout = gr.HTML("", elem_id="tv-probe-rollout")
    return ProbesTab(run, info, pr, energy, cosine, color, pca, pca_click, point, hist, bars, skipped, rollouts,
                     token_color, rollout, gr.State(None), gr.State(None), ExportRow())


# ------------------------------------------------------------------------------------------------ which run
def _choices() -> list[tuple[str, str]]:
    runs = probe.probe_runs()
    return [(f"{r.name or r.run_id} · {r.status} · {r.run_id}", r.run_id) for r in runs.itertuples()]


def choose_run(header_run: str | None, picked: str | None) -> str:
    """The header's run if it is a probe run, else the one picked in the tab, else the newest."""
    ids = list(probe.probe_runs()["run_id"])
    if not ids:
        raise ValueError(LAUNCH_HINT)
    if header_run in ids:
        return header_run
    return picked if picked in ids else ids[0]


# ------------------------------------------------------------------------------------------------ content
def make_figures(run_id: str, color: str) -> tuple[dict[str, go.Figure], dict[str, pd.DataFrame]]:
    """The tab's figures and the frames its tables show."""
    res = analyses.run_all(run_id, only=["probe_spectra", "probe_direction", "probe_pca"])
    sp, dr = res["probe_spectra"], res["probe_direction"]
    figs = {"pr_rank95": probe_figures.pr_rank95(sp["spectra"]), "energy": probe_figures.energy_curves(sp["energy"]),
            "cosine": probe_figures.cosine_heatmap(sp["cosine"]),
            "pca": probe_figures.pca_scatter(res["probe_pca"]["points"], color),
            "direction": probe_figures.direction_hist(dr["prompts"], dr["summary"]),
            "direction_prompts": probe_figures.direction_bars(dr["prompts"])}
    return figs, {"spectra": sp["spectra"], "direction": dr["summary"], "skipped": dr["skipped"]}


def info_md(run_id: str, frames: dict[str, pd.DataFrame]) -> str:
    info = queries.run_info(run_id).iloc[0]
    cfg = json.loads(info["config_json"]).get("config", {}) if isinstance(info["config_json"], str) else {}
    man = json.loads(info["manifest_json"]) if isinstance(info["manifest_json"], str) else {}
    acc = " · ".join(f"{m} accuracy {a:.1%}" for m, a in (man.get("accuracy") or {}).items())
    sp = frames["spectra"]
    prs = " · ".join(f"{m}: PR {', '.join(f'{v:.2f}' for v in g['pr'])}" for m, g in sp.groupby("model", sort=False))
    path = f" ({man['grad_path']} path)" if man.get("grad_path") else ""      # backend.probe.grads
    return (f"**{info['name'] or run_id}** (`{run_id}`) · model `{cfg.get('model')}` · adapter "
            f"`{cfg.get('adapter') or 'none'}` · weight `{man.get('site', cfg.get('param'))}` row {cfg.get('row')}"
            f"{path} · {cfg.get('num_prompts')} prompts × {cfg.get('num_samples')} rollouts · "
            f"T = {cfg.get('temperature')} · {man.get('n_vectors', '?')} vectors · {acc}"
            f"<br>PR per bucket (0 = lowest entropy) · {prs}"
            + (f"<br>⚠️ a shard: buckets {man['buckets']}" if man.get("buckets", "global") != "global" else ""))


def render(header_run: str | None, got: Mapping[str, Any]) -> tuple[list, dict]:
    run_id = choose_run(header_run, got.get("run"))
    color = got.get("color") if got.get("color") in probe_figures.COLOR_BY else "bucket"
    figs, frames = make_figures(run_id, color)
    rolls = probe.rollouts(run_id)[ROLLOUT_COLS]
    values = [gr.update(choices=_choices(), value=run_id), info_md(run_id, frames),
              *(for_display(figs[n]) for n in ("pr_rank95", "energy", "cosine", "pca")), "", None,
              *(for_display(figs[n]) for n in ("direction", "direction_prompts")),
              table(frames["skipped"]), table(rolls)]
    return values, {"run": run_id}


def render_tab(t: ProbesTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    return render(at.run, {"run": got[t.run], "color": got[t.color]})


def show_rollout(run_id: str, row: list | None, by: str) -> str:
    """The HTML of the rollout a table row names (model, prompt_idx, sample_idx first)."""
    if not row:
        return ""
    model, p, s = str(row[0]), as_int(row[1], "prompt_idx"), as_int(row[2], "sample_idx")
    head, tokens = probe.rollout(choose_run(None, run_id), model, p, s)
    return rollout_html(head, tokens, by if by in ("entropy", "bucket") else "entropy")


def point_key(data: object) -> list | None:
    """[model, prompt_idx, sample_idx, position] from a PCA click's event data (None: a click on no point)."""
    if not isinstance(data, dict) or any(data.get(k) is None for k in ("model", "prompt_idx", "sample_idx",
                                                                       "position")):
        return None
    return [str(data["model"]), as_int(data["prompt_idx"], "prompt_idx"), as_int(data["sample_idx"], "sample_idx"),
            as_int(data["position"], "position")]


def show_point(run_id: str, key: list | None, by: str) -> str:
    """The HTML of a clicked PCA point's rollout: which one it is, then the rollout with the token marked."""
    if not key:
        return ""
    model, p, s, pos = key
    head, tokens = probe.rollout(choose_run(None, run_id), model, p, s)
    tok = tokens.loc[tokens["position"] == pos, "token"]
    text = show_token(str(tok.iloc[0])) if len(tok) else "?"
    which = f"{model} · prompt {p} · sample {s} · token {text} at position {pos}"
    return (f"<p class='tv-probe-which'><b>PCA point</b>: {html.escape(which)}</p>"
            + rollout_html(head, tokens, by if by in ("entropy", "bucket") else "entropy", highlight=pos))


def wire(t: ProbesTab, page: Page) -> None:
    h = page.header

    @user_errors
    def redraw(run_id, color):
        values, focus = render(None, {"run": run_id, "color": color})
        return values + [Focus(NAME, focus["run"]).query()]

    for c in (t.run, t.color):
        c.input(redraw, [t.run, t.color], t.outputs + [h.query], api_visibility="private",
                show_progress="minimal", **concurrency.RENDER)

    @user_errors
    def pick(run_id, by, evt: gr.SelectData):
        return show_rollout(run_id, evt.row_value, by), evt.row_value

    t.rollouts.select(pick, [t.run, t.token_color], [t.rollout, t.selected], api_visibility="private",
                      **concurrency.RENDER)

    @user_errors
    def open_point(run_id, by, evt: gr.EventData):
        key = point_key(evt._data)
        if key is None:                   # a click beside the points
            return gr.skip(), gr.skip()
        return show_point(run_id, key, by), key

    t.pca_click.click(open_point, [t.run, t.token_color], [t.point, t.clicked], api_visibility="private",
                      **concurrency.RENDER)

    @user_errors
    def recolor(run_id, row, key, by):
        return show_rollout(run_id, row, by), show_point(run_id, key, by)

    t.token_color.input(recolor, [t.run, t.selected, t.clicked, t.token_color], [t.rollout, t.point],
                        api_visibility="private", **concurrency.RENDER)

    @user_errors
    def export(run_id, color):
        figs, _ = make_figures(choose_run(None, run_id), color or "bucket")
        return export_zip(figs, f"{run_id}-probes")

    t.export.button.click(export, [t.run, t.color], t.export.file, api_visibility="private", **concurrency.EXPORT)
