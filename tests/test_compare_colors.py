"""Compare gives a run one colour in every panel (by its place in the list, also in a panel where an earlier
run has no rows), the summary shows that colour, and LoRA's A/B bars have colours of their own, not the
blue / red of alignment and of the first two runs.

    pytest tests/test_compare_colors.py
"""
from __future__ import annotations

import re

import pandas as pd
import pytest

from backend import index
from backend.analysis import analyses, figures, report
from backend.dev.synth import SynthConfig, make_run
from tokviz.tabs import compare

NAMES = ("run one", "run two", "run three")


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    c = index.connect(index.MEMORY)
    for k, name in enumerate(NAMES):
        run = make_run(SynthConfig.tiny(seed=k, n_samples=3), root / "runs", run_id=f"r{k}", name=name)
        index.ingest_run(c, run)
    # the first run without module rows: its module-type panel is empty, the others' must keep their colours
    for (table,) in c.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
                              "AND (table_name = 'token_modules' OR table_name LIKE 'agg_%')").fetchall():
        c.execute(f"DELETE FROM {table} WHERE run_id = 'r0'")
    yield c
    c.close()


def hex_of(color: str) -> str:
    """'#1f77b4' or 'rgba(31,119,180,0.15)' -> '#1f77b4'."""
    m = re.fullmatch(r"rgba?\((\d+),\s*(\d+),\s*(\d+)(?:,\s*[\d.]+)?\)", color)
    return "#{:02x}{:02x}{:02x}".format(*map(int, m.groups())) if m else color.lower()


def trace_color(tr) -> str | None:
    for c in (getattr(getattr(tr, "line", None), "color", None), getattr(getattr(tr, "marker", None), "color", None),
              getattr(tr, "fillcolor", None)):
        if isinstance(c, str):
            return hex_of(c)
    return None


def test_a_run_has_one_colour_in_every_compare_panel(con):
    figs, tbl, _ = report.compare_indexed(["r0", "r1", "r2"], con=con)
    seen: dict[str, dict[str, set]] = {n: {} for n in NAMES}
    for name, fig in figs.items():
        if name == "summary_table":
            continue
        for tr in fig.data:
            run = next((n for n in NAMES if str(tr.name or "").startswith(n)), None)
            if run is not None:
                seen[run].setdefault(name, set()).add(trace_color(tr))
            if tr.type == "scatter" and "markers" in (tr.mode or "lines+markers"):    # plotly's default mode
                assert getattr(tr.marker, "color", None) or getattr(tr.line, "color", None), (name, tr.name)
    assert "module_types" not in seen["run one"] and "module_types" in seen["run two"]   # r0 has no module rows
    for k, run in enumerate(NAMES):
        panels = seen[run]
        assert len(panels) >= 5, (run, sorted(panels))          # evolution, decay, categories, lorenz, autocorr, ...
        for panel, colors in panels.items():
            assert colors == {figures.PALETTE[k]}, (run, panel, colors)
    # the summary shows the same colours, in the runs' order
    html = compare.summary_html(tbl.map(str).reset_index())
    assert re.findall(r"background:(#[0-9a-f]{6})", html) == list(figures.PALETTE[:3])


def test_lora_parts_have_their_own_colours(con):
    layers = pd.DataFrame({"layer": [0, 1], "lora_A": [1.0, 2.0], "lora_B": [3.0, 4.0], "ratio_b_over_a": [3.0, 2.0]})
    bars = {tr.name: tr.marker.color for tr in figures.lora_ab(layers).data if tr.type == "bar"}
    assert bars == {"lora_A": figures.LORA_COLORS["lora_A"], "lora_B": figures.LORA_COLORS["lora_B"]}
    alignment_blue_red = {figures.PALETTE[0], figures.PALETTE[1], "#2166ac", "#b2182b"}     # RdBu's ends too
    assert not set(bars.values()) & alignment_blue_red and len(set(bars.values())) == 2
    figs, _, _ = report.compare_indexed(["r1", "r2"], con=con)
    one = figures.build("module_types", {"modules": analyses.run("module_types", "r1", con=con)["modules"]})
    assert {tr.name: tr.marker.color for tr in one.data} == {p: figures.LORA_COLORS[p] for p in ("lora_A", "lora_B")}
    shapes = {tr.name: tr.marker.pattern.shape for tr in figs["module_types"].data}
    assert shapes == {"run two lora_A": "", "run two lora_B": "/", "run three lora_A": "", "run three lora_B": "/"}
