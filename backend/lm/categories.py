"""Rule-based token categories, decided on the decoded token text. The rules live in one table.

    categorize(" Step")   -> "step_marker"
    categorize("37")      -> "number"
    categorize("ing")     -> "subword"     (no leading space: continues the previous word)
"""
from __future__ import annotations

import re

CATEGORIES = ("step_marker", "number", "operator", "latex", "punctuation", "whitespace", "word", "subword",
              "special", "other")

DEFAULT_STEP_MARKERS = ("Step", "####", "Therefore", "So", "Thus", "Answer", "answer")

# (category, test on the stripped text); the first match wins. `special`, `whitespace` and
# `step_marker` are decided before this table (they need more than the stripped text).
RULES: list[tuple[str, re.Pattern]] = [
    ("number", re.compile(r"^[+-]?\d+([.,]\d+)*%?$")),
    ("latex", re.compile(r"^(\\[A-Za-z]+|\$+|\\[\[\]()]|[{}^_])$")),
    ("operator", re.compile(r"^(\+|-|\*|/|=|×|÷|<|>|≤|≥|\^|%|±|−|==|<=|>=|!=)$")),
    ("punctuation", re.compile(r"^[\.,;:!?\"'`()\[\]…\-–—]+$")),
    ("word", re.compile(r"^[A-Za-z][A-Za-z']*$")),
]


def categorize(text: str, is_special: bool = False, step_markers: tuple[str, ...] = DEFAULT_STEP_MARKERS) -> str:
    """Category of one token's decoded text (see CATEGORIES)."""
    if is_special:
        return "special"
    if text == "" or text.isspace():
        return "whitespace"
    stripped = text.strip()
    if stripped in step_markers or stripped.rstrip(":") in step_markers:
        return "step_marker"
    for name, pattern in RULES:
        if pattern.match(stripped):
            if name == "word" and not text[:1].isspace() and not text[:1] == "Ġ":
                return "subword"
            return name
    return "other"
