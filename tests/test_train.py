"""The train job end to end on the embedded default: run directory contract, loss goes down, failures keep
what was written, tracing leaves training bit-identical, DDP on gloo keeps ranks identical."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from backend.jobs.train import TrainConfig
from backend.lm.data import collate, encode_examples
from backend.lm.loss import forward_loss
from backend.lm.models import load_model_and_tokenizer
from backend.lm.schemes import get_scheme
from backend.lm.tasks import get_task
from backend.lm.trainer import train
from backend.store import schema
from backend.store.rundir import read_events

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(n_train=96, n_eval=8, batch_size=8, eval_max_new_tokens=48, log_every=5)


def cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, "runs_root": str(tmp_path / "runs"), **kw})


@pytest.mark.slow
def test_run_directory_contract_and_loss_goes_down(tmp_path):
    run = train(cfg(tmp_path, steps=20, lr=5e-3, name="contract"), progress=False)
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "events.jsonl", "manifest.json", "train_steps", "adapter", "eval"} <= names
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"] == TrainConfig.from_dict(saved["config"]).to_dict()   # the config round-trips
    steps = pq.read_table(run / "train_steps").to_pandas()
    assert list(steps["step"]) == list(range(1, 21))
    assert pq.read_schema(next((run / "train_steps").iterdir())).equals(schema.TRAIN_STEPS, check_metadata=True)
    events = read_events(run)
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    prog = [e for e in events if e["type"] == "progress"]
    assert prog[-1]["step"] == 20 and {"loss", "lr", "tokens_per_s", "eta_s"} <= set(prog[-1])
    manifest = json.loads((run / "manifest.json").read_text())
    newest_other = max(p.stat().st_mtime for p in run.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert (run / "manifest.json").stat().st_mtime >= newest_other                 # written last
    ev = pq.read_table(run / "eval").to_pandas()
    assert manifest["eval"]["accuracy"] == pytest.approx(ev.loc[ev.sample_k == -1, "correct"].mean())

    # the loss on a fixed batch of training sequences is lower with the trained adapter than without
    from peft import PeftModel
    base, tok = load_model_and_tokenizer("default", device="cpu")
    train_ex, _ = get_task("arith").generate(0, SMALL["n_train"], SMALL["n_eval"])
    batch = collate(encode_examples(tok, train_ex[:32], 256), tok.pad_token_id)
    sft = get_scheme("sft")
    with torch.no_grad():
        before = forward_loss(base, batch, sft, {}).total.item()
        tuned = PeftModel.from_pretrained(base, run / "adapter")
        after = forward_loss(tuned, batch, sft, {}).total.item()
    assert after < before, (before, after)


def test_failure_keeps_what_was_written_and_writes_no_manifest(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl.*line 2.*response"):
        train(cfg(tmp_path, dataset=str(bad), steps=2), progress=False)
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "config.json").exists() and not (run / "manifest.json").exists()
    assert read_events(run)[-1]["type"] == "error"


@pytest.mark.slow
def test_tracing_leaves_training_bit_identical(tmp_path):
    plain = train(cfg(tmp_path, steps=6, n_eval=0, lora_dropout=0.1), progress=False)
    traced = train(cfg(tmp_path, steps=6, n_eval=0, lora_dropout=0.1, trace_every=3, trace_sequences=2),
                   progress=False)
    a = json.loads((plain / "manifest.json").read_text())
    b = json.loads((traced / "manifest.json").read_text())
    assert a["rank_param_digests"] == b["rank_param_digests"]
    assert b["trace"]["steps"] == [3, 6]
    assert b["trace"]["share_sum_max_abs_err"] < 1e-4
    assert sorted(p.name for p in (traced / "trace" / "tokens").iterdir()) == \
        ["step_000003.rank0.parquet", "step_000006.rank0.parquet"]


@pytest.mark.parametrize("mode", ["position", "token"])
def test_traced_g_is_the_gradient_the_optimizer_applies(tmp_path, mode):
    """Two micro-batches of 4, 3 sequences traced: G (every micro-batch, their own weights and N) against the
    accumulated .grad the optimizer steps with, at every traced step; the traced rows hold part of ||G||^2."""
    run = train(cfg(tmp_path, steps=4, n_eval=0, batch_size=4, grad_accum=2, scheme="antiop",
                    scheme_params={"clip_mult": 1.0}, trace_every=2, trace_sequences=3, trace_mode=mode,
                    trace_magnitude="none"), progress=False)
    trace = json.loads((run / "manifest.json").read_text())["trace"]
    assert trace["steps"] == [2, 4]
    for c in trace["checks"]:
        assert c["grad_cosine_applied"] >= 1 - 1e-6, c
        assert c["micro_batches"] == 2 and c["traced_sequences"] == 3 and c["n_sequences"] == 8
        assert 0 < c["traced_share"] < 1
    assert trace["grad_cosine_applied_min"] >= 1 - 1e-6
    tokens = pq.read_table(run / "trace" / "tokens").to_pandas()
    assert tokens.groupby("step")["sample_idx"].nunique().tolist() == [3, 3]
    if mode == "position":
        got = tokens.groupby("step")["share"].sum().to_numpy()
        want = [c["traced_share"] for c in trace["checks"]]
        assert got == pytest.approx(want, abs=1e-5)
    assert not [e for e in read_events(run) if e["type"] == "warning"]


def test_a_trace_of_another_loss_warns_that_it_is_not_the_applied_update(tmp_path):
    run = train(cfg(tmp_path, steps=2, n_eval=0, batch_size=4, scheme="dft", trace_every=2, trace_sequences=2,
                    trace_loss="ce"), progress=False)
    (c,) = json.loads((run / "manifest.json").read_text())["trace"]["checks"]
    assert c["grad_cosine_applied"] < 0.9999
    (w,) = [e for e in read_events(run) if e["type"] == "warning"]
    assert w["step"] == 2 and "plain cross-entropy" in w["message"]


def test_resolved_targets_and_a_switched_attention_are_said(tmp_path):
    """all-linear resolves to the model's seven projections (manifest, 'loaded' event, run header); token mode's
    switch from the model's sdpa to eager attention is said once, as a note, and in the run header."""
    import pandas as pd

    from tokviz.header import _lora_and_attention
    run = train(cfg(tmp_path, steps=2, n_eval=0, batch_size=2, lora_targets=["all-linear"], trace_every=1,
                    trace_sequences=1, trace_mode="token", trace_magnitude="none"), progress=False)
    manifest = json.loads((run / "manifest.json").read_text())
    seven = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert manifest["lora_targets"] == seven
    events = read_events(run)
    assert [e for e in events if e["type"] == "loaded"][0]["lora_targets"] == seven
    (note,) = [e for e in events if e["type"] == "note" and "attention" in e["message"]]
    assert "tokviz_jvp" in note["message"] and "sdpa" in note["message"]
    # the default warmup (10 steps) outlasts this 2-step run: said, with the share of lr the last step reached
    (warm,) = [e for e in events if e["type"] == "note" and "warmup" in e["message"]]
    assert "warmup_steps=10 is longer than the run's 2 steps" in warm["message"] and "ends at 20% of lr" in warm["message"]
    lrs = pd.read_parquet(run / "train_steps")["lr"].tolist()
    assert lrs == pytest.approx([0.1 * 2e-3, 0.2 * 2e-3])                  # the schedule the note describes
    info = pd.Series({"manifest_json": json.dumps(manifest), "config_json": (run / "config.json").read_text()})
    bits = _lora_and_attention(info)
    assert bits == [f"LoRA `{', '.join(seven)}`", "traced with `tokviz_jvp` attention (the model's: `sdpa`)"]


def test_progress_moves_through_loading_every_step_and_evaluation(tmp_path, monkeypatch):
    """A job says it loads the model, reports every step once PROGRESS_EVERY_S went by (0 here), and evaluation
    reports done/total generations with an ETA; the jobs table reads the phase from those events."""
    from backend.jobs.queue import JobView, progress_of
    from backend.lm import trainer
    from tokviz.tabs.launch import jobs_html
    monkeypatch.setattr(trainer, "PROGRESS_EVERY_S", 0.0)
    run = train(cfg(tmp_path, steps=3, n_eval=4, eval_batch_size=2, eval_before=True, log_every=10,
                    eval_max_new_tokens=8), progress=False)
    events = read_events(run)
    types = [e["type"] for e in events]
    assert types.index("loading") < types.index("loaded")
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3]
    ev = [e for e in events if e["type"] == "evaluating"]
    assert [(e["when"], e["done"], e["total"]) for e in ev] == [("before", 2, 4), ("before", 4, 4),
                                                                ("after", 2, 4), ("after", 4, 4)]
    assert ev[0]["eta_s"] >= 0 and ev[-1]["eta_s"] == 0
    # what a jobs table shows while evaluation runs: the phase and its own count
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events[:types.index("evaluating") + 1]))
    p = progress_of(run)
    assert (p["phase"], p["step"], p["total"]) == ("evaluating (before training)", 2, 4)
    view = JobView(job_id="j", kind="train", title="t", status="running", run_id="r", run_dir=str(run),
                   step=p["step"], total=p["total"], eta_s=p["eta_s"], elapsed_s=1.0, last_event="", message="",
                   command="", phase=p["phase"])
    assert "evaluating (before training) 2/4" in jobs_html([view])


def test_inline_trace_matches_rerun(tmp_path):
    """The real step traced inline and a re-run of the same step give the same numbers (no dropout)."""
    rerun = train(cfg(tmp_path, steps=2, n_eval=0, trace_every=2, trace_sequences=8), progress=False)
    inline = train(cfg(tmp_path, steps=2, n_eval=0, trace_every=2, trace_sequences=8, trace_inline=True),
                   progress=False)
    cols = ["sample_idx", "position", "dot", "magnitude", "alignment", "share"]
    a = pq.read_table(rerun / "trace" / "tokens").to_pandas()[cols].sort_values(["sample_idx", "position"])
    b = pq.read_table(inline / "trace" / "tokens").to_pandas()[cols].sort_values(["sample_idx", "position"])
    assert len(a) == len(b) > 0
    scale = a["dot"].abs().max()
    assert (a["dot"].to_numpy() - b["dot"].to_numpy()).__abs__().max() <= 1e-4 * scale


@pytest.mark.slow
def test_ddp_gloo_two_ranks_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs = tmp_path / "runs"
    with socket.socket() as s:                  # a free port for the rendezvous (port 0 would hang rank 1)
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", port,
           "-m", "backend", "train", "--steps", "3", "--n-train", "64", "--n-eval", "4", "--batch-size", "4",
           "--trace-every", "3", "--trace-sequences", "2", "--runs-root", str(runs), "--quiet",
           "--eval-max-new-tokens", "32"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (run,) = runs.iterdir()
    m = json.loads((run / "manifest.json").read_text())
    assert m["world_size"] == 2
    assert len(m["rank_param_digests"]) == 2 and len(set(m["rank_param_digests"])) == 1
    shards = sorted(p.name for p in (run / "trace" / "tokens").iterdir())
    assert shards == ["step_000003.rank0.parquet", "step_000003.rank1.parquet"]      # each rank its own part


KILLED_AT_STEP_5 = """
import os, signal, sys
sys.path.insert(0, {root!r})
from backend.jobs.train import TrainConfig
from backend.lm import trainer
from backend.store.rundir import RunDir
trainer.TRAIN_STEPS_FLUSH = 2          # a train_steps part (steps 3-4) lands after the step-3 checkpoint
real_event = RunDir.event
def event(self, type_, **fields):      # kill -9 once step 5 (traced) is done, before its checkpoint
    real_event(self, type_, **fields)
    if type_ == "progress" and fields["step"] == 5:
        os.kill(os.getpid(), signal.SIGKILL)
RunDir.event = event
trainer.train(TrainConfig(**{cfg!r}), progress=False)
"""


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(tmp_path):
    """A run killed (SIGKILL) at step 5 is `interrupted`; `resume` continues from its step-3 checkpoint and
    gives the losses of every step and the final adapter of a run that was never interrupted."""
    from backend.__main__ import main as cli
    from backend.index.ingest import status_of
    from backend.lm.trainer import latest_checkpoint
    kw = dict(steps=8, n_eval=0, lora_dropout=0.1, log_every=1, trace_every=5, trace_sequences=2, checkpoint_every=3)
    whole = train(cfg(tmp_path / "whole", **kw), progress=False)
    killed_cfg = cfg(tmp_path, run_id="killed", **kw).to_dict()
    p = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_5.format(root=str(ROOT), cfg=killed_cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-3000:]
    run = tmp_path / "runs" / "killed"
    assert status_of(run) == "interrupted" and not (run / "manifest.json").exists()
    assert latest_checkpoint(run).name == "step_000003.pt"
    assert (run / "train_steps" / "part_000001.rank0.parquet").exists()       # steps 3-4, written after it
    assert (run / "trace" / "tokens" / "step_000005.rank0.parquet").exists()

    assert cli(["resume", str(run), "--quiet"]) == 0
    assert status_of(run) == "finished"
    a = pq.read_table(whole / "train_steps").to_pandas().sort_values("step")
    b = pq.read_table(run / "train_steps").to_pandas().sort_values("step")
    assert list(b["step"]) == list(range(1, 9))                                # each step once
    assert a["loss"].tolist() == b["loss"].tolist() and a["grad_norm"].tolist() == b["grad_norm"].tolist()
    ma = json.loads((whole / "manifest.json").read_text())
    mb = json.loads((run / "manifest.json").read_text())
    assert ma["rank_param_digests"] == mb["rank_param_digests"]                 # bit-identical adapter
    assert mb["trace"]["steps"] == [5] and mb["final_loss"] == ma["final_loss"]
    ea = pq.read_table(whole / "trace" / "tokens").to_pandas()["dot"].tolist()
    eb = pq.read_table(run / "trace" / "tokens").to_pandas()["dot"].tolist()
    assert ea == eb
    types = [e["type"] for e in read_events(run)]
    assert types.count("start") == 2 and "resumed" in types and types[-1] == "done"


def test_resume_after_a_failure_is_bit_identical(tmp_path, monkeypatch):
    """The fast, in-process version: a run that fails at step 3 (an exception, so it is `failed`) resumes from
    its step-2 checkpoint to the losses and adapter of an uninterrupted run (dropout on: the RNG must follow)."""
    from backend.index.ingest import status_of
    from backend.jobs.resume import main as resume_main
    from backend.store.rundir import RunDir
    kw = dict(steps=4, n_train=32, n_eval=0, lora_dropout=0.1, log_every=1, checkpoint_every=2)
    whole = train(cfg(tmp_path / "whole", **kw), progress=False)
    real_event = RunDir.event

    def event(self, type_, **fields):
        real_event(self, type_, **fields)
        if type_ == "progress" and fields["step"] == 3:
            raise KeyboardInterrupt("stopped at step 3 by the test")
    monkeypatch.setattr(RunDir, "event", event)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path, run_id="stopped", **kw), progress=False)
    monkeypatch.setattr(RunDir, "event", real_event)
    run = tmp_path / "runs" / "stopped"
    assert status_of(run) == "failed"
    monkeypatch.setenv("TOKVIZ_HOME", str(tmp_path))                    # the CLI, by run id (it took folders only)
    assert resume_main(["stopped", "--quiet"]) == 0
    a = pq.read_table(whole / "train_steps").to_pandas()
    b = pq.read_table(run / "train_steps").to_pandas().sort_values("step")
    assert list(b["step"]) == [1, 2, 3, 4] and a["loss"].tolist() == b["loss"].tolist()
    assert json.loads((whole / "manifest.json").read_text())["rank_param_digests"] == \
        json.loads((run / "manifest.json").read_text())["rank_param_digests"]
