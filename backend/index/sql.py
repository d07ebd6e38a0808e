"""Every SQL statement tokviz runs against its DuckDB index, as named constants with ``?`` parameters.

    from backend.index import sql
    con.execute(sql.SAMPLE_TOKENS, [run_id, step, sample_idx]).df()

Nothing else in the project writes SQL text; values are always bound as parameters, never formatted in.
The data tables are those the job kinds declare (``backend.jobs.registry.TableSpec``: the Parquet contract of
``backend.store.schema``), so their DDL and INSERTs are generated here from the Arrow schemas; the index adds
``runs`` (with an ``n_<table>`` row count per data table), ``files`` and ``meta``, the kinds' derived columns
(``tokens.resp_pos``: position within the response, 0 = first response token, NULL for prompt positions)
and derived tables (the ``agg_*`` aggregates of ``token_modules``). A newly registered kind's tables are
created when the index is opened.

Index schema versions (``meta.schema_version``): bump ``INDEX_VERSION`` on any change of the tables below
and add the statements that take an index from the previous version to ``MIGRATIONS``; an index older than
the oldest migration is rebuilt from the run directories.

Version 2 added the per-step aggregates of ``token_modules`` (``agg_*``), filled at ingest: the module-level
analyses read a few hundred rows from them instead of scanning millions (an index of version 1 is rebuilt).
Version 3 added ``agg_layer_module_part`` (per layer, module and LoRA part over response tokens: what the
summary's dominant and opposing modules read); an index of version 2 is rebuilt, which fills it for every run.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from backend.jobs.registry import TableSpec

INDEX_VERSION = 4

# from-version -> statements that turn an index of that version into one of version + 1
MIGRATIONS: dict[int, tuple[str, ...]] = {}

_DUCK_TYPES = {pa.string(): "VARCHAR", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
               pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN",
               pa.list_(pa.float32()): "FLOAT[]", pa.list_(pa.float16()): "FLOAT[]"}


def _columns(s: pa.Schema) -> list[str]:
    return [f.name for f in s]



# ------------------------------------------------------------------------------------------------ schema
# The data tables come from the job kinds' TableSpecs (backend.jobs.registry): their DDL and INSERTs are made
# here from the Arrow schema (table and column names are checked identifiers, never user input).
BASE_TABLES = ("meta", "runs", "files")
_IDENT = re.compile(r"^[a-z][a-z0-9_]*$")

CREATE_META = "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)"
# n_<table> count columns are added per registered data table (ADD_COUNT_COLUMN)
CREATE_RUNS = """CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY, kind VARCHAR, name VARCHAR, status VARCHAR NOT NULL, model VARCHAR,
    dataset VARCHAR, scheme VARCHAR, created_at VARCHAR, finished_at VARCHAR, path VARCHAR NOT NULL,
    schema_version INTEGER, fingerprint VARCHAR NOT NULL, ingested_at VARCHAR NOT NULL,
    n_traced_steps INTEGER, config_json VARCHAR, manifest_json VARCHAR)"""
CREATE_FILES = """CREATE TABLE files (
    run_id VARCHAR NOT NULL, relpath VARCHAR NOT NULL, table_name VARCHAR NOT NULL, n_bytes BIGINT,
    mtime_ns BIGINT)"""
CREATE_BASE = (CREATE_META, CREATE_RUNS, CREATE_FILES)


def _ident(name: str) -> str:
    assert _IDENT.match(name), f"not an SQL identifier tokviz uses: {name!r}"
    return name


def create_table(t: TableSpec) -> str:
    """The index table of a kind's Parquet table: its schema's columns plus the derived ones."""
    cols = [f"{_ident(f.name)} {_DUCK_TYPES[f.type]}{'' if f.nullable else ' NOT NULL'}" for f in t.schema]
    cols += [f"{_ident(name)} {dtype}" for name, dtype, _expr in t.derived]
    return f"CREATE TABLE IF NOT EXISTS {_ident(t.name)} ({', '.join(cols)})"


def add_count_column(table: str) -> str:
    """The runs table's row count of one data table (``n_<table>``)."""
    return f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS n_{_ident(table)} BIGINT"


def drop_table(table: str) -> str:
    return f"DROP TABLE IF EXISTS {_ident(table)}"


def delete_run_rows(table: str) -> str:
    return f"DELETE FROM {_ident(table)} WHERE run_id = ?"


def insert_from_parquet(t: TableSpec) -> str:
    """INSERT ... SELECT from a list of Parquet files (parameter 2), checking every row's run_id against
    parameter 1: a row of another run raises, naming the file. Derived columns are computed over the rows."""
    cols = _columns(t.schema)
    select = ", ".join(
        "CASE WHEN run_id = ?::VARCHAR THEN run_id ELSE error('row with run_id ' || run_id || ' in ' || filename"
        " || ' does not belong to this run') END" if c == "run_id" else _ident(c) for c in cols)
    names = ", ".join(cols + [_ident(name) for name, _dtype, _expr in t.derived])
    exprs = "".join(f", {expr}" for _name, _dtype, expr in t.derived)
    return (f"INSERT INTO {_ident(t.name)} ({names}) SELECT {select}{exprs} "
            f"FROM read_parquet(?, filename = true)")


def insert_run(columns: list[str]) -> str:
    """INSERT of one runs row, by column name."""
    return f"INSERT INTO runs ({', '.join(_ident(c) for c in columns)}) VALUES ({', '.join('?' * len(columns))})"


def count_steps(table: str) -> str:
    """Distinct steps of one run in a kind's steps table."""
    return f"SELECT count(DISTINCT step) FROM {_ident(table)} WHERE run_id = ?"


def distinct_steps(table: str) -> str:
    """The distinct steps of one run in a kind's steps table, ascending (what its analyses may be run at)."""
    return f"SELECT DISTINCT step FROM {_ident(table)} WHERE run_id = ? ORDER BY step"


# session settings: a library must not draw progress bars on the user's terminal; a locked-down connection
# reads files only below the allowed directories (set them first: the lock-down cannot be undone)
SET_NO_PROGRESS_BAR = "SET enable_progress_bar = false"
SET_ALLOWED_DIRECTORIES = "SET allowed_directories = ?"
SET_NO_EXTERNAL_ACCESS = "SET enable_external_access = false"
SET_THREADS = "SET threads = ?"
# the last setting of a locked-down connection: no later SET or PRAGMA can widen what it may read
SET_LOCK_CONFIGURATION = "SET lock_configuration = true"

# the SQL console: its statement runs in a transaction the engine refuses every write in (a DELETE inside a CTE,
# nextval, ...); the parse tree of the statement is read to list the tables and table functions it names
BEGIN_READ_ONLY = "BEGIN TRANSACTION READ ONLY"
SERIALIZE_SQL = "SELECT json_serialize_sql(?)"
# the index's own tables and their columns, for the SQL console's list (temporary and system tables left out)
INDEX_COLUMNS = """SELECT table_name, column_name, data_type FROM information_schema.columns
WHERE table_schema = 'main' AND table_catalog = current_database() ORDER BY table_name, ordinal_position"""

LIST_TABLES = "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'"
GET_META = "SELECT value FROM meta WHERE key = ?"
SET_META = "INSERT OR REPLACE INTO meta VALUES (?, ?)"
RUN_PATHS = "SELECT run_id, path FROM runs"

# ------------------------------------------------------------------------------------------------ ingest
RUN_FINGERPRINT = "SELECT fingerprint, path FROM runs WHERE run_id = ?"
INSERT_FILE = "INSERT INTO files VALUES (?, ?, ?, ?, ?)"

# (file_name, value) of one metadata key over a list of Parquet files; reads footers only
PARQUET_KV = ("SELECT file_name, decode(value) AS value FROM parquet_kv_metadata(?) "
              "WHERE decode(key) = ?")

# ---- the train kind's derived column and aggregates (backend.jobs.train)
# tokens.resp_pos: position - first response position of the (step, sample); NULL for prompt rows
RESP_POS = ("CASE WHEN is_response THEN position - min(position) FILTER (WHERE is_response) "
            "OVER (PARTITION BY step, sample_idx) END")
# Per-step aggregates of token_modules, one row per (run, step, group), computed at ingest by AGG_FILL:
# what the module-level analyses used to compute from the raw rows on every view.
AGG_CREATE = {
    "agg_layer_module": """CREATE TABLE IF NOT EXISTS agg_layer_module (
    run_id VARCHAR NOT NULL, step INTEGER NOT NULL, layer SMALLINT NOT NULL, module VARCHAR NOT NULL,
    dot_sum DOUBLE, mean_alignment DOUBLE, mean_magnitude DOUBLE, n BIGINT NOT NULL)""",
    "agg_module_types": """CREATE TABLE IF NOT EXISTS agg_module_types (
    run_id VARCHAR NOT NULL, step INTEGER NOT NULL, module VARCHAR NOT NULL, part VARCHAR NOT NULL,
    n BIGINT NOT NULL, mean_alignment DOUBLE, std_alignment DOUBLE, frac_negative DOUBLE, mean_magnitude DOUBLE,
    dot_sum DOUBLE)""",
    "agg_layer_module_part": """CREATE TABLE IF NOT EXISTS agg_layer_module_part (
    run_id VARCHAR NOT NULL, step INTEGER NOT NULL, layer SMALLINT NOT NULL, module VARCHAR NOT NULL,
    part VARCHAR NOT NULL, n BIGINT NOT NULL, mean_alignment DOUBLE, mean_magnitude DOUBLE, dot_sum DOUBLE)""",
    "agg_lora_ab": """CREATE TABLE IF NOT EXISTS agg_lora_ab (
    run_id VARCHAR NOT NULL, step INTEGER NOT NULL, layer VARCHAR NOT NULL, part VARCHAR NOT NULL,
    mean_magnitude DOUBLE, n BIGINT NOT NULL)""",
}
# token_modules rows of response positions (every traced step of one run: parameters run_id, run_id)
_RESPONSE_MODULE_ROWS_ALL_STEPS = """SELECT m.* FROM token_modules m SEMI JOIN (
        SELECT step, sample_idx, position FROM tokens WHERE run_id = ? AND is_response) r
    ON m.step = r.step AND m.sample_idx = r.sample_idx AND m.position = r.position
    WHERE m.run_id = ?"""
# The aggregates of one run (parameter: run_id, as many times as there are ?), after its tokens and
# token_modules rows are in. Definitions (module shares of the update use every traced position; the
# module-type and LoRA A/B statistics use response tokens):
# (step, layer, module, part) labels that more than one module's rows share: a LoRA module has one row per
# response token and step, so a count above the step's response tokens means two modules got one label
DUPLICATE_MODULE_LABELS = """SELECT a.step, a.layer, a.module, a.part FROM agg_layer_module_part a
JOIN (SELECT step, count(*) FILTER (WHERE is_response) AS r FROM tokens WHERE run_id = ? GROUP BY step) t USING (step)
WHERE a.run_id = ? AND a.n > t.r ORDER BY ALL LIMIT 3"""
AGG_FILL = {
    # per (step, layer, module), both LoRA parts, every traced position
    "agg_layer_module": """INSERT INTO agg_layer_module
SELECT run_id, step, layer, module, sum(dot), avg(alignment), avg(magnitude), count(*)
FROM token_modules WHERE run_id = ? GROUP BY run_id, step, layer, module""",
    # per (step, module type, LoRA part), over all layers and response tokens
    "agg_module_types": f"""INSERT INTO agg_module_types
WITH m AS ({_RESPONSE_MODULE_ROWS_ALL_STEPS})
SELECT run_id, step, module, part, count(*), avg(alignment), stddev_samp(alignment),
    avg(CAST(alignment < 0 AS DOUBLE)), avg(magnitude), sum(dot)
FROM m GROUP BY run_id, step, module, part""",
    # per (step, layer, module, LoRA part), over response tokens
    "agg_layer_module_part": f"""INSERT INTO agg_layer_module_part
WITH m AS ({_RESPONSE_MODULE_ROWS_ALL_STEPS})
SELECT run_id, step, layer, module, part, count(*), avg(alignment), avg(magnitude), sum(dot)
FROM m GROUP BY run_id, step, layer, module, part""",
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

# ------------------------------------------------------------------------------------------------ queries
LIST_RUNS = """SELECT run_id, name, kind, status, model, dataset, scheme, created_at, finished_at,
    n_traced_steps, n_tokens, n_token_modules, n_train_steps, path, ingested_at
FROM runs ORDER BY created_at DESC, run_id"""
RUN_INFO = "SELECT * FROM runs WHERE run_id = ?"
RUN_KIND = "SELECT kind FROM runs WHERE run_id = ?"
RUN_IDS = "SELECT run_id FROM runs ORDER BY run_id"
TRACED_STEPS = "SELECT DISTINCT step FROM tokens WHERE run_id = ? ORDER BY step"
RUN_STEPS = """SELECT step, count(DISTINCT sample_idx) AS n_samples, count(*) AS n_tokens,
    count(*) FILTER (WHERE is_response) AS n_response,
    avg(alignment) FILTER (WHERE is_response) AS mean_alignment,
    avg(loss) FILTER (WHERE is_response) AS mean_loss, sum(share) AS share_sum, any_value(mode) AS mode
FROM tokens WHERE run_id = ? GROUP BY step ORDER BY step"""
STEP_SAMPLES = """SELECT sample_idx, count(*) AS n_tokens, count(*) FILTER (WHERE is_response) AS n_response,
    avg(alignment) FILTER (WHERE is_response) AS mean_alignment,
    avg(CAST(alignment < 0 AS DOUBLE)) FILTER (WHERE is_response) AS opposing_fraction,
    avg(loss) FILTER (WHERE is_response) AS mean_loss, sum(share) AS share_sum,
    left(string_agg(token, '' ORDER BY position), ?) AS preview
FROM tokens WHERE run_id = ? AND step = ? GROUP BY sample_idx ORDER BY sample_idx"""
# the sample's rows, with their influence on the eval loss when the run recorded it (null otherwise); parameters:
# run, step, sample twice
SAMPLE_TOKENS = """SELECT t.position, t.resp_pos, t.token_id, t.token, t.category, t.is_response, t.loss, t.prob,
    t.entropy, t.weight, t.mode, t.alignment, t.dot, t.share, t.magnitude, t.magnitude_estimated, t.rank,
    i.influence, i.influence_alignment
FROM tokens t LEFT JOIN (SELECT position, rank, influence, influence_alignment FROM influence
                         WHERE run_id = ? AND step = ? AND sample_idx = ?) i USING (position, rank)
WHERE t.run_id = ? AND t.step = ? AND t.sample_idx = ? ORDER BY t.position"""
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
    quantile_cont(alignment, 0.9) AS p90, avg(CAST(alignment < 0 AS DOUBLE)) AS frac_negative
FROM tokens WHERE run_id = ? AND is_response AND alignment IS NOT NULL GROUP BY step ORDER BY step"""
PROMPT_VS_RESPONSE = """SELECT CASE WHEN is_response THEN 'response' ELSE 'prompt' END AS "group", count(*) AS n,
    avg(alignment) AS mean_alignment, stddev_samp(alignment) AS std_alignment,
    avg(CAST(alignment < 0 AS DOUBLE)) AS frac_negative, avg(magnitude) AS mean_magnitude,
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
# the trace mode(s) of a run (step NULL) or of one step: each analysis's figure names it
TRACE_MODES = """SELECT step, mode FROM tokens WHERE run_id = ? AND (?::INTEGER IS NULL OR step = ?)
GROUP BY ALL ORDER BY ALL"""
STEP_POSITION = """SELECT step, (resp_pos // ?) * ? AS bin_start, count(*) AS n, avg(alignment) AS mean_alignment
FROM tokens WHERE run_id = ? AND is_response AND alignment IS NOT NULL
GROUP BY ALL ORDER BY step, bin_start"""
CATEGORY_AT_STEP = """SELECT category, count(*) AS n, avg(alignment) AS mean_alignment,
    stddev_samp(alignment) AS std_alignment, avg(CAST(alignment < 0 AS DOUBLE)) AS frac_negative,
    avg(magnitude) AS mean_magnitude, sum(share) AS share_sum, avg(loss) AS mean_loss
FROM tokens WHERE run_id = ? AND step = ? AND is_response GROUP BY category ORDER BY mean_alignment"""
# per layer and part (and 'all' layers): see AGG_FILL["agg_lora_ab"]
LORA_AB = """SELECT layer, part, mean_magnitude, n FROM agg_lora_ab WHERE run_id = ? AND step = ?"""
# per (module type, LoRA part): see AGG_FILL["agg_module_types"]
MODULE_TYPES = """SELECT module, part, n, mean_alignment, std_alignment, frac_negative, mean_magnitude, dot_sum
FROM agg_module_types WHERE run_id = ? AND step = ? ORDER BY module, part"""
# per (layer, module, LoRA part): see AGG_FILL["agg_layer_module_part"]
LAYER_MODULE_PARTS_AT_STEP = """SELECT layer, module, part, n, mean_alignment, mean_magnitude, dot_sum
FROM agg_layer_module_part WHERE run_id = ? AND step = ? ORDER BY layer, module, part"""
MODULE_NAMES = "SELECT DISTINCT module FROM token_modules WHERE run_id = ? AND step = ? ORDER BY module"
LAYER_POSITION = """SELECT m.layer, (t.resp_pos // ?) * ? AS bin_start, count(*) AS n,
    avg(m.alignment) AS mean_alignment, avg(m.magnitude) AS mean_magnitude
FROM token_modules m JOIN (
        SELECT sample_idx, position, resp_pos FROM tokens WHERE run_id = ? AND step = ? AND is_response) t
    ON m.sample_idx = t.sample_idx AND m.position = t.position
WHERE m.run_id = ? AND m.step = ? AND (?::VARCHAR IS NULL OR m.module = ?)
GROUP BY ALL ORDER BY m.layer, bin_start"""
