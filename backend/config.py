"""The train (and trace) job's config: one dataclass, built the same way by the CLI, a YAML file and the web form.

    cfg = TrainConfig(task="arith", scheme="antiop", steps=200)          # invalid values raise ValueError
    cfg = TrainConfig.from_dict(yaml.safe_load(open("run.yaml")))
    python -m backend train --task arith --scheme topk --scheme-params keep_ratio=0.5 --steps 200
    python -m backend train --config run.yaml --steps 50                 # flags override the file

Every field carries ``help`` and, where it has one, an allowed range or a list of choices; ``__post_init__``
rejects a bad value naming the field and what is allowed.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

INF = math.inf


def _f(default: Any, help: str, range: tuple | None = None, choices: tuple | None = None, **kw) -> Any:
    meta = {"help": help}
    if range is not None:
        meta["range"] = range          # (low, high, low_open, high_open)
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check_range(what: str, v: float, rng: tuple) -> None:
    """Raise ValueError naming ``what`` unless ``v`` lies in ``rng`` = (low, high, low_open, high_open)."""
    lo, hi, lo_open, hi_open = rng
    if not ((v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{what}={v} is outside the allowed range {interval}")


POS = (0, INF, True, True)        # > 0
NONNEG = (0, INF, False, True)    # >= 0


@dataclass
class TrainConfig:
    # what to train
    name: str = _f("", "a short human name for the run (used in its id)")
    model: str = _f("default", "'default' (the embedded tiny Qwen2), a local model directory, or a hub id")
    task: str = _f("arith", "built-in task (see backend.tasks); ignored when `dataset` is given")
    task_params: dict = _f({}, "task generator parameters, e.g. {p: 97} for modadd")
    dataset: str = _f("", "a local JSONL or Parquet file with prompt/response or messages fields")
    n_train: int = _f(4000, "training examples to generate from the task", range=(1, INF, False, True))
    n_eval: int = _f(200, "held-out examples for the final evaluation (0: no eval)", range=NONNEG)
    data_seed: int = _f(0, "seed of the task's train/eval split")
    max_len: int = _f(256, "maximum tokens per sequence (prompt + response)", range=(2, INF, False, True))
    chat_template: bool = _f(True, "render prompts with the tokenizer's chat template when it has one")
    # the loss
    scheme: str = _f("sft", "token-weighting scheme (see backend.schemes)")
    scheme_params: dict = _f({}, "scheme parameters overriding its defaults, e.g. {keep_ratio: 0.5}")
    # LoRA
    lora_r: int = _f(8, "LoRA rank", range=(1, 4096, False, False))
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling alpha / r)", range=POS)
    lora_dropout: float = _f(0.0, "dropout on the LoRA input", range=(0.0, 1.0, False, True))
    lora_targets: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "module names to adapt")
    # optimisation
    steps: int = _f(200, "optimizer steps", range=(1, INF, False, True))
    batch_size: int = _f(16, "sequences per micro-batch (per process under torchrun)", range=(1, INF, False, True))
    grad_accum: int = _f(1, "micro-batches per optimizer step", range=(1, INF, False, True))
    lr: float = _f(2e-3, "peak learning rate", range=POS)
    lr_schedule: str = _f("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    warmup_steps: int = _f(10, "linear warmup steps", range=NONNEG)
    weight_decay: float = _f(0.0, "AdamW weight decay", range=NONNEG)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)", range=NONNEG)
    seed: int = _f(0, "seed of LoRA init, data order and dropout")
    # runtime
    dtype: str = _f("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16",
                    choices=("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"))
    device: str = _f("auto", "auto, cpu, cuda, cuda:N")
    attn_implementation: str = _f("auto", "attention kernel", choices=("auto", "eager", "sdpa", "flash_attention_2"))
    trust_remote_code: bool = _f(False, "run model code from the hub (only if you trust it)")
    log_every: int = _f(10, "steps between progress events", range=(1, INF, False, True))
    # evaluation
    eval_max_new_tokens: int = _f(64, "generation length at eval", range=(1, INF, False, True))
    eval_batch_size: int = _f(64, "prompts per generation batch", range=(1, INF, False, True))
    eval_k: int = _f(0, "also sample k answers per prompt at eval_temperature (0: greedy only)", range=NONNEG)
    eval_temperature: float = _f(0.7, "sampling temperature for eval_k", range=POS)
    eval_before: bool = _f(False, "also evaluate the base model before training")
    # tracing
    trace_every: int = _f(0, "trace every N steps (0: no tracing)", range=NONNEG)
    trace_mode: str = _f("position", "what a token's gradient means", choices=("position", "token"))
    trace_loss: str = _f("scheme", "the traced loss: the scheme's weighted loss or plain cross-entropy",
                         choices=("scheme", "ce"))
    trace_sequences: int = _f(4, "sequences of the step's batch to trace", range=(1, INF, False, True))
    trace_inline: bool = _f(False, "trace the real step instead of a re-run (needs grad_accum = 1)")
    trace_magnitude: str = _f("exact", "token mode: exact per-token gradient norms, a k-JVP sketch, or none",
                              choices=("exact", "sketch", "none"))
    trace_sketch_k: int = _f(64, "random directions for sketched magnitudes", range=(1, INF, False, True))
    # output
    runs_root: str = _f("", "where run directories go (default: <data root>/runs)")
    run_id: str = _f("", "explicit run id (default: timestamp-kind-name-random)")

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            expect = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}[f.type]
            if not isinstance(v, expect) or (f.type in ("int", "float") and isinstance(v, bool)):
                raise ValueError(f"{f.name}: expected {f.type}, got {v!r}")
            if "choices" in f.metadata and v not in f.metadata["choices"]:
                raise ValueError(f"{f.name}={v!r} is not allowed; choose one of: {', '.join(f.metadata['choices'])}")
            if "range" in f.metadata:
                check_range(f.name, v, f.metadata["range"])
        self._floats_as_floats()
        from backend.schemes import get_scheme          # imports torch: only when a config is built
        self.scheme_params = get_scheme(self.scheme).resolve_params(self.scheme_params)
        if self.dataset:
            if not Path(self.dataset).expanduser().is_file():
                raise ValueError(f"dataset: file {self.dataset!r} does not exist")
        else:
            from backend.tasks import get_task
            get_task(self.task)
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"lora_targets must be a non-empty list of module names, got {self.lora_targets!r}")
        if self.trace_inline and self.grad_accum != 1:
            raise ValueError("trace_inline needs grad_accum = 1 (the real step must be a single backward)")
        if self.eval_k and self.n_eval == 0:
            raise ValueError("eval_k > 0 needs n_eval > 0")

    def _floats_as_floats(self) -> None:
        """Store float fields as floats (YAML and JSON give ints for 1, 2, ...)."""
        for f in fields(self):
            if f.type == "float" and isinstance(getattr(self, f.name), int):
                setattr(self, f.name, float(getattr(self, f.name)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"config file {p} must hold a mapping of field: value, got {type(d).__name__}")
        return cls.from_dict(d)


# ---- command line: flags generated from the dataclass, so the CLI and the form cannot drift apart -------------

def _parse_mapping(text: str) -> dict:
    """'{"a": 1}' (JSON) or 'a=1,b=0.5' (YAML scalars) -> dict."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from e
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v.strip())
    return out


def _parse_list(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_config_args(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    parser.add_argument("--config", help="a YAML file of config fields; flags given here override it")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        h = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else f.default_factory()
        h = f"{h} (default: {default!r})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=h)
        else:
            conv = {"int": int, "float": float, "str": str, "list": _parse_list, "dict": _parse_mapping}[f.type]
            parser.add_argument(flag, type=conv, default=argparse.SUPPRESS, help=h,
                                choices=f.metadata.get("choices"))


def config_from_args(args: argparse.Namespace, cls=TrainConfig) -> TrainConfig:
    base = {}
    if getattr(args, "config", None):
        base = cls.from_yaml(args.config).to_dict()
    names = {f.name for f in fields(cls)}
    base.update({k: v for k, v in vars(args).items() if k in names})
    return cls.from_dict(base)
