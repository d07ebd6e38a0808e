"""Deep links: the URL query names the tab, run, traced step, sample and token, so a shared link opens
exactly that view.

    focus = Focus.from_query({"tab": "inspect", "run": "r1", "step": "20", "sample": "3", "token": "57"})
    focus.query()        # '?tab=inspect&run=r1&step=20&sample=3&token=57'

Values come from a URL anyone can write: numbers that do not parse are dropped (the view falls back to its
defaults) and the run id is checked against the index by whoever uses it, never used as a path.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping
from urllib.parse import urlencode

HOME = "inspect"        # the tab a page opens on, and a link that names no known tab
MAX_ID_CHARS = 200


def tab_names() -> tuple[str, ...]:
    """The tabs a link may name: those of the registry (``tokviz.tabs.TABS``), in the tab strip's order."""
    from tokviz.tabs import TABS  # here, not at the top: the registry's tab modules import this module
    return tuple(t.name for t in TABS)


def _int(v: object) -> int | None:
    try:
        n = int(str(v))
    except (TypeError, ValueError):
        return None
    return n if -1 < n < 2**31 else None


@dataclass(frozen=True)
class Focus:
    tab: str = HOME
    run: str | None = None
    step: int | None = None
    sample: int | None = None
    token: int | None = None

    @classmethod
    def from_query(cls, q: Mapping[str, str]) -> "Focus":
        tab = str(q.get("tab", HOME))
        run = q.get("run")
        return cls(tab=tab if tab in tab_names() else HOME,
                   run=str(run)[:MAX_ID_CHARS] if run else None, step=_int(q.get("step")),
                   sample=_int(q.get("sample")), token=_int(q.get("token")))

    def with_(self, **kw: object) -> "Focus":
        return replace(self, **kw)

    def query(self) -> str:
        """The URL query for this focus ('?tab=...'); sample and token only where the tab shows them."""
        items: list[tuple[str, object]] = [("tab", self.tab)]
        if self.run:
            items.append(("run", self.run))
        if self.step is not None:
            items.append(("step", self.step))
        if self.tab == "inspect":
            if self.sample is not None:
                items.append(("sample", self.sample))
            if self.sample is not None and self.token is not None:
                items.append(("token", self.token))
        return "?" + urlencode(items)


# JS run when the query string changes: put it in the address bar (no reload); returns the full URL.
SET_URL_JS = ("(q) => { if (q) { history.replaceState(null, '', window.location.pathname + q); } "
              "return window.location.href; }")
COPY_JS = """() => {
  const url = window.location.href;
  if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(url).catch(() => {}); }
  return url;
}"""
