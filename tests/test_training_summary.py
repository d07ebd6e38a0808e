"""The Training tab's summary line (issue #14: an empty "data" field): the data the run trained on when the run
says (its dataset, else its config's dataset or task), and nothing, rather than a placeholder, when it does not."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from tokviz.tabs import training


def _info(dataset: object, config: dict) -> pd.DataFrame:
    return pd.DataFrame([{"name": "r", "status": "done", "model": "tiny", "scheme": "sft", "dataset": dataset,
                          "manifest_json": json.dumps({}), "config_json": json.dumps({"config": config})}])


@pytest.mark.parametrize("dataset, config, shown", [
    ("arith.jsonl", {}, "data `arith.jsonl`"),
    (None, {"dataset": "mine.parquet"}, "data `mine.parquet`"),
    (None, {"task": "modadd"}, "data `modadd`"),
    (None, {}, None),
    ("", {"dataset": ""}, None),
])
def test_data_field(monkeypatch, dataset, config, shown):
    monkeypatch.setattr(training.queries, "run_info", lambda run_id: _info(dataset, config))
    monkeypatch.setattr(training.queries, "eval_rows", lambda run_id: pd.DataFrame())
    monkeypatch.setattr(training.queries, "train_steps",
                        lambda run_id: pd.DataFrame({"step": [1, 2], "loss": [1.5, 1.25]}))
    md, _ = training.summary_md("r")
    if shown is None:
        assert "data" not in md and "?" not in md, md
    else:
        assert shown in md, md
    assert "final loss 1.2500 at step 2" in md and "no evaluation" in md
