"""The token overlay: a sample's text, token by token, each token coloured by one metric.

    html = render(tokens_df, METRICS["alignment"], selected=57)   # tokens_df: queries.sample_tokens(...)

Pure functions (DataFrame -> HTML string), no I/O. Every token's text is HTML-escaped, so a token such as
``<script>`` shows as text; whitespace and newlines are kept (the container is ``white-space: pre-wrap``) and a
newline token shows a faint ``⏎`` so its colour can be seen. Prompt tokens are dimmed, dashed and italic; a
label marks where the prompt and the response begin. Hovering a token shows its numbers (a tooltip drawn
by the script, from a JSON payload sent once per sample); a click reports ``data-i`` (the position) to the app.
Keyboard (when no field has the focus): left/right select the previous/next token, up/down or k/j go to the
previous/next sample.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

# RdBu, from negative/low (red) through white to positive/high (blue): signed metrics and ratios around 1
_STOPS = np.array([[178, 24, 43], [214, 96, 77], [244, 165, 130], [253, 219, 199], [247, 247, 247],
                   [209, 229, 240], [146, 197, 222], [67, 147, 195], [33, 102, 172]], dtype=np.float64)
# Purples, from white (the sample's low end) to dark (its high end): one-sided metrics (loss, probability,
# entropy, magnitude), whose values have no natural centre to diverge from
_SEQ_STOPS = np.array([[252, 251, 253], [239, 237, 245], [218, 218, 235], [188, 189, 220], [158, 154, 200],
                       [128, 125, 186], [106, 81, 163], [84, 39, 143], [63, 0, 125]], dtype=np.float64)


_NO_INFLUENCE = ("no influence recorded at this step: train with --influence-eval N (and --trace-every) to measure "
                 "each token's effect on held-out loss")


@dataclass(frozen=True)
class Metric:
    """How one token column becomes a colour. Diverging (``centre`` given: white there, red below, blue above;
    signed metrics centre on 0, weights on 1) or sequential (``centre`` None: white at the sample's low end, dark
    at its high end, ``log`` first for heavy-tailed ones). ``trained_only``: the metric says something about
    tokens the loss trains on, so prompt tokens are left uncoloured."""
    name: str
    label: str
    column: str
    centre: float | None = 0.0
    log: bool = False
    fmt: str = ".4g"
    help: str = ""
    trained_only: bool = False
    missing: str = ""            # what to do when a sample has no values of it (shown instead of colours)


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("alignment", "alignment (cosine with the batch gradient)", "alignment", help="blue: pushes the "
           "update the way the batch goes; red: opposes it"),
    Metric("dot", "dot <P, G>", "dot", fmt=".3g"),
    Metric("share", "share of ||G||²", "share", fmt=".3%"),
    Metric("magnitude", "gradient magnitude (log scale)", "magnitude", centre=None, log=True, fmt=".3g"),
    Metric("loss", "loss -log p", "loss", centre=None, fmt=".3f", trained_only=True),
    Metric("prob", "probability of the token", "prob", centre=None, fmt=".3f", trained_only=True),
    Metric("entropy", "entropy of the prediction", "entropy", centre=None, fmt=".3f", trained_only=True),
    Metric("weight", "scheme weight (as trained)", "weight", centre=1.0, fmt=".3f", trained_only=True),
    Metric("influence", "influence on the eval loss <piece, G_eval>", "influence", fmt=".3g",
           help="blue: this token's part of the update lowers the held-out loss (helps); red: raises it (hurts)",
           missing=_NO_INFLUENCE),
    Metric("influence_alignment", "influence alignment (cosine with the eval-loss gradient)",
           "influence_alignment", fmt=".3f", missing=_NO_INFLUENCE,
           help="blue: points where the held-out loss wants the update to go; red: against it"),
]}
WHAT_IF_PREFIX = "what-if:"


def what_if_metric(scheme: str) -> Metric:
    """The metric "what scheme X would weigh this token" (its values are computed, not a stored column)."""
    return Metric(f"{WHAT_IF_PREFIX}{scheme}", f"weight scheme {scheme} would give", "what_if", centre=1.0,
                  fmt=".3f", help="batch statistics over the traced sequences of this step", trained_only=True)


def colours(t: np.ndarray, sequential: bool = False) -> list[str]:
    """t in [-1, 1] (NaN: no colour) -> hex colours on the diverging scale, or on the sequential one
    (-1 = white, the low end)."""
    stops = _SEQ_STOPS if sequential else _STOPS
    pos = (np.clip(np.nan_to_num(t, nan=0.0), -1, 1) + 1) / 2 * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[:, None]
    rgb = (stops[lo] * (1 - frac) + stops[lo + 1] * frac).round().astype(int)
    out = [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb]
    return [c if not math.isnan(x) else "" for c, x in zip(out, t)]


@dataclass(frozen=True)
class Scale:
    """Values -> [-1, 1]: diverging, (v - centre) / half_range; sequential, lo -> -1 and hi -> +1."""
    centre: float
    half_range: float
    log: bool
    sequential: bool = False

    def position(self, v: np.ndarray) -> np.ndarray:
        """Values -> [-1, 1] (NaN stays NaN)."""
        x = np.asarray(v, dtype=np.float64)
        if self.log:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = np.log10(np.where(x > 0, x, np.nan))
        return (x - self.centre) / self.half_range

    def value_at(self, t: float) -> float:
        x = self.centre + t * self.half_range
        return 10 ** x if self.log else x


def scale_for(metric: Metric, values: pd.Series, is_response: pd.Series) -> Scale:
    """The colour scale of one sample, from its response tokens' values (all tokens if there are none), so
    the colours spend their range where the loss trains. Diverging: centred per the metric, half-range the 98th
    percentile of the distance to the centre, so one outlier does not wash out the rest. Sequential: from the
    2nd to the 98th percentile (of log10 for a log metric)."""
    v = np.asarray(values, dtype=np.float64)
    ref = v[np.asarray(is_response, dtype=bool)] if np.asarray(is_response, dtype=bool).any() else v
    if metric.log:
        with np.errstate(divide="ignore", invalid="ignore"):
            ref = np.log10(np.where(ref > 0, ref, np.nan))
    ref = ref[np.isfinite(ref)]
    if metric.centre is None:
        lo, hi = (float(np.quantile(ref, 0.02)), float(np.quantile(ref, 0.98))) if ref.size else (0.0, 1.0)
        if not hi > lo:
            lo, hi = (lo - 0.5, lo + 0.5) if not metric.log else (lo - 1.0, lo + 1.0)
        return Scale((lo + hi) / 2, (hi - lo) / 2, metric.log, sequential=True)
    centre = float(metric.centre)
    dev = np.abs(ref - centre)
    half = float(np.quantile(dev, 0.98)) if dev.size else 0.0
    if not half > 0:
        half = float(dev.max()) if dev.size and dev.max() > 0 else 1.0
    return Scale(centre, half, metric.log)


def _fmt(v: object, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "–"
    return format(float(v), spec)


def show_token(token: str) -> str:
    """A token quoted, with invisible characters made visible (for the tooltip and tables)."""
    return "«" + token.replace("\n", "⏎").replace("\t", "⇥") + "»"


def token_html(token: str) -> str:
    """A token's text as HTML: escaped, a faint ⏎ before each newline so a newline token can be seen."""
    text = html.escape(token, quote=True)
    return text.replace("\n", '<i class="nl">⏎</i>\n') if "\n" in text else text


# the gradient metrics mean a different thing in each trace mode (tokens.mode; docs/design.md "Definitions")
GRADIENT_METRICS = ("alignment", "dot", "share", "magnitude")
MODE_DESCRIPTIONS = {
    "position": ("position mode: the piece this position supplies to the batch gradient (it carries the "
                 "gradients of later tokens' losses through attention; prompt positions have pieces)"),
    "token": "token mode: the gradient of this token's own loss",
}


def mode_note(metric: Metric, modes: pd.Series | None) -> str:
    """What ``metric`` is a gradient of, given the sample's ``mode`` column: "" for metrics that are not
    gradients (loss, prob, ...) or without a mode column."""
    if metric.column not in GRADIENT_METRICS or modes is None:
        return ""
    found = list(dict.fromkeys(str(m) for m in modes.dropna()))
    return "; ".join(MODE_DESCRIPTIONS.get(m, f"{m} mode") for m in found)


def legend(metric: Metric, scale: Scale, mode: str = "") -> str:
    """A colour bar with the values at its ends (and centre, when it diverges); ``mode``: what the metric is a
    gradient of (``mode_note``), shown after the metric's name; and what the prompt tokens' look means."""
    stops = ", ".join(colours(np.linspace(-1, 1, 9), scale.sequential))
    lo, mid, hi = (scale.value_at(t) for t in (-1.0, 0.0, 1.0))
    mode_html = f'<span class="tv-mode">({html.escape(mode)})</span>' if mode else ""
    mid_html = ("" if scale.sequential else f'<span class="tv-mid">centre {_fmt(mid, metric.fmt)}</span>')
    prompt = ("prompt (not trained on: uncoloured)" if metric.trained_only else "prompt")
    return (f'<div class="tv-legend"><span class="tv-metric">{html.escape(metric.label)}</span>{mode_html}'
            f'<span>{_fmt(lo, metric.fmt)}</span><span class="tv-bar" style="background: linear-gradient(90deg, '
            f'{stops})"></span><span>{_fmt(hi, metric.fmt)}</span>{mid_html}'
            f'<span class="tv-key"><span class="t p">{prompt}</span> <span class="t r">response</span></span>'
            '<span class="tv-keys" title="keyboard, when no field has the focus">← → token · ↑ ↓ (k j) sample</span>'
            '</div>')


FLOAT_TIPS = ("alignment", "share", "dot", "magnitude", "loss", "prob", "entropy", "weight")
OPTIONAL_TIPS = ("influence", "influence_alignment")


def _sig(a: np.ndarray, digits: int = 4) -> list[float]:
    """Values rounded to ``digits`` significant digits (NaN stays NaN): a compact tooltip payload."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mag = np.where(np.isfinite(a) & (a != 0), np.floor(np.log10(np.abs(a))), 0)
        scale = 10.0 ** (digits - 1 - mag)
        return (np.round(a * scale) / scale).tolist()


def _json_numbers(obj: object) -> str:
    """JSON of numbers only, NaN written as null (JSON has no NaN)."""
    return json.dumps(obj, separators=(",", ":")).replace("NaN", "null").replace("Infinity", "null")


def tip_data(tokens: pd.DataFrame, what_if: np.ndarray | None = None, what_if_name: str = "") -> str:
    """The numbers of every token as JSON (one list per column, 4 significant digits; categories by index),
    what the overlay's script shows when a token is hovered."""
    cats = list(dict.fromkeys(tokens["category"].astype(str)))
    index = {c: i for i, c in enumerate(cats)}
    cols: dict[str, list] = {c: _sig(tokens[c].astype("float64").to_numpy(na_value=np.nan)) for c in FLOAT_TIPS}
    for c in OPTIONAL_TIPS:                      # only when the run recorded them
        if c in tokens and tokens[c].notna().any():
            cols[c] = _sig(tokens[c].astype("float64").to_numpy(na_value=np.nan))
    cols["position"] = tokens["position"].astype(int).tolist()
    cols["resp_pos"] = tokens["resp_pos"].astype("float64").fillna(-1).astype(int).tolist()
    cols["is_response"] = tokens["is_response"].astype(int).tolist()
    cols["category"] = [index[c] for c in tokens["category"].astype(str)]
    wi = ""
    if what_if is not None:
        wi = f',"what_if":{{"name":{json.dumps(what_if_name)},"values":{_json_numbers(_sig(what_if))}}}'
    return f'{{"columns":{_json_numbers(cols)},"categories":{json.dumps(cats)}{wi}}}'


LEVELS = 21          # colour steps of the token background (class c0 .. c20; c10 is the centre, white)
STRONG = 3           # the outermost levels on each side get white text


def levels(t: np.ndarray) -> np.ndarray:
    """Positions on the scale in [-1, 1] -> colour level 0 .. LEVELS - 1 (-1 where there is no value)."""
    k = np.rint((np.clip(np.nan_to_num(t, nan=0.0), -1, 1) + 1) / 2 * (LEVELS - 1)).astype(int)
    return np.where(np.isnan(t), -1, k)


def render(tokens: pd.DataFrame, metric: Metric, selected: int | None = None, what_if: pd.Series | None = None,
           note: str = "", key: tuple[str, int, int] | None = None, scale: Scale | None = None) -> str:
    """The overlay of one sample. ``tokens``: rows of ``queries.sample_tokens``; ``what_if``: the metric's
    values when they are not a column (aligned with ``tokens``); ``key`` (run, step, sample) is written into
    the HTML: the tooltip script asks the server for the numbers of that sample (once, on the first hover),
    and a browser test can tell which sample is painted. ``scale``: a colour scale to use instead of the
    sample's own (two overlays on one scale: the Run vs run tab)."""
    if tokens.empty:
        return '<div class="tv-empty">no tokens</div>'
    if what_if is None and (metric.column not in tokens or tokens[metric.column].isna().all()) and metric.missing:
        return f'<div class="tv-empty tv-missing">{html.escape(metric.missing)}</div>'
    values = what_if if what_if is not None else tokens[metric.column]
    v = np.asarray(values, dtype=np.float64)
    scale = scale or scale_for(metric, pd.Series(v), tokens["is_response"])
    lev = levels(scale.position(v))
    if metric.trained_only:                       # the loss never trains on prompt tokens: no colour for them
        lev = np.where(tokens["is_response"].to_numpy(dtype=bool), lev, -1)
    prefix = "s" if scale.sequential else "c"
    parts = [legend(metric, scale, mode_note(metric, tokens["mode"] if "mode" in tokens else None))]
    if note:
        parts.append(f'<div class="tv-note">{html.escape(note)}</div>')
    run, step, sample = key if key is not None else ("", -1, -1)
    attrs = {"data-sample": f"{run}/{step}/{sample}", "data-run": run, "data-step": step, "data-idx": sample,
             "data-metric": metric.name}
    parts.append('<div class="tv-text" ' + " ".join(f'{k}="{html.escape(str(a), quote=True)}"'
                                                  for k, a in attrs.items()) + ">")
    prev_resp = None
    positions = tokens["position"].to_numpy()
    resp = tokens["is_response"].to_numpy(dtype=bool)
    texts = tokens["token"].astype(str).tolist()
    for i in range(len(texts)):
        if resp[i] != prev_resp:
            parts.append(f'<span class="tv-seg">{"response" if resp[i] else "prompt"}</span>')
            prev_resp = resp[i]
        cls = ("t r" if resp[i] else "t p") + (f" {prefix}{lev[i]}" if lev[i] >= 0 else "")
        if selected is not None and positions[i] == selected:
            cls += " sel"
        parts.append(f'<span class="{cls}" data-i="{positions[i]}">{token_html(texts[i])}</span>')
    parts.append("</div>")
    return "".join(parts)


def _level_css() -> str:
    rules = []
    for prefix, sequential, strong_ks in (("c", False, list(range(STRONG)) + list(range(LEVELS - STRONG, LEVELS))),
                                          ("s", True, list(range(LEVELS - 2 * STRONG, LEVELS)))):
        cols = colours(np.linspace(-1, 1, LEVELS), sequential)
        rules += [f".tv-text .{prefix}{k} {{ background: {c}; }}" for k, c in enumerate(cols)]
        rules.append(", ".join(f".tv-text .{prefix}{k}" for k in strong_ks) + " { color: #fff; }")
    return "\n".join(rules) + "\n"


# The overlay's CSS (scoped to its gr.HTML component by Gradio's css_template).
CSS = """
.tv-legend { display: flex; gap: .5em; align-items: center; flex-wrap: wrap; font-size: .85em; margin-bottom: .4em; }
.tv-legend .tv-bar { display: inline-block; width: 180px; height: .9em; border: 1px solid #ccc; }
.tv-legend .tv-metric { font-weight: 600; }
.tv-legend .tv-keys { margin-left: auto; color: #888; font-size: 11px; }
.tv-legend .tv-mid { color: #666; }
.tv-legend .tv-mode { color: #444; font-style: italic; }
.tv-note { font-size: .85em; color: #a15c00; margin-bottom: .4em; }
.tv-text { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
           font-size: 14px; line-height: 1.9; max-height: 560px; overflow-y: auto; padding: .5em;
           border: 1px solid #ddd; border-radius: 6px; background: #fff; color: #111; }
.tv-text .t { cursor: pointer; border-radius: 2px; }
.tv-text .t.p { opacity: .72; font-style: italic; border-bottom: 1px dashed #888; }
.tv-text .t.r { border-bottom: 1px solid transparent; }
.tv-text .t.sel { outline: 2px solid #111; outline-offset: 1px; }
.tv-text .t:hover { outline: 1px solid #444; }
.tv-text .nl { opacity: .45; font-style: normal; }
.tv-seg { display: inline-block; font-family: sans-serif; font-size: 10px; text-transform: uppercase;
          letter-spacing: .05em;
          color: #fff; background: #555; border-radius: 3px; padding: 0 4px; margin: 0 4px 0 2px; line-height: 1.5; }
.tv-key .t { padding: 0 4px; }
.tv-key .t.p { opacity: .72; font-style: italic; border-bottom: 1px dashed #888; }
.tv-key .t.r { border-bottom: 1px solid #111; }
.tv-empty { color: #666; padding: 1em; }
""" + _level_css()

# Clicks report the token position; hovering shows the token's numbers in one floating tooltip (the numbers of
# the whole sample come from the server on the first hover: ``server.token_numbers``, the Inspect tab's server
# function); after a re-render a selected token (a deep link) is scrolled into view.
JS = r"""
const tip = document.createElement('div');
tip.className = 'tv-tip';
tip.style.cssText = 'position:fixed;z-index:1000;display:none;pointer-events:none;white-space:pre;' +
  'background:#222;color:#fff;font:12px/1.45 ui-monospace,Menlo,monospace;padding:5px 8px;border-radius:4px;' +
  'box-shadow:0 2px 8px rgba(0,0,0,.25);max-width:560px';
document.body.appendChild(tip);
let cache = {key: null, data: null, rows: null, pending: null};
function payload(box) {
  const key = [box.dataset.run, box.dataset.step, box.dataset.idx, box.dataset.metric].join('|');
  if (cache.key === key) return cache.data ? cache : null;
  cache = {key: key, data: null, rows: null, pending: null};
  cache.pending = server.token_numbers(box.dataset.run, parseInt(box.dataset.step), parseInt(box.dataset.idx),
                                       box.dataset.metric).then((json) => {
    if (cache.key !== key) return;
    const d = JSON.parse(json);
    const rows = new Map();
    d.columns.position.forEach((p, k) => rows.set(p, k));
    cache.data = d; cache.rows = rows;
    if (hovered && hovered.isConnected) show(hovered);
  }).catch((err) => { if (cache.key === key) { cache.key = null; } tip.textContent = String(err); });
  return null;
}
const f = (v, d) => v === null || v === undefined ? '–' : (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3)
  ? v.toExponential(d - 1) : (+v.toPrecision(d)).toString());
const pct = (v) => v === null || v === undefined ? '–' : (100 * v).toPrecision(3) + '%';
function text(t) {
  const box = t.closest('.tv-text');
  const p = payload(box);
  if (!p) return 'loading the numbers…';
  const k = p.rows.get(parseInt(t.dataset.i));
  if (k === undefined) return '';
  const c = p.data.columns, q = (name) => c[name][k];
  const shown = '«' + t.textContent.replace(/⏎\n/g, '⏎').replace(/\n/g, '⏎').replace(/\t/g, '⇥') + '»';
  const where = q('is_response') ? 'response ' + q('resp_pos') : 'prompt';
  let s = '#' + q('position') + ' ' + where + ' · ' + p.data.categories[q('category')] + ' · ' + shown + '\n' +
    'alignment ' + f(q('alignment'), 4) + '   share ' + pct(q('share')) + '\n' +
    'dot ' + f(q('dot'), 3) + '   magnitude ' + f(q('magnitude'), 3) + '\n' +
    'loss ' + f(q('loss'), 4) + '   p ' + f(q('prob'), 3) + '   entropy ' + f(q('entropy'), 3) + '\n' +
    'weight ' + f(q('weight'), 3);
  if (p.data.what_if) s += '   ' + p.data.what_if.name + ' would weigh ' + f(p.data.what_if.values[k], 3);
  if (c.influence) s += '\ninfluence on eval loss ' + f(q('influence'), 3) + ' (cos ' + f(q('influence_alignment'), 3) + ')';
  return s;
}
let hovered = null;
function show(t) {
  tip.textContent = text(t);
  const r = t.getBoundingClientRect();
  tip.style.display = 'block';
  const below = r.bottom + 6 + tip.offsetHeight < window.innerHeight;
  tip.style.left = Math.max(4, Math.min(r.left, window.innerWidth - tip.offsetWidth - 8)) + 'px';
  tip.style.top = (below ? r.bottom + 6 : r.top - tip.offsetHeight - 6) + 'px';
}
element.addEventListener('mouseover', (e) => {
  const t = e.target.closest('.tv-text [data-i]');
  hovered = t;
  if (!t) { tip.style.display = 'none'; return; }
  show(t);
});
element.addEventListener('mouseleave', () => { hovered = null; tip.style.display = 'none'; });
// The app drops a click that comes while the previous one is still being answered (Gradio's trigger mode
// "once"; "always_last" would resend it without its position). So the script remembers the token it asked for
// last and checks the breakdown's title (#tv-token-title) a little later: while it shows another token, it asks
// again (a request made while one is pending is dropped, so asking again is harmless). The server ends on the
// highlighted token however fast the clicks or arrow keys come.
let wanted = null, timer = null;
function select(t) {
  element.querySelectorAll('.t.sel').forEach(s => s.classList.remove('sel'));
  t.classList.add('sel');
  wanted = parseInt(t.dataset.i);
  trigger('click', {position: wanted});
  clearTimeout(timer);
  timer = setTimeout(() => recheck(0), 250);
}
function recheck(tries) {
  const title = document.querySelector('#tv-token-title');
  const m = title && /Token #(\d+)/.exec(title.innerText);
  if (wanted === null || !element.querySelector('.t.sel') || (m && parseInt(m[1]) === wanted)) return;
  if (tries >= 40 || (!m && tries >= 4)) return;       // no answer to compare with: an error said why
  trigger('click', {position: wanted});
  timer = setTimeout(() => recheck(tries + 1), 250);
}
element.addEventListener('click', (e) => {
  const t = e.target.closest('.tv-text [data-i]');
  if (t) select(t);
});
// Keyboard, while the overlay is on screen and no field has the focus: left/right the previous/next token,
// up/down (or k/j) the previous/next sample (the tab's own buttons, so the server does what a click does).
document.addEventListener('keydown', (e) => {
  if (e.defaultPrevented || e.altKey || e.ctrlKey || e.metaKey) return;
  const a = document.activeElement;
  if (a && (a.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName))) return;
  const box = element.querySelector('.tv-text');
  if (!box || box.offsetParent === null) return;
  const k = e.key;
  if (k === 'ArrowLeft' || k === 'ArrowRight') {
    const toks = Array.from(box.querySelectorAll('[data-i]'));
    if (!toks.length) return;
    const cur = box.querySelector('.t.sel');
    const step = k === 'ArrowRight' ? 1 : -1;
    let i = cur ? toks.indexOf(cur) + step : (step > 0 ? 0 : toks.length - 1);
    i = Math.max(0, Math.min(toks.length - 1, i));
    select(toks[i]);
    toks[i].scrollIntoView({block: 'nearest'});
    e.preventDefault();
  } else if (k === 'ArrowUp' || k === 'ArrowDown' || k === 'j' || k === 'k') {
    const btn = document.querySelector(k === 'ArrowUp' || k === 'k' ? '#tv-prev' : '#tv-next');
    if (btn) { btn.click(); e.preventDefault(); }
  }
});
watch('value', () => {
  tip.style.display = 'none';
  wanted = null;
  clearTimeout(timer);
  const s = element.querySelector('.t.sel');
  const box = element.querySelector('.tv-text');
  if (s && box) { box.scrollTop = Math.max(0, s.offsetTop - box.offsetTop - box.clientHeight / 2); }
});
"""
