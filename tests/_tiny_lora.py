"""Tiny random causal LMs with LoRA on every projection, and a padded batch, for the tracer tests.

    model = tiny_lora_model("qwen2")          # peft LoRA on q/k/v/o and gate/up/down, lora_B randomised
    batch = tiny_batch()                       # (4, 20): prompts, responses, right and left padding
"""
from __future__ import annotations

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 97


def tiny_base_model(arch: str = "qwen2", seed: int = 0, attn: str = "sdpa", hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    kw = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              attn_implementation=attn, pad_token_id=0)
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw))
    raise ValueError(arch)


def randomise_lora(model, seed: int = 1, std: float = 0.2) -> None:
    """peft initialises lora_B to zero (every lora_A piece would vanish): draw A and B at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_lora_model(arch: str = "qwen2", seed: int = 0, dropout: float = 0.0, targets=None, r: int = 4,
                    attn: str = "sdpa", base=None):
    from peft import LoraConfig, get_peft_model
    base = base if base is not None else tiny_base_model(arch, seed, attn)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                            target_modules=list(targets or ALL_TARGETS), task_type="CAUSAL_LM"))
    randomise_lora(model, seed + 1)
    return model


def tiny_batch(seed: int = 0, B: int = 4, T: int = 20) -> dict:
    """Sequences of different lengths: prompt labels -100, response labelled, right padding (and one
    left-padded row); sample_idx 100, 101, ..."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    am = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for b in range(B):
        n = T - 3 * b if b < B - 1 else T - 4               # last row: left padded by 4
        start = 0 if b < B - 1 else 4
        p = 4 + b                                          # prompt length
        am[b, start:start + n] = 1
        labels[b, start + p:start + n] = ids[b, start + p:start + n]
        if b == 0:
            labels[b, start + n - 3:start + n] = -100      # a masked tail inside the sequence
        ids[b, :start] = 0
        ids[b, start + n:] = 0
    return {"input_ids": ids, "attention_mask": am, "labels": labels,
            "sample_idx": torch.arange(100, 100 + B)}


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB ids: 0 <pad>, 1 <eos>, 2 <unk>, then words w3 .. w96 and a few digits."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<eos>", "<unk>"] + [str(i) for i in range(10)] + ["+", "=", "Step"]
    words += [f"w{i}" for i in range(len(words), VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_model(path, arch: str = "qwen2", seed: int = 0) -> str:
    """A tiny random base model plus tokenizer saved with save_pretrained (loadable by backend.lm.models)."""
    tiny_base_model(arch, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)
