"""Run vs run: two runs trained on the same data (other schemes, other seeds) on one sample at one traced step,
token by token: run A (the header's run) and run B on one colour scale, and B - A on a diverging scale (blue: B
gives more, red: less), with a summary line (mean |B - A| over response tokens, the tokens that gained and lost
most). Only (step, sample) pairs both runs traced with the same token ids are offered
(``backend.analysis.runvsrun``)."""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any, Mapping

import gradio as gr
import pandas as pd

from backend.analysis import runvsrun
from backend.index import queries
from tokviz import concurrency, overlay
from tokviz.common import At, as_int, user_errors
from tokviz.context import AppContext
from tokviz.header import Page
from tokviz.links import Focus

NAME = "runvsrun"
CONTEXT = 4          # tokens shown either side of a gained / lost token in the summary
SUMMARY_CSS = """
.tv-rvr-sum { font-size: 13px; line-height: 1.6; }
.tv-rvr-sum .ctx { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; color: #666; white-space: pre-wrap; }
.tv-rvr-sum .ctx b { color: #111; background: #fde8c8; border-radius: 2px; }
.tv-rvr-sum .warn { background: #fff4d6; border-left: 4px solid #e0a800; padding: 2px 8px; margin: .2em 0; }
.tv-rvr-sum ul { margin: .2em 0 .4em 1.2em; padding: 0; }
"""
# the overlay's CSS, less the Inspect keyboard hint (these overlays have their own keys, said above them)
OVERLAY_CSS = overlay.CSS + ".tv-legend .tv-keys { display: none; }\n"
# A click on a token opens it in Inspect: the run of its overlay (B − A: run A, the header's), at this tab's step
# and sample (the app's ``open_token``; the ``data-open`` run is set by ``overlays``).
CLICK_JS = r"""
function tvOpen(t) {
  const box = t.closest('.tv-text');
  trigger('click', {run: box.dataset.open, step: parseInt(box.dataset.step), sample: parseInt(box.dataset.idx),
                    position: parseInt(t.dataset.i)});
}
element.addEventListener('click', (e) => {
  const t = e.target.closest('.tv-text [data-i]');
  if (t) tvOpen(t);
});
"""
# On run A's overlay only (one listener for the three): while the tab is on screen and no field has the focus,
# left/right move a selection through the tokens (the same position outlined in A, B and B − A), Enter opens the
# selected token of A in Inspect. A listener left by an overlay that is gone (a rebuild) removes itself.
KEYS_JS = r"""
function tvKeys(e) {
  if (!element.isConnected) { document.removeEventListener('keydown', tvKeys); return; }
  if (e.defaultPrevented || e.altKey || e.ctrlKey || e.metaKey) return;
  const a = document.activeElement;
  if (a && (a.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName))) return;
  const box = element.querySelector('.tv-text');
  if (!box || box.offsetParent === null) return;
  const cur = box.querySelector('.t.sel');
  if (e.key === 'Enter' && cur) { tvOpen(cur); e.preventDefault(); return; }
  if (e.key !== 'ArrowLeft' && e.key !== 'ArrowRight') return;
  const toks = Array.from(box.querySelectorAll('[data-i]'));
  if (!toks.length) return;
  const step = e.key === 'ArrowRight' ? 1 : -1;
  let i = cur ? toks.indexOf(cur) + step : (step > 0 ? 0 : toks.length - 1);
  i = Math.max(0, Math.min(toks.length - 1, i));
  const pos = toks[i].dataset.i;
  document.querySelectorAll('.tv-rvr-ov .t.sel').forEach(s => s.classList.remove('sel'));
  document.querySelectorAll('.tv-rvr-ov .tv-text [data-i="' + pos + '"]').forEach(s => {
    s.classList.add('sel'); s.scrollIntoView({block: 'nearest'}); });
  e.preventDefault();
}
document.addEventListener('keydown', tvKeys);
"""
KEYS_HINT = ("Click a token to open it in Inspect (run B's: the header moves to run B). Keys: ← → select a token "
             "in all three, Enter opens it.")


@dataclass
class RunVsRunTab:
    run_b: gr.Dropdown
    step: gr.Dropdown
    sample: gr.Dropdown
    metric: gr.Dropdown
    summary: gr.HTML
    ov_a: gr.HTML
    ov_b: gr.HTML
    ov_diff: gr.HTML

    @property
    def inputs(self) -> list:
        return [self.run_b, self.step, self.sample, self.metric]

    @property
    def outputs(self) -> list:
        return [self.run_b, self.step, self.sample, self.metric, self.summary, self.ov_a, self.ov_b, self.ov_diff]

    @property
    def token_links(self) -> list[gr.HTML]:
        """The overlays: a click on a token (``{run, step, sample, position}``) opens it in Inspect (tokviz.ui)."""
        return [self.ov_a, self.ov_b, self.ov_diff]


def build(ctx: AppContext) -> RunVsRunTab:
    gr.Markdown("Run A is the header's run; run B one trained on the same data (the runs listed traced a sample "
                "with the same tokens). Both overlays share one colour scale; the third shows B − A.")
    with gr.Row(equal_height=True):
        run_b = gr.Dropdown(label="Run B", choices=[], elem_id="tv-rvr-run-b", scale=4)
        step = gr.Dropdown(label="Step (traced by both)", choices=[], elem_id="tv-rvr-step", scale=1)
        sample = gr.Dropdown(label="Sample (same tokens in both)", choices=[], elem_id="tv-rvr-sample", scale=3)
        metric = gr.Dropdown(label="Metric", choices=list(runvsrun.METRICS), value="weight", elem_id="tv-rvr-metric",
                             scale=2)
    summary = gr.HTML("", css_template=SUMMARY_CSS, elem_id="tv-rvr-summary")
    gr.Markdown(KEYS_HINT, elem_id="tv-rvr-keys")
    ov = dict(css_template=OVERLAY_CSS, min_height=60, elem_classes=["tv-rvr-ov"])
    gr.Markdown("**A** (header's run)")
    ov_a = gr.HTML("", js_on_load=CLICK_JS + KEYS_JS, elem_id="tv-rvr-a", **ov)
    gr.Markdown("**B**")
    ov_b = gr.HTML("", js_on_load=CLICK_JS, elem_id="tv-rvr-b", **ov)
    gr.Markdown("**B − A**")
    ov_diff = gr.HTML("", js_on_load=CLICK_JS, elem_id="tv-rvr-diff", **ov)
    return RunVsRunTab(run_b, step, sample, metric, summary, ov_a, ov_b, ov_diff)


def _pick(value: object, allowed: list, fallback: object = None) -> object:
    """``value`` if allowed, else ``fallback`` if allowed, else the first allowed (None if there is none)."""
    for v in (value, fallback):
        if v is not None and v in allowed:
            return v
    return allowed[0] if allowed else None


def diff_metric(m: overlay.Metric) -> overlay.Metric:
    """The overlay metric of B - A for metric ``m``: diverging around 0, linear (also for a log-scale metric)."""
    return overlay.Metric(f"diff:{m.name}", f"B − A: {m.label}", "diff", centre=0.0, fmt=".3g",
                          trained_only=m.trained_only, help="blue: run B's value is higher; red: lower")


def _side(df: pd.DataFrame, which: str, column: str) -> pd.DataFrame:
    """One run's tokens as the overlay reads them (``queries.sample_tokens``'s columns it uses)."""
    return pd.DataFrame({"position": df["position"], "token": df[f"token_{which}"],
                         "is_response": df[f"is_response_{which}"], "mode": df[f"mode_{which}"],
                         column: df[which]})


def overlays(df: pd.DataFrame, metric: str, run_a: str, run_b: str, step: int, sample: int) -> tuple[str, str, str]:
    """The HTML of A, B (on one scale, from both runs' response tokens) and B - A."""
    m = overlay.METRICS[metric]
    a, b = _side(df, "a", m.column), _side(df, "b", m.column)
    scale = overlay.scale_for(m, pd.concat([a[m.column], b[m.column]], ignore_index=True),
                              pd.concat([a["is_response"], b["is_response"]], ignore_index=True))
    d = a.drop(columns=[m.column]).assign(diff=df["diff"])
    note = "one colour scale for A and B; hover a token for its numbers"
    out = (overlay.render(a, m, key=(run_a, step, sample), scale=scale, note=note),
           overlay.render(b, m, key=(run_b, step, sample), scale=scale, note=note),
           overlay.render(d, diff_metric(m), key=(f"{run_b} - {run_a}", step, sample)))
    opens = (run_a, run_b, run_a)       # the run a click on each opens in Inspect (B − A: the header's, A)
    return tuple(opening(with_titles(h, df, m), r) for h, r in zip(out, opens))       # type: ignore[return-value]


def opening(overlay_html: str, run: str) -> str:
    """The overlay with the run a click on its tokens opens in Inspect (``data-open`` on its text)."""
    return overlay_html.replace('<div class="tv-text" ',
                                f'<div class="tv-text" data-open="{html.escape(run, quote=True)}" ', 1)


def with_titles(overlay_html: str, df: pd.DataFrame, m: overlay.Metric) -> str:
    """The overlay with a tooltip (the ``title`` attribute) on every token: its position, text, A, B and B - A.
    These overlays have no script (the Inspect overlay's tooltip asks the server for one run's numbers)."""
    num = (lambda v: "–" if pd.isna(v) else format(float(v), ".4g"))
    tips = {int(r.position): html.escape(f"#{int(r.position)} {overlay.show_token(str(r.token_a))}\n{m.name}: A "
                                         f"{num(r.a)} · B {num(r.b)} · B − A {num(r.diff)}", quote=True)
            for r in df[["position", "token_a", "a", "b", "diff"]].itertuples(index=False)}
    return re.sub(r'data-i="(\d+)"', lambda g: f'{g.group(0)} title="{tips.get(int(g.group(1)), "")}"', overlay_html)


def _in_context(df: pd.DataFrame, i: int) -> str:
    """Token ``i`` (a row label) of ``df`` in its context: a few tokens either side, the token in bold."""
    k = df.index.get_loc(i)
    texts = df["token_a"].astype(str).tolist()
    flat = (lambda t: html.escape(t.replace("\n", "⏎").replace("\t", "⇥"), quote=True))     # one line
    before = "".join(texts[max(0, k - CONTEXT):k])
    after = "".join(texts[k + 1:k + 1 + CONTEXT])
    return f'<span class="ctx">{flat(before)}<b>{html.escape(overlay.show_token(texts[k]))}</b>{flat(after)}</span>'


def summary_html(df: pd.DataFrame, metric: str, run_a: str, run_b: str, step: int, sample: int) -> str:
    """The summary line: what is compared, mean |B - A| over response tokens, the tokens that gained and lost
    most (in context), and a warning when the runs traced in different modes (a gradient metric then means a
    different thing in each)."""
    m = overlay.METRICS[metric]
    s = runvsrun.summary(df)
    info = {r: queries.run_info(r).iloc[0] for r in (run_a, run_b)}

    def who(r: str) -> str:
        scheme = info[r]["scheme"]
        return f"<code>{html.escape(r)}</code>" + (f" ({html.escape(str(scheme))})" if isinstance(scheme, str) else "")

    val, dif = (lambda v: format(v, ".4g")), (lambda v: format(v, "+.4g"))
    head = (f"A {who(run_a)} vs B {who(run_b)} · step {step} · sample {sample} · {html.escape(m.label)}: "
            f"mean |B − A| over {s['n']} response tokens <b class='tv-rvr-mean'>"
            f"{'–' if s['n'] == 0 else format(s['mean_abs_diff'], '.4g')}</b>")
    lists = []
    for key, what in (("gained", "gained most under B"), ("lost", "lost most under B")):
        rows = s[key]
        items = "".join(f"<li>{_in_context(df, i)} {val(r['a'])} → {val(r['b'])} (B − A {dif(r['diff'])})</li>"
                        for i, r in rows.iterrows())
        lists.append(f"<div>{what}:</div><ul>{items}</ul>" if items else f"<div>{what}: none</div>")
    warn = ""
    ma, mb = set(df["mode_a"].dropna()), set(df["mode_b"].dropna())
    if metric in overlay.GRADIENT_METRICS and ma != mb:
        warn = (f'<div class="warn">⚠️ the runs traced in different modes (A: '
                f'{html.escape(", ".join(sorted(ma)))}, B: {html.escape(", ".join(sorted(mb)))}): '
                f'{html.escape(metric)} is a different gradient in each</div>')
    return f'<div class="tv-rvr-sum">{warn}<div>{head}</div>{"".join(lists)}</div>'


def render(run_a: str | None, header_step: int | None, run_b: object, step: object, sample: object,
           metric: object) -> tuple[list, dict]:
    """The tab's outputs for run A and the controls' values (each kept when still allowed, else the first
    allowed: run B, then a step both traced (the header's if it is one), a sample, a metric), and the focus."""
    if not run_a:
        raise ValueError("choose a run first (no run is selected)")
    if isinstance(run_b, (list, tuple)):             # a deep link's ``runs`` field
        run_b = run_b[0] if run_b else None
    partners = runvsrun.partners(run_a)["run_id"].tolist()
    if not partners:
        blank = [gr.update(choices=[], value=None)] * 3 + [gr.skip()]
        why = (f'<div class="tv-rvr-sum">No other run traced a sample with the same tokens as '
               f'<code>{html.escape(run_a)}</code>.</div>')
        notice = f"⚠️ Run vs run: no other run shares a traced sample with {run_a}"
        return blank + [why, "", "", ""], {"notice": notice}
    run_b = _pick(run_b, partners)
    pairs = runvsrun.comparable(run_a, run_b)
    steps = sorted(int(s) for s in pairs["step"].unique())
    step = _pick(as_int(step, "step"), steps, as_int(header_step, "step"))
    at = pairs[pairs["step"] == step]
    samples = [int(k) for k in at["sample_idx"]]
    sample = _pick(as_int(sample, "sample"), samples)
    metrics = runvsrun.available_metrics(run_a, run_b, step)
    metric = _pick(metric, metrics, "weight")
    df = runvsrun.compare_sample(run_a, run_b, step, sample, metric)
    sample_labels = [(f"#{k} · {n} tokens", k) for k, n in zip(samples, at["n_tokens"].astype(int))]
    ov = overlays(df, metric, run_a, run_b, step, sample)
    return [gr.update(choices=partners, value=run_b), gr.update(choices=steps, value=step),
            gr.update(choices=sample_labels, value=sample), gr.update(choices=metrics, value=metric),
            summary_html(df, metric, run_a, run_b, step, sample), *ov], \
        {"step": step, "sample": sample, "metric": metric, "runs": (run_b,)}


def render_tab(t: RunVsRunTab, at: At, got: Mapping[Any, Any]) -> tuple[list, dict]:
    """For the header (a new run or step, a deep link, the tab opened): the header's step first, when both runs
    traced it; else the tab's own step."""
    return render(at.run, got[t.step], got[t.run_b], at.step, got[t.sample], got[t.metric])


def link_inputs(t: RunVsRunTab) -> dict[str, gr.components.Component]:
    """The deep-link fields this tab restores (the step is the header's): run B (as ``runs``), sample, metric."""
    return {"runs": t.run_b, "sample": t.sample, "metric": t.metric}


def wire(t: RunVsRunTab, page: Page) -> None:
    """A change of run B, step, sample or metric redraws the tab (and the deep link)."""
    h = page.header

    @user_errors
    def redraw(run_a, header_step, run_b, step, sample, metric):
        values, focus = render(run_a, header_step, run_b, step, sample, metric)
        focus = {"step": header_step, **{k: v for k, v in focus.items() if k != "notice"}}
        return [*values, Focus(NAME, run_a, **focus).query()]

    for c in t.inputs:
        c.input(redraw, [h.run, h.step, *t.inputs], [*t.outputs, h.query], api_visibility="private",
                show_progress="minimal", **concurrency.RENDER)
