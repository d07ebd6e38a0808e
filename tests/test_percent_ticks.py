"""Percent axes label every tick differently (issue #14: the Training tab's right axis read "44%, 44%, 43%..."):
the tick labels plotly would draw are worked out here from the axis settings (linear ticks at tick0 + k * dtick
inside the range, each formatted with the d3 format, which for "%" is Python's) and must all differ."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from backend.analysis import figures, influence_figures


def tick_labels(axis: go.layout.YAxis) -> list[str]:
    """The labels of a linear axis with a fixed range, tick0 and dtick, as plotly draws them."""
    lo, hi = sorted(axis.range)
    t0, d = float(axis.tick0), float(axis.dtick)
    first = math.ceil((lo - t0) / d - 1e-9)
    values = [t0 + k * d for k in range(first, first + 10_000) if t0 + k * d <= hi + 1e-12]
    return [format(v, axis.tickformat) for v in values]


def test_reference_catches_the_reported_bug() -> None:
    """The check is not vacuous: 43-45% with a fixed ".0%" and plotly's step there (0.5%) repeats labels."""
    axis = go.layout.YAxis(range=[0.4345, 0.4455], tick0=0.0, dtick=0.005, tickformat=".0%")
    labels = tick_labels(axis)
    assert len(labels) != len(set(labels))          # ['43%', '44%', '44%'] (0.435 rounds to 44%, so does 0.44)


@pytest.mark.parametrize("values, tozero", [
    ([0.4351, 0.4382, 0.4417, 0.4449], False),       # the report: a fraction that moves by a point
    ([0.44, 0.44, 0.44], False),                     # constant
    ([0.5000, 0.5002, 0.5004], False),               # moves by hundredths of a point
    ([0.0, 0.003, 0.012], True),                     # small, from 0
    ([0.1, 0.9], True),                              # wide
    ([0.97, 1.0], False),
    ([], False),
])
def test_percent_axis_labels_differ(values: list[float], tozero: bool) -> None:
    axis = go.layout.YAxis(**figures.percent_axis(values, tozero=tozero))
    labels = tick_labels(axis)
    assert len(labels) >= 2, labels
    assert len(labels) == len(set(labels)), labels
    lo, hi = axis.range
    assert lo <= min(values, default=lo) and hi >= max(values, default=hi)       # the data is on screen
    if tozero:
        assert lo == 0.0


def test_training_tab_right_axis() -> None:
    """The alignment-over-training figure (Training tab) with an opposing fraction between 43% and 45%."""
    steps = np.arange(10, 110, 10)
    frac = np.linspace(0.4351, 0.4449, len(steps))
    ev = pd.DataFrame({"step": steps, "mean": 0.1, "std": 0.2, "p10": -0.2, "p50": 0.1, "p90": 0.4, "n": 300,
                       "frac_negative": frac})
    fig = figures.alignment_evolution(ev)
    labels = tick_labels(fig.layout.yaxis2)
    assert len(labels) >= 3 and len(labels) == len(set(labels)), labels
    assert all(label.endswith("%") for label in labels)


def test_other_percent_axes() -> None:
    groups = pd.DataFrame({"group": ["prompt", "response"], "mean_alignment": [0.1, 0.2], "std_alignment": 0.1,
                           "share_sum": [0.004, 0.996], "n": [10, 20], "frac_negative": 0.4,
                           "mean_magnitude": 1.0})
    fig = figures.prompt_vs_response(groups)
    labels = tick_labels(fig.layout.yaxis2)
    assert len(labels) == len(set(labels)), labels
    steps = pd.DataFrame({"step": [10, 20, 30], "eval_cosine": [0.1, 0.2, 0.3], "g_dot_eval": 1.0, "eval_loss": 1.0,
                          "eval_grad_norm": 1.0, "frac_hurts": [0.002, 0.004, 0.006], "n_aligned_hurts": 1,
                          "n_response": 100})
    fig = influence_figures.influence_over_training(steps)
    labels = tick_labels(fig.layout.yaxis2)
    assert len(labels) >= 3 and len(labels) == len(set(labels)), labels
