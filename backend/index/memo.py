"""Views of the index kept until the index changes: the web app's renders, computed once per distinct request.

    @memo.cached(entries=64)
    def overlay_html(run_id, step, sample, metric, token): ...     # reads the index through ``shared()`` only

    overlay_html.cache.hits, overlay_html.cache.misses   # its counters
    memo.clear()          # empty every cache

A reader of a hosted Space switches between the samples, steps and tabs of a few runs; collaborators look at the
same ones. Each such view costs 20-500 ms of CPU (DuckDB queries, pandas, building a plotly figure) and the
same request gives the same answer until the index is written. ``cached`` keys a function's result on its
arguments and ``db.generation()``, which moves after every committed write of this process (ingest, prune,
rebuild) and when the shared connection is opened or closed; DuckDB lets one process write the index file, so
in the app, which holds it, a result stays true until the number moves. Entries are kept least recently used
first out, ``entries`` per function.

Only for functions whose every read goes through the shared connection (``queries`` calls without ``con``)
and that depend on nothing but their arguments and the index (not the clock, the job queue or a session);
their results are shared between sessions and threads, so callers must not modify them (a figure goes to
Gradio, which serialises it). An exception is not cached. ``TOKVIZ_VIEW_CACHE=0`` turns every cache off (each
call computes, as without this module); a whole number sets the entries of each cache instead.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from functools import wraps
from typing import Any, Callable, TypeVar

from backend.index import db
from backend.store import paths

F = TypeVar("F", bound=Callable[..., Any])

_caches: dict[str, "LRU"] = {}


def entries_from_env(default: int) -> int:
    """``TOKVIZ_VIEW_CACHE``: unset: ``default``; 0: off; a whole number n >= 1: n entries per cache."""
    raw = os.environ.get("TOKVIZ_VIEW_CACHE", "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ValueError(f"TOKVIZ_VIEW_CACHE must be a whole number >= 0 (0 turns the view caches off), got {raw!r}")
    return int(raw)


class LRU:
    """A thread-safe map of at most ``entries`` items, least recently used out first, with hit/miss counters
    (the view caches below; ``backend.index.token_table``'s per-query counts)."""

    def __init__(self, name: str, entries: int) -> None:
        self.name, self.entries = name, entries
        self.data: OrderedDict[tuple, Any] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> tuple[bool, Any]:
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                self.hits += 1
                return True, self.data[key]
            self.misses += 1
            return False, None

    def put(self, key: tuple, value: Any) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.entries:
                self.data.popitem(last=False)

    def fetch(self, key: tuple, make: Callable[[], Any]) -> Any:
        """The value under ``key``, made by ``make()`` (outside the lock) and kept on a miss."""
        hit, value = self.get(key)
        if not hit:
            value = make()
            self.put(key, value)
        return value


def cached(entries: int = 64) -> Callable[[F], F]:
    """Decorator: the function's results by (arguments, index generation, index file); see the module doc.
    Arguments must be hashable (lists are keyed as tuples); a call with an unhashable one computes."""
    def deco(fn: F) -> F:
        name = f"{fn.__module__}.{fn.__qualname__}"
        cache = _caches[name] = LRU(name, entries_from_env(entries))

        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if cache.entries == 0:
                return fn(*args, **kwargs)
            gen = db.generation()           # read before computing: a write meanwhile moves it, the entry is dead
            try:
                key = (_hashable(args), _hashable(tuple(sorted(kwargs.items()))), gen, str(paths.index_path()))
                hash(key)
            except TypeError:               # an argument that is not a plain value: not cacheable, computed
                return fn(*args, **kwargs)
            hit, value = cache.get(key)
            if hit:
                return value
            value = fn(*args, **kwargs)
            cache.put(key, value)
            return value

        wrapper.cache = cache               # type: ignore[attr-defined]
        return wrapper                      # type: ignore[return-value]
    return deco


def _hashable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    return v


def clear() -> None:
    """Empty every cache (the counters stay)."""
    for c in _caches.values():
        with c.lock:
            c.data.clear()
