"""Trace a TRL ``SFTTrainer`` LoRA run with tokviz (assistant-only loss on a conversational dataset).

    pip install -e . && pip install "trl>=1.16"      # once, in the checkout
    python examples/trace_sft_trainer.py             # the embedded tiny model, 20 steps, traced every 10
    python -m backend verify <data root>/runs/<run_id> --step 10      # the command the script prints at the end

The dataset is conversational prompt/completion pairs; ``assistant_only_loss=True`` takes the loss on the
tokens the chat template marks with ``{% generation %}`` (the embedded tokenizer's template marks the assistant's
content and its ``<|im_end|>``: what tokviz's own training labels), and TRL's completion mask leaves out the
prompt. The callback's traced loss is plain cross-entropy over those labels, the loss ``SFTTrainer`` trains.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from backend.lm.tasks import get_task  # synthetic arithmetic problems; bring your own records
from backend.store.paths import DEFAULT_MODEL_DIR  # the embedded tiny Qwen2 (data/models/tiny-arith)
from backend.trace import TraceConfig
from backend.trace.hf_callback import TokvizTraceCallback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="a local model directory or a hub id")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps")
    ap.add_argument("--every", type=int, default=10, help="trace every N optimizer steps")
    ap.add_argument("--trace-sequences", type=int, default=4, help="sequences of each step that get rows")
    ap.add_argument("--batch-size", type=int, default=4, help="per-device micro-batch size")
    ap.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps")
    ap.add_argument("--n-train", type=int, default=64, help="training examples")
    ap.add_argument("--max-len", type=int, default=256, help="tokens per example, at most")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--runs-root", default=None, help="folder of run directories (default: <data root>/runs)")
    ap.add_argument("--run-id", default=None, help="the run directory's name (default: a new id)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Train and trace; returns the run directory."""
    a = parse_args(argv)
    tok = AutoTokenizer.from_pretrained(a.model)
    base = AutoModelForCausalLM.from_pretrained(a.model)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    train, _ = get_task("arith").generate(seed=0, n_train=a.n_train, n_eval=0)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": ex.prompt}],
                             "completion": [{"role": "assistant", "content": ex.response}]} for ex in train])

    with tempfile.TemporaryDirectory() as out:           # the Trainer's own output (nothing is saved here)
        # SFTConfig turns bf16 on by default, even on a CPU; the embedded model is fp32, so train it in fp32
        args = SFTConfig(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                         gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, seed=0,
                         bf16=torch.cuda.is_available(), max_length=a.max_len, assistant_only_loss=True,
                         logging_steps=max(1, a.steps // 4), save_strategy="no", report_to="none")
        trace = TraceConfig(mode="position", max_sequences=a.trace_sequences)
        cb = TokvizTraceCallback(every=a.every, config=trace, tokenizer=tok, runs_root=a.runs_root,
                                 run_id=a.run_id, name="example-sft")
        trainer = SFTTrainer(model=peft_model, args=args, train_dataset=ds, processing_class=tok, callbacks=[cb])
        trainer.train()
    run = str(cb.rd.path)
    print(f"traced run: {run}\ncheck a traced step: python -m backend verify {run} --step {a.every}")
    return run


if __name__ == "__main__":
    main()
