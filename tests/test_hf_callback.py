"""TokvizTraceCallback inside tiny Hugging Face Trainer runs: the traced G is the gradient the optimizer applied
(gradient accumulation, the Trainer's num_items_in_batch normalisation, a token-weighted loss), shards verify,
training stays bit-identical, and a Trainer the callback cannot follow, or one that crashes, never loses a run."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from backend.store.rundir import read_events
from backend.trace import TraceConfig
from backend.trace import store as trace_store
from backend.trace.hf_callback import TokvizTraceCallback
from backend.trace.verify import main as verify_main
from tests._tiny_lora import ALL_TARGETS, save_tiny_model, tiny_batch

COS_MIN = 1 - 1e-6


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _data(with_ids: bool = False) -> list[dict]:
    b = tiny_batch(B=4)
    rows = []
    for i in range(8):                                   # 8 distinct examples: two copies, ids 0..7
        row = {k: b[k][i % 4] for k in ("input_ids", "attention_mask", "labels")}
        if with_ids:
            row["sample_idx"] = torch.tensor(1000 + i)
        rows.append(row)
    return rows


def _train(model_dir: str, out: Path, callback=None, trainer_cls=None, dropout: float = 0.0, grad_accum: int = 2,
           steps: int = 4, with_ids: bool = False, **trainer_kw) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=ALL_TARGETS,
                                            task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=grad_accum, learning_rate=5e-2, report_to=[],
                             save_strategy="no", logging_steps=100, use_cpu=True, seed=7, dataloader_num_workers=0,
                             disable_tqdm=True, remove_unused_columns=False,
                             **{k: trainer_kw.pop(k) for k in ("bf16",) if k in trainer_kw})
    trainer = (trainer_cls or Trainer)(model=model, args=args, train_dataset=_data(with_ids),
                                       data_collator=_collate, callbacks=[callback] if callback else [], **trainer_kw)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("hfmodel") / "model", "qwen2")


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _cosines(run: Path) -> list[float]:
    return [c["grad_cosine_applied"] for c in _manifest(run)["trace"].values()]


@pytest.fixture(scope="module")
def plain_run(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    cb = TokvizTraceCallback(every=2, config=TraceConfig(mode="position", max_sequences=3), runs_root=tmp / "runs",
                             run_id="hf-run")
    traced = _train(model_dir, tmp / "out1", cb)
    plain = _train(model_dir, tmp / "out2")
    return tmp / "runs" / "hf-run", traced, plain


def test_the_traced_step_is_the_one_the_trainer_applied(plain_run):
    """Two micro-batches of 2, the Trainer's num_items_in_batch normalisation: G against the .grad the optimizer
    steps with, at every traced step."""
    run, _, _ = plain_run
    assert trace_store.traced_steps(run) == [2, 4]
    assert all(c >= COS_MIN for c in _cosines(run)), _cosines(run)
    for c in _manifest(run)["trace"].values():
        assert c["micro_batches"] == 2 and c["n_sequences"] == 4 and c["traced_sequences"] == 3
        assert 0 < c["traced_share"] < 1 and abs(c["share_sum"] - 1) < 1e-5
    t = trace_store.read_step(run, 2)
    assert t.num_rows > 0 and set(t["step"].to_pylist()) == {2}
    assert trace_store.read_step(run, 2, "token_modules").num_rows == t.num_rows * 2 * 2 * 7
    assert not [e for e in read_events(run) if e["type"] in ("warning", "trace_skipped")]


def test_callback_steps_verify(plain_run, capsys):
    run, _, _ = plain_run
    assert verify_main([str(run), "--step", "4"]) == 0, capsys.readouterr().out


def test_callback_leaves_training_bit_identical(plain_run):
    _, traced, plain = plain_run
    assert traced.keys() == plain.keys()
    assert all(torch.equal(traced[k], plain[k]) for k in plain)
    assert any(p.abs().sum() > 0 for k, p in plain.items() if "lora_B" in k)      # it did train


def test_sample_ids_are_never_reused(plain_run, model_dir, tmp_path):
    run, _, _ = plain_run
    ids = [set(trace_store.read_step(run, s)["sample_idx"].to_pylist()) for s in (2, 4)]
    assert all(i < 0 for s in ids for i in s) and not (ids[0] & ids[1])      # no dataset id: run-unique, < 0
    cb = TokvizTraceCallback(every=2, runs_root=tmp_path / "runs", run_id="ids")
    _train(model_dir, tmp_path / "out", cb, with_ids=True, steps=2)           # the collator passes sample_idx
    got = set(trace_store.read_step(tmp_path / "runs" / "ids", 2)["sample_idx"].to_pylist())
    assert got and got <= set(range(1000, 1008))


def _weights(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.exp(-loss) * mask                        # dft: p_t, detached


def _weighted_trainer():
    from transformers import Trainer

    from backend.lm.loss import weight_ce

    class WeightedTrainer(Trainer):
        """A token-weighted loss as users write one: each micro-batch's weighted mean (the Trainer divides it
        by the accumulation steps)."""
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            logits = out.logits
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                   ignore_index=-100, reduction="none").view(labels[:, 1:].shape)
            mask = labels[:, 1:] != -100
            w = _weights(weight_ce(logits.detach(), labels), mask)
            loss = (w * ce).sum() / mask.sum()
            return (loss, out) if return_outputs else loss
    return WeightedTrainer


def test_a_token_weighted_loss_is_traced_with_its_weight_function(model_dir, tmp_path):
    cb = TokvizTraceCallback(every=2, scheme=_weights, normaliser="micro_batch", runs_root=tmp_path / "runs",
                             run_id="weighted")
    _train(model_dir, tmp_path / "out", cb, trainer_cls=_weighted_trainer())
    run = tmp_path / "runs" / "weighted"
    assert all(c >= COS_MIN for c in _cosines(run)), _cosines(run)
    notes = [e["message"] for e in read_events(run) if e["type"] == "warning"]
    assert len(notes) == 1 and "overrides compute_loss" in notes[0]            # said before training started
    assert verify_main([str(run), "--step", "2"]) == 0                         # replayed with the stored weights
    # the wrong weights (plain CE) are caught by the built-in check, with a warning naming the likely cause
    cb = TokvizTraceCallback(every=2, normaliser="micro_batch", runs_root=tmp_path / "runs", run_id="wrong")
    _train(model_dir, tmp_path / "out2", cb, trainer_cls=_weighted_trainer(), steps=2)
    assert _cosines(tmp_path / "runs" / "wrong")[0] < 0.9999
    assert any("is `scheme` the weighting" in e.get("message", "") for e in read_events(tmp_path / "runs" / "wrong"))


def _ce_sum(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum") / num_items_in_batch


def test_compute_loss_func_keeps_its_labels_and_is_named_before_training(model_dir, tmp_path):
    cb = TokvizTraceCallback(every=2, runs_root=tmp_path / "runs", run_id="clf")
    _train(model_dir, tmp_path / "out", cb, compute_loss_func=_ce_sum, steps=2)   # labels popped by the Trainer
    run = tmp_path / "runs" / "clf"
    events = read_events(run)
    warn = [i for i, e in enumerate(events) if e["type"] == "warning"]
    first_trace = min(i for i, e in enumerate(events) if e["type"] == "trace")
    assert warn and warn[0] < first_trace and "compute_loss_func" in events[warn[0]]["message"]
    assert _cosines(run)[0] >= COS_MIN                      # it is plain CE over the step's label count


def test_a_crash_mid_run_closes_the_run_and_keeps_its_steps(model_dir, tmp_path):
    calls = {"n": 0}

    def explode(outputs, labels, num_items_in_batch=None):
        calls["n"] += 1
        if calls["n"] > 5:                                  # the third optimizer step's first micro-batch
            raise RuntimeError("boom")
        return _ce_sum(outputs, labels, num_items_in_batch)
    cb = TokvizTraceCallback(every=2, runs_root=tmp_path / "runs", run_id="crash")
    with pytest.raises(RuntimeError, match="boom"):
        _train(model_dir, tmp_path / "out", cb, compute_loss_func=explode)
    run = tmp_path / "runs" / "crash"
    deadline = time.monotonic() + 60                        # the watcher notices within a second; wait for it
    while read_events(run)[-1]["type"] != "error":
        assert time.monotonic() < deadline, read_events(run)[-1]
        time.sleep(0.05)
    assert "traced steps [2]" in read_events(run)[-1]["error"] and not (run / "manifest.json").exists()
    assert trace_store.traced_steps(run) == [2]


def test_mixed_precision_is_recorded_and_replayed(model_dir, tmp_path, capsys):
    cb = TokvizTraceCallback(every=2, runs_root=tmp_path / "runs", run_id="bf16")
    _train(model_dir, tmp_path / "out", cb, bf16=True, steps=2)
    run = tmp_path / "runs" / "bf16"
    meta = json.loads((trace_store.state_dir(run, 2) / "trace.rank0.json").read_text())
    assert meta["trace_config"]["autocast"] == "bfloat16"
    capsys.readouterr()                                     # the Trainer's own prints
    assert verify_main([str(run), "--step", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["autocast"] == "bfloat16" and report["tol"] == pytest.approx(2e-2)
    assert _cosines(run)[0] > 0.99                          # bf16 rounding, not a different update


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every"):
        TokvizTraceCallback(every=0)
    with pytest.raises(ValueError, match="normaliser"):
        TokvizTraceCallback(every=1, normaliser="tokens")
    with pytest.raises(ValueError, match="scheme"):
        TokvizTraceCallback(every=1, scheme="nope")


def test_influence_on_an_eval_batch_is_recorded_at_traced_steps(model_dir, tmp_path):
    """The callback's eval batch gives the influence tables; at each traced step the influences of every position
    sum to <G, G_eval> (checked by the tracer), and a bad eval batch is refused before training."""
    import pyarrow.parquet as pq
    ev = {k: v[:2] for k, v in tiny_batch(seed=5, B=4).items() if k in ("input_ids", "attention_mask", "labels")}
    cb = TokvizTraceCallback(every=2, config=TraceConfig(mode="position", max_sequences=4),
                             runs_root=tmp_path / "runs", run_id="infl", eval_batch=ev)
    _train(model_dir, tmp_path / "out", cb)
    run = tmp_path / "runs" / "infl"
    steps = sorted(f.name for f in (run / "trace" / "influence_steps").glob("*.parquet"))
    assert steps == ["step_000002.rank0.parquet", "step_000004.rank0.parquet"]
    for f in steps:
        row = pq.read_table(run / "trace" / "influence_steps" / f).to_pylist()[0]
        assert row["eval_examples"] == 2 and row["influence_sum_rel_err"] < 1e-5
        assert -1 <= row["eval_cosine"] <= 1
    tok = pq.read_table(run / "trace" / "tokens" / steps[0]).num_rows
    assert pq.read_table(run / "trace" / "influence" / steps[0]).num_rows == tok
    bad = dict(ev, labels=torch.full_like(ev["labels"], -100))
    with pytest.raises(ValueError, match="no response tokens"):
        TokvizTraceCallback(every=2, eval_batch=bad)
