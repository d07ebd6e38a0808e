"""The tracer against the naive reference of backend.trace.verify (explicit pieces / one backward per token), on tiny
random Qwen2 and Llama models with LoRA on every attention and MLP projection (lora_B randomised)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from backend.lm.loss import forward_loss, per_token_ce, weight_ce
from backend.lm.schemes import get_scheme
from backend.store.rundir import RunDir
from backend.trace import InlineTrace, TraceConfig, discover_lora_modules, trace_batch
from backend.trace import store as trace_store
from backend.trace.verify import compare, failures, reference
from tests._tiny_lora import ALL_TARGETS, randomise_lora, tiny_base_model, tiny_batch, tiny_lora_model, tiny_tokenizer

TOL = 1e-4
ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def errors_vs_naive(model, res) -> tuple[dict, dict]:
    ref = reference(model, [res.state])
    ours = pd.DataFrame(res.tokens).assign(rank=0)
    mods = pd.DataFrame(res.modules).assign(rank=0)
    return compare(ours, mods, ref), ref


def assert_close(errs: dict, ref: dict, recorded: dict) -> None:
    bad = failures({"errors": errs, "checks_reference": ref["checks"], "checks_recorded": recorded}, TOL)
    assert not bad, bad
    assert errs["token_rows_unmatched"] == 0 and errs.get("module_rows_unmatched", 0) == 0


# ---- discovery and config --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_discover_lora_modules(arch):
    model = tiny_lora_model(arch)
    sites = discover_lora_modules(model)
    assert len(sites) == 2 * 7 * 2                                   # layers x modules x parts
    assert {s.module for s in sites} == set(ALL_TARGETS) and {s.layer for s in sites} == {0, 1}
    s = sites[0]
    assert s.name == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"
    layer, module, part, linear = s
    assert (layer, module, part) == (0, "q_proj", "lora_A")
    assert dict(model.named_modules())[s.name] is linear and s.param is linear.weight
    mlp = discover_lora_modules(model, ["down_proj", "gate_proj"])
    assert {s.module for s in mlp} == {"down_proj", "gate_proj"} and len(mlp) == 8
    with pytest.raises(ValueError, match="fc9"):
        discover_lora_modules(model, ["fc9"])
    with pytest.raises(ValueError, match="no active LoRA"):
        discover_lora_modules(tiny_base_model(arch))


@pytest.mark.parametrize("kw, field", [({"mode": "grad"}, "mode"), ({"sketch_k": 0}, "sketch_k"),
                                       ({"magnitude": "approx"}, "magnitude"), ({"micro_batch_size": 0},
                                                                                "micro_batch_size"),
                                       ({"mode": "token", "dropout": True}, "dropout"),
                                       ({"mode": "token", "inline": True}, "inline")])
def test_trace_config_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=field):
        TraceConfig(**kw)


# ---- both modes against the naive reference -----------------------------------------------------------------

POSITION_CASES = {
    "sft": dict(scheme="sft", params={}, cfg={}),
    "antiop-ce": dict(scheme="antiop", params={"clip_mult": 0.5}, cfg={"trace_loss": "ce"}),
    "antiop": dict(scheme="antiop", params={"clip_mult": 0.5}, cfg={}),
    "lr-micro": dict(scheme="lr", params={}, cfg={"micro_batch_size": 3}),       # reference pass, 2 chunks
    "dropout": dict(scheme="dft", params={}, cfg={"dropout": True}),
    "full-check": dict(scheme="topk", params={"keep_ratio": 0.5}, cfg={"full_check": True}),
}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("case", list(POSITION_CASES))
def test_position_mode_matches_naive_pieces(arch, case):
    c = POSITION_CASES[case]
    model = tiny_lora_model(arch, dropout=0.1)
    res = trace_batch(model, tiny_batch(), c["scheme"], c["params"], TraceConfig(mode="position", **c["cfg"]),
                      step=7)
    errs, ref = errors_vs_naive(model, res)
    assert_close(errs, ref, res.checks)
    assert abs(res.checks["share_sum"] - 1) < 1e-5
    assert res.checks["pieces_sum_max_rel_err"] < 1e-5
    assert res.checks["unrecorded_abs_share"] < 1e-6
    assert abs(res.tokens["share"].sum() - 1) < 1e-5
    assert np.isclose(res.checks["grad_norm"], ref["checks"]["grad_norm"], rtol=1e-5)


TOKEN_CASES = {
    "exact": dict(magnitude="exact"),
    "exact-response-micro": dict(magnitude="exact", token_positions="response", micro_batch_size=2, grad_chunk=5),
    "none": dict(magnitude="none", jvp_chunk=5),
    "sketch": dict(magnitude="sketch", sketch_k=24, jvp_chunk=7),
}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_token_mode_matches_naive_per_token_backward(arch, case):
    model = tiny_lora_model(arch)
    res = trace_batch(model, tiny_batch(), "dft", {}, TraceConfig(mode="token", **TOKEN_CASES[case]), step=3)
    errs, ref = errors_vs_naive(model, res)
    assert_close(errs, ref, res.checks)
    assert res.checks["attn_implementation_used"] == "tokviz_jvp"      # blockwise, with a forward-mode rule
    if case.startswith("exact"):
        assert res.checks["token_dot_jvp_vs_backward_max_rel_err"] < 1e-5
        assert not res.tokens["magnitude_estimated"].any()
    if case == "none":
        assert np.isnan(res.tokens["magnitude"]).all() and np.isnan(res.tokens["alignment"]).all()


def test_sketched_magnitudes_are_within_their_statistical_error():
    model = tiny_lora_model("qwen2")
    batch = tiny_batch()
    k = 64
    exact = trace_batch(model, batch, "sft", {}, TraceConfig(mode="token"))
    sk = trace_batch(model, batch, "sft", {}, TraceConfig(mode="token", magnitude="sketch", sketch_k=k))
    rel = np.abs(sk.tokens["magnitude"] / exact.tokens["magnitude"] - 1)
    # ||g||^2 estimate ~ chi^2_k / k: the norm's relative error has sd ~ sqrt(1/(2k)) = 0.088 here
    assert np.median(rel) < 2 * (0.5 / k) ** 0.5 and rel.max() < 0.5
    assert sk.tokens["magnitude_estimated"].all()
    np.testing.assert_allclose(sk.tokens["dot"], exact.tokens["dot"], rtol=1e-5, atol=1e-7)


# ---- G is the whole step's gradient; max_sequences only limits the rows -------------------------------------

def _step_reference(model, batch, scheme_name, params, micro, n_traced):
    """G of the whole step and the traced sequences' part of it, by plain autograd on each micro-batch's
    scheme loss (weights and N of the whole micro-batch), and those weights."""
    scheme = get_scheme(scheme_name)
    params = scheme.resolve_params(params)
    B = batch["input_ids"].shape[0]
    bounds = list(range(0, B, micro or B)) + [B]
    K = len(bounds) - 1
    ws = [p for n, p in model.named_parameters() if "lora_" in n]
    G = [torch.zeros_like(w) for w in ws]
    G_tr = [torch.zeros_like(w) for w in ws]
    weights = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        ch = {k: batch[k][a:b] for k in ("input_ids", "attention_mask", "labels")}
        out = forward_loss(model, ch, scheme, params)
        rows = torch.arange(a, b) < n_traced
        part = (out.weights * out.loss)[rows].sum() / out.normaliser
        for acc, g in zip(G, torch.autograd.grad(out.total / K, ws, retain_graph=True)):
            acc += g
        if rows.any():
            for acc, g in zip(G_tr, torch.autograd.grad(part / K, ws)):
                acc += g
        weights.append(out.weights.detach())
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs]).double()       # noqa: E731
    return flat(G), flat(G_tr), torch.cat(weights)


@pytest.mark.parametrize("mode", ["position", "token"])
@pytest.mark.parametrize("micro", [None, 2, 3])
def test_g_is_the_whole_step_and_traced_share_is_the_traced_rows_part(mode, micro):
    model = tiny_lora_model("qwen2")
    batch = tiny_batch()
    cfg = TraceConfig(mode=mode, max_sequences=2, micro_batch_size=micro)
    res = trace_batch(model, batch, "antiop", {"clip_mult": 1.0}, cfg, step=5)
    G, G_tr, weights = _step_reference(model, batch, "antiop", {"clip_mult": 1.0}, micro, n_traced=2)
    ours = torch.cat([res.grad[n + ".weight"].reshape(-1) if n + ".weight" in res.grad else None
                      for n in [s.name for s in discover_lora_modules(model)]]).double()
    cos = float(ours @ G / (ours.norm() * G.norm()))
    assert cos > 1 - 1e-6 and float(ours.norm() / G.norm()) == pytest.approx(1, rel=1e-5)
    assert res.checks["grad_norm"] == pytest.approx(float(G.norm()), rel=1e-5)
    want_share = float(G_tr @ G / G.square().sum())
    assert 0.05 < want_share < 0.95                              # the untraced sequences hold a real part
    assert res.checks["traced_share"] == pytest.approx(want_share, abs=1e-5)
    assert set(res.tokens["sample_idx"]) == {100, 101}           # rows for the traced sequences only
    b, p = res.tokens["sample_idx"] - 100, res.tokens["position"]
    np.testing.assert_allclose(res.tokens["weight"], weights[b, p].numpy(), rtol=1e-6, atol=1e-7)
    if mode == "position":
        assert res.tokens["share"].sum() == pytest.approx(want_share, abs=1e-5)
        assert abs(res.checks["share_sum"] - 1) < 1e-5 and res.checks["pieces_sum_max_rel_err"] < 1e-5
    assert res.checks["micro_batches"] == (1 if micro is None else 2) and res.checks["micro_batches_traced"] == 1
    errs, ref = errors_vs_naive(model, res)                      # the naive reference agrees, rows and share
    assert_close(errs, ref, res.checks)
    assert ref["checks"]["traced_share"] == pytest.approx(res.checks["traced_share"], abs=1e-5)


def test_traced_subset_with_dropout_and_micro_batches_replays_the_step():
    # pass 2 runs only the first micro-batch; its dropout masks must be those pass 1 (and verify) drew
    model = tiny_lora_model("llama", dropout=0.2)
    cfg = TraceConfig(mode="position", max_sequences=1, micro_batch_size=2, dropout=True)
    res = trace_batch(model, tiny_batch(), "sft", {}, cfg, step=9)
    errs, ref = errors_vs_naive(model, res)
    assert_close(errs, ref, res.checks)
    assert set(res.tokens["sample_idx"]) == {100} and 0 < res.checks["traced_share"] < 1


@pytest.mark.parametrize("mode", ["position", "token"])
def test_module_alignment_of_a_piece_that_is_zero_in_theory_is_null(mode):
    # a sequence's first real position attends to one key: its softmax is constant, so q_proj gets no gradient
    # there; float32 leaves dust whose cosine with G is noise (it used to be stored as +-0.1 .. 0.8)
    from backend.trace.batch import MODULE_ALIGNMENT_MIN_REL
    model = tiny_lora_model("qwen2")
    batch = tiny_batch()
    res = trace_batch(model, batch, "sft", {}, TraceConfig(mode=mode), step=1)
    t, m = pd.DataFrame(res.tokens), pd.DataFrame(res.modules)
    m = m.merge(t[["sample_idx", "position", "magnitude"]], on=["sample_idx", "position"], suffixes=("", "_tok"))
    first = {100 + b: int(batch["attention_mask"][b].nonzero()[0]) for b in range(4)}
    at_first = m[(m["position"] == m["sample_idx"].map(first)) & (m["module"] == "q_proj")]
    assert len(at_first) == 4 * 2 * 2                                 # sequences x layers x LoRA parts
    assert (at_first["magnitude"] < 1e-5 * at_first["magnitude_tok"]).all()          # dust, not a piece
    assert at_first["alignment"].isna().all()
    small = m["magnitude"] < MODULE_ALIGNMENT_MIN_REL * m["magnitude_tok"]
    assert m.loc[small, "alignment"].isna().all()                      # the stated rule, and nothing more
    assert m.loc[~small & (m["magnitude"] > 0), "alignment"].notna().all()
    assert m["dot"].notna().all()                                     # dots still sum into the token's


def test_modules_that_share_a_last_name_keep_their_own_label():
    # GPT-2 has attn.c_proj and mlp.c_proj in every block: one label "c_proj" merged their rows
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                            fan_in_fan_out=True, task_type="CAUSAL_LM"))
    randomise_lora(model)
    sites = discover_lora_modules(model)
    assert sorted({s.module for s in sites}) == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"]
    assert {s.module for s in discover_lora_modules(model, ["c_proj"])} == {"attn.c_proj", "mlp.c_proj"}
    res = trace_batch(model, tiny_batch(), "sft", {}, TraceConfig(mode="position", full_check=True))
    m = pd.DataFrame(res.modules)
    assert not m.duplicated(["sample_idx", "position", "layer", "module", "part"]).any()
    errs, ref = errors_vs_naive(model, res)
    assert_close(errs, ref, res.checks)


# ---- which positions are recorded ---------------------------------------------------------------------------

def test_recorded_positions_prompt_yes_padding_no():
    model = tiny_lora_model("qwen2")
    batch = tiny_batch()
    am, labels = batch["attention_mask"], batch["labels"]
    tok = tiny_tokenizer()
    for mode in ("position", "token"):
        res = trace_batch(model, batch, "sft", {}, TraceConfig(mode=mode, magnitude="none"), tok)
        t = res.tokens
        b = t["sample_idx"] - 100
        p = t["position"]
        assert (am[b, p] == 1).all() and (am[b, p + 1] == 1).all(), "a padding position was recorded"
        assert (~t["is_response"]).any() and (t["weight"][~t["is_response"]] == 0).all()
        np.testing.assert_array_equal(t["is_response"], (labels[b, p + 1] != -100).numpy())
        np.testing.assert_array_equal(t["token_id"], batch["input_ids"][b, p + 1].numpy())
        assert t["token"][0] == tok.decode([int(t["token_id"][0])]) and set(t["category"]) <= {
            "word", "subword", "number", "operator", "step_marker", "special", "other", "punctuation"}
        for row in range(4):
            valid = ((am[row, :-1] == 1) & (am[row, 1:] == 1)).nonzero().flatten().tolist()
            resp = (labels[row, 1:] != -100).nonzero().flatten().tolist()
            got = sorted(p[b == row].tolist())
            # position mode stops at the last response token (row 0 has a masked tail); token mode does not
            want = [x for x in valid if x <= max(resp)] if mode == "position" else valid
            assert got == want, (mode, row)
    res = trace_batch(model, batch, "sft", {}, TraceConfig(mode="token", token_positions="response"))
    assert res.tokens["is_response"].all()


# ---- tracing never changes training ------------------------------------------------------------------------

def _train(model, batches, trace_cfgs: dict[int, TraceConfig], steps: int = 3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheme = get_scheme("sft")
    torch.manual_seed(123)
    model.train()
    for step in range(1, steps + 1):
        if step in trace_cfgs:
            trace_batch(model, batches[step], "sft", {}, trace_cfgs[step], step=step)
        out = forward_loss(model, batches[step], scheme, {})
        out.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_tracing_leaves_weights_bit_identical():
    batches = {s: tiny_batch(seed=s) for s in range(1, 4)}
    plain = _train(tiny_lora_model("llama", dropout=0.2), batches, {})
    traced = _train(tiny_lora_model("llama", dropout=0.2), batches,
                    {1: TraceConfig(mode="position", dropout=True), 2: TraceConfig(mode="token", magnitude="sketch",
                                                                                   sketch_k=4),
                     3: TraceConfig(mode="position", micro_batch_size=2)})
    assert plain.keys() == traced.keys()
    for n in plain:
        assert torch.equal(plain[n], traced[n]), n


def test_tracing_leaves_rng_grads_modes_and_attention_alone():
    model = tiny_lora_model("qwen2", dropout=0.1)
    model.train()
    model.base_model.model.model.layers[1].eval()                     # a mixed state must come back as it was
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in params]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    for cfg in (TraceConfig(mode="position", dropout=True), TraceConfig(mode="token")):
        trace_batch(model, tiny_batch(), "sft", {}, cfg)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert [m.training for m in model.modules()] == modes
    assert model.config._attn_implementation == "sdpa"


def test_inline_trace_of_the_real_step():
    batch = tiny_batch()
    scheme = get_scheme("dft")

    def step(trace: bool):
        model = tiny_lora_model("qwen2", dropout=0.2)
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(5)
        res = None
        if trace:
            tr = InlineTrace(model, TraceConfig(mode="position", inline=True), step=1)
            with tr:
                out = forward_loss(model, batch, scheme, {})
                out.total.backward()
            res = tr.result(batch, out, scheme, {})
            state = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            out = forward_loss(model, batch, scheme, {})
            out.total.backward()
        opt.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if trace:
            with torch.no_grad():                                      # back to the step's weights for the check
                for n, p in model.named_parameters():
                    p.copy_(state[n])
        return model, res, after

    model, res, traced = step(True)
    _, _, plain = step(False)
    assert all(torch.equal(traced[n], plain[n]) for n in plain)
    assert res.checks["step_grad_norm_rel_err"] < 1e-6 and abs(res.checks["share_sum"] - 1) < 1e-5
    errs, ref = errors_vs_naive(model, res)                            # dropout replayed from the saved RNG
    assert_close(errs, ref, res.checks)


# ---- storage ------------------------------------------------------------------------------------------------

def test_shards_have_the_schema_and_nulls(tmp_path):
    from backend.store import schema
    model = tiny_lora_model("qwen2")
    rd = RunDir.create(kind="train", name="t", config={}, root=tmp_path)
    for step, cfg in ((1, TraceConfig(mode="position")), (2, TraceConfig(mode="token", magnitude="none"))):
        res = trace_batch(model, tiny_batch(), "sft", {}, cfg, tiny_tokenizer(), step=step)
        trace_store.store_step(rd, step, model, res, rank=0)
    assert trace_store.traced_steps(rd.path) == [1, 2]
    t1 = trace_store.read_step(rd.path, 1)
    assert t1.schema.equals(schema.TOKENS, check_metadata=True) and (t1["run_id"].to_numpy() == rd.run_id).all()
    assert schema.schema_version_of(t1.schema) == schema.SCHEMA_VERSION
    m1 = trace_store.read_step(rd.path, 1, "token_modules")
    assert m1.schema.equals(schema.TOKEN_MODULES) and m1.num_rows == t1.num_rows * 28
    t2 = trace_store.read_step(rd.path, 2)
    assert t2["share"].null_count == t2.num_rows and t2["magnitude"].null_count == t2.num_rows
    assert t2["magnitude_estimated"].null_count == t2.num_rows
    state = trace_store.load_step_state(rd.path, 1)
    assert set(state["adapter"]) == {n for n, p in model.named_parameters() if "lora_" in n}
    assert state["ranks"][0]["meta"]["mode"] == "position"


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import pyarrow.parquet as pq
    from backend.trace import store as trace_store
    from backend.store.rundir import RunDir
    from backend.trace import TraceConfig, trace_batch
    from tests._tiny_lora import tiny_batch, tiny_lora_model
    model = tiny_lora_model("qwen2")
    rd = RunDir.create(kind="train", name="kill", config={{}}, root={root_runs!r}, run_id="killed")
    res = trace_batch(model, tiny_batch(), "sft", {{}}, TraceConfig(), step=1)
    trace_store.store_step(rd, 1, model, res)
    real = pq.write_table
    def dying(table, where, **kw):             # step 2: die while the shard's temp file is half written
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    pq.write_table = dying
    res = trace_batch(model, tiny_batch(), "sft", {{}}, TraceConfig(), step=2)
    trace_store.store_step(rd, 2, model, res)
""")


def test_a_killed_run_keeps_completed_steps_readable(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), root_runs=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "killed"
    assert trace_store.traced_steps(run) == [1]                       # the half-written step 2 is invisible
    assert trace_store.read_step(run, 1).num_rows > 0
    assert trace_store.read_step(run, 1, "token_modules").num_rows > 0
    assert list((run / "trace" / "tokens").glob(".step_000002*"))      # only its temp file is there
    with pytest.raises(ValueError, match="no tokens shards for step 2"):
        trace_store.read_step(run, 2)
    assert not (run / "manifest.json").exists()


# ---- DDP: each rank traces its part, G is the global gradient -------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import os, sys, pickle
    sys.path.insert(0, {root!r})
    import torch, torch.distributed as dist
    from backend.trace import TraceConfig, trace_batch
    from tests._tiny_lora import tiny_batch, tiny_lora_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    r = dist.get_rank()
    full = tiny_batch()
    part = {{k: v[2 * r:2 * r + 2] for k, v in full.items()}}
    model = tiny_lora_model("llama")
    out = {{}}
    for mode in ("position", "token"):
        res = trace_batch(model, part, "sft", {{}}, TraceConfig(mode=mode), step=1)
        out[mode] = (res.tokens, res.modules, res.checks)
    pickle.dump(out, open({out!r} + f".{{r}}", "wb"))
    # both ranks done before either tears gloo down: a rank destroying its group while its peer still holds the
    # connection aborted the peer ("terminate called without an active exception", once in a CI run)
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_ddp_ranks_trace_their_part_against_the_global_gradient(tmp_path):
    import pickle
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path / "res")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(script)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [pickle.load(open(tmp_path / f"res.{r}", "rb")) for r in range(2)]
    model = tiny_lora_model("llama")
    for mode in ("position", "token"):
        # one process, the same 4 sequences in 2 micro-batches of 2: L = mean of the two losses = DDP's
        single = trace_batch(model, tiny_batch(), "sft", {}, TraceConfig(mode=mode, micro_batch_size=2), step=1)
        both = pd.concat([pd.DataFrame(r[mode][0]) for r in ranks], ignore_index=True)
        one = pd.DataFrame(single.tokens)
        assert len(both) == len(one)
        for col in ("dot", "magnitude", "alignment") + (("share",) if mode == "position" else ()):
            np.testing.assert_allclose(both[col], one[col], rtol=1e-4, atol=1e-8, err_msg=f"{mode} {col}")
        if mode == "position":                                        # the share sum is all-reduced
            assert all(abs(r[mode][2]["share_sum"] - 1) < 1e-5 and r[mode][2]["world_size"] == 2 for r in ranks)


def confident_batch(model, B: int = 3, T: int = 24) -> dict:
    """Greedy continuations of a model whose head is scaled up: most targets have p > 0.999."""
    with torch.no_grad():
        ids = torch.randint(3, 97, (B, 4), generator=torch.Generator().manual_seed(0))
        model.eval()
        spread = model(input_ids=ids).logits.std()
        model.get_output_embeddings().weight.mul_(12.0 / spread)           # logits with a spread of ~12
        while ids.shape[1] < T:
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    labels = ids.clone()
    labels[:, :6] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("magnitude", ["exact", "sketch"])
def test_token_mode_stays_exact_for_confident_tokens(magnitude):
    # d(CE)/dz_y = p_y - 1 cancels in float32 when p_y -> 1: token_loss keeps every method accurate
    model = tiny_lora_model("llama")
    batch = confident_batch(model)
    res = trace_batch(model, batch, "sft", {}, TraceConfig(mode="token", magnitude=magnitude, sketch_k=8))
    assert np.mean(res.tokens["prob"][res.tokens["is_response"]] > 0.999) > 0.3
    errs, ref = errors_vs_naive(model, res)
    assert_close(errs, ref, res.checks)
    if magnitude == "exact":
        assert res.checks["token_dot_jvp_vs_backward_max_rel_err"] < 1e-5


def _float64_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: -log_softmax in float64 of the float32 logits, and the entropy, (B, T-1) each."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = labels[:, 1:].clamp_min(0).unsqueeze(-1)
    return -lp.gather(-1, tgt).squeeze(-1), -(lp.exp() * lp).sum(-1)


def test_scheme_weights_come_from_accurate_losses_on_a_confident_model():
    # float32 log-softmax rounds the loss of a confident token (log(1 + s), s < 1e-7) to 0: antiop's c / l_t, with
    # c = 3 x median loss ~ 6e-3 here, was off by 4e-5 (by 9e-3 late in the demo run, c ~ 6e-5). The losses behind the weights are checked *relatively*:
    # antiop's weight is a ratio c / l_t, so l_t's relative error passes one-to-one into it, and the losses span
    # 1e-9 .. 1 (an absolute 1e-6 would accept 4e-9 read as 0).
    model = tiny_lora_model("llama")
    batch = confident_batch(model)
    mask = batch["labels"][:, 1:] != -100
    s = get_scheme("antiop")
    params = s.resolve_params({})
    with torch.no_grad():
        out = forward_loss(model, batch, s, params, want_entropy=True)
    l64, h64 = _float64_ce(out.logits, batch["labels"])
    assert (l64[mask] < 1e-6).sum() >= 5                                  # confident tokens are there
    w_loss = weight_ce(out.logits, batch["labels"])
    rel = ((w_loss.double() - l64).abs() / l64)[mask]
    assert rel.max() < 1e-6, float(rel.max())
    assert (w_loss[~mask] == 0).all()
    r = l64[mask]
    c = params["clip_mult"] * torch.quantile(r, 0.5)
    w64 = torch.where(r <= c, torch.ones_like(r), c / r)
    assert (w64 < 0.5).sum() >= 5                                         # antiop clips here
    werr = (out.weights[mask].double() - w64).abs().max()
    assert werr < 1e-6, float(werr)
    hrel = ((out.entropy.double() - h64).abs() / h64)[mask].max()       # entropy: log p_max had the same rounding
    assert hrel < 1e-6, float(hrel)
    # the backpropagated loss is per_token_ce as before: only the detached weights changed
    loss, _ = per_token_ce(out.logits, batch["labels"])
    assert torch.equal(out.loss, loss * mask)
    assert torch.equal(out.total, (out.weights * loss).sum() / out.normaliser)
    # the reference loss (lr, rho1) on a base model made confident (lora_B zeroed: the adapter is a no-op while
    # the batch is generated), from the base model's logits with the adapter off
    model = tiny_lora_model("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    batch = confident_batch(model)
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        with model.disable_adapter():
            ref_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lr = get_scheme("lr")
        out_lr = forward_loss(model, batch, lr, lr.resolve_params({}))
    ref64 = _float64_ce(ref_logits, batch["labels"])[0]
    assert (ref64[mask] < 1e-3).sum() >= 5                                # confident: p > 0.999
    ref_rel = ((out_lr.ref_loss.double() - ref64).abs() / ref64)[mask].max()
    assert ref_rel < 1e-6, float(ref_rel)
