"""The whole app: the header, the tabs of the registry (``tokviz.tabs.TABS``), and the events between them.

    demo = build_app()                 # opens the index and ingests new runs (a few seconds at most)
    serve(demo, server_port=7860)      # demo.launch with the app's options; or python app.py

Tabs render lazily: the one on screen renders when the run or step changes; another renders when opened (if
what it shows is stale). A deep link (``?tab=...&run=...&step=...&sample=...&token=...``) is applied on load.
Each tab wires its own events (``TabSpec.wire``); the events between the header and the tabs are wired here,
one function each: run and step, tab switching, the deep link on load, the address bar, the poll (and
refresh), and a surprising token opened in Inspect. They read the values of many tabs' controls at once, so
their inputs are sets: the function gets one dict, component -> value, and returns updates by component.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qsl

import gradio as gr

from backend import index
from tokviz import concurrency, tabs
from tokviz import header as header_mod
from tokviz.common import At, as_int, pick_step, step_choices, user_errors
from tokviz.context import AppContext
from tokviz.header import Page, Shown
from tokviz.links import COPY_JS, HOME, SET_URL_JS, Focus
from tokviz.tabs import TabSpec, inspect_tab

POLL_S = 1.5          # how often a page asks whether runs or jobs changed


@dataclass
class Built:
    """A registry entry as built into this app: its ``gr.Tab`` and the components its ``build`` returned."""
    spec: TabSpec
    tab: gr.Tab
    t: Any


def build_app(ctx: AppContext | None = None) -> gr.Blocks:
    """Build the app (opening the index and ingesting the runs under the data root first)."""
    ctx = ctx or AppContext.from_env()
    ctx.start()
    atexit.register(ctx.close)
    with gr.Blocks(title="tokviz") as demo:
        header = header_mod.build(ctx)
        with gr.Tabs(selected=HOME, elem_id="tv-tabs") as strip:
            built = [build_tab(spec, ctx) for spec in tabs.TABS]
        page = Page(ctx, header, strip, shown=gr.State(Shown()), generation=gr.State(-1))
        for b in built:
            b.spec.wire(b.t, page)
        views = Views(page, built)
        ins = the(built, inspect_tab.InspectTab)
        wire_run_and_step(page, views)
        wire_tab_switching(page, views, built)
        wire_deep_link(demo, page, views, ins)
        wire_address_bar(page)
        wire_poll(page, gr.Timer(POLL_S))
        wire_open_in_inspect(page, views, [b for b in built if hasattr(b.t, "token_links")], ins)
    return demo


def build_tab(spec: TabSpec, ctx: AppContext) -> Built:
    with gr.Tab(spec.label, id=spec.name, elem_id=f"tv-tab-{spec.name}") as tab:
        t = spec.build(ctx)
    return Built(spec, tab, t)


def the(built: list[Built], kind: type) -> Built:
    """The built tab whose components are a ``kind`` (InspectTab, ...): for the events between two tabs."""
    return next(b for b in built if isinstance(b.t, kind))


# Gradio's run history keeps every event's outputs in the browser's storage: with a 2,000-token overlay per
# sample switch it grows by hundreds of kB a click and each switch gets slower. The app does not use it.
# Uploads (datasets on the Launch tab) are capped: a hosted Space takes files from anyone.
LAUNCH_OPTIONS = {"run_history": False, "footer_links": ["api", "settings"], "max_file_size": "200mb"}


def serve(demo: gr.Blocks, **launch_kwargs: object) -> object:
    """``demo.launch`` with the app's options (``LAUNCH_OPTIONS``); keyword arguments are passed on. Every
    event names its concurrency group (``tokviz.concurrency``); the queue's default limit only covers one that
    does not (Gradio's own default is 1: one such event at a time across all sessions)."""
    # Gradio recomputes its per-function latency summary (a DataFrame of the last 10,000 events, grouped, with
    # percentiles) after every event by default: 17-45 ms of CPU each, more than most of our renders. It feeds
    # only the /monitoring page, which the app does not enable; every 1,000 events is plenty (the environment
    # can still set it, read when the queue is made)
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
    demo.queue(default_concurrency_limit=concurrency.RENDER_LIMIT)
    return demo.launch(**{**LAUNCH_OPTIONS, **launch_kwargs})


def unique(components: Iterable[Any]) -> list:
    """Components once each, in order (a component two tabs' lists share is one output of an event)."""
    return list(dict.fromkeys(components))


class Views:
    """The tabs that render for (run, step), and the renders that the header, tab and link events share.

    A render reads the header's run and step from the page's ``Shown`` and holds its lock (see ``Shown``)."""

    def __init__(self, page: Page, built: list[Built]) -> None:
        self.page = page
        self.tabs = {b.spec.name: b for b in built if b.spec.render is not None}
        # tabs that do not render for a run but whose link carries a choice (the SQL console's text)
        self.others = {b.spec.name: b for b in built if b.spec.render is None and b.spec.link is not None}
        self.inputs = {c for b in self.tabs.values() for c in b.t.inputs}       # what any render reads
        self.outputs = unique(c for b in self.tabs.values() for c in b.t.outputs)

    def render(self, name: str, at: At, got: Mapping[Any, Any]) -> tuple[dict | None, dict, str]:
        """(updates by component, focus, "") of one tab, or (None, {}, why) when it has nothing to show (the
        header's notice line says why: tab switches answer without the queue, where a toast cannot be sent)."""
        b = self.tabs[name]
        try:
            values, focus = b.spec.render(b.t, at, got)
        except (ValueError, index.TokvizIndexError) as e:
            return None, {}, f"⚠️ {b.spec.label}: {e}"
        focus = dict(focus)
        notice = focus.pop("notice", "")
        return dict(zip(b.t.outputs, values)), focus, notice

    def draw(self, shown: Shown, name: str, gen: int, got: Mapping[Any, Any]) -> dict:
        """Render tab ``name`` (if it renders for a run) for the header as ``shown`` holds it, the caller holding
        its lock; mark it rendered. Updates of its outputs and of the header's notice line and link."""
        h = self.page.header
        focus = Focus(name, shown.run, shown.step)
        if name not in self.tabs:
            return {h.notice: "", h.query: focus.query()}
        values, f, notice = self.render(name, At(self.page.ctx, shown.run, shown.step, gen), got)
        if values is None:
            return {h.notice: notice, h.query: focus.query()}
        shown.mark(name, gen)
        return {h.notice: notice, h.query: focus.with_(**f).query(), **values}

    def move(self, shown: Shown, run_id: str | None, step: int | None, gen: int, got: Mapping[Any, Any]) -> dict:
        """The header moved to (run, step): render the tab on screen, as it is when this runs (a tab switch
        still rendering has set it, and is waited for)."""
        with shown.lock:
            shown.moved(run_id, step)
            return self.draw(shown, shown.tab, gen, got)

    def open(self, shown: Shown, name: str, gen: int, got: Mapping[Any, Any]) -> object:
        """Tab ``name`` was opened: render it if what it shows is stale."""
        if before_load(self.page, got):
            return gr.skip()
        shown.tab = name         # before the lock: a run change firing now renders this tab
        with shown.lock:         # after a run change still rendering: this renders the header it left
            if shown.run and not shown.is_rendered(name, gen):
                return self.draw(shown, name, gen, got)
            return {self.page.header.query: self.kept_link(shown, name, got)}

    def kept_link(self, shown: Shown, name: str, got: Mapping[Any, Any]) -> object:
        """The link of a tab opened without a redraw: as it is if it already names the tab (a view opened on
        it, such as a surprising token opened in Inspect, has set it); else the tab and what its inputs hold."""
        if Focus.from_query(dict(parse_qsl(str(got[self.page.header.query] or "").lstrip("?")))).tab == name:
            return gr.skip()
        b = self.tabs[name]
        return link_of(b, shown, got) if shown.run else Focus(name, shown.run, shown.step).query()

    def link_inputs(self, focus: Focus) -> dict:
        """The inputs a deep link sets on the tab it names (Inspect: sample, token, metric and view; Compare:
        the runs; SQL: the console's text)."""
        b = self.tabs.get(focus.tab) or self.others.get(focus.tab)
        if b is None or b.spec.link is None:
            return {}
        return {c: getattr(focus, f) for f, c in b.spec.link(b.t).items()}


def link_of(b: Built, shown: Shown, got: Mapping[Any, Any]) -> str:
    """The link of tab ``b`` as its controls hold it (``got``): each choice of its link that is not the
    control's initial value (the view a page opens with anyway: links stay short)."""
    fields = {f: Focus.field(f, got[c]) for f, c in (b.spec.link(b.t) if b.spec.link else {}).items()
              if got[c] != c.value}
    return Focus(b.spec.name, shown.run, shown.step, **fields).query()


def before_load(page: Page, got: Mapping[Any, Any]) -> bool:
    """Whether an event was sent before the page's load was applied (the header's query is still empty): the
    tab strip's select of its first tab as the page mounts, or a click before the first paint. Either may be
    handled after the load, and the load's own choice of tab stands."""
    return not got[page.header.query]


# ---------------------------------------------------------------------------------------------- events
def wire_run_and_step(page: Page, views: Views) -> None:
    """A new run or traced step in the header renders the tab on screen (the others when they are opened)."""
    h = page.header
    inputs = {h.run, h.step, page.shown, page.generation, *views.inputs}
    shared = {"api_visibility": "private", "show_progress": "minimal", **concurrency.RENDER}

    def on_run(got: dict) -> dict:
        run_id = got[h.run]
        steps = step_choices(run_id)
        step = pick_step(run_id, got[h.step])
        out = views.move(got[page.shown], run_id, step, got[page.generation], got)
        # the step (and Inspect's sample) are kept when the new run has them; else a note says what moved
        out[h.notice] = " ".join(n for n in (header_mod.step_note(run_id, got[h.step], step), out[h.notice]) if n)
        return {h.step: gr.update(choices=steps, value=step), h.info: header_mod.run_info_md(run_id), **out}

    def on_step(got: dict) -> dict:
        return views.move(got[page.shown], got[h.run], got[h.step], got[page.generation], got)

    h.run.input(on_run, inputs, [h.step, h.info, h.notice, h.query, *views.outputs], **shared)
    h.step.input(on_step, inputs, [h.notice, h.query, *views.outputs], **shared)


def wire_tab_switching(page: Page, views: Views, built: list[Built]) -> None:
    """Opening a tab renders it if what it shows is stale. Without the queue (one HTTP round trip): a tab's
    render is read-only and independent of other sessions, and the queue's join + event stream costs 0.1-0.3
    s. A tab that does not render for a run only becomes the tab on screen."""
    h = page.header
    for b in built:
        if b.spec.name in views.tabs:
            def opened(got: dict, _name: str = b.spec.name) -> object:
                return views.open(got[page.shown], _name, got[page.generation], got)

            b.tab.select(opened, {page.shown, page.generation, h.query, *b.t.inputs},
                         [h.query, h.notice, *b.t.outputs], api_visibility="private", show_progress="minimal",
                         queue=False, **concurrency.RENDER)
        else:
            flag = [b.spec.opened(b.t)] if b.spec.opened else []

            def opened_other(got: dict, _b: Built = b, _flag: list = flag) -> object:
                if before_load(page, got):
                    return {}
                shown = got[page.shown]
                shown.tab = _b.spec.name
                return {h.query: link_of(_b, shown, got), **{f: True for f in _flag if not got[f]}}

            linked = set(b.spec.link(b.t).values()) if b.spec.link else set()
            b.tab.select(opened_other, {page.shown, h.query, *linked, *flag}, [h.query, *flag],
                         api_visibility="private", show_progress="hidden", **concurrency.UI)


def wire_deep_link(demo: gr.Blocks, page: Page, views: Views, ins: Built) -> None:
    """On load, the page's query string picks the tab, run and step (and the choices of the tab it names:
    Inspect's sample, token, metric and view, Compare's runs, the SQL console's text, which is only put in the
    editor); every run list gets its choices."""
    ctx, h = page.ctx, page.header

    def on_load(got: dict, request: gr.Request) -> dict:
        focus = Focus.from_query(dict(request.query_params) if request is not None else {})
        choices = ctx.run_choices()
        traced = ctx.run_choices(traced_only=True)
        ids, traced_ids = [v for _, v in choices], [v for _, v in traced]
        # a link's run, else the run a published Space opens on (TOKVIZ_OPEN_RUN), else the first traced run
        opening = os.environ.get("TOKVIZ_OPEN_RUN")
        run_id = (focus.run if focus.run in ids else opening if opening in ids else
                  (traced_ids[0] if traced_ids else (ids[0] if ids else None)))
        step = pick_step(run_id, focus.step)
        gen = ctx.generation
        shown = got[page.shown]
        fixed = views.link_inputs(focus)
        with shown.lock:
            shown.tab = focus.tab
            shown.moved(run_id, step)
            out = views.draw(shown, focus.tab, gen, {**got, **fixed})
        if focus.tab in views.others:       # no render: the link's choices go straight into their controls
            out.update({c: v for c, v in fixed.items() if v is not None})
            out[h.query] = focus.with_(run=run_id, step=step).query()
        if focus.run and focus.run not in ids:
            out[h.notice] = (f"⚠️ run {focus.run!r} from the link is not in the index; showing {run_id!r} "
                             f"instead. {out[h.notice]}")
        if ins.t.overlay not in out and (focus.tab == ins.spec.name or run_id is None):
            out[ins.t.overlay] = ""       # nothing to draw (the notice says why): no "loading" left behind
        return {**run_lists(page, choices, traced), h.run: gr.update(choices=choices, value=run_id),
                h.step: gr.update(choices=step_choices(run_id), value=step), h.info: header_mod.run_info_md(run_id),
                page.tabs: gr.Tabs(selected=focus.tab), page.generation: gen, **out}

    others = [c for b in views.others.values() for c in b.spec.link(b.t).values()]
    outputs = unique([h.run, h.step, h.info, h.notice, page.tabs, page.generation, h.query,
                      *(d for d, _ in page.run_lists), *views.outputs, *others])
    # "minimal": a spinner while the first view renders (the overlay says "loading the sample…" meanwhile)
    loaded = demo.load(on_load, {page.shown, *views.inputs}, outputs, api_visibility="private",
                       show_progress="minimal", queue=False, **concurrency.RENDER)
    # Once the first view is painted, draw the (empty) token breakdown: the browser then loads the plotting
    # library while the reader looks at the page, not on the first click of a token or a tab.
    loaded.then(lambda token: inspect_tab.breakdown_placeholder() if token is None else gr.skip(), ins.t.token,
                ins.t.breakdown, api_visibility="private", show_progress="hidden", queue=False, **concurrency.UI)


def wire_address_bar(page: Page) -> None:
    """The address bar follows what is shown (the header's query); "copy link" shows and copies it."""
    h = page.header
    h.query.change(None, h.query, h.link, js=SET_URL_JS)
    h.copy.click(lambda: gr.update(visible=True), None, h.link, api_visibility="private",
                 show_progress="hidden", **concurrency.UI).then(None, None, h.link, js=COPY_JS)


def run_lists(page: Page, choices: list, traced: list) -> dict:
    """New choices for the header's run list and every list a tab follows (``Page.follow_runs``)."""
    return {page.header.run: gr.update(choices=choices),
            **{d: gr.update(choices=traced if traced_only else choices) for d, traced_only in page.run_lists}}


def wire_poll(page: Page, timer: gr.Timer) -> None:
    """Every POLL_S: new runs (a finished job, a refresh) reach every run list, and what tabs keep live (the
    jobs table) is updated. The refresh button ingests first (and is the API's ``refresh_runs``)."""
    ctx = page.ctx
    inputs = {page.generation, page.shown, *(c for p in page.polled for c in p.inputs)}
    outputs = unique([page.generation, page.header.run, *(d for d, _ in page.run_lists),
                      *(c for p in page.polled for c in p.outputs)])

    def poll(got: dict) -> dict:
        gen = ctx.generation
        out = {}
        if gen != got[page.generation]:
            out = {page.generation: gen, **run_lists(page, ctx.run_choices(), ctx.run_choices(traced_only=True))}
        for p in page.polled:
            out.update(p.update(got, got[page.shown].tab))
        return out or gr.skip()

    timer.tick(poll, inputs, outputs, api_visibility="private", show_progress="hidden", **concurrency.POLL)

    def refresh(got: dict) -> dict:
        lines = ctx.ingest()
        failed = [ln for ln in lines if ln.startswith("FAILED")]
        if failed:
            gr.Warning("some runs could not be indexed:\n" + "\n".join(failed))
        return poll(got)

    page.header.refresh.click(refresh, inputs, outputs, api_name="refresh_runs", show_progress="minimal",
                              **concurrency.INGEST)


def wire_open_in_inspect(page: Page, views: Views, linked: list[Built], ins: Built) -> None:
    """A click on a token in a table of a tab with ``token_links`` (Tokens: surprising tokens, token table;
    Influence: the help/hurt table; Run vs run: its overlays) opens it in Inspect: ``{sample, position}`` of the
    header's run and step, or with ``run`` and ``step`` another (the header moves there)."""
    h, t, name = page.header, ins.t, ins.spec.name

    @user_errors
    def open_token(got: dict, evt: gr.EventData) -> dict:
        data = evt._data if isinstance(evt._data, dict) else {}
        if data.get("sample") is None or data.get("position") is None:     # a click beside the rows
            return gr.skip()
        sample, token = as_int(data["sample"], "sample"), as_int(data["position"], "position")
        shown, gen = got[page.shown], got[page.generation]
        with shown.lock:
            run_id = str(data["run"]) if data.get("run") else shown.run
            step = as_int(data["step"], "step") if data.get("step") is not None else shown.step
            moved = (run_id, step) != (shown.run, shown.step)
            values, f = inspect_tab.render(run_id, step, sample, got[t.metric], token, got[t.view], gen)
            f.pop("notice", None)        # the token's sample is of that run and step: nothing moved
            if moved:                    # every other tab now shows a stale run or step: redrawn when opened
                shown.moved(run_id, step)
            shown.tab = name
            shown.mark(name, gen)
            query = Focus(name, run_id, step).with_(**f).query()
        out = {page.tabs: gr.Tabs(selected=name), h.query: query, **dict(zip(t.outputs, values))}
        if moved:
            out.update({h.run: gr.update(value=run_id), h.step: gr.update(choices=step_choices(run_id), value=step),
                        h.info: header_mod.run_info_md(run_id)})
        return out

    for table in (c for b in linked for c in b.t.token_links):
        table.click(open_token, {page.shown, page.generation, t.metric, t.view},
                    [page.tabs, h.query, h.run, h.step, h.info, *t.outputs], api_visibility="private",
                    **concurrency.RENDER)
