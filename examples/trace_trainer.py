"""Trace a plain ``transformers.Trainer`` LoRA run with tokviz: the README's "Tracing your own Trainer", complete.

    pip install -e .                                  # once, in the checkout: `backend` importable from anywhere
    python examples/trace_trainer.py                  # the embedded tiny model, 20 steps, traced every 10
    python examples/trace_trainer.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 200 --every 20
    python -m backend verify <data root>/runs/<run_id> --step 10      # the command the script prints at the end

Everything but the callback is an ordinary Hugging Face script: a LoRA model from peft, chat-templated
examples whose prompt tokens get label -100, a padding collator, a ``Trainer``. The callback adds a tokviz run
directory (``<data root>/runs/<run_id>``, data root ``data/`` or ``$TOKVIZ_HOME``) holding the per-token trace
of every ``--every``-th optimizer step; it only writes files and never changes training. The traced loss is the
callback's ``scheme`` (plain cross-entropy by default), the loss this Trainer trains.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from backend.lm.tasks import get_task  # synthetic arithmetic problems; bring your own records
from backend.store.paths import DEFAULT_MODEL_DIR  # the embedded tiny Qwen2 (data/models/tiny-arith)
from backend.trace import TraceConfig
from backend.trace.hf_callback import TokvizTraceCallback


def encode(tok, prompt: str, response: str, max_len: int) -> dict[str, list[int]]:
    """One chat exchange as ids and labels: the prompt rendered by the chat template with the assistant header
    (no loss on it), then the response and EOS (the loss), cut to ``max_len`` tokens."""
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    response_ids = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_len]
    return {"input_ids": ids, "labels": labels}


def make_collate(pad_id: int):
    """A collator padding on the right: input_ids, attention_mask and labels (-100 on padding), each (B, T)."""
    def collate(items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        T = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)       # (B, T)
        labels = torch.full((len(items), T), -100, dtype=torch.long)            # (B, T)
        attention_mask = torch.zeros((len(items), T), dtype=torch.long)         # (B, T)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[i, :n] = torch.tensor(it["input_ids"])
            labels[i, :n] = torch.tensor(it["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return collate


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
    ds = [encode(tok, ex.prompt, ex.response, a.max_len) for ex in train]
    collate = make_collate(tok.pad_token_id)

    with tempfile.TemporaryDirectory() as out:           # the Trainer's own output (nothing is saved here)
        args = TrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                                 gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, seed=0,
                                 logging_steps=max(1, a.steps // 4), save_strategy="no", report_to="none")
        trace = TraceConfig(mode="position", max_sequences=a.trace_sequences)
        cb = TokvizTraceCallback(every=a.every, config=trace, tokenizer=tok, runs_root=a.runs_root,
                                 run_id=a.run_id, name="example-trainer")
        trainer = Trainer(model=peft_model, args=args, train_dataset=ds, data_collator=collate, callbacks=[cb])
        trainer.train()
    run = str(cb.rd.path)
    print(f"traced run: {run}\ncheck a traced step: python -m backend verify {run} --step {a.every}")
    return run


if __name__ == "__main__":
    main()
