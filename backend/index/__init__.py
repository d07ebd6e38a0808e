"""The DuckDB index of run directories: connections and transactions (``db``), ingest (``ingest``), SQL
(``sql``) and the query functions the app reads through (``queries``).

    from backend import index
    con = index.connect()                       # the one connection factory (creates / migrates the index)
    index.ingest_all(con)                       # every new or changed run, one transaction each
"""
from backend.index.db import (
                              MEMORY,
                              IndexLockedError,
                              IndexVersionError,
                              IngestError,
                              TokvizIndexError,
                              close_shared,
                              connect,
                              shared,
                              shared_path_held,
                              transaction,
)
from backend.index.ingest import IngestResult, find_runs, ingest_all, ingest_run, main, prune_missing, rebuild

__all__ = ["MEMORY", "IndexLockedError", "IndexVersionError", "IngestError", "IngestResult", "TokvizIndexError",
           "close_shared", "connect", "find_runs", "ingest_all", "ingest_run", "main", "prune_missing", "rebuild",
           "shared", "shared_path_held", "transaction"]
