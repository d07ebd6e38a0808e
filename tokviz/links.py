"""Deep links: the URL query names the tab, run, traced step, and every choice that changes the view (Inspect's
sample, token, colour metric and breakdown; Compare's runs; the SQL console's text), so a shared link opens
exactly that view.

    focus = Focus.from_query({"tab": "inspect", "run": "r1", "step": "20", "sample": "3", "token": "57"})
    focus.query()        # '?tab=inspect&run=r1&step=20&sample=3&token=57'
    Focus("compare", "r1", runs=("r1", "r2")).query()     # '?tab=compare&run=r1&runs=r1,r2'

Values come from a URL anyone can write: numbers that do not parse are dropped (the view falls back to its
defaults); run ids, the metric and the breakdown are checked by whoever uses them (an unknown one falls back,
and the header's notice says so), never used as a path; the SQL text is only put in the console's editor.
Choices at their defaults are left out, to keep links short.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping
from urllib.parse import urlencode

HOME = "inspect"        # the tab a page opens on, and a link that names no known tab
MAX_ID_CHARS = 200
MAX_RUNS = 12           # Compare's runs a link may name
MAX_SQL_CHARS = 2000    # a longer console text is left out of the link (URLs past ~8 kB are refused by servers)
DEFAULT_METRIC = "alignment"      # Inspect's colour metric when a link names none
# Inspect's breakdown kinds: the link's short name -> the label the tab's radio shows; the first is the default
VIEW_KEYS = {"dot": "heatmap: dot", "alignment": "heatmap: alignment", "magnitude": "heatmap: magnitude",
             "bars": "bars: dot per layer"}
_VIEW_KEY_OF = {label: key for key, label in VIEW_KEYS.items()}


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


def _str(v: object, limit: int = MAX_ID_CHARS) -> str | None:
    return str(v)[:limit] if v not in (None, "") else None


def _runs(v: object) -> tuple[str, ...]:
    """Compare's runs: a list (the dropdown's value) or 'a,b' (a link's); empty names and repeats dropped."""
    items = v if isinstance(v, (list, tuple)) else str(v or "").split(",")
    return tuple(dict.fromkeys(str(r)[:MAX_ID_CHARS] for r in items if str(r).strip()))[:MAX_RUNS]


def _view(v: object) -> str | None:
    """A breakdown kind as the radio's label: a link's short name or a label; anything else kept as given
    (the tab falls back from it and says so)."""
    s = _str(v)
    return VIEW_KEYS.get(s, s) if s else None


def _sql(v: object) -> str | None:
    s = str(v) if v not in (None, "") else None
    return s if s and len(s) <= MAX_SQL_CHARS else None


@dataclass(frozen=True)
class Focus:
    tab: str = HOME
    run: str | None = None
    step: int | None = None
    sample: int | None = None
    token: int | None = None
    metric: str | None = None           # Inspect's colour metric (None: DEFAULT_METRIC)
    view: str | None = None             # Inspect's breakdown kind, as the radio's label (None: the first)
    runs: tuple[str, ...] = ()          # Compare's runs
    sql: str | None = None              # the SQL console's text (only ever put in its editor)

    @classmethod
    def from_query(cls, q: Mapping[str, str]) -> "Focus":
        tab = str(q.get("tab", HOME))
        return cls(tab=tab if tab in tab_names() else HOME, run=_str(q.get("run")), step=_int(q.get("step")),
                   sample=_int(q.get("sample")), token=_int(q.get("token")), metric=_str(q.get("metric")),
                   view=_view(q.get("view")), runs=_runs(q.get("runs")), sql=_sql(q.get("sql")))

    @staticmethod
    def field(name: str, value: object) -> object:
        """A component's value as the link field ``name`` holds it (the sample as a number, the runs as a
        tuple, ...): for a link made from what a tab's controls hold."""
        convert = {"sample": _int, "token": _int, "step": _int, "runs": _runs, "view": _view, "sql": _sql}
        return convert.get(name, _str)(value)

    def with_(self, **kw: object) -> "Focus":
        return replace(self, **kw)

    def query(self) -> str:
        """The URL query for this focus ('?tab=...'); each choice only on the tab it belongs to, and only when it
        is not the default."""
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
            if self.metric and self.metric != DEFAULT_METRIC:
                items.append(("metric", self.metric))
            if self.view and self.view != next(iter(VIEW_KEYS.values())):
                items.append(("view", _VIEW_KEY_OF.get(self.view, self.view)))
        elif self.tab == "compare" and self.runs:
            items.append(("runs", ",".join(self.runs)))
        elif self.tab == "sql" and self.sql and len(self.sql) <= MAX_SQL_CHARS:
            items.append(("sql", self.sql))
        elif self.tab == "runvsrun":        # Run vs run: run B (as ``runs``), the sample and the metric
            items += [(k, v) for k, v in (("runs", ",".join(self.runs[:1])), ("sample", self.sample),
                                          ("metric", self.metric)) if v not in (None, "")]
        return "?" + urlencode(items, safe=",")      # 'runs=a,b', not 'a%2Cb': shorter, still one value


# JS run when the query string changes: put it in the address bar (no reload); returns the full URL.
SET_URL_JS = ("(q) => { if (q) { history.replaceState(null, '', window.location.pathname + q); } "
              "return window.location.href; }")
COPY_JS = """() => {
  const url = window.location.href;
  if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(url).catch(() => {}); }
  return url;
}"""
