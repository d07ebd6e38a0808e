"""Shared fixtures of the web-app tests: a data root with synthetic runs, and the real app served on a free
port (one server per test module; the app tests start it through ``app_server``)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
XSS_TOKENS = ("<script>window.__xss=1</script>", '<img src=x onerror="window.__xss=2">', "{{value}}${value}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plant_tokens(run_dir: Path, texts: tuple[str, ...], sample_idx: int | None = None) -> None:
    """Overwrite the text of the first response tokens of one sample (every step) with ``texts``."""
    for f in sorted((run_dir / "trace" / "tokens").glob("*.parquet")):
        t = pq.read_table(f)
        d = t.to_pydict()
        target = d["sample_idx"][0] if sample_idx is None else sample_idx
        rows = [i for i, (s, r) in enumerate(zip(d["sample_idx"], d["is_response"])) if s == target and r]
        for i, text in zip(rows, texts):
            d["token"][i] = text
        pq.write_table(pa.Table.from_pydict(d, schema=t.schema), f)


def make_home(root: Path, *, xss: bool = True) -> Path:
    """A data root with two small synthetic trace runs (one with hostile token texts planted)."""
    from backend.dev.synth import SynthConfig, make_run
    runs = root / "runs"
    cfg = dict(n_layers=2, n_samples=4, traced_steps=(5, 10, 20), max_step=20, prompt_len=(6, 12),
               response_len=(30, 60))
    make_run(SynthConfig(scheme="sft", seed=1, **cfg), runs, run_id="synth-sft", name="synthetic sft")
    b = make_run(SynthConfig(scheme="antiop", seed=2, **cfg), runs, run_id="synth-antiop", name="synthetic antiop")
    if xss:
        plant_tokens(b, XSS_TOKENS)
    return root


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one CPU thread during the test (its numbers then do not depend on the machine's cores), the
    previous count restored after: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_home(tmp_path_factory) -> Path:
    return make_home(tmp_path_factory.mktemp("tokviz-home"))


@contextmanager
def app_server(home: Path, **env: str) -> Iterator[tuple[str, object]]:
    """Serve the real app (``tokviz.ui.build_app``) in this process with ``TOKVIZ_HOME=home`` and ``env``;
    yields (base url, AppContext). The index connection and the jobs are closed afterwards."""
    from backend import index
    from tokviz.context import AppContext
    from tokviz.ui import build_app, serve

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKVIZ_HOME", str(home))
        for k in ("TOKVIZ_READONLY", "TOKVIZ_ADMIN_TOKEN", "SPACE_ID"):
            mp.delenv(k, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        ctx = AppContext.from_env()
        demo = build_app(ctx)
        port = free_port()
        serve(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/", ctx
        finally:
            demo.close()
            ctx.close()
            index.close_shared()


def wait_for(pred, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


CHROMIUM = os.environ.get("TOKVIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@contextmanager
def index_held_elsewhere(path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the DuckDB file ``path`` open (as a running app would) until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys
        con = duckdb.connect({str(path)!r})
        print("ready", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=20)
