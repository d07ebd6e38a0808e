"""The ``train`` job kind: LoRA SFT under a token-weighting scheme, optionally traced every N steps.

    python -m backend train --task arith --scheme antiop --scheme-params clip_mult=2 --steps 200
    python -m backend train --config run.yaml --trace-every 20          # flags override the file
    cfg = TrainConfig(task="arith", scheme="antiop", steps=200)          # invalid values raise ValueError

The config and the registry entry live here (no torch: the app builds the Launch form from them); the loop is
``backend.lm.trainer.train``. Tables: ``train_steps``, ``eval``, and at traced steps ``tokens`` and
``token_modules`` (backend.store.schema), with per-step aggregates of ``token_modules`` filled at ingest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from backend.index import sql
from backend.jobs.config import INF, NONNEG, POS, JobConfig, option
from backend.jobs.registry import DerivedTable, JobSpec, TableSpec
from backend.lm import scheme_specs
from backend.lm.data import text_format
from backend.lm.tasks import TASKS, get_task
from backend.store import schema


@dataclass
class TrainConfig(JobConfig):
    """A LoRA SFT run under a token-weighting scheme, optionally traced (docs/design.md, "Definitions")."""
    # what to train
    name: str = option("", "a short human name for the run (used in its id)")
    model: str = option("default", "'default' (the embedded tiny Qwen2), a local model directory, or a hub id")
    task: str = option("arith", f"built-in task: {', '.join(TASKS)} (backend.lm.tasks); ignored when `dataset` is given")
    task_params: dict = option({}, "task generator parameters, e.g. {p: 97} for modadd")
    dataset: str = option("", "a local JSONL or Parquet file with prompt/response or messages fields")
    n_train: int = option(4000, "training examples to generate from the task", range=(1, INF, False, True))
    n_eval: int = option(200, "held-out examples for the final evaluation (0: no eval)", range=NONNEG)
    data_seed: int = option(0, "seed of the task's train/eval split")
    max_len: int = option(256, "maximum tokens per sequence (prompt + response)", range=(2, INF, False, True))
    chat_template: bool = option(True, "render prompts with the tokenizer's chat template when it has one")
    prompt_template: str = option("", "join each prompt and response with this instead, e.g. '{prompt}\\n{response}' "
                                  "(must hold {prompt} then end with {response}; \\n and \\t read as newline and "
                                  "tab). '': the chat template, or with none the prompt directly followed by the "
                                  "response (said once in the run's events)")
    # the loss
    scheme: str = option("sft", f"token-weighting scheme: {', '.join(scheme_specs.SCHEMES)} (docs/design.md)")
    scheme_params: dict = option({}, "scheme parameters overriding its defaults, e.g. {keep_ratio: 0.5}")
    # LoRA
    lora_r: int = option(8, "LoRA rank", range=(1, 4096, False, False))
    lora_alpha: float = option(16.0, "LoRA alpha (scaling alpha / r)", range=POS)
    lora_dropout: float = option(0.0, "dropout on the LoRA input", range=(0.0, 1.0, False, True))
    lora_targets: list = option(["q_proj", "k_proj", "v_proj", "o_proj"], "module names to adapt")
    # optimisation
    steps: int = option(200, "optimizer steps", range=(1, INF, False, True))
    batch_size: int = option(16, "sequences per micro-batch (per process under torchrun)", range=(1, INF, False, True))
    grad_accum: int = option(1, "micro-batches per optimizer step", range=(1, INF, False, True))
    lr: float = option(2e-3, "peak learning rate", range=POS)
    lr_schedule: str = option("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    warmup_steps: int = option(10, "linear warmup steps", range=NONNEG)
    weight_decay: float = option(0.0, "AdamW weight decay", range=NONNEG)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)", range=NONNEG)
    seed: int = option(0, "seed of LoRA init, data order and dropout")
    # runtime
    dtype: str = option("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16",
                    choices=("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"))
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    attn_implementation: str = option("auto", "attention kernel", choices=("auto", "eager", "sdpa", "flash_attention_2"))
    trust_remote_code: bool = option(False, "run model code from the hub (only if you trust it)")
    log_every: int = option(10, "steps between progress events", range=(1, INF, False, True))
    checkpoint_every: int = option(100, "save the resumable training state (adapter, optimizer, scheduler, RNG, "
                                   "data order) every N steps, and at traced steps; `python -m backend resume` "
                                   "continues from the latest (0: only at traced steps)", range=NONNEG)
    # evaluation
    eval_max_new_tokens: int = option(64, "generation length at eval", range=(1, INF, False, True))
    eval_batch_size: int = option(64, "prompts per generation batch", range=(1, INF, False, True))
    eval_k: int = option(0, "also sample k answers per prompt at eval_temperature (0: greedy only)", range=NONNEG)
    eval_temperature: float = option(0.7, "sampling temperature for eval_k", range=POS)
    eval_before: bool = option(False, "also evaluate the base model before training")
    eval_every: int = option(0, "also evaluate (same protocol and items) after every N-th step, into eval_steps "
                             "(0: off)", range=NONNEG)
    # tracing
    trace_every: int = option(0, "trace every N steps (0: no tracing)", range=NONNEG)
    trace_mode: str = option("position", "what a token's gradient means", choices=("position", "token"))
    trace_loss: str = option("scheme", "the traced loss: the scheme's weighted loss or plain cross-entropy",
                         choices=("scheme", "ce"))
    trace_sequences: int = option(4, "sequences of the step's batch to trace", range=(1, INF, False, True))
    trace_inline: bool = option(False, "trace the real step instead of a re-run (needs grad_accum = 1)")
    trace_magnitude: str = option("auto", "token mode: exact per-token gradient norms, a k-JVP sketch, none, or "
                                  "auto: exact when a traced step stays within ~10x a plain step, else sketched "
                                  "(the choice and its expected cost are printed before the first traced step)",
                                  choices=("auto", "exact", "sketch", "none"))
    trace_sketch_k: int = option(64, "random directions for sketched magnitudes (relative error of the norm about "
                                 "sqrt(1/(2k)); auto may halve it, down to 16, to fit)", range=(1, INF, False, True))
    trace_sketch_dim: int = option(0, "position mode: also keep a k-dimensional random sketch of each traced "
                                   "position's gradient piece (token_sketches table: PCA, nearest tokens); 0: off",
                                   range=(0, 65536, False, False))
    trace_sketch_kind: str = option("gaussian", "the sketch's projection (docs/sketches.md): gaussian (rank-one "
                                    "Gaussian rows, a hidden-side factor shared by 4 rows; ~7 percent of a step on the CPU "
                                    "bench model), gaussian-full (one factor per row: error up to ~15 percent lower, ~1.8x "
                                    "the cost) or sparse (a count sketch on the hidden side, error floor)",
                                    choices=("gaussian", "gaussian-full", "sparse"))
    influence_eval: int = option(0, "at traced steps, also each traced token's influence on the mean loss of this "
                                 "many held-out examples (the task's eval split, or influence_file): <piece or "
                                 "g_t, G_eval>. 0: off", range=NONNEG)
    influence_file: str = option("", "the held-out examples for influence_eval (a prompt/response or messages "
                                 "JSONL/Parquet file, its first influence_eval records); '': the task's eval split")
    # embedding token gradients (backend.grads.embgrad)
    embgrad_every: int = option(0, "record n_v = ||dL/dE_v|| per vocabulary token every N steps, from the gradient "
                                "at the embedding output (0: off)", range=NONNEG)
    embgrad_stride: int = option(0, "modadd: also the stride-group metrics of the number tokens for this stride "
                                 "(0: off)", range=NONNEG)
    # output
    runs_root: str = option("", "where run directories go (default: <data root>/runs)")
    run_id: str = option("", "explicit run id (default: timestamp-kind-name-random)")

    def validate(self) -> None:
        spec = scheme_specs.get(self.scheme)
        self.scheme_params = spec.resolve_params(self.scheme_params)
        if self.dataset:
            if not Path(self.dataset).expanduser().is_file():
                raise ValueError(f"dataset: file {self.dataset!r} does not exist")
        else:
            get_task(self.task).check_params(self.task_params)       # before a run folder exists
        if self.model.startswith(("/", ".", "~")) and not Path(self.model).expanduser().exists():
            raise ValueError(f"model: path {self.model!r} does not exist")
        if self.prompt_template:
            text_format(self.chat_template, self.prompt_template)          # ValueError naming what is wrong
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"lora_targets must be a non-empty list of module names, got {self.lora_targets!r}")
        if self.trace_inline and self.grad_accum != 1:
            raise ValueError("trace_inline needs grad_accum = 1 (the real step must be a single backward)")
        if self.trace_inline and self.trace_mode != "position":
            raise ValueError("trace_inline needs trace_mode 'position' (token mode re-runs the step with JVPs)")
        if self.embgrad_stride and not self.embgrad_every:
            raise ValueError("embgrad_stride needs embgrad_every > 0 (the steps whose embedding gradients are "
                             "recorded)")
        if self.embgrad_stride and (self.dataset or self.task != "modadd"):
            raise ValueError(f"embgrad_stride is for the modadd task's number tokens; task is {self.task!r}")
        if self.trace_sketch_dim and self.trace_mode != "position":
            raise ValueError("trace_sketch_dim > 0 needs trace_mode 'position' (token mode keeps no sketches)")
        if self.influence_eval and not self.trace_every:
            raise ValueError("influence_eval needs trace_every > 0 (influence is recorded at traced steps)")
        if self.influence_file and not self.influence_eval:
            raise ValueError("influence_file needs influence_eval > 0 (how many of its examples to use)")
        if self.influence_file and not Path(self.influence_file).expanduser().is_file():
            raise ValueError(f"influence_file: file {self.influence_file!r} does not exist")
        if self.influence_eval and not self.influence_file and (self.dataset or self.n_eval == 0):
            raise ValueError("influence_eval needs held-out examples: the task's eval split (n_eval > 0, no user "
                             "dataset) or an influence_file")
        if self.eval_k and self.n_eval == 0:
            raise ValueError("eval_k > 0 needs n_eval > 0")
        if self.eval_every and (self.n_eval == 0 or self.dataset):
            raise ValueError("eval_every > 0 needs held-out items of a task (n_eval > 0, no user dataset)")
        if self.dataset and (self.eval_before or self.eval_k):
            raise ValueError("eval_before and eval_k need held-out items of a task: a user dataset has no answer "
                             "checker (it trains on every record)")


# ------------------------------------------------------------------------------------------------ tables
_TRACE_SHARD = re.compile(r"^step_(\d+)\.rank(\d+)\.parquet$")


def trace_shard_key(p: Path) -> tuple[int, int]:
    """(step, rank) of a trace shard ``step_NNNNNN.rankR.parquet``; ValueError for another name."""
    m = _TRACE_SHARD.match(p.name)
    if not m:
        raise ValueError(f"{p}: a trace shard must be named step_NNNNNN.rankR.parquet")
    return int(m.group(1)), int(m.group(2))


def complete_trace_steps(files: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """Of a run still running (or crashed), the traced steps whose tokens and token_modules shards are both
    there, from the same ranks (and their influence shards, written before them); the other tables as they are."""
    keys = {t: {trace_shard_key(p) for p in files[t]} for t in ("tokens", "token_modules")}
    partial = {step for step, _rank in keys["tokens"] ^ keys["token_modules"]}
    complete = {step for step, _rank in keys["tokens"]} - partial
    traced = set(keys) | {"influence", "influence_modules", "influence_steps", "token_sketches"}
    return {t: [p for p in fs if trace_shard_key(p)[0] in complete] if t in traced else fs for t, fs in files.items()}


TOKENS = TableSpec("tokens", schema.TOKENS, "trace/tokens/*.parquet", order=trace_shard_key,
                   derived=(("resp_pos", "INTEGER", sql.RESP_POS),))
TOKEN_MODULES = TableSpec("token_modules", schema.TOKEN_MODULES, "trace/token_modules/*.parquet",
                          order=trace_shard_key)
TRAIN_STEPS = TableSpec("train_steps", schema.TRAIN_STEPS, "train_steps/*.parquet")
EVAL = TableSpec("eval", schema.EVAL, "eval/*.parquet")
EVAL_STEPS = TableSpec("eval_steps", schema.EVAL_STEPS, "eval_steps/*.parquet")
INFLUENCE = TableSpec("influence", schema.INFLUENCE, "trace/influence/*.parquet", order=trace_shard_key)
INFLUENCE_MODULES = TableSpec("influence_modules", schema.INFLUENCE_MODULES, "trace/influence_modules/*.parquet",
                              order=trace_shard_key)
INFLUENCE_STEPS = TableSpec("influence_steps", schema.INFLUENCE_STEPS, "trace/influence_steps/*.parquet",
                            order=trace_shard_key)
TOKEN_SKETCHES = TableSpec("token_sketches", schema.TOKEN_SKETCHES, "trace/token_sketches/*.parquet",
                           order=trace_shard_key)
EMBGRAD = TableSpec("embgrad", schema.EMBGRAD, "embgrad/*.parquet")
EMBGRAD_STEPS = TableSpec("embgrad_steps", schema.EMBGRAD_STEPS, "embgrad_steps/*.parquet")

JOB = JobSpec(
    name="train", help="LoRA SFT under a token-weighting scheme, optionally traced",
    config=TrainConfig, entry="backend.lm.trainer:train",
    tables=(TOKENS, TOKEN_MODULES, TRAIN_STEPS, EVAL, EMBGRAD, EMBGRAD_STEPS, EVAL_STEPS,
            INFLUENCE, INFLUENCE_MODULES, INFLUENCE_STEPS, TOKEN_SKETCHES),
    derived=tuple(DerivedTable(name, sql.AGG_CREATE[name], sql.AGG_FILL[name]) for name in sql.AGG_FILL),
    complete=complete_trace_steps, steps_table="tokens",
    analyses=("backend.analysis.trace", "backend.analysis.influence", "backend.analysis.sketches"),
    form_defaults={"trace_every": 20},
    ingest_checks=((sql.DUPLICATE_MODULE_LABELS, "token_modules rows of two LoRA modules share one (step, layer, "
                    "module, part) label (a tracer that named modules by their last name only)"),),
    launch_fields=("name", "model", "task", "task_params", "n_train", "n_eval", "scheme", "scheme_params", "lora_r",
                   "lora_alpha", "lora_dropout", "lora_targets", "steps", "batch_size", "lr", "trace_every",
                   "trace_mode", "trace_sequences"),
    hidden_fields=("dataset", "runs_root", "run_id"),
    path_fields=("dataset", "runs_root", "influence_file"), model_fields=("model",),
    user_errors=("backend.lm.models:HubUnreachableError",),
)
