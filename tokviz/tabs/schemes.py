"""Schemes: launch a scheme comparison (schemes x seeds, one protocol) and read its results: the table of
accuracies with 95% intervals and the verdict against the baseline, loss and accuracy curves (seeds thin, mean
bold), the scheme weights by token category, the child runs, and links that open one traced sample (same seed,
step and sample) in Inspect under each scheme. A running comparison shows its progress (runs done / total, the
running run's step, ETA) from its events; its runs are indexed when it ends (or on Refresh).

The form is the Launch tab's form of the ``compare-schemes`` kind (``tokviz.tabs.launch``), built from the same
config dataclass as ``python -m backend compare-schemes``, and made when its accordion is first opened
(``gr.render``), not with every page.
"""
from __future__ import annotations

import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from backend.analysis import schemes
from backend.jobs import registry
from backend.jobs.compare_schemes import KIND
from tokviz import concurrency
from tokviz.common import for_display, user_errors
from tokviz.context import AppContext
from tokviz.header import Page
from tokviz.links import Focus
from tokviz.tabs import launch


@dataclass
class SchemesTab:
    comparison: gr.Dropdown
    refresh: gr.Button
    status: gr.Markdown
    table: gr.HTML
    stats: gr.HTML                   # trace statistics by scheme against the baseline
    results: gr.Plot
    loss: gr.Plot
    accuracy: gr.Plot
    weights: gr.Plot
    runs: gr.HTML
    inspect_pick: gr.Dropdown        # a traced (seed, step, sample) of the comparison's runs
    inspect_links: gr.HTML           # that sample in Inspect, one link per scheme
    box: gr.Accordion                # "Launch a scheme comparison": its form is made when it first opens
    opened: gr.State                 # whether it has been opened (then the form is on the page)
    token: gr.Textbox
    launch: gr.Button
    message: gr.Markdown
    rendered: gr.State               # what the tab drew: "<comparison>|<index generation>"

    @property
    def shown(self) -> list:
        return [self.comparison, self.status, self.table, self.stats, self.results, self.loss, self.accuracy,
                self.weights, self.runs, self.inspect_pick, self.inspect_links]


def build(ctx: AppContext) -> SchemesTab:
    with gr.Row(equal_height=True):
        comparison = gr.Dropdown(label="Scheme comparison", choices=[], elem_id="tv-sch-cmp", scale=5,
                                 allow_custom_value=True)
        refresh = gr.Button("Refresh", scale=0, min_width=120, elem_id="tv-sch-refresh")
    status = gr.Markdown("", elem_id="tv-sch-status")
    table = gr.HTML("", css_template=TABLE_CSS, elem_id="tv-sch-table")
    stats = gr.HTML("", css_template=TABLE_CSS, elem_id="tv-sch-stats")
    with gr.Row():
        results = gr.Plot(label="Accuracy by scheme", elem_id="tv-sch-results")
        accuracy = gr.Plot(label="Accuracy over training", elem_id="tv-sch-accuracy")
    with gr.Row():
        loss = gr.Plot(label="Training loss", elem_id="tv-sch-loss")
        weights = gr.Plot(label="Weights by token category", elem_id="tv-sch-weights")
    runs = gr.HTML("", css_template=TABLE_CSS, elem_id="tv-sch-runs")
    with gr.Row(equal_height=True):
        inspect_pick = gr.Dropdown(label="A traced sample to read under every scheme (seed · step · sample)",
                                   choices=[], elem_id="tv-sch-inspect-pick", scale=3)
        inspect_links = gr.HTML("", css_template=TABLE_CSS, elem_id="tv-sch-inspect", scale=4)
    with gr.Accordion("Launch a scheme comparison", open=False, elem_id="tv-sch-launch-box") as box:
        gr.Markdown("One train run per (scheme, seed), everything else identical; all evaluated greedily and "
                    "with k samples on the same held-out items. Runs that finished with the same name and "
                    "settings are reused, failed ones restarted.")
        token = gr.Textbox(label="Admin token", type="password", elem_id="tv-sch-token",
                           visible=ctx.settings.readonly and bool(ctx.settings.admin_token))

        opened = gr.State(False)

        @gr.render(inputs=[opened], triggers=[opened.change], queue=False, show_progress="minimal",
                   **concurrency.UI)
        def form(is_open: bool) -> None:
            if is_open:
                wire_form(t, ctx, launch._kind_form(registry.get(KIND), prefix="tv-sch-f"))

        button = gr.Button("Launch comparison", variant="primary", elem_id="tv-sch-launch",
                           interactive=ctx.settings.may_launch(None) or bool(ctx.settings.admin_token))
        message = gr.Markdown("", elem_id="tv-sch-message")
    t = SchemesTab(comparison, refresh, status, table, stats, results, loss, accuracy, weights, runs, inspect_pick,
                   inspect_links, box, opened, token, button, message, gr.State(""))
    return t


def wire_form(t: SchemesTab, ctx: AppContext, form: launch.KindForm) -> None:
    """The events of the comparison form just made (inside ``build``'s render)."""
    def on_launch(token, *got):
        try:
            job_id = launch.submit(ctx, *form.values(got), token, form.kind)
        except (ValueError, PermissionError) as e:
            return launch._message(str(e), False)
        return launch._message(f"queued {job_id}: its progress shows here and on the Launch tab", True)

    t.launch.click(on_launch, [t.token, *form.inputs], t.message, api_visibility="private", **concurrency.JOBS)
    launch.follow_scheme(form)


TABLE_CSS = """
.tv-sch { border-collapse: collapse; font-size: 13px; margin: .3em 0 .8em; }
.tv-sch th, .tv-sch td { border-bottom: 1px solid #eee; padding: 3px 10px; text-align: left; }
.tv-sch th { border-bottom: 2px solid #ccc; font-weight: 600; }
.tv-better { color: #1a7f37; font-weight: 600; } .tv-worse { color: #c62828; font-weight: 600; }
.tv-sch-cap { font-weight: 600; margin-top: .5em; }
.tv-sch-hint { color: #666; font-size: 12px; }
.tv-sch-open { display: inline-block; margin: .2em .5em .2em 0; padding: 2px 10px; border: 1px solid #bbb;
  border-radius: 6px; text-decoration: none; }
"""


def choices() -> list[tuple[str, str]]:
    df = schemes.comparisons()
    return [(f"{r.name or r.run_id} · {r.status} · {r.run_id}", r.run_id) for r in df.itertuples()]


def _ci(m: float, lo: float, hi: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"


def results_html(res: pd.DataFrame, protocol: dict) -> str:
    """The results table: per scheme, greedy and sampled accuracy with intervals, delta to the baseline and
    the verdict; every text escaped."""
    if res.empty:
        return '<div class="tv-sch-cap">No results yet (the comparison is running, or failed).</div>'
    rows = []
    for scheme, g in res.groupby("scheme", sort=False):
        cells = [f"<td><b>{html.escape(scheme)}</b></td>"]
        for metric in ("greedy", "sampled"):
            r = g[g["metric"] == metric].iloc[0]
            delta = "baseline" if r.verdict == "baseline" else _ci(r.delta, r.delta_low, r.delta_high, True)
            cls = {"better": "tv-better", "worse": "tv-worse"}.get(r.verdict, "")
            cells += [f"<td>{_ci(r['mean'], r.ci_low, r.ci_high)}</td>", f"<td>{html.escape(delta)}</td>",
                      f'<td class="{cls}">{html.escape(r.verdict)}</td>']
        rows.append("<tr>" + "".join(cells) + "</tr>")
    n = res.iloc[0]
    k, temp = protocol.get("k_samples", "?"), protocol.get("temperature", "?")
    head = ("<tr><th>scheme</th><th>greedy accuracy [95% CI]</th><th>Δ vs baseline</th><th>verdict</th>"
            f"<th>sampled accuracy (k={k}, T={temp}) [95% CI]</th><th>Δ vs baseline</th><th>verdict</th></tr>")
    cap = (f"{int(n.n_seeds)} seed{'s' if n.n_seeds > 1 else ''} × {int(n.n_items)} held-out items; intervals: paired bootstrap over seeds "
           "and items; verdict: the Δ interval excludes 0")
    return (f'<div class="tv-sch-cap">Results · {html.escape(cap)}</div><table class="tv-sch"><thead>{head}</thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


STAT_LABELS = {"mean_alignment": "mean alignment", "opposing_fraction": "opposing fraction", "gini": "Gini",
               "tokens_for_80pct": "tokens for 80%"}


def stats_html(st: pd.DataFrame) -> str:
    """Trace statistics per scheme (mean over seeds) with the difference to the baseline, at one step and mode."""
    if st.empty:
        return ""
    stats = list(dict.fromkeys(st["stat"]))
    head = "<tr><th>scheme</th>" + "".join(f"<th>{html.escape(STAT_LABELS.get(k, k))} (Δ)</th>" for k in stats) + "</tr>"
    body = ""
    for scheme, g in st.groupby("scheme", sort=False):
        by = g.set_index("stat")
        body += f"<tr><td><b>{html.escape(scheme)}</b></td>" + "".join(
            f"<td>{by.loc[k, 'mean']:.3f} ({by.loc[k, 'delta_vs_baseline']:+.3f})</td>" for k in stats) + "</tr>"
    r = st.iloc[0]
    cap = (f"Trace statistics against the baseline · step {int(r.step)}, {r['mode']} mode, every run traced there · "
           "mean over seeds (Δ: minus the baseline's)")
    return f'<div class="tv-sch-cap">{html.escape(cap)}</div><table class="tv-sch">{head}{body}</table>'


def runs_html(kids: pd.DataFrame) -> str:
    if kids.empty:
        return ""
    head = "<tr><th>run</th><th>scheme</th><th>seed</th><th>status</th><th>greedy</th><th>sampled</th><th>seconds</th></tr>"
    body = "".join(
        f"<tr><td><code>{html.escape(r.child_run_id)}</code></td><td>{html.escape(r.scheme)}</td><td>{r.seed}</td>"
        f"<td>{html.escape(str(r.status if isinstance(r.status, str) else r.planned_status))}</td>"
        f"<td>{'' if pd.isna(r.greedy_accuracy) else f'{r.greedy_accuracy:.3f}'}</td>"
        f"<td>{'' if pd.isna(r.sampled_accuracy) else f'{r.sampled_accuracy:.3f}'}</td>"
        f"<td>{r.seconds:.0f}</td></tr>" for r in kids.itertuples())
    return f'<div class="tv-sch-cap">Runs of this comparison</div><table class="tv-sch">{head}{body}</table>'


def inspect_choices(samples: pd.DataFrame) -> list[tuple[str, str]]:
    """Choices ``seed · step · sample · response start`` (value ``seed:step:sample``) of every traced sample of
    the comparison, from ``schemes.traced_samples`` (one row per scheme; the first scheme's preview)."""
    if samples.empty:
        return []
    first = samples.drop_duplicates(["seed", "step", "sample_idx"]).sort_values(["seed", "step", "sample_idx"])
    return [(f"seed {r.seed} · step {r.step} · #{r.sample_idx} · {str(r.preview or '').replace(chr(10), '⏎ ')}",
             f"{r.seed}:{r.step}:{r.sample_idx}") for r in first.itertuples()]


def inspect_links_html(samples: pd.DataFrame, kids: pd.DataFrame, pick: str | None) -> str:
    """One link per scheme opening the picked (seed, step, sample) in Inspect on that scheme's run of the seed
    (a deep link: ``?tab=inspect&run=...&step=...&sample=...``); a scheme whose run did not trace it is named
    without a link. Empty when nothing is picked or the runs were not traced."""
    if samples.empty or not pick:
        return ('<div class="tv-sch-cap">No traced samples: launch the comparison with trace_every > 0 to read '
                "one sample under every scheme in Inspect.</div>" if samples.empty else "")
    try:
        seed, step, sample = (int(x) for x in str(pick).split(":"))
    except ValueError:
        raise ValueError(f"pick a sample from the list (seed:step:sample), got {pick!r}") from None
    traced = set(zip(samples["child_run_id"], samples["step"], samples["sample_idx"]))
    links = []
    for r in kids[kids["seed"] == seed].drop_duplicates("scheme").itertuples():
        name = html.escape(str(r.scheme))
        if (r.child_run_id, step, sample) in traced:
            href = html.escape(Focus("inspect", r.child_run_id, step, sample).query(), quote=True)
            links.append(f'<a class="tv-sch-open" href="{href}" data-scheme="{name}" '
                         f'title="{html.escape(r.child_run_id, quote=True)}">{name}</a>')
        else:
            links.append(f'<span class="tv-sch-open" title="not traced there">{name} (not traced)</span>')
    cap = f"Open sample #{sample} (step {step}, seed {seed}) in Inspect as:"
    hint = "In Inspect, switching the header's run between these keeps the sample and step."
    return (f'<div class="tv-sch-cap">{html.escape(cap)}</div>' + "".join(links)
            + f'<div class="tv-sch-hint">{html.escape(hint)}</div>')


def status_md(cmp_id: str) -> tuple[str, dict]:
    """A line on the comparison (status, progress while it runs) and its protocol."""
    row = schemes.comparisons()
    row = row[row["run_id"] == cmp_id]
    if row.empty:
        raise ValueError(f"{cmp_id!r} is not a scheme comparison in the index")
    info = row.iloc[0]
    cfg = json.loads(info.config_json)["config"]
    p = schemes.progress(cmp_id)
    manifest = schemes.manifest(cmp_id)
    bits = [f"**{html.escape(info['name'] or cmp_id)}** · status **{p.get('status', info['status'])}**",
            (f"schemes {', '.join(cfg['schemes'])} (baseline {cfg['baseline']}) × {cfg['seeds']} seeds · "
             f"{cfg['steps']} steps · task `{cfg['task']}` · model `{cfg['model']}`")]
    if p.get("runs_total"):
        cur = ", ".join(f"{c['run']} step {c['step']}/{cfg['steps']}" for c in p.get("current") or [])
        eta = f" · ETA {p['eta_s']:.0f} s" if p.get("eta_s") is not None and p.get("status") == "running" else ""
        bits.append(f"runs done {p['runs_done']}/{p['runs_total']}" + (f" · running {cur}" if cur else "") + eta)
    if manifest.get("wall_s") is not None:
        bits.append(f"wall time {manifest['wall_s']:.0f} s")
    return " · ".join(bits[:1]) + "<br>" + " · ".join(bits[1:]), manifest.get("protocol", {})


def render(cmp_id: str | None, pick: str | None = None) -> list:
    cs = choices()
    ids = [v for _, v in cs]
    cmp_id = cmp_id if cmp_id in ids else (ids[0] if ids else None)
    if cmp_id is None:
        note = "No scheme comparison indexed yet: launch one below, or `python -m backend compare-schemes ...`."
        return [gr.update(choices=cs, value=None), note, "", "", gr.skip(), gr.skip(), gr.skip(), gr.skip(), "",
                gr.update(choices=[], value=None), ""]
    md, protocol = status_md(cmp_id)
    res = schemes.results(cmp_id)
    points = schemes.accuracy_points(cmp_id)
    kids, samples = schemes.children(cmp_id), schemes.traced_samples(cmp_id)
    picks = inspect_choices(samples)
    pick = pick if pick in [v for _, v in picks] else (picks[0][1] if picks else None)   # kept on a redraw
    return [gr.update(choices=cs, value=cmp_id), md, results_html(res, protocol), stats_html(schemes.trace_stats(cmp_id)),
            for_display(schemes.results_figure(res), 420), for_display(schemes.loss_figure(schemes.loss_curves(cmp_id)), 420),
            for_display(schemes.accuracy_figure(points), 420),
            for_display(schemes.weights_figure(schemes.weights_by_category(cmp_id)), 420),
            runs_html(kids), gr.update(choices=picks, value=pick), inspect_links_html(samples, kids, pick)]


def wire(t: SchemesTab, page: Page) -> None:
    ctx = page.ctx

    @user_errors
    def show(cmp_id, pick=None):
        return render(cmp_id, pick) + [_key(cmp_id)]

    outputs = t.shown + [t.rendered]
    t.comparison.input(show, t.comparison, outputs, api_name="scheme_comparison", **concurrency.RENDER)

    @user_errors
    def refresh(cmp_id):
        ctx.ingest()
        return show(cmp_id)

    t.refresh.click(refresh, t.comparison, outputs, api_visibility="private", **concurrency.INGEST)

    @user_errors
    def links(cmp_id, pick):
        if not cmp_id:
            return ""
        return inspect_links_html(schemes.traced_samples(cmp_id), schemes.children(cmp_id), pick)

    # made once, when first opened: closing and opening the accordion again keeps what was typed. Through the
    # queue: a State's change event follows only a queued event's update (not a queue=False one's)
    t.box.expand(lambda was: gr.skip() if was else True, t.opened, t.opened, api_visibility="private",
                 show_progress="hidden", **concurrency.UI)

    t.inspect_pick.input(links, [t.comparison, t.inspect_pick], t.inspect_links, api_name="scheme_inspect_links",
                         **concurrency.RENDER)

    def live(got: Mapping[Any, Any], on_screen: str) -> dict:
        """On screen: draw everything when the index or the comparison changed since the last drawing (the
        tab opened, a job ended); else, while jobs run, the status line only."""
        if on_screen != "schemes":
            return {}
        cmp_id = got[t.comparison]
        if got[t.rendered] != _key(cmp_id):
            try:
                return dict(zip(outputs, show(cmp_id, got[t.inspect_pick])))
            except gr.Error as e:
                return {t.status: f"⚠️ {html.escape(str(e))}", t.rendered: _key(cmp_id)}
        if cmp_id and ctx.jobs.active():
            return {t.status: status_md(cmp_id)[0]}
        return {}

    def _key(cmp_id: str | None) -> str:
        return f"{cmp_id}|{ctx.generation}"

    page.keep_live([t.comparison, t.rendered, t.inspect_pick], outputs, live)
