"""The whole app: the header, the tabs, and the wiring between them.

    demo = build_app()                 # opens the index and ingests new runs (a few seconds at most)
    serve(demo, server_port=7860)      # demo.launch with the app's options; or python app.py

Tabs render lazily: the one on screen renders when the run or step changes; another renders when opened (if
what it shows is stale). A deep link (``?tab=...&run=...&step=...&sample=...&token=...``) is applied on load.
"""
from __future__ import annotations

import atexit
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qsl

import gradio as gr

from backend import index
from tokviz import header as header_mod
from tokviz.common import as_int, pick_step, step_choices, user_errors
from tokviz.context import AppContext
from tokviz.links import COPY_JS, SET_URL_JS, TABS, Focus
from tokviz.tabs import compare, concentration, inspect_tab, launch, layers, sql_console, tokens, training

POLL_S = 1.5          # how often a page asks whether runs or jobs changed
LABELS = {"inspect": "Inspect", "concentration": "Concentration", "layers": "Layers & positions",
          "tokens": "Tokens", "training": "Training", "compare": "Compare runs", "launch": "Launch", "sql": "SQL"}


@dataclass
class TabSpec:
    """A tab that renders for (run, step): its own inputs and outputs and the function between them."""
    name: str
    tab: gr.Tab
    inputs: list
    outputs: list
    render: Callable[..., tuple[list, dict]]     # (run_id, step, generation, *inputs) -> (values, focus)


def build_app(ctx: AppContext | None = None) -> gr.Blocks:
    """Build the app (opening the index and ingesting the runs under the data root first)."""
    ctx = ctx or AppContext.from_env()
    ctx.start()
    atexit.register(ctx.close)
    with gr.Blocks(title="tokviz") as demo:
        h = header_mod.build(ctx)
        with gr.Tabs(selected="inspect", elem_id="tv-tabs") as tabs:
            with gr.Tab(LABELS["inspect"], id="inspect", elem_id="tv-tab-inspect") as t_ins:
                ins = inspect_tab.build()
            with gr.Tab(LABELS["concentration"], id="concentration", elem_id="tv-tab-concentration") as t_conc:
                conc = concentration.build()
            with gr.Tab(LABELS["layers"], id="layers", elem_id="tv-tab-layers") as t_lay:
                lay = layers.build()
            with gr.Tab(LABELS["tokens"], id="tokens", elem_id="tv-tab-tokens") as t_tok:
                tok = tokens.build()
            with gr.Tab(LABELS["training"], id="training", elem_id="tv-tab-training") as t_train:
                train = training.build()
            with gr.Tab(LABELS["compare"], id="compare", elem_id="tv-tab-compare") as t_cmp:
                cmp = compare.build()
            with gr.Tab(LABELS["launch"], id="launch", elem_id="tv-tab-launch") as t_launch:
                lau = launch.build(ctx)
            with gr.Tab(LABELS["sql"], id="sql", elem_id="tv-tab-sql") as t_sql:
                sq = sql_console.build()
            # room for the probe, activation-gradient and scheme-comparison tabs of later issues
        active = gr.State("inspect")
        rendered = gr.State({})
        generation = gr.State(-1)
        timer = gr.Timer(POLL_S)

        specs = [
            TabSpec("inspect", t_ins, ins.inputs, ins.outputs,
                    lambda r, s, g, sample, metric, token, view: inspect_tab.render(r, s, sample, metric, token,
                                                                                    view, g)),
            TabSpec("concentration", t_conc, conc.inputs, conc.outputs,
                    lambda r, s, g, steps, others: concentration.render(r, s, steps, others)),
            TabSpec("layers", t_lay, lay.inputs, lay.outputs,
                    lambda r, s, g, module, more_open: layers.render(r, s, module, more_open)),
            TabSpec("tokens", t_tok, tok.inputs, tok.outputs, lambda r, s, g: tokens.render(r, s)),
            TabSpec("training", t_train, train.inputs, train.outputs, lambda r, s, g: training.render(r, s)),
            TabSpec("compare", t_cmp, cmp.inputs, cmp.outputs,
                    lambda r, s, g, runs: compare.render(r, s, runs, ctx.run_choices(traced_only=True))),
        ]
        other_tabs = {"launch": t_launch, "sql": t_sql}
        wire(demo, ctx, h, tabs, specs, other_tabs, active, rendered, generation, timer, ins, conc, tok, cmp, lau)
        inspect_tab.wire(ins, h.run, h.step, h.query, generation)
        concentration.wire(conc, h.run, h.step)
        layers.wire(lay, h.run, h.step)
        tokens.wire(tok, h.run, h.step)
        training.wire(train, h.run, h.step)
        compare.wire(cmp)
        launch.wire(lau, ctx)
        sql_console.wire(sq)
    return demo


# Gradio's run history keeps every event's outputs in the browser's storage: with a 2,000-token overlay per
# sample switch it grows by hundreds of kB a click and each switch gets slower. The app does not use it.
# Uploads (datasets on the Launch tab) are capped: a hosted Space takes files from anyone.
LAUNCH_OPTIONS = {"run_history": False, "footer_links": ["api", "settings"], "max_file_size": "200mb"}


def serve(demo: gr.Blocks, **launch_kwargs: object) -> object:
    """``demo.launch`` with the app's options (``LAUNCH_OPTIONS``); keyword arguments are passed on."""
    return demo.launch(**{**LAUNCH_OPTIONS, **launch_kwargs})


def _key(run_id: str | None, step: int | None, gen: int) -> str:
    return f"{run_id}|{step}|{gen}"


def wire(demo: gr.Blocks, ctx: AppContext, h: header_mod.Header, tabs: gr.Tabs, specs: list[TabSpec], other_tabs: dict,
         active: gr.State, rendered: gr.State, generation: gr.State, timer: gr.Timer,
         ins: inspect_tab.InspectTab, conc: concentration.ConcentrationTab, tok: tokens.TokensTab,
         cmp: compare.CompareTab, lau: launch.LaunchTab) -> None:
    """Header, tab switching, deep links, the run-list/jobs poll, and Tokens -> Inspect."""
    all_inputs = [c for s in specs for c in s.inputs]
    all_outputs = [c for s in specs for c in s.outputs]
    spans, i = {}, 0
    for s in specs:
        spans[s.name] = (i, i + len(s.inputs))
        i += len(s.inputs)

    def render_tab(name: str, run_id, step, gen, inputs: list) -> tuple[list | None, dict, str]:
        """(values, focus, "") of one tab, or (None, {}, why) when it has nothing to show (the header's notice
        line says why: tab switches answer without the queue, where a toast cannot be sent)."""
        spec = next(s for s in specs if s.name == name)
        try:
            values, focus = spec.render(run_id, step, gen, *inputs)
            focus = dict(focus)
            return values, focus, focus.pop("notice", "")
        except (ValueError, index.TokvizIndexError) as e:
            return None, {}, f"⚠️ {LABELS[name]}: {e}"

    def dispatch(name: str, run_id, step, gen, rendered_: dict, inputs: list) -> tuple[dict, str, str, list]:
        """Render the tab on screen (if it renders for a run); skip every other tab's outputs."""
        out = [gr.skip()] * len(all_outputs)
        focus = Focus(name, run_id, step)
        rendered_ = dict(rendered_ or {})
        spec_names = [s.name for s in specs]
        notice = ""
        if name in spec_names:
            a, b = spans[name]
            values, f, notice = render_tab(name, run_id, step, gen, inputs[a:b])
            if values is not None:
                start = sum(len(s.outputs) for s in specs[:spec_names.index(name)])
                out[start:start + len(values)] = values
                rendered_ = {name: _key(run_id, step, gen)}
                focus = focus.with_(**f)
        return rendered_, focus.query(), notice, out

    # ---- run and step
    def on_run(run_id, step, name, rendered_, gen, *inputs):
        steps = step_choices(run_id)
        step = pick_step(run_id, step)
        r, q, notice, out = dispatch(name, run_id, step, gen, rendered_, list(inputs))
        return [gr.update(choices=steps, value=step), header_mod.run_info_md(run_id), notice, r, q] + out

    h.run.input(on_run, [h.run, h.step, active, rendered, generation, *all_inputs],
                [h.step, h.info, h.notice, rendered, h.query, *all_outputs], api_visibility="private",
                show_progress="minimal")

    def on_step(run_id, step, name, rendered_, gen, *inputs):
        r, q, notice, out = dispatch(name, run_id, step, gen, rendered_, list(inputs))
        return [notice, r, q] + out

    h.step.input(on_step, [h.run, h.step, active, rendered, generation, *all_inputs],
                 [h.notice, rendered, h.query, *all_outputs], api_visibility="private", show_progress="minimal")

    # ---- tab switching: render what is stale. Without the queue (one HTTP round trip): a tab's render is
    # read-only and independent of other sessions, and the queue's join + event stream costs 0.1-0.3 s.
    for spec in specs:
        def on_select(run_id, step, rendered_, gen, shown_query, *inputs, _spec=spec):
            query = Focus(_spec.name, run_id, step).query()
            if not run_id or (rendered_ or {}).get(_spec.name) == _key(run_id, step, gen):
                # nothing to redraw. The link keeps what the tab shows: a view opened on this tab (a surprising
                # token opened in Inspect) has set it already; else Inspect's sample and token go into it.
                if Focus.from_query(dict(parse_qsl(str(shown_query or "").lstrip("?")))).tab == _spec.name:
                    query = gr.skip()
                elif _spec.name == "inspect" and run_id:
                    sample, _metric, token, _view = inputs
                    query = Focus("inspect", run_id, step, as_int(sample, "sample"), as_int(token, "token")).query()
                return [_spec.name, gr.skip(), query, gr.skip()] + [gr.skip()] * len(_spec.outputs)
            values, f, notice = render_tab(_spec.name, run_id, step, gen, list(inputs))
            if values is None:
                return [_spec.name, gr.skip(), query, notice] + [gr.skip()] * len(_spec.outputs)
            r = {**(rendered_ or {}), _spec.name: _key(run_id, step, gen)}
            return [_spec.name, r, Focus(_spec.name, run_id, step).with_(**f).query(), notice] + values

        spec.tab.select(on_select, [h.run, h.step, rendered, generation, h.query, *spec.inputs],
                        [active, rendered, h.query, h.notice, *spec.outputs], api_visibility="private",
                        show_progress="minimal", queue=False)
    for name, tab in other_tabs.items():
        tab.select(lambda run_id, step, _n=name: (_n, Focus(_n, run_id, step).query()), [h.run, h.step],
                   [active, h.query], api_visibility="private", show_progress="hidden")

    # ---- deep links: the page's query string on load
    def on_load(request: gr.Request, *inputs):
        focus = Focus.from_query(dict(request.query_params) if request is not None else {})
        choices = ctx.run_choices()
        traced = [v for _, v in ctx.run_choices(traced_only=True)]
        ids = [v for _, v in choices]
        run_id = focus.run if focus.run in ids else (traced[0] if traced else (ids[0] if ids else None))
        step = pick_step(run_id, focus.step)
        inputs = list(inputs)
        if focus.tab == "inspect":
            a, _ = spans["inspect"]
            inputs[a] = focus.sample          # sample
            inputs[a + 2] = focus.token       # token
        gen = ctx.generation
        r, q, notice, out = dispatch(focus.tab, run_id, step, gen, {}, inputs)
        if focus.run and focus.run not in ids:
            notice = f"⚠️ run {focus.run!r} from the link is not in the index; showing {run_id!r} instead. {notice}"
        conc_runs = gr.update(choices=choices)
        return ([gr.update(choices=choices, value=run_id), gr.update(choices=step_choices(run_id), value=step),
                 header_mod.run_info_md(run_id), notice, gr.Tabs(selected=focus.tab), focus.tab, r, gen, q,
                 conc_runs] + out)

    loaded = demo.load(on_load, all_inputs,
                       [h.run, h.step, h.info, h.notice, tabs, active, rendered, generation, h.query, conc.runs,
                        *all_outputs], api_visibility="private", show_progress="hidden", queue=False)
    # Once the first view is painted, draw the (empty) token breakdown: the browser then loads the plotting
    # library while the reader looks at the page, not on the first click of a token or a tab.
    loaded.then(lambda token: inspect_tab.breakdown_placeholder() if token is None else gr.skip(), ins.token,
                ins.breakdown, api_visibility="private", show_progress="hidden", queue=False)

    # ---- the address bar follows what is shown; "copy link"
    h.query.change(None, h.query, h.link, js=SET_URL_JS)
    h.copy.click(lambda: gr.update(visible=True), None, h.link, api_visibility="private",
                 show_progress="hidden").then(None, None, h.link, js=COPY_JS)

    # ---- new runs (a finished job, a refresh) reach every run list; the jobs table stays live
    def poll(seen, name, job_id):
        gen = ctx.generation
        if gen != seen:
            choices = ctx.run_choices()
            lists = [gen, gr.update(choices=choices), gr.update(choices=choices),
                     gr.update(choices=ctx.run_choices(traced_only=True))]
        else:
            lists = [gr.skip()] * 4
        if name == "launch" or ctx.jobs.active():
            jobs = list(launch.jobs_state(ctx, job_id))
        else:
            jobs = [gr.skip()] * 3
        return lists + jobs


    poll_io = ([generation, active, lau.job], [generation, h.run, conc.runs, cmp.runs, lau.jobs, lau.job, lau.log])
    timer.tick(poll, *poll_io, api_visibility="private", show_progress="hidden")

    def refresh(seen, name, job_id):
        lines = ctx.ingest()
        failed = [ln for ln in lines if ln.startswith("FAILED")]
        if failed:
            gr.Warning("some runs could not be indexed:\n" + "\n".join(failed))
        return poll(seen, name, job_id)

    h.refresh.click(refresh, *poll_io, api_name="refresh_runs", show_progress="minimal")

    # ---- Tokens: a surprising token opens in Inspect
    @user_errors
    def open_in_inspect(run_id, step, metric, view, gen, rendered_, evt: gr.EventData):
        data = evt._data if isinstance(evt._data, dict) else {}
        if data.get("sample") is None or data.get("position") is None:     # a click beside the rows
            return [gr.skip()] * (4 + len(ins.outputs))
        sample = as_int(data["sample"], "sample")
        token = as_int(data["position"], "position")
        values, f = inspect_tab.render(run_id, step, sample, metric, token, view, gen)
        q = Focus("inspect", run_id, step).with_(**f).query()
        r = {**(rendered_ or {}), "inspect": _key(run_id, step, gen)}
        return [gr.Tabs(selected="inspect"), "inspect", r, q] + values

    tok.surprising.click(open_in_inspect, [h.run, h.step, ins.metric, ins.view, generation, rendered],
                         [tabs, active, rendered, h.query, *ins.outputs], api_visibility="private")
    assert set(TABS) == {s.name for s in specs} | set(other_tabs), "links.TABS must name every tab"
