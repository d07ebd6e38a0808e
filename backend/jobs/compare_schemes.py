"""The ``compare-schemes`` job kind: one train run per (scheme, seed), everything else identical, evaluated with
one protocol, and a results table with paired-bootstrap intervals against a baseline scheme.

    python -m backend compare-schemes --task arith --schemes sft,topk,antiop,lr --seeds 3 --steps 300 \\
        --trace-every 50 --eval-k 4
    python -m backend compare-schemes ... --json          # the manifest: per scheme mean, ci_low, ci_high, delta
    python -m backend compare-schemes ... --eval-every 50   # also accuracy at steps 50, 100, ... (every child)
    TOKVIZ_MAX_JOBS=2 python -m backend compare-schemes ...          # two child runs at a time
    python -m backend compare-schemes ... --devices 0,1              # child runs placed on GPUs 0 and 1

Every ``train`` flag is a flag here too (the fields below are generated from ``TrainConfig``) and applies to every
child run; ``scheme``, ``scheme_params`` and ``seed`` are replaced by ``schemes``, ``scheme_params`` (per scheme)
and ``seeds``; ``dataset`` is left out (a user dataset has no answer checker, so no accuracy to compare). Seed j of every scheme has the same LoRA init, data order and eval sampling stream
(backend.lm.trainer: ``seed`` drives all three); ``data_seed`` fixes the train/eval split for all runs.

A child run's id is ``<name>-<scheme>-s<seed>-<hash>`` (``cmp`` without a name), the hash taken over its train
config (name, run id and runs root aside), so running a comparison again with the same name and settings (from
the CLI or the Schemes form, whatever the comparison's own id) reuses the child runs that finished and
restarts those that failed (from their checkpoint when they have one). The comparison's own run directory holds
``compare_runs`` (its children: the parent -> child grouping the index shows) and ``compare_results`` (the
table). No torch here: the app builds the Schemes form from this module; the work is in
``backend.jobs.compare_schemes_run``.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import MISSING, field, fields, make_dataclass

import pyarrow as pa

from backend.jobs.config import JobConfig, option
from backend.jobs.registry import JobSpec, TableSpec
from backend.jobs.train import JOB as TRAIN_JOB
from backend.jobs.train import TrainConfig
from backend.lm import scheme_specs
from backend.store.rundir import check_run_id
from backend.store.schema import f32, table_schema

KIND = "compare-schemes"
# TrainConfig fields a comparison sets per child run (or for itself) rather than passing through
PER_RUN = ("name", "scheme", "scheme_params", "seed", "runs_root", "run_id")
# train fields a comparison does not offer: a user dataset has no answer checker, so nothing to compare on
NOT_OFFERED = ("dataset",)
# train fields whose value does not change what a run computes: left out of a child's settings hash
NOT_HASHED = ("name", "run_id", "runs_root", "log_every")
# TrainConfig's fields when child ids were introduced: always hashed. A train field added since is hashed only
# when it differs from its default, so adding one leaves the ids of runs made before it (the shipped demo's, a
# user's finished runs) as they were: running their comparison again still reuses them
HASHED_ALWAYS = frozenset((
    "attn_implementation", "batch_size", "chat_template", "checkpoint_every", "data_seed", "dataset", "device",
    "dtype", "embgrad_every", "embgrad_stride", "eval_batch_size", "eval_before", "eval_k", "eval_max_new_tokens",
    "eval_temperature", "grad_accum", "lora_alpha", "lora_dropout", "lora_r", "lora_targets", "lr", "lr_schedule",
    "max_grad_norm", "max_len", "model", "n_eval", "n_train", "scheme", "scheme_params", "seed", "steps", "task",
    "task_params", "trace_every", "trace_inline", "trace_loss", "trace_magnitude", "trace_mode", "trace_sequences",
    "trace_sketch_k", "trust_remote_code", "warmup_steps", "weight_decay"))
# defaults that differ from train's: a comparison evaluates both greedily and by sampling
DEFAULTS = {"eval_k": 4}


def _copy(f) -> object:
    kw = {"metadata": f.metadata}
    default = DEFAULTS.get(f.name, MISSING)
    if default is not MISSING:
        kw["default"] = default
    elif f.default is not MISSING:
        kw["default"] = f.default
    else:
        kw["default_factory"] = f.default_factory
    return field(**kw)


_OWN = [
    ("name", "str", option("", "a short human name for the comparison (its runs are named <name>-<scheme>-s<seed>)")),
    ("schemes", "list", option(["sft", "topk", "antiop", "lr"],
                               f"schemes to compare, comma separated: {', '.join(scheme_specs.SCHEMES)}")),
    ("baseline", "str", option("sft", "the scheme every other one is compared against (must be in schemes)")),
    ("seeds", "int", option(3, "seeds per scheme (seeds first_seed .. first_seed + seeds - 1)", range=(1, 1000, False, False))),
    ("first_seed", "int", option(0, "the first seed")),
    ("scheme_params", "dict", option({}, "per-scheme parameters, e.g. {antiop: {clip_mult: 2}} (defaults otherwise)")),
    ("devices", "list", option([], "GPU indices to place child runs on, round robin (CUDA_VISIBLE_DEVICES per run); "
                                   "empty: as train's `device` says")),
    ("parallel", "int", option(0, "child runs at a time (0: TOKVIZ_MAX_JOBS, default 1)", range=(0, 64, False, False))),
    ("n_boot", "int", option(2000, "bootstrap replicates for the intervals", range=(100, 1_000_000, False, False))),
]
_TRAIN = [(f.name, f.type, _copy(f)) for f in fields(TrainConfig) if f.name not in PER_RUN + NOT_OFFERED]
_TAIL = [("runs_root", "str", option("", "where the comparison and its runs go (default: <data root>/runs)")),
         ("run_id", "str", option("", "explicit run id of the comparison (default: timestamp-kind-name-random)"))]


def _validate(self) -> None:
    """Schemes known and distinct, the baseline among them, per-scheme parameters valid, a task with an answer
    checker and both eval protocols on; every child's TrainConfig is built once here so its own checks run."""
    if not self.schemes:
        raise ValueError("schemes: name at least two schemes to compare, e.g. sft,topk")
    for s in self.schemes:
        if s not in scheme_specs.SCHEMES:
            raise ValueError(f"schemes: unknown scheme {s!r}; available: {', '.join(scheme_specs.SCHEMES)}")
    if len(set(self.schemes)) != len(self.schemes):
        raise ValueError(f"schemes: each scheme once, got {self.schemes}")
    if len(self.schemes) < 2:
        raise ValueError(f"schemes: a comparison needs at least two schemes, got {self.schemes}")
    if self.baseline not in self.schemes:
        raise ValueError(f"baseline {self.baseline!r} must be one of the schemes {self.schemes}")
    extra = sorted(set(self.scheme_params) - set(self.schemes))
    if extra:
        raise ValueError(f"scheme_params: {extra} are not among the schemes {self.schemes}")
    if any(not isinstance(v, dict) for v in self.scheme_params.values()):
        raise ValueError("scheme_params: a mapping of scheme -> {parameter: value}, e.g. {antiop: {clip_mult: 2}}")
    for d in self.devices:
        if not str(d).isdigit():
            raise ValueError(f"devices: GPU indices such as 0,1, got {d!r}")
    if self.n_eval < 1:
        raise ValueError("n_eval: a comparison needs held-out items (n_eval >= 1)")
    if self.eval_k < 1:
        raise ValueError("eval_k: a comparison reports sampled accuracy too (eval_k >= 1 samples per item)")
    for s in self.schemes:           # every child config is valid, or the comparison is refused up front
        child_config(self, s, self.first_seed)


CompareSchemesConfig = make_dataclass(
    "CompareSchemesConfig", _OWN + _TRAIN + _TAIL, bases=(JobConfig,), namespace={"validate": _validate})
CompareSchemesConfig.__module__ = __name__
CompareSchemesConfig.__doc__ = ("Train every scheme with every seed, everything else identical, and compare "
                                "their accuracy on the same held-out items with intervals.")


def seeds_of(cfg) -> list[int]:
    return list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))


def child_config(cfg, scheme: str, seed: int) -> TrainConfig:
    """The train config of the run (scheme, seed): the comparison's train settings, with this scheme, its
    parameters and this seed, and its deterministic run id (``child_run_id``)."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if f.name not in PER_RUN + NOT_OFFERED}
    base = f"{cfg.name}-" if cfg.name else ""
    child = TrainConfig(**shared, scheme=scheme, scheme_params=dict(cfg.scheme_params.get(scheme, {})), seed=seed,
                        name=f"{base}{scheme}-s{seed}", runs_root=cfg.runs_root)
    child.run_id = child_run_id(child, cfg.name)
    return child


def settings_hash(child: TrainConfig) -> str:
    """sha256 (12 hex digits) of what a train run computes from: its config without NOT_HASHED fields, and
    without fields added since HASHED_ALWAYS that are at their default."""
    defaults = TrainConfig().to_dict()
    d = {k: v for k, v in child.to_dict().items()
         if k not in NOT_HASHED and (k in HASHED_ALWAYS or v != defaults.get(k))}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def child_run_id(child: TrainConfig, prefix: str = "") -> str:
    """``<prefix>-<scheme>-s<seed>-<settings hash>``; prefix: the comparison's name (slugged) or ``cmp``."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", prefix).strip("-_")[:40] or "cmp"
    return check_run_id(f"{slug}-{child.scheme}-s{child.seed}-{settings_hash(child)}")


def plan(cfg) -> list[TrainConfig]:
    """Every child run, seed-major (seed 0 of every scheme first: a paired comparison is there early)."""
    return [child_config(cfg, s, seed) for seed in seeds_of(cfg) for s in cfg.schemes]


# ------------------------------------------------------------------------------------------------ tables
COMPARE_RUNS = table_schema("compare_runs", [
    pa.field("run_id", pa.string(), nullable=False),          # the comparison
    pa.field("child_run_id", pa.string(), nullable=False),    # one of its train runs
    pa.field("scheme", pa.string(), nullable=False),
    pa.field("seed", pa.int32(), nullable=False),
    pa.field("status", pa.string()),                          # planned, reused, finished, failed, cancelled
    pa.field("device", pa.string()),                          # CUDA_VISIBLE_DEVICES of the run ("" = default)
    pa.field("greedy_accuracy", f32),                         # exact match, temperature 0
    pa.field("sampled_accuracy", f32),                        # mean over eval_k samples at eval_temperature
    pa.field("seconds", f32),                                 # wall time of the run in this comparison (0: reused)
])

COMPARE_RESULTS = table_schema("compare_results", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("scheme", pa.string(), nullable=False),
    pa.field("metric", pa.string(), nullable=False),          # "greedy" or "sampled"
    pa.field("mean", f32),                                    # over seeds and items
    pa.field("ci_low", f32),
    pa.field("ci_high", f32),
    pa.field("delta", f32),                                   # mean - baseline's mean
    pa.field("delta_low", f32),
    pa.field("delta_high", f32),
    pa.field("verdict", pa.string()),                         # better / worse / not distinguishable / baseline
    pa.field("n_seeds", pa.int32()),
    pa.field("n_items", pa.int32()),
])

RUNS_TABLE = TableSpec("compare_runs", COMPARE_RUNS, "compare/runs.parquet")
RESULTS_TABLE = TableSpec("compare_results", COMPARE_RESULTS, "compare/results.parquet")

JOB = JobSpec(
    name=KIND, help="train several schemes x seeds with one protocol and compare their accuracy",
    config=CompareSchemesConfig, entry="backend.jobs.compare_schemes_run:run",
    tables=(RUNS_TABLE, RESULTS_TABLE),
    launch_fields=("name", "schemes", "baseline", "seeds", "model", "task", "task_params", "n_train", "n_eval",
                   "steps", "batch_size", "lr", "eval_k", "eval_temperature", "eval_every", "trace_every",
                   "trace_mode"),
    hidden_fields=("runs_root", "run_id"), path_fields=("runs_root", "influence_file"), model_fields=("model",),
    user_errors=TRAIN_JOB.user_errors + ("backend.jobs.compare_schemes_run:ChildRunsFailed",),
)
