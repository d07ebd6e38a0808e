"""Every SQL statement tokviz runs against its DuckDB index, as named constants with ``?`` parameters.

    from backend import sql
    con.execute(sql.SAMPLE_TOKENS, [run_id, step, sample_idx]).df()

Nothing else in the project writes SQL text; values are always bound as parameters, never formatted in.
The tables mirror ``backend.schema`` (the Parquet contract) so the DDL is derived from it here; the index adds
``runs``, ``files`` and ``meta`` plus one derived column, ``tokens.resp_pos`` (position within the response,
0 = first response token, NULL for prompt positions).

Index schema versions (``meta.schema_version``): bump ``INDEX_VERSION`` on any change of the tables below
and add the statements that take an index from the previous version to ``MIGRATIONS``; an index older than
the oldest migration is rebuilt from the run directories.

Version 2 added the per-step aggregates of ``token_modules`` (``agg_*``), filled at ingest: the module-level
analyses read a few hundred rows from them instead of scanning millions (an index of version 1 is rebuilt).
"""
from __future__ import annotations

import pyarrow as pa

from backend import schema

INDEX_VERSION = 2

# from-version -> statements that turn an index of that version into one of version + 1
MIGRATIONS: dict[int, tuple[str, ...]] = {}

_DUCK_TYPES = {pa.string(): "VARCHAR", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
               pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}


def _columns(s: pa.Schema) -> list[str]:
    return [f.name for f in s]


def _create(table: str, s: pa.Schema, extra: str = "") -> str:
    cols = [f"{f.name} {_DUCK_TYPES[f.type]}{'' if f.nullable else ' NOT NULL'}" for f in s]
    return f"CREATE TABLE {table} ({', '.join(cols)}{extra})"


# ------------------------------------------------------------------------------------------------ schema
DATA_TABLES = ("tokens", "token_modules", "train_steps", "eval")   # read from Parquet, keyed by run_id
AGG_TABLES = ("agg_layer_module", "agg_module_types", "agg_lora_ab")   # derived at ingest, keyed by run_id
INDEX_TABLES = ("meta", "runs", "files") + DATA_TABLES + AGG_TABLES

CREATE_META = "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)"
CREATE_RUNS = """CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY, kind VARCHAR, name VARCHAR, status VARCHAR NOT NULL, model VARCHAR,
    dataset VARCHAR, scheme VARCHAR, created_at VARCHAR, finished_at VARCHAR, path VARCHAR NOT NULL,
    schema_version INTEGER, fingerprint VARCHAR NOT NULL, ingested_at VARCHAR NOT NULL,
    n_traced_steps INTEGER, n_tokens BIGINT, n_token_modules BIGINT, n_train_steps BIGINT, n_eval BIGINT,
    config_json VARCHAR, manifest_json VARCHAR)"""
CREATE_FILES = """CREATE TABLE files (
    run_id VARCHAR NOT NULL, relpath VARCHAR NOT NULL, table_name VARCHAR NOT NULL, n_bytes BIGINT,
    mtime_ns BIGINT)"""
CREATE_TOKENS = _create("tokens", schema.TOKENS, ", resp_pos INTEGER")
CREATE_TOKEN_MODULES = _create("token_modules", schema.TOKEN_MODULES)
CREATE_TRAIN_STEPS = _create("train_steps", schema.TRAIN_STEPS)
CREATE_EVAL = _create("eval", schema.EVAL)
# Per-step aggregates of token_modules, one row per (run, step, group), computed at ingest by the AGG_FILL
# statements below: what the module-level analyses used to compute from the raw rows on every view.
CREATE_AGG_LAYER_MODULE = """CREATE TABLE agg_layer_module (
    run_id VARCHAR NOT NULL, step INTEGER NOT NULL, layer SMALLINT NOT NULL, module VARCHAR NOT NULL,
    dot_sum DOUBLE, mean_alignment DOUBLE, mean_magnitude DOUBLE, n BIGINT NOT NULL)"""
CREATE_AGG_MODULE_TYPES = """CREATE TABLE agg_module_types (
    run_id VARCHAR NOT NULL, step INTEGER NOT NULL, module VARCHAR NOT NULL, part VARCHAR NOT NULL,
    n BIGINT NOT NULL, mean_alignment DOUBLE, std_alignment DOUBLE, frac_negative DOUBLE, mean_magnitude DOUBLE,
    dot_sum DOUBLE)"""
CREATE_AGG_LORA_AB = """CREATE TABLE agg_lora_ab (
    run_id VARCHAR NOT NULL, step INTEGER NOT NULL, layer VARCHAR NOT NULL, part VARCHAR NOT NULL,
    mean_magnitude DOUBLE, n BIGINT NOT NULL)"""
CREATE_ALL = (CREATE_META, CREATE_RUNS, CREATE_FILES, CREATE_TOKENS, CREATE_TOKEN_MODULES, CREATE_TRAIN_STEPS,
              CREATE_EVAL, CREATE_AGG_LAYER_MODULE, CREATE_AGG_MODULE_TYPES, CREATE_AGG_LORA_AB)
# DROP statements cannot take parameters; the names come from INDEX_TABLES, never from input.
DROP_TABLE = {t: f"DROP TABLE IF EXISTS {t}" for t in INDEX_TABLES}

# session settings: a library must not draw progress bars on the user's terminal; a locked-down connection
# reads files only below the allowed directories (set them first: the lock-down cannot be undone)
SET_NO_PROGRESS_BAR = "SET enable_progress_bar = false"
SET_ALLOWED_DIRECTORIES = "SET allowed_directories = ?"
SET_NO_EXTERNAL_ACCESS = "SET enable_external_access = false"
SET_THREADS = "SET threads = ?"

LIST_TABLES = "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'"
GET_META = "SELECT value FROM meta WHERE key = ?"
SET_META = "INSERT OR REPLACE INTO meta VALUES (?, ?)"
RUN_PATHS = "SELECT run_id, path FROM runs"

# ------------------------------------------------------------------------------------------------ ingest
RUN_FINGERPRINT = "SELECT fingerprint, path FROM runs WHERE run_id = ?"
DELETE_RUN_ROWS = {t: f"DELETE FROM {t} WHERE run_id = ?" for t in DATA_TABLES + AGG_TABLES + ("files", "runs")}

# (file_name, value) of one metadata key over a list of Parquet files; reads footers only
PARQUET_KV = ("SELECT file_name, decode(value) AS value FROM parquet_kv_metadata(?) "
              "WHERE decode(key) = ?")


def _insert_from_parquet(table: str, s: pa.Schema, extra_cols: str = "", extra_select: str = "") -> str:
    """INSERT ... SELECT from a list of Parquet files (parameter 2), checking every row's run_id against
    parameter 1: a row of another run raises, naming the file."""
    cols = _columns(s)
    select = ", ".join(
        "CASE WHEN run_id = ?::VARCHAR THEN run_id ELSE error('row with run_id ' || run_id || ' in ' || filename"
        " || ' does not belong to this run') END" if c == "run_id" else c for c in cols)
    return (f"INSERT INTO {table} ({', '.join(cols)}{extra_cols}) SELECT {select}{extra_select} "
            f"FROM read_parquet(?, filename = true)")


INSERT_FROM_PARQUET = {
    # resp_pos: position - first response position of the (step, sample); NULL for prompt rows
    "tokens": _insert_from_parquet(
        "tokens", schema.TOKENS, ", resp_pos",
        ", CASE WHEN is_response THEN position - min(position) FILTER (WHERE is_response) "
        "OVER (PARTITION BY step, sample_idx) END"),
    "token_modules": _insert_from_parquet("token_modules", schema.TOKEN_MODULES),
    "train_steps": _insert_from_parquet("train_steps", schema.TRAIN_STEPS),
    "eval": _insert_from_parquet("eval", schema.EVAL),
}
# token_modules rows of response positions (every traced step of one run: parameters run_id, run_id)
_RESPONSE_MODULE_ROWS_ALL_STEPS = """SELECT m.* FROM token_modules m SEMI JOIN (
        SELECT step, sample_idx, position FROM tokens WHERE run_id = ? AND is_response) r
    ON m.step = r.step AND m.sample_idx = r.sample_idx AND m.position = r.position
    WHERE m.run_id = ?"""
# The aggregates of one run (parameter: run_id, as many times as there are ?), after its tokens and
# token_modules rows are in. Definitions (module shares of the update use every traced position; the
# module-type and LoRA A/B statistics use response tokens):
AGG_FILL = {
    # per (step, layer, module), both LoRA parts, every traced position
    "agg_layer_module": """INSERT INTO agg_layer_module
SELECT run_id, step, layer, module, sum(dot), avg(alignment), avg(magnitude), count(*)
FROM token_modules WHERE run_id = ? GROUP BY run_id, step, layer, module""",
    # per (step, module type, LoRA part), over all layers and response tokens
    "agg_module_types": f"""INSERT INTO agg_module_types
WITH m AS ({_RESPONSE_MODULE_ROWS_ALL_STEPS})
SELECT run_id, step, module, part, count(*), avg(alignment), stddev_samp(alignment),
    avg(CASE WHEN alignment < 0 THEN 1.0 ELSE 0.0 END), avg(magnitude), sum(dot)
FROM m GROUP BY run_id, step, module, part""",
    # per (step, layer, part): the norm of a response token's piece in that layer (over its modules), averaged
    # over tokens; the 'all' rows take the norm over every layer
    "agg_lora_ab": f"""INSERT INTO agg_lora_ab
WITH m AS ({_RESPONSE_MODULE_ROWS_ALL_STEPS}),
per_tok AS (SELECT run_id, step, sample_idx, position, layer, part, sum(magnitude * magnitude) AS sq
            FROM m GROUP BY ALL)
SELECT run_id, step, CAST(layer AS VARCHAR), part, avg(sqrt(sq)), count(*) FROM per_tok
GROUP BY run_id, step, layer, part
UNION ALL
SELECT run_id, step, 'all', part, avg(sqrt(sq)), count(*)
FROM (SELECT run_id, step, sample_idx, position, part, sum(sq) AS sq FROM per_tok GROUP BY ALL)
GROUP BY run_id, step, part""",
}
INSERT_FILE = "INSERT INTO files VALUES (?, ?, ?, ?, ?)"
INSERT_RUN = f"INSERT INTO runs VALUES ({', '.join(['?'] * 20)})"
COUNT_TRACED_STEPS = "SELECT count(DISTINCT step) FROM tokens WHERE run_id = ?"

# ------------------------------------------------------------------------------------------------ queries
LIST_RUNS = """SELECT run_id, name, kind, status, model, dataset, scheme, created_at, finished_at,
    n_traced_steps, n_tokens, n_token_modules, n_train_steps, path, ingested_at
FROM runs ORDER BY created_at DESC, run_id"""
RUN_INFO = "SELECT * FROM runs WHERE run_id = ?"
RUN_IDS = "SELECT run_id FROM runs ORDER BY run_id"
TRACED_STEPS = "SELECT DISTINCT step FROM tokens WHERE run_id = ? ORDER BY step"
RUN_STEPS = """SELECT step, count(DISTINCT sample_idx) AS n_samples, count(*) AS n_tokens,
    count(*) FILTER (WHERE is_response) AS n_response,
    avg(alignment) FILTER (WHERE is_response) AS mean_alignment,
    avg(loss) FILTER (WHERE is_response) AS mean_loss, sum(share) AS share_sum, any_value(mode) AS mode
FROM tokens WHERE run_id = ? GROUP BY step ORDER BY step"""
STEP_SAMPLES = """SELECT sample_idx, count(*) AS n_tokens, count(*) FILTER (WHERE is_response) AS n_response,
    avg(alignment) FILTER (WHERE is_response) AS mean_alignment,
    avg(CASE WHEN alignment < 0 THEN 1.0 ELSE 0.0 END) FILTER (WHERE is_response) AS opposing_fraction,
    avg(loss) FILTER (WHERE is_response) AS mean_loss, sum(share) AS share_sum,
    left(string_agg(token, '' ORDER BY position), ?) AS preview
FROM tokens WHERE run_id = ? AND step = ? GROUP BY sample_idx ORDER BY sample_idx"""
SAMPLE_TOKENS = """SELECT position, resp_pos, token_id, token, category, is_response, loss, prob, entropy, weight,
    mode, alignment, dot, share, magnitude, magnitude_estimated, rank
FROM tokens WHERE run_id = ? AND step = ? AND sample_idx = ? ORDER BY position"""
TOKEN_BREAKDOWN = """SELECT layer, module, part, alignment, dot, magnitude FROM token_modules
WHERE run_id = ? AND step = ? AND sample_idx = ? AND position = ? ORDER BY layer, module, part"""
# per (position, layer) of one sample: the layer's piece summed over modules and parts
SAMPLE_LAYER_PROFILE = """SELECT position, layer, sum(dot) AS dot, sqrt(sum(magnitude * magnitude)) AS magnitude,
    avg(alignment) AS mean_alignment
FROM token_modules WHERE run_id = ? AND step = ? AND sample_idx = ?
GROUP BY position, layer ORDER BY position, layer"""
SEARCH_SAMPLES = """WITH s AS (
    SELECT step, sample_idx, string_agg(token, '' ORDER BY position) AS text,
        avg(alignment) FILTER (WHERE is_response) AS mean_alignment, count(*) AS n_tokens
    FROM tokens WHERE run_id = ? AND (?::INTEGER IS NULL OR step = ?) GROUP BY step, sample_idx)
SELECT step, sample_idx, n_tokens, mean_alignment, text FROM s
WHERE contains(lower(text), lower(?)) ORDER BY step, sample_idx LIMIT ?"""
# every token of one traced step (all traced sequences): what a scheme's batch statistics would see
STEP_TOKEN_STATS = """SELECT sample_idx, position, is_response, loss, entropy FROM tokens
WHERE run_id = ? AND step = ? ORDER BY sample_idx, position"""
TRAIN_STEPS = """SELECT step, loss, ce_loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s
FROM train_steps WHERE run_id = ? ORDER BY step"""
EVAL_ROWS = """SELECT sample_idx, sample_k, prediction, answer, extracted, correct
FROM eval WHERE run_id = ? ORDER BY sample_idx, sample_k"""

# ------------------------------------------------------------------------------------------------ analyses
# Token-level statistics use response tokens; module shares of the update (LAYER_MODULE_AT_STEP) use every
# traced position, since the pieces of all positions sum to the batch gradient.
ALIGNMENT_EVOLUTION = """SELECT step, count(*) AS n, avg(alignment) AS mean, stddev_samp(alignment) AS std,
    quantile_cont(alignment, 0.1) AS p10, quantile_cont(alignment, 0.5) AS p50,
    quantile_cont(alignment, 0.9) AS p90, avg(CASE WHEN alignment < 0 THEN 1.0 ELSE 0.0 END) AS frac_negative
FROM tokens WHERE run_id = ? AND is_response AND alignment IS NOT NULL GROUP BY step ORDER BY step"""
PROMPT_VS_RESPONSE = """SELECT CASE WHEN is_response THEN 'response' ELSE 'prompt' END AS "group", count(*) AS n,
    avg(alignment) AS mean_alignment, stddev_samp(alignment) AS std_alignment,
    avg(CASE WHEN alignment < 0 THEN 1.0 ELSE 0.0 END) AS frac_negative, avg(magnitude) AS mean_magnitude,
    sum(share) AS share_sum, sum(dot) AS dot_sum
FROM tokens WHERE run_id = ? AND step = ? GROUP BY ALL"""
LAYER_MODULE_AT_STEP = """SELECT layer, module, dot_sum, mean_alignment, mean_magnitude, n
FROM agg_layer_module WHERE run_id = ? AND step = ? ORDER BY layer, module"""
MAGNITUDE_TRACED = """SELECT step, count(*) AS n, avg(magnitude) AS mean, quantile_cont(magnitude, 0.5) AS median,
    quantile_cont(magnitude, 0.9) AS p90, sqrt(sum(magnitude * magnitude)) AS rss
FROM tokens WHERE run_id = ? AND is_response AND magnitude IS NOT NULL GROUP BY step ORDER BY step"""
# position mode: the pieces of all positions sum to G, so sum of dots = ||G||^2
BATCH_GRAD_NORM = """SELECT step, sqrt(greatest(sum(dot), 0)) AS batch_grad_norm FROM tokens
WHERE run_id = ? AND mode = 'position' GROUP BY step ORDER BY step"""
RESPONSE_TOKENS_AT_STEP = """SELECT sample_idx, position, resp_pos, token, category, alignment, magnitude, dot,
    share, loss, prob
FROM tokens WHERE run_id = ? AND step = ? AND is_response ORDER BY sample_idx, position"""
# narrower reads of the same rows, for analyses that need a column or three (no token text to convert)
RESPONSE_MAGNITUDES_AT_STEP = "SELECT magnitude FROM tokens WHERE run_id = ? AND step = ? AND is_response"
RESPONSE_POSITIONS_AT_STEP = """SELECT resp_pos, alignment, magnitude FROM tokens
WHERE run_id = ? AND step = ? AND is_response"""
RESPONSE_SEQUENCES_AT_STEP = """SELECT sample_idx, alignment FROM tokens
WHERE run_id = ? AND step = ? AND is_response ORDER BY sample_idx, position"""
ALL_TOKENS_AT_STEP = """SELECT sample_idx, position, resp_pos, token, category, is_response, alignment,
    magnitude, loss, prob
FROM tokens WHERE run_id = ? AND step = ? ORDER BY sample_idx, position"""
MAX_RESP_POS = "SELECT max(resp_pos) FROM tokens WHERE run_id = ? AND (?::INTEGER IS NULL OR step = ?)"
STEP_POSITION = """SELECT step, (resp_pos // ?) * ? AS bin_start, count(*) AS n, avg(alignment) AS mean_alignment
FROM tokens WHERE run_id = ? AND is_response AND alignment IS NOT NULL
GROUP BY ALL ORDER BY step, bin_start"""
CATEGORY_AT_STEP = """SELECT category, count(*) AS n, avg(alignment) AS mean_alignment,
    stddev_samp(alignment) AS std_alignment, avg(CASE WHEN alignment < 0 THEN 1.0 ELSE 0.0 END) AS frac_negative,
    avg(magnitude) AS mean_magnitude, sum(share) AS share_sum, avg(loss) AS mean_loss
FROM tokens WHERE run_id = ? AND step = ? AND is_response GROUP BY category ORDER BY mean_alignment"""
# per layer and part (and 'all' layers): see AGG_FILL["agg_lora_ab"]
LORA_AB = """SELECT layer, part, mean_magnitude, n FROM agg_lora_ab WHERE run_id = ? AND step = ?"""
# per (module type, LoRA part): see AGG_FILL["agg_module_types"]
MODULE_TYPES = """SELECT module, part, n, mean_alignment, std_alignment, frac_negative, mean_magnitude, dot_sum
FROM agg_module_types WHERE run_id = ? AND step = ? ORDER BY module, part"""
MODULE_NAMES = "SELECT DISTINCT module FROM token_modules WHERE run_id = ? AND step = ? ORDER BY module"
LAYER_POSITION = """SELECT m.layer, (t.resp_pos // ?) * ? AS bin_start, count(*) AS n,
    avg(m.alignment) AS mean_alignment, avg(m.magnitude) AS mean_magnitude
FROM token_modules m JOIN (
        SELECT sample_idx, position, resp_pos FROM tokens WHERE run_id = ? AND step = ? AND is_response) t
    ON m.sample_idx = t.sample_idx AND m.position = t.position
WHERE m.run_id = ? AND m.step = ? AND (?::VARCHAR IS NULL OR m.module = ?)
GROUP BY ALL ORDER BY m.layer, bin_start"""
