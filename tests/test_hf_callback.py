"""TokvizTraceCallback inside a tiny Hugging Face Trainer run: shards at the traced steps, verify passes, and the
trained weights are bit-identical to a run without the callback."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend.trace import TraceConfig
from backend.trace import store as trace_store
from backend.trace.hf_callback import TokvizTraceCallback
from backend.trace.verify import main as verify_main
from tests._tiny_lora import ALL_TARGETS, save_tiny_model, tiny_batch


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _train(model_dir: str, out: Path, callback=None) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL_TARGETS,
                                            task_type="CAUSAL_LM"))
    b = tiny_batch(B=4)
    data = [{k: b[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(4)] * 2
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=5e-2,
                             report_to=[], save_strategy="no", logging_steps=100, use_cpu=True, seed=7,
                             dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=_collate,
                      callbacks=[callback] if callback else [])
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("hf")
    model_dir = save_tiny_model(tmp / "model", "qwen2")
    cb = TokvizTraceCallback(every=2, config=TraceConfig(mode="position", max_sequences=2), runs_root=tmp / "runs",
                             run_id="hf-run")
    traced = _train(model_dir, tmp / "out1", cb)
    plain = _train(model_dir, tmp / "out2")
    return tmp / "runs" / "hf-run", traced, plain


def test_callback_writes_readable_shards_at_traced_steps(runs):
    run, _, _ = runs
    assert trace_store.traced_steps(run) == [2, 4]
    for step in (2, 4):
        t = trace_store.read_step(run, step)
        assert t.num_rows > 0 and set(t["step"].to_pylist()) == {step}
        assert trace_store.read_step(run, step, "token_modules").num_rows == t.num_rows * 2 * 2 * 7
    assert (run / "manifest.json").exists()


def test_callback_steps_verify(runs, capsys):
    run, _, _ = runs
    assert verify_main([str(run), "--step", "4"]) == 0, capsys.readouterr().out


def test_callback_leaves_training_bit_identical(runs):
    _, traced, plain = runs
    assert traced.keys() == plain.keys()
    assert all(torch.equal(traced[k], plain[k]) for k in plain)
    assert any(p.abs().sum() > 0 for k, p in plain.items() if "lora_B" in k)      # it did train


def test_callback_rejects_bad_every():
    with pytest.raises(ValueError, match="every"):
        TokvizTraceCallback(every=0)
