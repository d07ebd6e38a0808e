"""Batched generation and exact-match evaluation of a (possibly peft-wrapped) causal LM on a task.

    from backend.lm.evaluate import evaluate, generate_batch
    texts = generate_batch(model, tok, ["Mia has 3 apples. ..."], max_new_tokens=64)   # greedy
    res = evaluate(model, tok, "arith", eval_examples, max_new_tokens=64, batch_size=64, k_samples=4)
    res["accuracy"], res["sampled_accuracy"], res["records"][0]
    # {'sample_idx': 0, 'sample_k': -1, 'prediction': 'Step 1: ...', 'answer': '19', 'extracted': '19',
    #  'correct': True}

Prompts are rendered and tokenized exactly as ``backend.lm.data.encode`` does for training, left-padded, and
decoded up to the first EOS. Greedy decoding (temperature 0) is deterministic; sampling is deterministic for
a given seed and batch size (a private RNG stream, the global torch RNG is left as it was).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from backend.lm.data import Prompt, prompt_ids, record_prompt
from backend.lm.tasks import Example, Task, get_task


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; generation needs one")
    return pad


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_new_tokens: int,
                   temperature: float = 0.0, seed: int = 0, chat: bool = True) -> list[str]:
    """Generate a continuation for each prompt (texts or chat-message lists); returns the decoded new text.

    Left-padded batch; greedy when ``temperature == 0``, else sampling at that temperature. Each sequence stops
    at the tokenizer's EOS; the returned text excludes special tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; generation could not stop")
    pad = _pad_id(tokenizer)
    ids = [prompt_ids(tokenizer, p, chat) for p in prompts]
    T = max(len(x) for x in ids)
    device = next(model.parameters()).device
    input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
    for b, x in enumerate(ids):
        input_ids[b, T - len(x):] = torch.tensor(x, dtype=torch.long)
        attention_mask[b, T - len(x):] = 1
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                  do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 **kwargs)                                     # (B, T + new)
    finally:
        model.train(was_training)
    texts = []
    for row in out[:, T:].tolist():
        if eos in row:
            row = row[:row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def evaluate(model: Any, tokenizer: Any, task: Task | str, examples: Sequence[Example | dict],
             max_new_tokens: int, batch_size: int, k_samples: int = 0, temperature: float = 0.7,
             seed: int = 0, chat: bool = True,
             on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Exact-match accuracy of greedy generations, plus ``k_samples`` sampled generations per example.
    ``on_progress(done, total)`` is called after every generated batch (generations so far, of all).

    Returns ``{"accuracy", "n", "records"}`` and, when ``k_samples > 0``, ``"sampled_accuracy"`` (mean over all
    sampled generations) and ``"pass_at_k"`` (fraction of examples with at least one correct sample). Each
    record: ``sample_idx`` (index in ``examples``), ``sample_k`` (-1 greedy, 0..k-1 samples), ``prediction``,
    ``answer``, ``extracted``, ``correct``.
    """
    task = get_task(task) if isinstance(task, str) else task
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if k_samples < 0:
        raise ValueError(f"k_samples must be >= 0, got {k_samples}")
    if k_samples > 0 and temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    if not examples:
        raise ValueError("evaluate needs at least one example")
    prompts = [record_prompt(ex) for ex in examples]
    answers = [ex.answer if isinstance(ex, Example) else ex.get("answer", "") for ex in examples]
    records: list[dict] = []
    passes = [False] * len(examples)
    total = len(prompts) * (k_samples + 1)
    for k in range(-1, k_samples):
        temp = 0.0 if k < 0 else temperature
        for start in range(0, len(prompts), batch_size):
            texts = generate_batch(model, tokenizer, prompts[start:start + batch_size], max_new_tokens,
                                   temperature=temp, seed=seed + 1000003 * (k + 1) + start, chat=chat)
            for i, text in enumerate(texts, start=start):
                extracted = task.extract_answer(text)
                correct = task.is_correct(text, answers[i])
                records.append({"sample_idx": i, "sample_k": k, "prediction": text, "answer": answers[i],
                                "extracted": extracted, "correct": correct})
                if k >= 0:
                    passes[i] = passes[i] or correct
            if on_progress is not None:
                on_progress(len(records), total)
    greedy = [r["correct"] for r in records if r["sample_k"] == -1]
    assert len(greedy) == len(examples), "one greedy record per example"
    result: dict[str, Any] = {"accuracy": sum(greedy) / len(greedy), "n": len(greedy), "records": records}
    if k_samples > 0:
        sampled = [r["correct"] for r in records if r["sample_k"] >= 0]
        result["sampled_accuracy"] = sum(sampled) / len(sampled)
        result["pass_at_k"] = sum(passes) / len(passes)
        result["k_samples"] = k_samples
    return result
