"""The HTML of one probe rollout: its prompt and generated tokens coloured by entropy or bucket (no gradio, so
it is testable on its own; the Probes tab shows it). Every text is HTML-escaped."""
from __future__ import annotations

import html

import numpy as np
import pandas as pd

BUCKET_COLORS = ("#e8f1fb", "#b9d4f0", "#f7e08b", "#f6a55e", "#e4572e")   # low -> high entropy
TOKEN_CSS = """<style>.tv-probe-roll { font-family: monospace; line-height: 1.9; white-space: normal; }
.tv-probe-roll span.t { padding: 1px 2px; border-radius: 3px; margin: 0 1px; }
.tv-probe-roll span.p { outline: 2px solid #333; }
.tv-probe-roll span.h { outline: 3px solid #1f6feb; box-shadow: 0 0 0 5px rgba(31,111,235,.25); }</style>"""


def entropy_color(h: float, top: float) -> str:
    """A white-to-red background for entropy h on a log scale up to ``top``."""
    x = float(np.clip(np.log1p(max(h, 0.0) * 100) / np.log1p(max(top, 1e-9) * 100), 0, 1))
    return f"rgba(228,87,46,{0.08 + 0.8 * x:.2f})"


def rollout_html(head: dict, tokens: pd.DataFrame, by: str, highlight: int | None = None) -> str:
    """The rollout's prompt and its generated tokens, each coloured by entropy or bucket (escaped text);
    picked tokens (with a recorded vector) are outlined, the token at position ``highlight`` (a PCA point
    clicked) more strongly."""
    top = float(tokens["entropy"].max()) if len(tokens) else 1.0
    spans = []
    for r in tokens.itertuples():
        bg = BUCKET_COLORS[int(r.bucket) % len(BUCKET_COLORS)] if by == "bucket" else entropy_color(r.entropy, top)
        text = html.escape(str(r.token)).replace("\n", "⏎<br>")
        tip = html.escape(f"position {r.position} · entropy {r.entropy:.4g} · bucket {r.bucket}"
                          f"{' · picked' if r.picked else ''}", quote=True)
        cls = "t" + (" p" if r.picked else "") + (" h" if highlight is not None and r.position == highlight else "")
        spans.append(f"<span class='{cls}' style='background:{bg}' title=\"{tip}\">{text}</span>")
    verdict = "✅ correct" if head["correct"] else "❌ incorrect"
    return (f"{TOKEN_CSS}<div class='tv-probe-roll'><p><b>{verdict}</b> · answer {html.escape(str(head['answer']))}"
            f" · extracted {html.escape(str(head['extracted']))}</p><p style='color:#666'>"
            f"{html.escape(str(head['prompt']))}</p><p>{''.join(spans)}</p></div>")
