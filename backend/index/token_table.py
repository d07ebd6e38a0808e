"""The token table: every response token of a run at one traced step, sorted, filtered and paged in DuckDB.

    from backend.index import token_table as tt
    q = tt.TableQuery(sort="loss", descending=True, categories=("number",), ranges={"alignment": (None, 0.0)},
                      text="7", page=3, page_size=50)
    page = tt.token_page(run_id, step, q)      # TokenPage: .rows (DataFrame, with context), .total, .pages

A step holds up to millions of response tokens, so a page is never taken with a plain deep ``OFFSET`` (DuckDB
sorts every row to skip 5M of them: ~1-2 s on 10M rows). Instead:

- a set of at most ``SMALL_SET`` rows, or a page ending before ``DIRECT_ROWS``, is a top-N query
  (``ORDER BY .. LIMIT .. OFFSET``: a small heap, one scan);
- sorted by a metric, a page ending before ``DIRECT_SORTED`` comes from the set's first ``DIRECT_SORTED``
  values (``min(col, k)``, cached per query, in the same scan as the set's count): the value at the page's last
  rank bounds the page, and only the rows up to it are sorted (exact: every row up to that rank has a value up
  to it); the next pages reuse the values;
- in the default order (sample, position), per-sample row counts (one GROUP BY, cached per query) give the few
  samples a page spans, and only those are read (the index stores a step's rows by sample, so DuckDB skips the
  rest by its zone maps);
- sorted by a metric, a sample of the column's values (``TABLESAMPLE``, cached per query) brackets the page's
  values ``[lo, hi]``; the rows before ``lo`` are counted exactly and the page is taken from the bracket's rows
  in order, so it is exact whatever the estimate was (a bracket that misses is widened; after a few misses,
  the plain query). A bracket that is one value (a tie, e.g. every weight 1.0) is paged in the default order
  within it. On 10M rows this is ~6x faster than the plain query at a middle page (``bench/token_table.py``).

Sort order: the metric (NULLs last), then sample, then position: a total order, so pages never overlap.
All values are bound as parameters; column names come from the allow-lists below, never from the caller's text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import duckdb
import numpy as np
import pandas as pd

from backend.index import memo, queries

# the columns a page shows; the metrics a page can be sorted and range-filtered by
COLUMNS = ("sample_idx", "position", "resp_pos", "token", "category", "loss", "weight", "alignment", "dot", "share",
           "magnitude")
METRICS = ("loss", "weight", "alignment", "dot", "share", "magnitude", "prob", "entropy")
SORTS = ("sample",) + METRICS           # "sample": the default order, by sample then position
MAX_PAGE_SIZE = 500
DIRECT_ROWS = 20_000                    # pages of the default order ending before this row are top-N queries
DIRECT_SORTED = 1_000                   # and sorted by a metric (a deeper top-N keeps a heap of all rows before)
SMALL_SET = 200_000                     # a filtered set this small is paged with the plain query
CONTEXT_BEFORE, CONTEXT_AFTER = 8, 3    # tokens of context shown around each token
_SAMPLE_PERCENT = 1.0                   # TABLESAMPLE of the column, for the bracket estimate
_CACHE_ENTRIES = 32

_BASE = "run_id = ? AND step = ? AND is_response"
_KEYS = "sample_idx, position"
# {col}: a column of COLUMNS / METRICS (allow-listed), never the caller's text; {where}: TableQuery.where()
VERSION = "SELECT n_tokens, ingested_at FROM runs WHERE run_id = ?"      # a cache entry's validity
COUNT = "SELECT count(*), count({col}) FROM tokens WHERE {where}"
# the set's count and its first k values of {col} in the sort's order ({agg}: min ascending, max descending)
HEAD = "SELECT count(*), count({col}), {agg}({col}, {k:d}) FROM tokens WHERE {where}"
# LIMIT and OFFSET are Python ints written into the text (``:d``): with them as parameters DuckDB plans a full
# sort, not a top-N heap (1.3-2x slower on 10M rows)
TOP_N = "SELECT " + _KEYS + " FROM tokens WHERE {where} ORDER BY {order} LIMIT {limit:d} OFFSET {offset:d}"
SAMPLE_COUNTS = "SELECT sample_idx, count(*) AS n FROM tokens WHERE {where} GROUP BY sample_idx ORDER BY sample_idx"
SAMPLES_SPAN = ("SELECT " + _KEYS + " FROM tokens WHERE {where} AND sample_idx BETWEEN ? AND ? "
                "ORDER BY sample_idx, position LIMIT {limit:d} OFFSET {offset:d}")
# every sampled row of the step, with whether it passes the filters: the set's values, and its size estimated as
# (kept / sampled) x the step's count
VALUE_SAMPLE = ("SELECT {col} AS v, ({filters}) AS keep FROM tokens TABLESAMPLE {pct}% (system, 7) WHERE " + _BASE)
STEP_COUNT = "SELECT count(*) FROM tokens WHERE " + _BASE
# a first look at a sorted set: its size and the rows before a bracket estimated from the sample, in one scan
COUNT_BEFORE = "SELECT count(*), count({col}), count(*) FILTER (WHERE {col} {op} ?::FLOAT) FROM tokens WHERE {where}"
# bounds are cast to the column's type (FLOAT), so DuckDB filters in the scan, and every count uses the same bound
BEFORE = "SELECT count(*) FROM tokens WHERE {where} AND {col} {op} ?::FLOAT"
IN_BRACKET = ("SELECT " + _KEYS + " FROM tokens WHERE {where} AND {col} BETWEEN ?::FLOAT AND ?::FLOAT "
              "ORDER BY {order} LIMIT {limit:d} OFFSET {offset:d}")
# the page's rows by their keys, each with the text of the tokens around it (prompt tokens included)
ROWS = """WITH k AS (
    SELECT unnest(?::INTEGER[]) AS s, unnest(?::INTEGER[]) AS p, generate_subscripts(?::INTEGER[], 1) AS i)
SELECT k.s AS sample_idx, k.p AS position,
    {cols},
    coalesce(string_agg(t.token, '' ORDER BY t.position) FILTER (WHERE t.position < k.p), '') AS context_before,
    coalesce(string_agg(t.token, '' ORDER BY t.position) FILTER (WHERE t.position > k.p), '') AS context_after
FROM k JOIN tokens t ON t.sample_idx = k.s AND t.position BETWEEN k.p - ? AND k.p + ?
WHERE t.run_id = ? AND t.step = ? AND t.sample_idx IN ({samples})
GROUP BY k.i, k.s, k.p ORDER BY k.i"""


@dataclass(frozen=True)
class TableQuery:
    """What the table shows: sort, filters and the page. ``ranges`` maps a metric to (min, max), either end
    None for open; ``categories`` empty for all; ``text``: the token's text contains it (case-insensitive)."""
    sort: str = "sample"
    descending: bool = False
    categories: tuple[str, ...] = ()
    ranges: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    text: str = ""
    page: int = 0
    page_size: int = 50

    def __post_init__(self) -> None:
        if self.sort not in SORTS:
            raise ValueError(f"cannot sort the token table by {self.sort!r}; allowed: {', '.join(SORTS)}")
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be in [1, {MAX_PAGE_SIZE}], got {self.page_size}")
        if self.page < 0:
            raise ValueError(f"page must be >= 0, got {self.page}")
        for col, (lo, hi) in self.ranges.items():
            if col not in METRICS:
                raise ValueError(f"cannot filter the token table by {col!r}; allowed: {', '.join(METRICS)}")
            for v in (lo, hi):
                if v is not None and not math.isfinite(v):
                    raise ValueError(f"the {col} range must have finite ends, got ({lo}, {hi})")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"the {col} range is empty: min {lo} > max {hi}")

    def where(self) -> tuple[str, list[object]]:
        """(WHERE clause, its parameters after run_id and step) of the filtered set."""
        expr, params = self.filters()
        return (_BASE if expr == "TRUE" else f"{_BASE} AND {expr}"), params

    def filters(self) -> tuple[str, list[object]]:
        """(the filters as one boolean expression, "TRUE" for none; its parameters). Range ends are compared
        as FLOAT, the columns' type (a bound is rounded to float32), so DuckDB filters inside the scan."""
        parts, params = [], []
        if self.categories:
            parts.append("category IN (" + ", ".join("?" for _ in self.categories) + ")")
            params += list(self.categories)
        for col in sorted(self.ranges):            # validated against METRICS in __post_init__
            lo, hi = self.ranges[col]
            if lo is not None:
                parts.append(f"{col} >= ?::FLOAT")
                params.append(float(lo))
            if hi is not None:
                parts.append(f"{col} <= ?::FLOAT")
                params.append(float(hi))
        if self.text:
            parts.append("contains(lower(token), lower(?))")
            params.append(self.text)
        return (" AND ".join(parts) or "TRUE"), params

    def filter_key(self) -> tuple:
        """What selects the set (not its order or page): a cache key."""
        return (self.categories, tuple(sorted(self.ranges.items())), self.text)


@dataclass
class TokenPage:
    """One page of the table: ``rows`` (COLUMNS plus context_before / context_after), the filtered total,
    the page shown (clamped to the last) and the number of pages."""
    rows: pd.DataFrame
    total: int
    page: int
    pages: int
    query: TableQuery


# per-query helpers (counts, per-sample counts, value samples, first values), keyed with the run's ``runs`` row
# (token count, ingest time) so a re-ingested run is never served from stale counts
_cache = memo.LRU("token_table", _CACHE_ENTRIES)


def token_page(run_id: str, step: int, q: TableQuery, con: duckdb.DuckDBPyConnection | None = None) -> TokenPage:
    """One page of the run's response tokens at ``step``, sorted and filtered as ``q`` says (see the module
    docstring for how a deep page stays fast). ValueError for an unknown run or step."""
    where, fparams = q.where()
    params = [run_id, step, *fparams]
    col = "sample_idx" if q.sort == "sample" else q.sort
    with queries.cursor(con) as cur:
        version = cur.execute(VERSION, [run_id]).fetchone()
        if version is None:
            queries.require_run(run_id, cur)
        key = (run_id, step, q.filter_key(), *version)
        if q.sort != "sample" and q.page * q.page_size + q.page_size <= DIRECT_SORTED:
            _head(cur, where, params, q, key)         # the count comes with the first values, in one scan
        if q.sort != "sample" and ("count", col, *key) not in _cache.data:
            first = _first_sorted(cur, q, run_id, step, key)
            if first is not None:
                total, page, keys = first
                return TokenPage(_rows(cur, run_id, step, keys), total, page, max(1, math.ceil(total / q.page_size)), q)
        total, not_null = _cache.fetch(("count", col, *key), lambda: tuple(
            int(v) for v in cur.execute(COUNT.format(col=col, where=where), params).fetchone()))
        if total == 0:
            queries.require_step(run_id, step, cur)
        pages = max(1, math.ceil(total / q.page_size))
        page = min(q.page, pages - 1)
        offset, n = page * q.page_size, min(q.page_size, max(0, total - page * q.page_size))
        if n == 0:
            keys = np.zeros((0, 2), dtype=np.int64)
        elif q.sort == "sample":
            keys = _natural(cur, where, params, offset, n, key, total)
        else:
            keys = _sorted(cur, where, params, q, offset, n, key, total, not_null)
        assert len(keys) == n, f"page {page} of {total} rows: got {len(keys)} keys, expected {n}"
        rows = _rows(cur, run_id, step, keys)
    return TokenPage(rows, total, page, pages, q)


def _order(q: TableQuery) -> str:
    if q.sort == "sample":
        return "sample_idx, position"
    return f"{q.sort} {'DESC' if q.descending else 'ASC'} NULLS LAST, sample_idx, position"


def _keys(cur, query: str, params: list) -> np.ndarray:
    """(sample_idx, position) rows of a query, as an (n, 2) array."""
    got = cur.execute(query, params).fetchnumpy()
    return np.stack([np.asarray(got["sample_idx"], dtype=np.int64), np.asarray(got["position"], dtype=np.int64)],
                    axis=1).reshape(-1, 2)


def _top(cur, where: str, order: str, params: list, n: int, offset: int) -> np.ndarray:
    return _keys(cur, TOP_N.format(where=where, order=order, limit=int(n), offset=int(offset)), params)


def _natural(cur, where: str, params: list, offset: int, n: int, key: tuple, total: int) -> np.ndarray:
    """Keys of rows ``offset .. offset+n-1`` of the set in (sample, position) order."""
    if offset + n <= DIRECT_ROWS or total <= SMALL_SET:
        return _top(cur, where, "sample_idx, position", params, n, offset)
    counts = _cache.fetch(("samples", where, *key),
                        lambda: cur.execute(SAMPLE_COUNTS.format(where=where), params).fetchnumpy())
    samples, cum = counts["sample_idx"], np.cumsum(counts["n"])       # cum[i]: rows up to and with sample i
    assert cum[-1] == total, f"per-sample counts sum to {cum[-1]}, the set has {total} rows"
    first = int(np.searchsorted(cum, offset, side="right"))            # the sample holding row `offset`
    last = int(np.searchsorted(cum, offset + n - 1, side="right"))
    before = int(cum[first - 1]) if first > 0 else 0
    span = [int(samples[first]), int(samples[last])]
    return _keys(cur, SAMPLES_SPAN.format(where=where, limit=int(n), offset=offset - before), [*params, *span])


def _head(cur, where: str, params: list, q: TableQuery, key: tuple) -> tuple[int, int, np.ndarray]:
    """(the set's size, its count of non-NULL ``q.sort`` values, its first ``DIRECT_SORTED`` values in the
    sort's order), from one scan, cached per query and direction; fills the count's cache entry too."""
    def make() -> tuple[int, int, np.ndarray]:
        total, not_null, first = cur.execute(HEAD.format(col=q.sort, agg="max" if q.descending else "min",
                                                         k=DIRECT_SORTED, where=where), params).fetchone()
        first = np.sort(np.asarray(first or [], dtype=np.float64))
        return int(total), int(not_null), first[::-1] if q.descending else first
    got = _cache.fetch(("head", q.sort, q.descending, *key), make)
    _cache.fetch(("count", q.sort, *key), lambda: got[:2])
    return got


def _sorted(cur, where: str, params: list, q: TableQuery, offset: int, n: int, key: tuple, total: int,
            not_null: int) -> np.ndarray:
    """Keys of rows ``offset .. offset+n-1`` of the set sorted by a metric (NULLs last, then sample, position)."""
    col = q.sort
    if offset + n <= min(DIRECT_SORTED, not_null):
        # the value at rank offset+n-1 bounds every row up to it (a tie at it included): sort those rows only
        bound = float(_head(cur, where, params, q, key)[2][offset + n - 1])
        lo, hi = (bound, math.inf) if q.descending else (-math.inf, bound)
        return _keys(cur, IN_BRACKET.format(where=where, col=col, order=_order(q), limit=n, offset=offset),
                     [*params, lo, hi])
    if total <= SMALL_SET:
        return _top(cur, where, _order(q), params, n, offset)
    parts = []
    if offset < not_null:                                   # the part of the page with values
        parts.append(_bracketed(cur, where, params, q, offset, min(n, not_null - offset), key, not_null))
    if offset + n > not_null:                               # the part in the NULLs, in (sample, position) order
        skip = max(0, offset - not_null)
        parts.append(_natural(cur, f"{where} AND {col} IS NULL", params, skip, offset + n - max(offset, not_null),
                              ("null", col, *key), total - not_null))
    return np.concatenate(parts)


def _sample(cur, q: TableQuery, run_id: str, step: int, key: tuple) -> tuple[np.ndarray, float, float]:
    """(the sorted non-NULL values of ``q.sort`` in a sample of the set; the set's size and its count of
    non-NULL values, estimated from the sample), cached per query: the step's count times the fraction of
    sampled rows the filters keep (and that have a value)."""
    def make() -> tuple[np.ndarray, float, float]:
        expr, fparams = q.filters()
        df = cur.execute(VALUE_SAMPLE.format(col=q.sort, filters=expr, pct=_SAMPLE_PERCENT),
                         [*fparams, run_id, step]).df()
        kept = df["v"][df["keep"].fillna(False).astype(bool)]          # a filter on a NULL keeps nothing
        v = np.sort(kept.dropna().to_numpy(dtype=np.float32))
        step_rows = _cache.fetch(("step", run_id, step, *key[3:]), lambda: int(
            cur.execute(STEP_COUNT, [run_id, step]).fetchone()[0]))
        scale = step_rows / len(df) if len(df) else 0.0
        return v, len(kept) * scale, len(v) * scale
    return _cache.fetch(("values", q.sort, *key), make)


def _bounds(values: np.ndarray, offset: int, n: int, not_null: float, desc: bool, margin: float) -> tuple[float, float]:
    """(lo, hi): values that bracket rows ``offset .. offset+n-1`` of ``not_null`` sorted rows, from the
    sorted sample ``values``, with ``margin`` sample ranks to spare on each side. The ends are snapped to a
    grid of margin/2 sample ranks: the next pages get the same bracket, and the count of the rows before it
    (cached) is not taken again."""
    m, g = len(values), margin / 2
    lo_rank = math.floor((offset * m / not_null - margin) / g) * g
    hi_rank = math.ceil(((offset + n) * m / not_null + margin) / g) * g
    if desc:                           # rank r from the top is rank m-1-r from the bottom
        lo_rank, hi_rank = m - 1 - hi_rank, m - 1 - lo_rank
    lo = float(values[math.floor(lo_rank)]) if lo_rank >= 0 else -math.inf
    hi = float(values[math.ceil(hi_rank)]) if hi_rank <= m - 1 else math.inf
    return lo, hi


def _margin(m: int, n: int, not_null: float) -> float:
    # a rank's spread in a sample of m values is sqrt(m p (1-p)) <= sqrt(m)/2 (vectors are sampled whole,
    # values within one are near independent); a bracket that misses is widened
    return 1.5 * math.sqrt(m) + n * m / not_null


def _first_sorted(cur, q: TableQuery, run_id: str, step: int, key: tuple) -> tuple[int, int, np.ndarray] | None:
    """(total, page, keys) of a sorted page on the first look at its set, or None for the general path: the
    bracket is estimated from the sample and the set's estimated size, and one scan counts the set and the rows
    before the bracket (the general path takes one scan for each). None for a small set, a page near the
    NULLs or the end, or a bracket that missed (the counts it took are kept for the general path)."""
    where, fparams = q.where()
    params, col, desc = [run_id, step, *fparams], q.sort, q.descending
    offset, n = q.page * q.page_size, q.page_size
    if offset + n <= DIRECT_SORTED:           # a first page: the count and a top-N, no sample
        return None
    values, est, est_not_null = _sample(cur, q, run_id, step, key)
    m = len(values)
    if m < 100 or est <= 2 * SMALL_SET or offset + n > 0.9 * est_not_null:
        return None
    lo, hi = _bounds(values, offset, n, est_not_null, desc, _margin(m, n, est_not_null))
    if lo == hi:
        return None
    op, bound = (">", hi) if desc else ("<", lo)
    total, not_null, before = (int(v) for v in cur.execute(COUNT_BEFORE.format(col=col, op=op, where=where),
                                                            [bound, *params]).fetchone())
    _cache.fetch(("count", col, *key), lambda: (total, not_null))
    _cache.fetch(("before", col, op, bound, where, *key), lambda: before)
    if total <= SMALL_SET or offset + n > not_null or before > offset:
        return None
    keys = _keys(cur, IN_BRACKET.format(where=where, col=col, order=_order(q), limit=n, offset=offset - before),
                 [*params, lo, hi])
    return (total, q.page, keys) if len(keys) == n else None


def _bracketed(cur, where: str, params: list, q: TableQuery, offset: int, n: int, key: tuple,
               not_null: int) -> np.ndarray:
    """Keys of rows ``offset .. offset+n-1`` of the non-NULL values of ``q.sort`` in its order: the page's
    values are bracketed from a sample of the column, the rows before the bracket counted exactly."""
    col, desc, order = q.sort, q.descending, _order(q)
    plain = f"{where} AND {col} IS NOT NULL"
    values, _, _ = _sample(cur, q, params[0], params[1], key)
    m = len(values)
    if m < 100:                  # too few sampled vectors to estimate from: the plain query, exact
        return _top(cur, plain, order, params, n, offset)
    margin = _margin(m, n, not_null)
    for _ in range(3):
        lo, hi = _bounds(values, offset, n, not_null, desc, margin)
        if lo == hi:                        # one value: a tie, ordered by (sample, position) within it
            return _tie(cur, where, params, q, lo, offset, n, key)
        op, bound = (">", hi) if desc else ("<", lo)
        before = 0 if math.isinf(bound) else _cache.fetch(("before", col, op, bound, where, *key), lambda: int(
            cur.execute(BEFORE.format(where=where, col=col, op=op), [*params, bound]).fetchone()[0]))
        if before <= offset:
            keys = _keys(cur, IN_BRACKET.format(where=where, col=col, order=order, limit=n, offset=offset - before),
                         [*params, lo, hi])
            if len(keys) == n:
                return keys
        margin *= 4
    return _top(cur, plain, order, params, n, offset)


def _tie(cur, where: str, params: list, q: TableQuery, value: float, offset: int, n: int,
         key: tuple) -> np.ndarray:
    """Keys of the page when its bracket is a single value: the rows before it counted, then (sample,
    position) order among the rows equal to it (continuing into the next values if the page runs past it)."""
    col, order = q.sort, _order(q)
    before = int(cur.execute(BEFORE.format(where=where, col=col, op=">" if q.descending else "<"),
                             [*params, value]).fetchone()[0])
    equal = int(cur.execute(BEFORE.format(where=where, col=col, op="="), [*params, value]).fetchone()[0])
    if not before <= offset < before + equal:        # the estimate missed the tie: the plain query, exact
        return _top(cur, f"{where} AND {col} IS NOT NULL", order, params, n, offset)
    take = min(n, before + equal - offset)
    keys = _natural(cur, f"{where} AND {col} = ?::FLOAT", [*params, value], offset - before, take,
                    ("tie", col, value, *key), equal)
    if take < n:                                     # the page continues past the tie
        beyond = f"{where} AND {col} {'<' if q.descending else '>'} ?::FLOAT"
        keys = np.concatenate([keys, _top(cur, beyond, order, [*params, value], n - take, 0)])
    return keys


def _rows(cur, run_id: str, step: int, keys: np.ndarray) -> pd.DataFrame:
    """The rows of ``keys`` ((n, 2): sample_idx, position), in their order, with the text of the tokens before
    (CONTEXT_BEFORE) and after (CONTEXT_AFTER) each."""
    if len(keys) == 0:
        return pd.DataFrame({c: [] for c in (*COLUMNS, "context_before", "context_after")})
    s, p = keys[:, 0].tolist(), keys[:, 1].tolist()
    samples = sorted(set(s))
    cols = ", ".join(f"any_value(t.{c}) FILTER (WHERE t.position = k.p) AS {c}"
                     for c in COLUMNS if c not in ("sample_idx", "position"))
    df = cur.execute(ROWS.format(cols=cols, samples=", ".join("?" for _ in samples)),
                     [s, p, s, CONTEXT_BEFORE, CONTEXT_AFTER, run_id, step, *samples]).df()
    assert len(df) == len(keys), f"{len(keys)} keys gave {len(df)} rows"
    return df
