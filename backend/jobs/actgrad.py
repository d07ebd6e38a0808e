"""The ``actgrad`` job kind: gradients of the training loss with respect to every decoder layer's output hidden
state, at every position of a few samples (docs/design.md, "Activation gradients").

    python -m backend actgrad --run data/runs/demo-sft-position --samples 32 --targets "last =|last digit"
    python -m backend actgrad --model tiny-modadd --task modadd --samples 32 --layers 0,-1 --targets "first ="
    cfg = ActgradConfig(run="data/runs/r1", layers="all", targets="first ,|last digit before )|index:12")

The config, the tables and the target grammar live here (no torch: the app builds the Launch form from them);
the work is ``backend.grads.actgrad_run.run``. Tables (one row each):

- ``actgrad``: (sample, layer, position) -> ||dL/dh_{l,t}||, with the token at t;
- ``actgrad_vectors``: the full float32 vector dL/dh_{l,t} at each found target position, every chosen layer;
- ``actgrad_targets``: (sample, target) -> the position found, or ``skipped`` with the reason (a sample whose
  pattern is absent is listed, never dropped silently);
- ``actgrad_samples``: each sample's prompt, response, answer and loss (hover text, PCA colours).

Targets (``--targets``, ``|``-separated): ``index:N`` (position N; negative counts from the sequence's end),
``first X`` / ``last X`` with X a token text (compared with surrounding whitespace stripped), ``digit`` (a
token of digits only) or ``response`` (a response token); optionally ``before Y`` / ``after Y``: only positions
before / after the first token Y. ``last digit before )``: the last digit token before the first ``)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

from backend.jobs.config import INF, JobConfig, option
from backend.jobs.registry import JobSpec, TableSpec
from backend.lm.tasks import TASKS, get_task
from backend.store.schema import f32, table_schema

KIND = "actgrad"


@dataclass
class ActgradConfig(JobConfig):
    """Per-layer, per-position gradients of the training loss w.r.t. decoder-layer outputs."""
    name: str = option("", "a short human name for the run (used in its id)")
    run: str = option("", "a train run (its directory, or its id under <data root>/runs): its model, LoRA adapter, "
                      "task and data (else give `model`)")
    adapter_step: int = option(0, "with `run`: the adapter saved at this traced step (0: the run's final adapter)",
                               range=(0, INF, False, True))
    model: str = option("", "without `run`: 'default' (also when empty), 'tiny-modadd', a local model directory or "
                        "a hub id")
    adapter: str = option("", "without `run`: a LoRA adapter directory (peft save_pretrained) to load on `model`")
    task: str = option("", f"task of the samples: {', '.join(TASKS)} (default: the run's task, else arith)")
    task_params: dict = option({}, "task generator parameters (default: the run's), e.g. {p: 97}")
    split: str = option("eval", "samples from the task's held-out split or its training split",
                        choices=("eval", "train"))
    data_seed: int = option(-1, "seed of the task's train/eval split (-1: the run's, else 0)",
                            range=(-1, INF, False, True))
    samples: int = option(32, "number of samples (the first N of the split)", range=(1, 100_000, False, False))
    max_len: int = option(256, "maximum tokens per sequence", range=(2, INF, False, True))
    layers: str = option("all", "decoder layers: 'all' or comma-separated indices (negative: from the end)")
    targets: str = option("last digit|last =", "target positions whose full vectors are kept, '|'-separated: "
                          "index:N, first/last TOKEN|digit|response [before|after TOKEN]")
    loss: str = option("ce", "the differentiated loss: 'ce' = plain cross-entropy summed over the response "
                       "tokens of all samples / their number (independent of batching); 'scheme' = the run's "
                       "token-weighting scheme on each batch, exactly as a training step of that batch computes it",
                       choices=("ce", "scheme"))
    batch_size: int = option(8, "samples per forward + backward", range=(1, INF, False, True))
    dtype: str = option("fp32", "model dtype (norms and vectors are stored as float32 whatever it is)",
                        choices=("auto", "fp32", "bf16", "fp16"))
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    attn_implementation: str = option("auto", "attention kernel",
                                      choices=("auto", "eager", "sdpa", "flash_attention_2"))
    trust_remote_code: bool = option(False, "run model code from the hub (only if you trust it)")
    runs_root: str = option("", "where run directories go (default: <data root>/runs)")
    run_id: str = option("", "explicit run id (default: timestamp-kind-name-random)")

    def validate(self) -> None:
        if self.run and (self.model or self.adapter):
            raise ValueError("give either `run` or `model`/`adapter`, not both (the run names its model and adapter)")
        if self.adapter_step and not self.run:
            raise ValueError("adapter_step needs `run` (the adapters saved at traced steps live in the run)")
        if self.task:
            get_task(self.task)
        parse_layers(self.layers, None)
        parse_targets(self.targets)


# ------------------------------------------------------------------------------------------------ layers
def parse_layers(text: str, n_layers: int | None) -> list[int]:
    """'all' or '0,2,-1' -> sorted layer indices in [0, n_layers); ValueError listing the valid ones. With
    ``n_layers`` None only the syntax is checked."""
    text = text.strip()
    if text == "all":
        return list(range(n_layers)) if n_layers is not None else []
    try:
        raw = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise ValueError(f"layers: expected 'all' or comma-separated integers, got {text!r}") from e
    if not raw:
        raise ValueError(f"layers: expected 'all' or comma-separated integers, got {text!r}")
    if n_layers is None:
        return raw
    bad = [i for i in raw if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {n_layers} decoder layers, valid indices "
                         f"0..{n_layers - 1} (or -{n_layers}..-1 from the end), or 'all'")
    return sorted({i % n_layers for i in raw})


# ------------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """One target pattern: ``index:N`` or ``first|last WHAT [before|after ANCHOR]``."""
    spec: str                 # as written (the name in the tables)
    index: int | None = None
    which: str = ""           # "first" or "last"
    what: str = ""            # a token text, "digit" or "response"
    where: str = ""           # "", "before" or "after"
    anchor: str = ""


_INDEX = re.compile(r"^index:(-?\d+)$")
GRAMMAR = "index:N, or first|last TOKEN|digit|response, optionally followed by before|after TOKEN"


def parse_targets(text: str) -> list[Target]:
    """'first ,|last digit before )|index:12' -> Targets; ValueError naming the bad one and the grammar."""
    out = []
    for spec in (s.strip() for s in text.split("|")):
        if not spec:
            continue
        m = _INDEX.match(spec)
        if m:
            out.append(Target(spec, index=int(m.group(1))))
            continue
        words = spec.split()
        if len(words) < 2 or words[0] not in ("first", "last"):
            raise ValueError(f"targets: cannot read {spec!r}; a target is {GRAMMAR}")
        where, anchor, what = "", "", words[1:]
        if len(what) >= 3 and what[-2] in ("before", "after"):
            where, anchor, what = what[-2], what[-1], what[:-2]
        if len(what) != 1 or what[0] in ("before", "after"):
            raise ValueError(f"targets: cannot read {spec!r}; a target is {GRAMMAR}")
        out.append(Target(spec, which=words[0], what=what[0], where=where, anchor=anchor))
    if not out:
        raise ValueError(f"targets: none given; a target is {GRAMMAR}")
    if len({t.spec for t in out}) != len(out):
        raise ValueError(f"targets: {text!r} names the same target twice")
    return out


def _matches(target: Target, text: str, is_response: bool) -> bool:
    s = text.strip()
    if target.what == "digit":
        return s.isdigit()
    if target.what == "response":
        return is_response
    return s == target.what


def find_target(target: Target, texts: Sequence[str], is_response: Sequence[bool]) -> tuple[int | None, str]:
    """The position of ``target`` in one sequence (token texts, no padding), or (None, why it is absent)."""
    n = len(texts)
    if target.index is not None:
        pos = target.index if target.index >= 0 else n + target.index
        if not 0 <= pos < n:
            return None, f"index {target.index} is outside the sequence of {n} tokens"
        return pos, ""
    lo, hi = 0, n
    if target.where:
        hits = [i for i, t in enumerate(texts) if t.strip() == target.anchor]
        if not hits:
            return None, f"no token {target.anchor!r} to look {target.where}"
        lo, hi = (0, hits[0]) if target.where == "before" else (hits[0] + 1, n)
    cands = [i for i in range(lo, hi) if _matches(target, texts[i], bool(is_response[i]))]
    if not cands:
        scope = f" {target.where} the first {target.anchor!r}" if target.where else ""
        return None, f"no {target.what!r} token{scope}"
    return (cands[0] if target.which == "first" else cands[-1]), ""


# ------------------------------------------------------------------------------------------------ tables
ACTGRAD = table_schema("actgrad", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),     # index in the chosen split
    pa.field("layer", pa.int16(), nullable=False),          # decoder layer (0-based)
    pa.field("position", pa.int32(), nullable=False),       # t: the hidden state of input token x_t
    pa.field("token_id", pa.int32(), nullable=False),       # x_t (the INPUT token at t, not the predicted one)
    pa.field("token", pa.string(), nullable=False),
    pa.field("is_response", pa.bool_(), nullable=False),    # x_t belongs to the response
    pa.field("norm", f32),                                  # ||dL/dh_{l,t}||
])
ACTGRAD_VECTORS = table_schema("actgrad_vectors", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("target", pa.string(), nullable=False),        # the target as written
    pa.field("layer", pa.int16(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("token", pa.string(), nullable=False),
    pa.field("norm", f32),
    pa.field("vector", pa.list_(f32)),                      # dL/dh_{l,t}, float32, hidden size
])
ACTGRAD_TARGETS = table_schema("actgrad_targets", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("target", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),        # "found" or "skipped"
    pa.field("position", pa.int32()),                       # null when skipped
    pa.field("token", pa.string()),
    pa.field("reason", pa.string()),                        # why it was skipped ("" when found)
])
ACTGRAD_SAMPLES = table_schema("actgrad_samples", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("response", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("loss", f32),                                  # mean CE over the sample's response tokens
    pa.field("n_tokens", pa.int32()),
])

TABLES = (TableSpec("actgrad", ACTGRAD, "actgrad/norms.parquet"),
          TableSpec("actgrad_vectors", ACTGRAD_VECTORS, "actgrad/vectors.parquet"),
          TableSpec("actgrad_targets", ACTGRAD_TARGETS, "actgrad/targets.parquet"),
          TableSpec("actgrad_samples", ACTGRAD_SAMPLES, "actgrad/samples.parquet"))

JOB = JobSpec(
    name=KIND, help="gradients of the training loss w.r.t. every decoder layer's output, per position",
    config=ActgradConfig, entry="backend.grads.actgrad_run:run", tables=TABLES,
    analyses=("backend.analysis.actgrad",),
    launch_fields=("name", "run", "adapter_step", "model", "task", "samples", "layers", "targets", "loss"),
    path_fields=("run", "adapter", "runs_root"), model_fields=("model",),
    user_errors=("backend.lm.models:HubUnreachableError",),
)
