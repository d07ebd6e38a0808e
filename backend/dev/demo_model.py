"""Build the shipped demo models from a seed: a tokenizer plus a tiny Qwen2 for ``arith`` and for ``modadd``.

    python -m backend build-demo-model                      # both, into data/models/tiny-{arith,modadd}
    python -m backend build-demo-model --seed 1 --out /tmp/tiny-arith --skip-modadd

``tiny-arith``: a byte-level BPE tokenizer trained on the arith corpus (digits split one per token, as Qwen2
does; Qwen-style chat template; EOS ``<|im_end|>``, pad ``<|endoftext|>``) and a ~1M-parameter
``Qwen2ForCausalLM`` pretrained with full-parameter AdamW on arith problems encoded by ``backend.lm.data.encode``.
Training stops at the first evaluation whose greedy exact-match accuracy on a held-out set reaches
``target_low``: the model can do the task sometimes but is under-trained, so fine-tuning visibly helps.

``tiny-modadd``: a WordLevel tokenizer (every number 0..p-1 one token, no chat template) and a tiny Qwen3
(see ``build_modadd`` for why not Qwen2) trained for a fixed number of steps on half of the ``a + b`` pairs.

Both folders load with ``AutoTokenizer.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` and hold a
``build_info.json`` (seed, steps, accuracies, eval size, wall time, versions). Everything is seeded; float
results can still differ across thread counts (BLAS reduction order), so the build uses one thread by
default; it also degrades far less than two threads on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from backend.lm.data import collate, encode_examples
from backend.lm.evaluate import evaluate
from backend.lm.tasks import Example, get_task
from backend.store import paths

# Qwen2's pre-tokenizer pattern: \p{N} alone splits every digit into its own token.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen-style turns, joined by '\n' *between* messages (nothing after the last one), so a prompt rendered with
# the generation prompt is a prefix of the conversation and the rendered conversation ends on the assistant's
# <|im_end|>: completion-only loss (TRL's) trains the response and its EOS, never a '\n' after it that
# generation never emits (tokviz's own encoding, data.encode, labels the same tokens). The {% generation %}
# markers (rendering nothing) wrap the assistant's content and <|im_end|>, the same tokens, for
# `return_assistant_tokens_mask=True` and TRL's `assistant_only_loss`.
CHAT_TEMPLATE = ("{% for message in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
                 "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
                 "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
                 "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\n<|im_start|>assistant\n' }}{% endif %}")
# Prompts of the default eval splits (seeds 0..EXCLUDED_EVAL_SEEDS-1, first EXCLUDED_EVAL_N draws) never appear
# in the pretraining corpus, so a later fine-tuning run evaluated on them measures generalisation.
EXCLUDED_EVAL_SEEDS = 10
EXCLUDED_EVAL_N = 1000
PRETRAIN_SEED_OFFSET = 1_000_003
STOP_SEED_OFFSET = 2_000_003


@dataclass
class DemoConfig:
    seed: int = field(default=0, metadata={"help": "seeds the tokenizer corpus, weights, data order"})
    out: str = field(default=str(paths.DEFAULT_MODEL_DIR), metadata={"help": "tiny-arith output folder"})
    modadd_out: str = field(default=str(paths.MODADD_MODEL_DIR), metadata={"help": "tiny-modadd output folder"})
    skip_arith: bool = False
    skip_modadd: bool = False
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1: same numbers on every machine)"})
    # tokenizer
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary size (400..1000)"})
    # model
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    # pretraining
    n_train: int = 50_000
    max_len: int = 192
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_steps: int = 4000
    eval_every: int = 50
    n_stop_eval: int = 256
    n_report_eval: int = 500
    target_low: float = field(default=0.20, metadata={"help": "stop at the first eval at or above this"})
    accept_low: float = 0.05
    accept_high: float = 0.60
    max_new_tokens: int = 64
    # modadd
    modadd_p: int = 97
    modadd_steps: int = field(default=1200, metadata={"help": "optimizer steps for the modadd model"})
    modadd_batch_size: int = 128
    modadd_lr: float = 3e-3
    modadd_weight_decay: float = 0.1

    def __post_init__(self) -> None:
        if not 400 <= self.vocab_size <= 1000:
            raise ValueError(f"vocab_size must be in 400..1000, got {self.vocab_size}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}), "
                             f"and num_heads by num_kv_heads ({self.num_kv_heads})")
        if not 0 < self.accept_low <= self.target_low <= self.accept_high < 1:
            raise ValueError("need 0 < accept_low <= target_low <= accept_high < 1, got "
                             f"{self.accept_low}, {self.target_low}, {self.accept_high}")
        for name in ("max_steps", "eval_every", "batch_size", "modadd_steps", "modadd_batch_size", "n_stop_eval",
                     "n_report_eval", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------- tokenizers

def build_arith_tokenizer(corpus: list[Example], vocab_size: int) -> Any:
    """Byte-level BPE (Qwen2 pre-tokenization) wrapped as a transformers tokenizer with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()       # exactly what transformers' Qwen2Tokenizer rebuilds on load
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = ["user", "assistant", "system"] + [t for ex in corpus for t in (ex.prompt, ex.response)]
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_modadd_tokenizer(p: int) -> Any:
    """WordLevel tokenizer: every number 0..p-1, '+' and '=' are single tokens; whitespace separates them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|pad|>": 0, "<|endoftext|>": 1, "<|unk|>": 2, "+": 3, "=": 4}
    vocab.update({str(i): len(vocab) + i for i in range(p)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   unk_token="<|unk|>")


# ---------------------------------------------------------------------------------------------- models

def _architecture(arch: str) -> tuple[type, type]:
    import transformers

    archs = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    if arch not in archs:
        raise ValueError(f"unknown architecture {arch!r}; available: {sorted(archs)}")
    return tuple(getattr(transformers, name) for name in archs[arch])


def build_model(tokenizer: Any, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                max_positions: int, seed: int, arch: str = "qwen2") -> Any:
    """A randomly initialised (from ``seed``) tiny causal LM with tied embeddings."""
    config_cls, model_cls = _architecture(arch)
    cfg = config_cls(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                     intermediate_size=intermediate, max_position_embeddings=max_positions,
                     tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup)      # linear warmup, then constant: no plateau by schedule


def _batches(items: list[dict], batch_size: int, rng: random.Random):
    """Endless shuffled batches (whole epochs, reshuffled each time)."""
    order = list(range(len(items)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [items[j] for j in order[i:i + batch_size]]


def _save(model: Any, tokenizer: Any, out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    (out / "build_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _portable_config(cfg: DemoConfig) -> dict:
    """The config as saved in build_info.json: output folders inside the project made relative to it."""
    out = asdict(cfg)
    for key in ("out", "modadd_out"):
        p = Path(out[key]).resolve()
        if p.is_relative_to(paths.PROJECT_ROOT):
            out[key] = str(p.relative_to(paths.PROJECT_ROOT))
    return out


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


# ---------------------------------------------------------------------------------------------- tiny-arith

def build_arith(cfg: DemoConfig) -> dict:
    """Train the tokenizer and pretrain the tiny arith model; save to ``cfg.out``. Returns build info."""
    t0 = time.time()
    task = get_task("arith")
    excluded = {ex.prompt for s in range(EXCLUDED_EVAL_SEEDS) for ex in task.generate(s, 0, EXCLUDED_EVAL_N)[1]}
    stop_set, _ = task.generate(cfg.seed + STOP_SEED_OFFSET, cfg.n_stop_eval, 0)
    excluded |= {ex.prompt for ex in stop_set}
    pool, _ = task.generate(cfg.seed + PRETRAIN_SEED_OFFSET, cfg.n_train + len(excluded), 0)
    corpus = [ex for ex in pool if ex.prompt not in excluded][:cfg.n_train]
    assert len(corpus) == cfg.n_train, "the pretraining pool was too small after excluding eval prompts"
    report_set = task.generate(0, 0, cfg.n_report_eval)[1]     # the default eval split of seed 0

    tokenizer = build_arith_tokenizer(corpus, cfg.vocab_size)
    items = encode_examples(tokenizer, corpus, cfg.max_len)
    model = build_model(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                        cfg.intermediate_size, max_positions=512, seed=cfg.seed)
    print(f"tiny-arith: vocab {len(tokenizer)}, {n_params(model):,} parameters, {len(items)} training problems, "
          f"mean length {sum(len(i['input_ids']) for i in items) / len(items):.0f} tokens")

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    batches = _batches(items, cfg.batch_size, random.Random(cfg.seed))
    history: list[dict] = []
    prev_state, prev_acc, prev_step = None, 0.0, 0
    chosen: tuple[dict, float, int] | None = None
    bar = tqdm(range(1, cfg.max_steps + 1), desc="pretrain tiny-arith", unit="step", mininterval=2.0)
    model.train()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step - 1, cfg.lr, cfg.warmup_steps)
        batch = collate(next(batches), tokenizer.pad_token_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
        if step % cfg.eval_every:
            continue
        acc = evaluate(model, tokenizer, task, stop_set, cfg.max_new_tokens, batch_size=128)["accuracy"]
        history.append({"step": step, "loss": round(out.loss.item(), 4), "stop_eval_accuracy": acc})
        tqdm.write(f"step {step}: loss {out.loss.item():.3f}, held-out accuracy {acc:.3f}")
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if acc >= cfg.target_low:
            if acc <= cfg.accept_high:
                chosen = (state, acc, step)
            elif prev_state is not None and prev_acc >= cfg.accept_low:
                chosen = (prev_state, prev_acc, prev_step)    # jumped past the window: keep the one before
            else:
                raise RuntimeError(f"accuracy jumped from {prev_acc:.3f} to {acc:.3f} between evals; lower "
                                   "eval_every or lr")
            break
        prev_state, prev_acc, prev_step = state, acc, step
    bar.close()
    if chosen is None:
        if prev_acc < cfg.accept_low:
            raise RuntimeError(f"held-out accuracy only reached {prev_acc:.3f} in {cfg.max_steps} steps")
        chosen = (prev_state, prev_acc, prev_step)
    state, stop_acc, steps = chosen
    model.load_state_dict(state)
    res = evaluate(model, tokenizer, task, report_set, cfg.max_new_tokens, batch_size=128)
    info = {"model": "tiny-arith", "seed": cfg.seed, "steps": steps, "n_params": n_params(model),
            "stop_eval_accuracy": stop_acc, "stop_eval_size": len(stop_set),
            "base_accuracy": res["accuracy"], "eval_size": res["n"],
            "eval_split": {"task": "arith", "seed": 0, "n_eval": cfg.n_report_eval},
            "wall_time_s": round(time.time() - t0, 1), "history": history, "config": _portable_config(cfg),
            "versions": _versions(), "threads": torch.get_num_threads()}
    _save(model, tokenizer, Path(cfg.out), info)
    print(f"tiny-arith: step {steps}, base accuracy {res['accuracy']:.3f} on {res['n']} eval problems "
          f"(stop set {stop_acc:.3f}), {info['wall_time_s']} s -> {cfg.out}")
    return info


# ---------------------------------------------------------------------------------------------- tiny-modadd

def build_modadd(cfg: DemoConfig) -> dict:
    """Train the tiny modadd model for ``cfg.modadd_steps``; save to ``cfg.modadd_out``. Returns build info."""
    t0 = time.time()
    task = get_task("modadd")
    train, eval_ = task.generate(cfg.seed, 0, 0, p=cfg.modadd_p)     # all pairs, split by train_fraction
    tokenizer = build_modadd_tokenizer(cfg.modadd_p)
    items = encode_examples(tokenizer, train, max_len=16)
    # Qwen3, not Qwen2: transformers 5 loads any model_type "qwen2" folder with Qwen2Tokenizer, which rebuilds
    # the tokenizer as digit-splitting byte-level BPE and would break the one-token-per-number vocabulary.
    # Qwen3 has the same module names (q_proj ... down_proj) and honours tokenizer.json as saved.
    model = build_model(tokenizer, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=512,
                        max_positions=16, seed=cfg.seed, arch="qwen3")
    print(f"tiny-modadd: vocab {len(tokenizer)}, {n_params(model):,} parameters, {len(train)} train / "
          f"{len(eval_)} eval pairs")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.modadd_lr, weight_decay=cfg.modadd_weight_decay,
                            betas=(0.9, 0.98))
    batches = _batches(items, cfg.modadd_batch_size, random.Random(cfg.seed))
    model.train()
    bar = tqdm(range(1, cfg.modadd_steps + 1), desc="train tiny-modadd", unit="step", mininterval=2.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step - 1, cfg.modadd_lr, 10)
        batch = collate(next(batches), tokenizer.pad_token_id)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    train_acc = evaluate(model, tokenizer, task, train[:1000], max_new_tokens=2, batch_size=1000)["accuracy"]
    res = evaluate(model, tokenizer, task, eval_, max_new_tokens=2, batch_size=1000)
    info = {"model": "tiny-modadd", "seed": cfg.seed, "steps": step, "n_params": n_params(model),
            "p": cfg.modadd_p, "train_accuracy_first_1000": train_acc, "base_accuracy": res["accuracy"],
            "eval_size": res["n"], "eval_split": {"task": "modadd", "seed": cfg.seed, "n_train": 0, "n_eval": 0},
            "wall_time_s": round(time.time() - t0, 1), "versions": _versions(),
            "threads": torch.get_num_threads()}
    _save(model, tokenizer, Path(cfg.modadd_out), info)
    print(f"tiny-modadd: {step} steps, train accuracy {train_acc:.3f}, eval accuracy {res['accuracy']:.3f} "
          f"on {res['n']} pairs, {info['wall_time_s']} s -> {cfg.modadd_out}")
    return info


# ---------------------------------------------------------------------------------------------- CLI

def build(cfg: DemoConfig) -> dict:
    """Build the models ``cfg`` asks for; returns their build infos by name."""
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    out: dict[str, Any] = {}
    if not cfg.skip_arith:
        out["arith"] = build_arith(cfg)
    if not cfg.skip_modadd:
        out["modadd"] = build_modadd(cfg)
    print(f"built {', '.join(out) or 'nothing'} in {time.time() - t0:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m backend build-demo-model [--seed 0] [--out DIR] ...``; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m backend build-demo-model", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(paths.DEFAULT_MODEL_DIR), help="tiny-arith output folder")
    ap.add_argument("--modadd-out", default=str(paths.MODADD_MODEL_DIR), help="tiny-modadd output folder")
    ap.add_argument("--skip-arith", action="store_true")
    ap.add_argument("--skip-modadd", action="store_true")
    ap.add_argument("--max-steps", type=int, default=DemoConfig.max_steps)
    ap.add_argument("--threads", type=int, default=DemoConfig.threads)
    ap.add_argument("--modadd-steps", type=int, default=DemoConfig.modadd_steps)
    args = ap.parse_args(argv)
    cfg = DemoConfig(seed=args.seed, out=args.out, modadd_out=args.modadd_out, skip_arith=args.skip_arith,
                     skip_modadd=args.skip_modadd, max_steps=args.max_steps, threads=args.threads,
                     modadd_steps=args.modadd_steps)
    build(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
