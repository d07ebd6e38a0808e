"""The ``probe`` job kind: per-token gradients of log p on one weight row, by entropy bucket, base vs trained.

    python -m backend probe --task arith --model default --adapter demo-sft-position --num-prompts 64 \
        --num-samples 8 --temperature 1.0 --layer -1 --param mlp.down_proj.weight --row 0 --per-bucket 8
    python -m backend probe ... --shard 0/4 --run-id myprobe.shard0     # one of 4 processes (one per GPU)
    python -m backend probe-merge RUN_DIR_0 RUN_DIR_1 ... --run-id myprobe   # concatenate, re-bucket globally

For each model (the base, and the base with ``adapter`` merged in), ``num_samples`` rollouts per prompt are
sampled, judged with the task's checker, and every generated token gets its entropy (float32, from the
sampling logits). Entropies are cut into ``n_buckets`` buckets by the model's global quantiles; up to
``per_bucket`` positions per bucket per rollout are picked (seeded), and each picked position t records
g_t = d log p(x_t) / d W[row], W the weight ``param`` of decoder layer ``layer`` (backend.probe.grads).

The config and the registry entry live here (no torch: the app builds the Launch form from them); the work is
``backend.probe.run.probe`` and the merge ``backend.probe.merge``. Tables (one row per ...): ``probe_rollouts``
(rollout), ``probe_tokens`` (generated token, with its bucket and, if picked, its vector), ``probe_vectors``
(recorded vector; ``vector_idx`` is its row in ``probe/vectors.npy``, float32 N x row_dim), ``probe_buckets``
(bucket boundaries per model). The analyses are in ``backend.analysis.probe``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

from backend.jobs.config import INF, POS, JobConfig, option
from backend.jobs.registry import JobSpec, TableSpec
from backend.lm.tasks import TASKS, get_task
from backend.store.schema import table_schema

VECTORS_FILE = "probe/vectors.npy"       # float32 (N, row_dim); row i is probe_vectors.vector_idx = i
MODELS = ("base", "trained")
_SHARD = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; ``""`` -> (0, 1) (no sharding). ValueError otherwise."""
    if spec == "":
        return 0, 1
    m = _SHARD.match(spec.strip())
    if not m:
        raise ValueError(f"shard {spec!r} is not allowed: write i/n with 0 <= i < n, e.g. 0/4 (or leave it empty)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {spec!r} is not allowed: need n >= 1 and 0 <= i < n (i from 0 to {max(n - 1, 0)})")
    return i, n


def shard_prompts(num_prompts: int, shard: str) -> list[int]:
    """The prompt indices shard ``i/n`` probes: i, i + n, i + 2n, ... (every prompt exactly once over 0..n-1)."""
    i, n = parse_shard(shard)
    return list(range(i, num_prompts, n))


@dataclass
class ProbeConfig(JobConfig):
    """Per-token gradients of log p on one weight row, by entropy bucket, for a base model and an adapter."""
    name: str = option("", "a short human name for the run (used in its id)")
    model: str = option("default", "'default' (the embedded tiny Qwen2), a local model directory, or a hub id")
    adapter: str = option("", "a train run (its directory or run id) whose adapter is probed too ('': base only)")
    task: str = option("arith", f"built-in task: {', '.join(TASKS)} (its held-out split gives the prompts)")
    task_params: dict = option({}, "task generator parameters, e.g. {p: 97} for modadd")
    data_seed: int = option(0, "seed of the task's split (the eval split of a train run with the same seed)")
    num_prompts: int = option(64, "prompts probed (all shards together)", range=(1, INF, False, True))
    num_samples: int = option(8, "rollouts sampled per prompt and model", range=(1, 1024, False, False))
    temperature: float = option(1.0, "sampling temperature (entropy and log p use softmax(z / temperature))",
                                range=POS)
    max_new_tokens: int = option(64, "generated tokens per rollout at most", range=(1, 4096, False, False))
    layer: int = option(-1, "decoder layer of the probed weight (negative: from the end)")
    param: str = option("mlp.down_proj.weight", "the probed weight: a Linear weight's name inside the layer")
    row: int = option(0, "the row of that weight (an output unit): g = d log p / d W[row]", range=(0, INF, False, True))
    n_buckets: int = option(5, "entropy buckets (global quantiles per model)", range=(2, 100, False, False))
    per_bucket: int = option(8, "positions picked per bucket per rollout at most", range=(1, 4096, False, False))
    seed: int = option(0, "seed of sampling and of the picked positions")
    shard: str = option("", "i/n: probe prompts i, i+n, ... (n processes at once; then probe-merge)")
    grad_chunk: int = option(32, "cotangents per batched backward (memory vs speed)", range=(1, 4096, False, False))
    chat_template: bool = option(True, "render prompts with the tokenizer's chat template when it has one")
    dtype: str = option("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16",
                        choices=("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"))
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    trust_remote_code: bool = option(False, "run model code from the hub (only if you trust it)")
    runs_root: str = option("", "where run directories go (default: <data root>/runs)")
    run_id: str = option("", "explicit run id (default: timestamp-kind-name-random)")

    def validate(self) -> None:
        get_task(self.task)
        parse_shard(self.shard)
        if not self.param or not self.param.endswith(".weight"):
            raise ValueError(f"param={self.param!r} must name a Linear weight inside the layer, "
                             "e.g. mlp.down_proj.weight or self_attn.q_proj.weight")


# ------------------------------------------------------------------------------------------------ tables
PROBE_ROLLOUTS = table_schema("probe_rollouts", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),          # "base" or "trained"
    pa.field("prompt_idx", pa.int32(), nullable=False),      # index in the task's held-out split
    pa.field("sample_idx", pa.int32(), nullable=False),      # 0..num_samples-1
    pa.field("prompt", pa.string()),
    pa.field("text", pa.string()),                           # the generated text, up to EOS
    pa.field("answer", pa.string()),
    pa.field("extracted", pa.string()),
    pa.field("correct", pa.bool_(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),        # generated tokens (EOS included)
    pa.field("mean_entropy", pa.float32()),
])

PROBE_TOKENS = table_schema("probe_tokens", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("prompt_idx", pa.int32(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),        # index among the generated tokens, from 0
    pa.field("token_id", pa.int32(), nullable=False),        # the sampled token
    pa.field("token", pa.string(), nullable=False),          # its decoded text
    pa.field("entropy", pa.float32(), nullable=False),       # of softmax(z / temperature), nats
    pa.field("bucket", pa.int16(), nullable=False),          # 0 (lowest entropy) .. n_buckets-1
    pa.field("picked", pa.bool_(), nullable=False),          # its gradient was recorded
    pa.field("vector_idx", pa.int32(), nullable=False),      # row in probe/vectors.npy, -1 if none
    pa.field("logp", pa.float32()),                          # log p of the token where its vector was computed
])

PROBE_VECTORS = table_schema("probe_vectors", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("vector_idx", pa.int32(), nullable=False),      # row in probe/vectors.npy
    pa.field("model", pa.string(), nullable=False),
    pa.field("prompt_idx", pa.int32(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("token_id", pa.int32(), nullable=False),
    pa.field("token", pa.string(), nullable=False),
    pa.field("bucket", pa.int16(), nullable=False),
    pa.field("entropy", pa.float32(), nullable=False),
    pa.field("correct", pa.bool_(), nullable=False),         # of the rollout
    pa.field("logp", pa.float32()),                          # log p of the token (the differentiated value)
    pa.field("norm", pa.float32()),                          # ||g||
])

PROBE_BUCKETS = table_schema("probe_buckets", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("bucket", pa.int16(), nullable=False),
    pa.field("lo", pa.float32()),                            # entropy >= lo (the first bucket: -inf)
    pa.field("hi", pa.float32()),                            # entropy < hi (the last bucket: +inf)
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("n_picked", pa.int32(), nullable=False),
])

JOB = JobSpec(
    name="probe", help="per-token gradients of log p on one weight row, by entropy bucket (base vs adapter)",
    config=ProbeConfig, entry="backend.probe.run:probe",
    tables=(TableSpec("probe_rollouts", PROBE_ROLLOUTS, "probe/rollouts.parquet"),
            TableSpec("probe_tokens", PROBE_TOKENS, "probe/tokens.parquet"),
            TableSpec("probe_vectors", PROBE_VECTORS, "probe/vectors.parquet"),
            TableSpec("probe_buckets", PROBE_BUCKETS, "probe/buckets.parquet")),
    analyses=("backend.analysis.probe",),
    launch_fields=("name", "model", "adapter", "task", "num_prompts", "num_samples", "temperature",
                   "max_new_tokens", "layer", "param", "row", "per_bucket"),
    path_fields=("runs_root", "adapter"), model_fields=("model",),      # the app confines both to its roots
    user_errors=("backend.lm.models:HubUnreachableError",),
)
