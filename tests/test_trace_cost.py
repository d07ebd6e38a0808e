"""What a traced step costs, said before the first one (backend.trace.config.trace_cost / plan_cost), and verify's
token sample (backend.trace.verify) against recomputing every token (issue #18, item 4)."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from backend.lm.schemes import get_scheme
from backend.trace import TraceConfig, trace_batch
from backend.trace.config import (
    COST_BUDGET,
    MIN_SKETCH_K,
    StepShape,
    plan_cost,
    sketch_error,
    trace_cost,
)
from backend.trace.verify import (
    choose_sample,
    compare,
    describe_sample,
    recorded_tokens,
    reference,
)
from tests._tiny_lora import tiny_batch, tiny_lora_model

SHAPE = StepShape(n_sites=8, batch_sequences=16, traced_sequences=4, positions=10, seq_len=12, n_params=1000)


def test_trace_cost_by_hand():
    # units of one sequence forward: plain step 3B = 48
    assert trace_cost(TraceConfig(mode="position"), SHAPE) == pytest.approx(2.0)           # one re-run
    assert trace_cost(TraceConfig(mode="position", micro_batch_size=4), SHAPE) == pytest.approx(3.0)
    assert trace_cost(TraceConfig(mode="position", inline=True), SHAPE) == pytest.approx(1.1)
    # token exact: G 48 + dot 2*4 + 4 * (ceil(10/32) + 2*10) = 48 + 8 + 84 = 140
    assert trace_cost(TraceConfig(mode="token", magnitude="exact"), SHAPE) == pytest.approx((48 + 140) / 48)
    # sketch k=64, j=8, with rows (M=8), two units a tangent: 48 + 8 + 4 * (128 + 8) + 4 * (16 + 1) = 668
    cfg = TraceConfig(mode="token", magnitude="sketch", sketch_k=64)
    assert trace_cost(cfg, SHAPE) == pytest.approx((48 + 668) / 48)
    # none, no rows: G + the dot only
    cfg = TraceConfig(mode="token", magnitude="none", module_rows=False)
    assert trace_cost(cfg, SHAPE) == pytest.approx((48 + 56) / 48)
    # S is at most B: tracing more sequences than the step has costs no more
    big_s = StepShape(8, 4, 100, 10, 12)
    assert trace_cost(TraceConfig(mode="token", magnitude="none", module_rows=False), big_s) == \
        pytest.approx((12 + 12 + 8) / 12)


def test_auto_keeps_exact_magnitudes_when_they_fit():
    cfg, ratio, msg = plan_cost(TraceConfig(mode="token"), SHAPE, auto=True)
    assert cfg.magnitude == "exact" and cfg.module_rows and ratio <= COST_BUDGET
    assert msg.startswith(f"expected cost of a traced step: ~{ratio:.1f}x a plain training step")


@pytest.mark.parametrize("n_sites", [8, 56, 192, 600])
@pytest.mark.parametrize("positions", [10, 200, 4000])
@pytest.mark.parametrize("batch, traced", [(16, 4), (64, 4), (8, 2), (16, 1)])
def test_auto_stays_within_budget_on_any_model(n_sites, positions, batch, traced):
    """With at most a quarter of the step traced (the defaults: 4 of 16), whatever the depth and length."""
    shape = StepShape(n_sites, batch, traced, positions, int(positions) + 1)
    cfg, ratio, msg = plan_cost(TraceConfig(mode="token", sketch_k=64), shape, auto=True)
    assert ratio <= COST_BUDGET and "above the" not in msg, msg
    assert ratio == pytest.approx(trace_cost(cfg, shape))
    if cfg.magnitude == "sketch":
        assert cfg.sketch_k >= MIN_SKETCH_K
        assert f"{sketch_error(cfg.sketch_k):.0%}" in msg and "sqrt(1/(2k))" in msg    # the error bound, stated
    exact = trace_cost(TraceConfig(mode="token", magnitude="exact"), shape)
    assert (cfg.magnitude == "exact") == (exact <= COST_BUDGET)      # exact whenever it fits, never when not


def test_long_sequences_get_sketched_and_deep_models_lose_module_rows_last():
    long = StepShape(n_sites=16, batch_sequences=16, traced_sequences=4, positions=500, seq_len=512)
    cfg, _, msg = plan_cost(TraceConfig(mode="token", sketch_k=64), long, auto=True)
    assert cfg.magnitude == "sketch" and cfg.module_rows and "chosen by --trace-magnitude auto" in msg
    deep = StepShape(n_sites=400, batch_sequences=16, traced_sequences=4, positions=500, seq_len=512)
    cfg, _, msg = plan_cost(TraceConfig(mode="token", sketch_k=64), deep, auto=True)
    assert cfg.magnitude == "sketch" and not cfg.module_rows and "no per-module rows" in msg


def test_tracing_every_sequence_can_exceed_the_budget_and_says_so():
    shape = StepShape(n_sites=8, batch_sequences=8, traced_sequences=8, positions=200, seq_len=201)
    cfg, ratio, msg = plan_cost(TraceConfig(mode="token", sketch_k=64), shape, auto=True)
    assert ratio > COST_BUDGET and cfg.sketch_k == MIN_SKETCH_K and not cfg.module_rows     # the cheapest
    assert "above the ~10x target" in msg and "--trace-sequences" in msg


def test_without_auto_the_asked_settings_are_kept_and_their_cost_said():
    long = StepShape(n_sites=16, batch_sequences=16, traced_sequences=4, positions=500, seq_len=512)
    asked = TraceConfig(mode="token", magnitude="exact")
    cfg, ratio, msg = plan_cost(asked, long, auto=False)
    assert cfg == asked and ratio > COST_BUDGET and f"~{ratio:.1f}x" in msg


def test_sketch_error_is_the_chi_square_rule():
    assert sketch_error(64) == pytest.approx(math.sqrt(1 / 128))
    assert sketch_error(16) == pytest.approx(0.1767767)


# ---- verify's token sample ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["position", "token"])
def test_a_sample_recomputes_the_same_values_and_keeps_the_whole_step_checks(mode):
    torch.set_num_threads(1)
    model = tiny_lora_model("qwen2", targets=["q_proj", "v_proj"])
    # two micro-batches, the traced sequences in both: the sample crosses chunk boundaries
    res = trace_batch(model, tiny_batch(), get_scheme("sft"), {}, TraceConfig(mode=mode, max_sequences=3,
                                                                               magnitude="exact", micro_batch_size=2))
    keys = recorded_tokens([res.state])
    ours = pd.DataFrame(res.tokens).assign(rank=0)
    assert len(keys) == len(ours) and set(keys) == set(zip(ours["rank"], ours["sample_idx"], ours["position"]))
    sample = choose_sample(keys, 7, seed=1)
    assert len(sample) == 7 and set(sample) <= set(keys) and sample == choose_sample(keys, 7, seed=1)
    assert choose_sample(keys, len(keys), seed=1) is None                      # as many as there are: every one
    full = reference(model, [res.state])
    part = reference(model, [res.state], sample=sample)
    key = ["rank", "sample_idx", "position"]
    cols = ["dot", "magnitude", "loss", "prob", "entropy", "alignment"]
    a = full["tokens"].merge(pd.DataFrame(sample, columns=key), on=key).sort_values(key).reset_index(drop=True)
    b = part["tokens"].sort_values(key).reset_index(drop=True)
    assert len(b) == 7
    pd.testing.assert_frame_equal(a[key + cols], b[key + cols], rtol=1e-6, atol=1e-9)
    assert len(part["modules"]) == 7 * 8                                    # 2 modules x 2 parts x 2 layers
    # traced_share (and in position mode the pieces' sum) still cover every recorded token
    assert part["checks"]["traced_share"] == pytest.approx(full["checks"]["traced_share"], rel=1e-6, abs=1e-9)
    if mode == "position":
        assert part["checks"]["pieces_sum_max_rel_err"] < 1e-4
    errs = compare(ours.merge(pd.DataFrame(sample, columns=key), on=key),
                   pd.DataFrame(res.modules).assign(rank=0).merge(pd.DataFrame(sample, columns=key), on=key), part)
    assert errs["token_rows_unmatched"] == 0 and errs["module_rows_unmatched"] == 0
    assert max(v for k, v in errs.items() if not k.endswith("unmatched")) < 1e-4, errs
    line = describe_sample({"tokens_recorded": len(keys), "sample": [list(k) for k in sample], "sample_seed": 1})
    assert line.startswith(f"checked 7 of {len(keys)} recorded tokens, drawn with seed 1")
    assert all(f"seq {s}" in line for _, s, _ in sample)
