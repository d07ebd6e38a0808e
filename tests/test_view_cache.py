"""The app's view caches (backend.index.memo): a repeated view is computed once, and a write to the index
(an ingest) makes every cached view be computed again, so a cache never shows what the index no longer holds."""
from __future__ import annotations

import shutil

import duckdb
import pytest

from backend.index import db, memo, queries
from tests.conftest import app_server, make_home


def counted(entries: int = 4):
    """A cached function that counts its computations (and fails on "boom")."""
    calls: list[tuple] = []

    @memo.cached(entries=entries)
    def view(*args: object) -> list:
        calls.append(args)
        if "boom" in args:
            raise ValueError("boom")
        return [len(calls)]

    return view, calls


def test_a_repeated_call_is_computed_once_and_lists_are_keyed_by_value():
    view, calls = counted()
    assert view("r", 1, [2, 3]) is view("r", 1, [2, 3])            # the same object: shared, not recomputed
    assert len(calls) == 1
    view("r", 1, [3, 2])
    view("r", 2, [2, 3])
    assert len(calls) == 3
    assert view.cache.hits == 1 and view.cache.misses == 3


def test_a_committed_write_anywhere_makes_every_entry_stale():
    view, calls = counted()
    first = view("r", 1)
    con = duckdb.connect()
    with db.transaction(con):
        con.execute("CREATE TABLE t (x INTEGER)")
    second = view("r", 1)
    assert len(calls) == 2 and second != first
    with pytest.raises(RuntimeError), db.transaction(con):       # a rolled-back write changes nothing
        con.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("rolled back")
    assert view("r", 1) is second and len(calls) == 2


def test_an_error_is_not_cached_and_unhashable_arguments_compute():
    view, calls = counted()
    for _ in range(2):
        with pytest.raises(ValueError, match="boom"):
            view("boom")
    assert len(calls) == 2
    view({"a": 1})
    view({"a": 1})
    assert len(calls) == 4


def test_least_recently_used_entries_leave_first():
    view, calls = counted(entries=2)
    view(1), view(2), view(1), view(3)          # 2 is the least recently used when 3 arrives
    assert len(view.cache.data) == 2
    view(1)
    assert len(calls) == 3
    view(2)
    assert len(calls) == 4


def test_the_environment_turns_the_caches_off_or_sizes_them(monkeypatch):
    monkeypatch.setenv("TOKVIZ_VIEW_CACHE", "0")
    view, calls = counted()
    view(1), view(1)
    assert len(calls) == 2
    monkeypatch.setenv("TOKVIZ_VIEW_CACHE", "1")
    view, calls = counted(entries=64)
    view(1), view(2), view(1)
    assert len(calls) == 3 and view.cache.entries == 1
    monkeypatch.setenv("TOKVIZ_VIEW_CACHE", "lots")
    with pytest.raises(ValueError, match="TOKVIZ_VIEW_CACHE must be a whole number >= 0"):
        counted()


def test_the_app_shows_a_rewritten_run_after_it_is_ingested_again(tmp_path, monkeypatch):
    """A run re-written on disk (same id, other numbers) and ingested again: Inspect's overlay, the token views,
    Layers, Concentration, Tokens and Training show the new numbers, equal to what the uncached functions
    compute."""
    from backend.dev.synth import SynthConfig, make_run
    from tokviz.tabs import concentration, inspect_tab, layers, tokens, training

    home = make_home(tmp_path / "home", xss=False)
    cfg = dict(n_layers=2, n_samples=4, traced_steps=(5, 10, 20), max_step=20, prompt_len=(6, 12),
               response_len=(30, 60))
    reads: list[tuple] = []
    real = queries.sample_tokens

    def counting(*args, **kwargs):
        reads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(queries, "sample_tokens", counting)
    with app_server(home) as (_, ctx):
        def views(uncached: bool = False) -> list:
            f = (lambda fn: fn.__wrapped__) if uncached else (lambda fn: fn)
            return [f(inspect_tab.overlay_html)("synth-sft", 10, sample, "alignment", None),
                    f(inspect_tab.token_views)("synth-sft", 10, sample, 8, inspect_tab.VIEWS[0])[1].to_json(),
                    f(layers.position_heatmap)("synth-sft", 10, None).to_json(),
                    f(concentration.shown)("synth-sft", 10, [5, 20], [])[0][1].to_json(),
                    [fig.to_json() for fig in f(tokens.shown)("synth-sft", 10)[0]],
                    f(training.shown)("synth-sft")[2].to_json()]

        sample = int(queries.step_samples("synth-sft", 10)["sample_idx"][0])
        before = views()
        n = len(reads)
        assert views() == before and len(reads) == n                      # answered from the caches
        assert views(uncached=True) == before
        # the same samples (drawn first from the seed), another layer: every number after them differs
        shutil.rmtree(home / "runs" / "synth-sft")
        make_run(SynthConfig(scheme="sft", seed=1, **{**cfg, "n_layers": 3}), home / "runs", run_id="synth-sft",
                 name="synthetic sft")
        ctx.ingest(home / "runs" / "synth-sft")
        after = views()
        assert len(reads) > n
        assert all(a != b for a, b in zip(after, before))                  # every view shows the new numbers
        assert views(uncached=True) == after                               # as computed without a cache
