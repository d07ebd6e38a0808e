"""The app's tabs: one module each, and ``TABS``, the registry the app builds, wires and renders them from
(``tokviz.ui``) and deep links name them from (``tokviz.links``). Adding a tab is its module and one line here.

A tab module offers
- ``build(ctx) -> T``: makes the tab's components (inside its ``gr.Tab``) and returns them as a dataclass;
- ``wire(t, page)``: connects the tab's own events. ``page`` (``tokviz.header.Page``) holds what they may use
  besides ``t``: the app context, the header (run, step, the deep link's query), the page's state; a tab asks
  it to keep a run list current (``page.follow_runs``) or to poll components (``page.keep_live``);
- for a tab that makes part of its contents only when first opened: ``TabSpec.opened``, a ``gr.State`` the app
  sets to True then;
- for a tab that shows one run at one traced step, ``render_tab(t, at, got) -> (values, focus)``: the app calls
  it when the header's run or step changes while the tab is on screen, when the tab is opened (if what it
  shows is stale), and on a deep link. ``at`` (``tokviz.common.At``) is the header's run and step; ``got``
  maps each of ``t.inputs`` (the controls it reads besides them) to its value; ``values`` are for
  ``t.outputs``, in order; ``focus`` updates the deep link (sample, token) and may carry a ``notice``: a line
  the header shows about what the tab could not show.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import gradio as gr

from tokviz.common import At
from tokviz.context import AppContext
from tokviz.header import Page
from tokviz.tabs import (
    activations,
    compare,
    concentration,
    influence,
    inspect_tab,
    launch,
    layers,
    probes,
    publish_panel,
    runvsrun,
    schemes,
    sketches,
    sql_console,
    tokens,
    training,
)


@dataclass(frozen=True)
class TabSpec:
    """One tab: everything the app needs to know about it."""
    name: str                                           # ?tab=NAME in a deep link; elem_id tv-tab-NAME
    label: str                                          # what the tab strip says
    build: Callable[[AppContext], Any]                  # its components, made inside its gr.Tab
    wire: Callable[[Any, Page], None]                   # its own events
    render: Callable[[Any, At, Mapping[Any, Any]], tuple[list, dict]] | None = None    # for (run, step)
    link: Callable[[Any], dict[str, gr.components.Component]] | None = None   # deep-link field -> its input
    # a gr.State the app sets to True when the tab first comes on screen (a click or a deep link): a tab that
    # makes part of its contents only then (``gr.render`` triggered by its change) keeps page loads light
    opened: Callable[[Any], gr.State] | None = None


def wire_launch(t: launch.LaunchTab, page: Page) -> None:
    """The Launch tab's own events (``launch.wire``), and its jobs table, job list and log tail kept live by
    the app's poll while the tab is on screen or a job is running."""
    launch.wire(t, page.ctx)
    publish_panel.wire(t.publish, page)
    jobs = page.ctx.jobs

    def live(got: Mapping[Any, Any], on_screen: str) -> dict:
        if on_screen != "launch" and not jobs.active():
            return {}
        return dict(zip([t.jobs, t.job, t.log], launch.jobs_state(page.ctx, got[t.job])))

    page.keep_live([t.job], [t.jobs, t.job, t.log], live)


TABS: tuple[TabSpec, ...] = (      # in the order the tab strip shows them
    TabSpec("inspect", "Inspect", inspect_tab.build, inspect_tab.wire, inspect_tab.render_tab,
            inspect_tab.link_inputs),
    TabSpec("concentration", "Concentration", concentration.build, concentration.wire, concentration.render_tab),
    TabSpec("layers", "Layers & positions", layers.build, layers.wire, layers.render_tab),
    TabSpec("tokens", "Tokens", tokens.build, tokens.wire, tokens.render_tab),
    TabSpec("influence", "Influence", influence.build, influence.wire, influence.render_tab),
    TabSpec("sketches", "Sketches", sketches.build, sketches.wire, sketches.render_tab),
    TabSpec("training", "Training", training.build, training.wire, training.render_tab),
    TabSpec("runvsrun", "Run vs run", runvsrun.build, runvsrun.wire, runvsrun.render_tab, runvsrun.link_inputs),
    TabSpec("compare", "Compare runs", compare.build, compare.wire, compare.render_tab, compare.link_inputs),
    TabSpec("activations", "Activations", activations.build, activations.wire, activations.render_tab),
    TabSpec("probes", "Probes", probes.build, probes.wire, probes.render_tab),
    TabSpec("schemes", "Schemes", schemes.build, schemes.wire),
    TabSpec("launch", "Launch", launch.build, wire_launch, opened=lambda t: t.opened),
    TabSpec("sql", "SQL", sql_console.build, sql_console.wire, link=sql_console.link_inputs),
)
assert len({t.name for t in TABS}) == len(TABS), "tab names must be unique: deep links name tabs by them"
