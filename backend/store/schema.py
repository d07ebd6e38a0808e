"""Parquet schemas of everything a run writes: the contract between jobs (writers) and the index (reader).

Every table carries ``run_id`` on every row and the schema version in the Parquet metadata
(key ``tokviz.schema_version``). Float values are float32. Adding a column is allowed (bump the version);
renaming or removing a key column is not.

Run directory layout (``<data root>/runs/<run_id>/``)::

    config.json                          the job's config, as saved by the job
    events.jsonl                         progress events, one JSON object a line
    train_steps/part_000000.rank0.parquet
    trace/tokens/step_000020.rank0.parquet
    trace/token_modules/step_000020.rank0.parquet
    trace/state/step_000020/            adapter + batch at that step (for ``verify``)
    eval/rank0.parquet                   per-sample eval predictions
    adapter/                             final LoRA adapter
    manifest.json                        written last: its presence means the run finished
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
VERSION_KEY = b"tokviz.schema_version"
TABLE_KEY = b"tokviz.table"


def table_schema(table: str, fields: list[pa.Field]) -> pa.Schema:
    """An Arrow schema carrying the table name and the schema version in its metadata (what ingest checks)."""
    return pa.schema(fields, metadata={VERSION_KEY: str(SCHEMA_VERSION).encode(), TABLE_KEY: table.encode()})


f32 = pa.float32()

TOKENS = table_schema("tokens", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),          # optimizer step at which the trace was taken
    pa.field("sample_idx", pa.int32(), nullable=False),    # index of the example in the task's train split
    pa.field("position", pa.int32(), nullable=False),      # t: predicts x_{t+1}
    pa.field("token_id", pa.int32(), nullable=False),      # the PREDICTED token x_{t+1}
    pa.field("token", pa.string(), nullable=False),        # its decoded text
    pa.field("category", pa.string(), nullable=False),     # backend.lm.categories
    pa.field("is_response", pa.bool_(), nullable=False),   # label not masked (-100)
    pa.field("loss", f32),                                 # -log p(x_{t+1} | x_<=t)
    pa.field("prob", f32),                                 # p(x_{t+1} | x_<=t)
    pa.field("entropy", f32),                              # entropy of the predictive distribution (nats)
    pa.field("weight", f32),                               # scheme weight w_t (0 for prompt positions)
    pa.field("mode", pa.string(), nullable=False),         # "position" or "token"
    pa.field("alignment", f32),
    pa.field("dot", f32),
    pa.field("share", f32),                                # position mode: dot / ||G||^2
    pa.field("magnitude", f32),
    pa.field("magnitude_estimated", pa.bool_()),           # token mode: magnitude from k random JVPs
    pa.field("rank", pa.int16()),                          # DDP rank that traced the row
])

TOKEN_MODULES = table_schema("token_modules", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("layer", pa.int16(), nullable=False),
    pa.field("module", pa.string(), nullable=False),       # q_proj, k_proj, ..., down_proj
    pa.field("part", pa.string(), nullable=False),         # lora_A or lora_B
    pa.field("alignment", f32),
    pa.field("dot", f32),
    pa.field("magnitude", f32),
])

# influence on held-out loss at traced steps (--influence-eval N): backend.trace.influence, written next to (and
# before) the step's tokens shards, same rows and keys
INFLUENCE = table_schema("influence", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("influence", f32),                            # <P_s, G_eval> (position) or <g_t, G_eval> (token)
    pa.field("influence_alignment", f32),                  # influence / (magnitude ||G_eval||)
    pa.field("rank", pa.int16()),
])

INFLUENCE_MODULES = table_schema("influence_modules", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("layer", pa.int16(), nullable=False),
    pa.field("module", pa.string(), nullable=False),
    pa.field("part", pa.string(), nullable=False),
    pa.field("influence", f32),                            # the module's piece (part of g_t) against G_eval_m
    pa.field("influence_alignment", f32),                  # / (its magnitude ||G_eval_m||); null when negligible
])

INFLUENCE_STEPS = table_schema("influence_steps", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("rank", pa.int16(), nullable=False),
    pa.field("eval_examples", pa.int32()),
    pa.field("eval_tokens", pa.int32()),
    pa.field("eval_loss", f32),                            # mean eval cross-entropy over response tokens
    pa.field("eval_grad_norm", f32),                       # ||G_eval||
    pa.field("g_dot_eval", f32),                           # <G, G_eval>: -lr x this = first-order eval loss change
    pa.field("eval_cosine", f32),                          # cos(G, G_eval)
    pa.field("influence_sum_rel_err", f32),                # built-in check (backend.trace.core._influence)
])

# per-position gradient sketches at traced steps (--trace-sketch-dim k, position mode): backend.trace.sketch. The
# sketch is stored as a unit vector in float16 (2 bytes a value; unit scale keeps it clear of float16's subnormal
# range, where raw sketch values of small pieces would lose digits) and its norm in float32:
# <sk, sk'> = sketch_norm * sketch_norm' * (sketch . sketch') estimates <P, P'>. DuckDB reads float16 as FLOAT[].
TOKEN_SKETCHES = table_schema("token_sketches", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("position", pa.int32(), nullable=False),
    pa.field("rank", pa.int16()),
    pa.field("sketch", pa.list_(pa.float16())),            # sk(P_s) / ||sk(P_s)|| (null when the piece is zero)
    pa.field("sketch_norm", f32),                          # ||sk(P_s)||: estimates ||P_s|| (the magnitude)
])

TRAIN_STEPS = table_schema("train_steps", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),          # 1-based optimizer step
    pa.field("loss", f32),                                 # the scheme's weighted loss, mean over micro-batches
    pa.field("ce_loss", f32),                              # plain cross-entropy on the same tokens
    pa.field("lr", f32),
    pa.field("grad_norm", f32),                            # before clipping
    pa.field("tokens", pa.int32()),                        # response tokens in the step (all ranks)
    pa.field("tokens_per_s", f32),
    pa.field("elapsed_s", f32),
])

EVAL = table_schema("eval", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),    # index in the eval split
    pa.field("sample_k", pa.int16(), nullable=False),      # -1: greedy; 0..k-1: temperature samples
    pa.field("prediction", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("extracted", pa.string()),
    pa.field("correct", pa.bool_()),
])

# eval at intermediate steps of a train run (--eval-every N, backend.lm.eval_steps): the eval table's protocol
EVAL_STEPS = table_schema("eval_steps", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),          # optimizer steps done when evaluated
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("sample_k", pa.int16(), nullable=False),
    pa.field("prediction", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("extracted", pa.string()),
    pa.field("correct", pa.bool_()),
])

# embedding token gradients of a train run (--embgrad-every N): backend.grads.embgrad, docs/design.md's definitions
EMBGRAD = table_schema("embgrad", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),          # optimizer step recorded
    pa.field("token_id", pa.int32(), nullable=False),      # vocabulary token v (only those with n_v > 0)
    pa.field("token", pa.string(), nullable=False),        # its decoded text
    pa.field("count", pa.int32()),                         # occurrences in the step's (rank 0) batch
    pa.field("norm", f32),                                 # n_v = ||dL/dE_v||
])

EMBGRAD_STEPS = table_schema("embgrad_steps", [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("n_vocab", pa.int32()),                       # rows of the embedding matrix
    pa.field("n_with_grad", pa.int32()),                   # tokens with n_v > 0
    pa.field("max_norm", f32),
    pa.field("gradient_sparsity", f32),                    # fraction of the vocabulary with n_v < 1% of max
    pa.field("gradient_gini", f32),                        # Gini of n over the vocabulary
    pa.field("tokens_for_50pct", pa.int32()),              # tokens, largest n_v^2 first, for 50% of sum n_v^2
    pa.field("tokens_for_90pct", pa.int32()),
    pa.field("concentration_ratio", f32),                  # tokens_for_50pct / n_with_grad
    pa.field("stride", pa.int16()),                        # 0: no stride metrics
    pa.field("stride_group_variance", f32),
    pa.field("stride_group_max_ratio", f32),
])



def schema_version_of(schema: pa.Schema) -> int | None:
    """The tokviz schema version stored in a Parquet file's schema metadata, or None if absent."""
    meta = schema.metadata or {}
    raw = meta.get(VERSION_KEY)
    return int(raw) if raw is not None else None
