"""``analyze`` and ``compare``: every figure written, and a summary that matches a direct computation from
the Parquet shards (pyarrow + numpy, no DuckDB).

    pytest tests/test_report.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backend import index
from backend.analysis import analyses, report
from backend.dev.synth import SynthConfig, make_run, read_shards
from tests.conftest import index_held_elsewhere


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path))
    return tmp_path


def direct_summary(run: Path, step: int) -> dict:
    """The headline numbers computed straight from the shards with numpy, following docs/design.md."""
    tok = read_shards(run, "tokens").astype({"alignment": "float64", "magnitude": "float64"})
    mod = read_shards(run, "token_modules").astype({"alignment": "float64", "dot": "float64", "magnitude": "float64"})
    resp = tok[tok.is_response]
    r = resp[resp.step == step].sort_values(["sample_idx", "position"])
    first = r.groupby("sample_idx").position.transform("min")
    a, v = r.alignment.to_numpy(), r.magnitude.to_numpy()
    vs = np.sort(v)
    n = v.size
    desc = vs[::-1]
    means = resp.groupby("step").alignment.mean()
    m = mod[mod.step == step]
    per_mod = m.groupby(["layer", "module"]).dot.sum()           # every traced position, both parts
    rm = m.merge(r[["sample_idx", "position"]], on=["sample_idx", "position"])
    per_part = rm.groupby(["layer", "module", "part"]).alignment.mean()  # response tokens, per LoRA part
    per_type = rm.groupby(["module", "part"]).agg(dot=("dot", "sum"), align=("alignment", "mean"))
    norms = (rm.assign(sq=rm.magnitude ** 2).groupby(["sample_idx", "position", "part"]).sq.sum() ** 0.5)
    part_mean = norms.groupby("part").mean()
    lag1 = []
    for _, g in r.groupby("sample_idx"):
        x = g.alignment.to_numpy()
        if x.size > 2:
            d = x - x.mean()
            lag1.append((d[:-1] * d[1:]).sum() / (d * d).sum())
    dom, top = per_part.idxmax(), per_mod.idxmax()
    opposing = per_part[per_part < 0]
    opp = opposing.idxmin() if len(opposing) else None
    # Spearman from its definition: Pearson of the average ranks (pandas ranks ties by their mean rank)
    rank_r = np.corrcoef(pd.Series(a).rank().to_numpy(), pd.Series(v).rank().to_numpy())[0, 1]
    return {
        "mean_alignment": a.mean(),
        "opposing_fraction": (a < 0).mean(),
        "alignment_trend": np.polyfit(means.index.to_numpy(float), means.to_numpy(), 1)[0],
        "positional_decay_slope": np.polyfit((r.position - first).to_numpy(float), a, 1)[0],
        "gini": 2 * (np.arange(1, n + 1) * vs).sum() / (n * vs.sum()) - (n + 1) / n,
        "tokens_for_80pct": (np.searchsorted(np.cumsum(desc), 0.8 * v.sum()) + 1) / n,
        "category_alignment": r.groupby("category").alignment.mean().to_dict(),
        "magnitude_alignment_r": np.corrcoef(a, v)[0, 1],              # raw magnitudes, as the seeds report it
        "magnitude_alignment_spearman": rank_r,
        "lora_ba_ratio": part_mean["lora_B"] / part_mean["lora_A"],
        "dominant_module": "L{}.{}.{}".format(*dom),
        "dominant_module_alignment": per_part[dom],
        "opposing_module": "L{}.{}.{}".format(*opp) if opp is not None else None,
        "opposing_module_alignment": per_part[opp] if opp is not None else None,
        "dominant_module_type": "{}.{}".format(*per_type["align"].idxmax()),
        "largest_share_module": "L{}.{}".format(*top),
        "largest_share_module_share": per_mod[top] / per_mod.sum(),
        "largest_share_module_type": "{}.{}".format(*per_type["dot"].idxmax()),
        "lag1_autocorr": float(np.mean(lag1)),
    }


def test_analyze_writes_every_figure_and_a_matching_summary(home):
    run = make_run(SynthConfig.tiny(world_size=2), home / "runs", run_id="run-a", name="alpha")
    summary = report.analyze(run)
    out = run / "analysis"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["mean_alignment"] == summary["mean_alignment"]
    assert on_disk["step"] == 20 and on_disk["status"] == "finished"
    want = direct_summary(run, 20)
    for key, value in want.items():
        if value is None or isinstance(value, str):
            assert on_disk[key] == value, key
        elif isinstance(value, dict):
            assert on_disk[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert on_disk[key] == pytest.approx(value, rel=1e-6), key
    static_ok, why = report.static_export_status()
    for name in [n for n in analyses.names(kind="train") if analyses.get(n).available is None]:   # no influence
        html = (out / f"{name}.html").read_text()
        assert "plotly" in html.lower() and len(html) > 1_000_000, name     # standalone: plotly.js inlined
        if static_ok:
            assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
            assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
        assert on_disk["figures"][name][0] == f"{name}.html"
    assert on_disk["static_export"] == ("ok" if static_ok else f"skipped: {why}")
    assert (out / "tables" / "concentration.stats.csv").exists()
    # a second analyze at another step reuses the index (unchanged run) and writes where told
    s2 = report.analyze("run-a", out=home / "elsewhere", step=5, static=False, html_js="directory")
    assert s2["step"] == 5 and s2["static_export"] == "skipped: static export turned off"
    assert s2["mean_alignment"] == pytest.approx(direct_summary(run, 5)["mean_alignment"], rel=1e-6)
    assert (home / "elsewhere" / "plotly.min.js").exists()


def test_compare_overlays_runs_and_tabulates(home):
    a = make_run(SynthConfig.tiny(), home / "runs", run_id="run-a", name="alpha")
    b = make_run(SynthConfig.tiny(seed=3, scheme="dft"), home / "runs", run_id="run-b", name="beta")
    out = home / "cmp"
    table = report.compare([a, "run-b"], out=out, static=False)
    assert list(table.columns) == ["alpha", "beta"]
    assert table.loc["mean_alignment", "alpha"] == pytest.approx(direct_summary(a, 20)["mean_alignment"], rel=1e-6)
    assert table.loc["gini", "beta"] == pytest.approx(direct_summary(b, 20)["gini"], rel=1e-6)
    for name in ("alignment_evolution", "positional_decay", "concentration", "category_breakdown", "module_types",
                 "autocorrelation", "summary_table"):
        assert (out / f"{name}.html").exists(), name
    csv = pd.read_csv(out / "summary.csv", index_col=0)
    assert list(csv.columns) == ["alpha", "beta"] and "lag1_autocorr" in csv.index
    doc = json.loads((out / "summary.json").read_text())
    assert doc["run_ids"] == ["run-a", "run-b"] and set(doc["summaries"]) == {"alpha", "beta"}
    with pytest.raises(ValueError, match="at least two runs"):
        report.compare([a])


def test_cli_errors_are_messages(home, capsys):
    assert report.main(["analyze", str(home / "missing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert report.main(["frobnicate"]) == 2
    run = make_run(SynthConfig.tiny(), home / "runs", run_id="run-a")
    assert report.main(["analyze", str(run), "--step", "7", "--static", "off"]) == 2
    assert "step 7 is not a traced step" in capsys.readouterr().err
    # a kind with no analyses of its own (a scheme comparison) said "summarize needs the frames of one job kind"
    import shutil

    from backend.store import paths
    shutil.copytree(paths.SHIPPED_DATA / "runs" / "demo-schemes", home / "runs" / "demo-schemes")
    assert report.main(["analyze", str(home / "runs" / "demo-schemes"), "--static", "off"]) == 2
    assert "(a 'compare-schemes' run) has no analysis that applies to it" in capsys.readouterr().err


def test_analyze_uses_a_private_index_when_the_index_is_held(home, capsys):
    run = make_run(SynthConfig.tiny(), home / "runs", run_id="run-a")
    path = home / "tokviz.duckdb"
    index.connect(path).close()
    with index_held_elsewhere(path):
        assert report.main(["analyze", str(run), "--static", "off"]) == 0
        err = capsys.readouterr().err
        assert "in use by another process" in err and "private in-memory index" in err
    assert json.loads((run / "analysis" / "summary.json").read_text())["run_id"] == "run-a"


def test_static_export_is_skipped_with_a_message_when_no_browser(home, monkeypatch, capsys):
    import plotly.graph_objects as go
    monkeypatch.setenv("PATH", str(home))             # no chromium on the PATH
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    ok, why = report.static_export_status()
    assert not ok and ("Chromium" in why or "kaleido" in why)
    figs = {"one": go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))}
    done = report.export_figures(figs, home / "figs")
    assert done == {"figures": {"one": ["one.html"]}, "static_export": f"skipped: {why}"}
    assert (home / "figs" / "one.html").exists() and not (home / "figs" / "one.png").exists()
    assert "PNG/PDF export skipped" in capsys.readouterr().err
    with pytest.raises(report.StaticExportUnavailable, match="required but is unavailable"):
        report.export_figures(figs, home / "figs", static=True)


# ------------------------------------------------------------------------------------------------ trace mode
def test_summary_and_cli_say_the_trace_mode(home, capsys):
    """summary.json carries the run's trace mode (the compare table shows it as a row), and ``analyze``
    on a position run says what an opposing token is there."""
    pos = make_run(SynthConfig.tiny(), home / "runs", run_id="run-p", name="pos")
    tok = make_run(SynthConfig.tiny(mode="token", seed=2), home / "runs", run_id="run-t", name="tok")
    assert report.main(["analyze", str(pos), "--static", "off"]) == 0
    out = capsys.readouterr().out
    assert json.loads((pos / "analysis" / "summary.json").read_text())["mode"] == "position"
    assert [ln for ln in out.splitlines() if ln.startswith("mode ")] == [f"{'mode':<24} position"]
    assert report.OPPOSING_MEANS["position"] in out.splitlines()
    assert "an opposing token is a position whose piece of the update points against the batch gradient" in out
    assert report.analyze(tok, static=False)["mode"] == "token"
    with report.index_with([pos, tok]) as (con, ids):
        figs, table, _ = report.compare_indexed(ids, con=con)
    assert list(table.loc["mode"]) == ["position", "token"]
    for name, fig in figs.items():                # overlays of runs of both modes name both
        if name != "summary_table":
            assert fig.layout.title.text.endswith(" (position / token mode)"), name


def rewrite_shards(run: Path, table: str, edit) -> None:
    """Rewrite every Parquet shard of ``table`` in place: ``edit(df) -> df`` (same columns, same schema)."""
    for f in sorted((run / "trace" / table).glob("*.parquet")):
        t = pq.read_table(f)
        pq.write_table(pa.Table.from_pandas(edit(t.to_pandas()), schema=t.schema, preserve_index=False), f)


def test_opposing_module_is_per_part_and_only_when_negative(home):
    """The synthetic modules all align positively (no opposing module: null); one (layer, module, part) whose
    pieces are turned around becomes the opposing one, named with its LoRA part."""
    run = make_run(SynthConfig.tiny(), home / "runs", run_id="run-a")
    plain = report.analyze(run, static=False)
    assert plain["opposing_module"] is None and plain["opposing_module_alignment"] is None
    assert plain["dominant_module"].endswith((".lora_A", ".lora_B"))

    def flip(df: pd.DataFrame) -> pd.DataFrame:       # L1 v_proj lora_B pieces point the other way
        sel = (df.layer == 1) & (df.module == "v_proj") & (df.part == "lora_B")
        df.loc[sel, ["alignment", "dot"]] *= -1
        return df
    rewrite_shards(run, "token_modules", flip)
    flipped = report.analyze(run, static=False)
    want = direct_summary(run, 20)
    assert want["opposing_module"] == "L1.v_proj.lora_B" == flipped["opposing_module"]
    assert flipped["opposing_module_alignment"] == pytest.approx(want["opposing_module_alignment"], rel=1e-6)
    assert flipped["opposing_module_alignment"] < 0


def test_token_mode_reports_no_shares(home):
    """In token mode the tokens' dots do not add up to the update: the share-based keys are null (present,
    with a definition saying why), the alignment-based ones are still reported."""
    run = make_run(SynthConfig.tiny(), home / "runs", run_id="run-t")
    rewrite_shards(run, "tokens", lambda df: df.assign(mode="token", share=np.nan))
    s = report.analyze(run, static=False)
    for key in ("largest_share_module", "largest_share_module_share", "largest_share_module_type", "prompt_share"):
        assert key in s and s[key] is None, key
    for key in ("largest_share_module", "largest_share_module_type", "prompt_share"):
        assert "token mode" in analyses.summary("train").definitions[key], key
    assert "dominant_module_share" not in s
    want = direct_summary(run, 20)
    assert s["dominant_module"] == want["dominant_module"]
    assert s["dominant_module_type"] == want["dominant_module_type"]
    assert s["magnitude_alignment_r"] == pytest.approx(want["magnitude_alignment_r"], rel=1e-6)
