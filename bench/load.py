"""The web app under load: N concurrent API clients (one session each) against one single client, same mix.

Each client replays a mix of Inspect sample switches and token picks, analysis-tab renders (Concentration,
Layers, Compare, search) and SQL console queries through the app's public API, with a short think time between
requests, for ``--seconds``: over plain HTTP (Gradio's ``/call`` API, default) or gradio_client
(``--client gradio``); both go through Gradio's queue, as any API client does.
The app is started the way a user starts it (``python app.py`` with TOKVIZ_HOME set to a data root of
synthetic runs), on loopback only, afresh for each phase (neither phase finds the other's cached views), and
stopped at the end. Each client keeps one session (a session hash), as a browser tab or gradio_client does:
a call without one makes Gradio build a session state from the config of every component (~45 ms of CPU).

    python bench/load.py                          # 20 clients vs 1, 60 s each; a table
    python bench/load.py --clients 15 --seconds 30 --json
    python bench/load.py --view-cache both        # with the app's view caches and without, side by side
    python bench/load.py --app-dir /tmp/load-old  # the app of another checkout (a git worktree), same data

Printed: p50 / p95 latency per request (all kinds, and Inspect alone), errors (an app error or a request
without an answer within ``--timeout`` s), requests done, the app's RSS and CPU per request, and ``repeats``:
the fraction of requests identical to an earlier one of the phase (an upper bound on the view caches' hit
rate: the sessions share a few runs, as a Space's visitors do, and so the caches); ``p95_ratio`` is the
N-client p95 over the single-client p95 (target <= 5, with zero errors). Timings on a machine whose cores are
busy elsewhere vary: compare runs on one machine only, side by side.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.dev.synth import SynthConfig, make_run  # noqa: E402

TARGETS = {"p95_ratio": 5.0, "errors": 0}
RUNS = ("load-a", "load-b")
STEPS = (10, 20, 30)
MODULES = ("q_proj", "v_proj", "down_proj")
# (kind, weight): what a reader does most is switch samples and pick tokens in Inspect
MIX = (("inspect_sample", 40), ("inspect_token", 15), ("concentration", 10), ("layers", 10), ("compare", 5),
       ("search", 5), ("sql", 15))
SQL_QUERIES = (
    "SELECT run_id, step, count(*) AS n, avg(alignment) AS a FROM tokens GROUP BY ALL ORDER BY ALL",
    "SELECT module, layer, avg(alignment) AS a, sum(dot) AS d FROM token_modules GROUP BY ALL ORDER BY ALL",
    "SELECT sample_idx, max(loss) AS worst FROM tokens WHERE is_response GROUP BY 1 ORDER BY 2 DESC",
)


def build_data(home: Path) -> None:
    """Two traced runs of 8 layers x 7 modules x 2 parts, 12 samples of ~350 tokens at 3 steps (~1.4M
    ``token_modules`` rows each), unless ``home`` has them already."""
    for i, run_id in enumerate(RUNS):
        if (home / "runs" / run_id / "manifest.json").exists():
            continue
        shutil.rmtree(home / "runs" / run_id, ignore_errors=True)
        make_run(SynthConfig(n_layers=8, n_samples=12, traced_steps=STEPS, max_step=30, seed=i,
                             scheme=("sft", "antiop")[i]), home / "runs", run_id=run_id, name=run_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(app_dir: Path, home: Path, port: int, view_cache: bool = True) -> subprocess.Popen:
    """``python app.py`` in ``app_dir`` serving ``home`` on 127.0.0.1:``port``, once it answers; ``view_cache``
    False: with ``TOKVIZ_VIEW_CACHE=0`` (every view computed, backend.index.memo)."""
    env = {**os.environ, "TOKVIZ_HOME": str(home), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(app_dir)}
    if not view_cache:
        env["TOKVIZ_VIEW_CACHE"] = "0"
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=app_dir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app in {app_dir} exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.3)
    stop(proc)
    raise RuntimeError("the app did not answer within 300 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (its threads included), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
    return psutil.Process(pid).memory_info().rss


class HttpClient:
    """An API client over plain HTTP: Gradio's ``/call`` API (through the queue, like gradio_client), one
    loopback connection per request. Far lighter than gradio_client, so that on a small machine the load
    generator leaves the cores to the app (on a real deployment the clients run elsewhere)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        u = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout_s = u.hostname, u.port, timeout_s
        # one session per client, as a browser tab or gradio_client keeps: without a session hash Gradio builds
        # a fresh session state (the config of every component of the app, ~45 ms of CPU) for every request
        self.session_hash = uuid.uuid4().hex[:12]

    def predict(self, *args: object, api_name: str) -> list:
        """The outputs of one call; TimeoutError past the timeout, RuntimeError for an app error."""
        deadline = time.time() + self.timeout_s
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            path = f"/gradio_api/call/{api_name.lstrip('/')}"
            conn.request("POST", path, json.dumps({"data": list(args), "session_hash": self.session_hash}), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
            conn.request("GET", f"{path}/{json.loads(body)['event_id']}")
            resp = conn.getresponse()
            event = None
            while time.time() < deadline:
                line = resp.readline().decode()
                if not line:
                    raise RuntimeError("the event stream ended without a result")
                if line.startswith("event: "):
                    event = line[7:].strip()
                elif line.startswith("data: ") and event in ("complete", "error"):
                    data = json.loads(line[6:])
                    if event == "error":
                        raise RuntimeError(f"app error: {str(data)[:200]}")
                    return data
            raise TimeoutError(f"no answer within {self.timeout_s:g} s")
        except TimeoutError as e:      # the socket timed out
            raise TimeoutError(f"no answer within {self.timeout_s:g} s") from e
        finally:
            conn.close()

    def close(self) -> None:
        """Nothing is held between calls."""


def make_client(kind: str, url: str, timeout_s: float):
    """An ``HttpClient``, or a gradio_client ``Client`` (one session each)."""
    if kind == "http":
        return HttpClient(url, timeout_s)
    if kind == "gradio":
        from gradio_client import Client
        return Client(url, verbose=False)
    raise ValueError(f"--client must be http or gradio, got {kind!r}")


@dataclass
class Samples:
    """What the clients pick from: (run, step, sample, n_tokens) of every traced sample."""
    rows: list[tuple[str, int, int, int]]

    @classmethod
    def of(cls, client) -> Samples:
        _, table, _ = client.predict("SELECT run_id, step, sample_idx, count(*) FROM tokens GROUP BY ALL "
                                     "ORDER BY ALL", 10_000, api_name="/sql")
        rows = [(str(r), int(s), int(i), int(n)) for r, s, i, n in table["data"]]
        if not rows:
            raise RuntimeError("the app's index holds no traced samples")
        return cls(rows)


def request(kind: str, rng: random.Random, samples: Samples) -> tuple[tuple, str]:
    """The arguments and endpoint of one request of ``kind``."""
    run, step, sample, n = rng.choice(samples.rows)
    if kind == "inspect_sample":
        return (run, step, sample, rng.choice(["alignment", "loss", "magnitude"]), None), "/inspect_sample"
    if kind == "inspect_token":
        return (run, step, sample, rng.randrange(n), "heatmap: dot"), "/inspect_token"
    if kind == "concentration":
        return (run, step, list(rng.sample(STEPS, 2)), []), "/concentration"
    if kind == "layers":
        return (run, step, rng.choice(MODULES)), "/layer_position_heatmap"
    if kind == "compare":
        return (list(RUNS),), "/compare_runs"
    if kind == "search":
        return (run, rng.choice([" Step", "####", " apples"])), "/search_samples"
    if kind == "sql":
        return (rng.choice(SQL_QUERIES), 1000), "/sql"
    raise ValueError(f"unknown request kind {kind!r}; known: {', '.join(k for k, _ in MIX)}")


@dataclass
class Result:
    latencies: list[tuple[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seen: set = field(default_factory=set)          # (endpoint, arguments) of every request sent so far
    repeats: int = 0                                # requests identical to an earlier one of the phase
    lock: threading.Lock = field(default_factory=threading.Lock)


def call(client, args: tuple, api: str, timeout_s: float) -> None:
    if isinstance(client, HttpClient):
        client.predict(*args, api_name=api)
        return
    job = client.submit(*args, api_name=api)
    try:
        job.result(timeout=timeout_s)
    except FutureTimeout as e:
        job.cancel()
        raise TimeoutError(f"no answer within {timeout_s:g} s") from e


def client_loop(kind_of_client: str, url: str, seed: int, deadline: float, think_s: float, timeout_s: float,
                samples: Samples, out: Result) -> None:
    """One session: requests of the mix until ``deadline``, each waited for at most ``timeout_s``."""
    rng = random.Random(seed)
    try:
        client = make_client(kind_of_client, url, timeout_s)
    except Exception as e:  # noqa: BLE001 - a session that cannot connect is an error of the run, reported
        with out.lock:
            out.errors.append(f"connect: {type(e).__name__}: {str(e)[:200]}")
        return
    kinds, weights = zip(*MIX)
    try:
        while time.time() < deadline:
            kind = rng.choices(kinds, weights)[0]
            args, api = request(kind, rng, samples)
            key = (api, json.dumps(args))
            with out.lock:
                out.repeats += key in out.seen
                out.seen.add(key)
            t0 = time.perf_counter()
            try:
                call(client, args, api, timeout_s)
            except Exception as e:  # noqa: BLE001 - every failed request is counted and reported, not hidden
                with out.lock:
                    out.errors.append(f"{api}: {type(e).__name__}: {str(e)[:200]}")
            else:
                with out.lock:
                    out.latencies.append((kind, time.perf_counter() - t0))
            time.sleep(rng.uniform(0.5, 1.5) * think_s)
    finally:
        client.close()


def phase(kind_of_client: str, url: str, n_clients: int, seconds: float, think_s: float, timeout_s: float,
          samples: Samples, pid: int, seed: int) -> dict:
    """``n_clients`` sessions side by side for ``seconds``; latency percentiles, errors, the app's RSS."""
    out = Result()
    deadline = time.time() + seconds
    peak = [rss_bytes(pid)]
    done = threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.5):
            peak.append(rss_bytes(pid))

    cpu0, own0, t0 = cpu_s(pid), cpu_s(os.getpid()), time.perf_counter()
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client_loop,
                                args=(kind_of_client, url, seed + i, deadline, think_s, timeout_s, samples, out))
               for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + timeout_s + 60)     # a client past this is itself a finding: counted below
    app_cpu, own_cpu, wall = cpu_s(pid) - cpu0, cpu_s(os.getpid()) - own0, time.perf_counter() - t0
    done.set()
    sampler.join(timeout=5)
    stuck = sum(t.is_alive() for t in threads)
    lat = np.array([s for _, s in out.latencies]) if out.latencies else np.array([np.nan])
    ins = np.array([s for k, s in out.latencies if k.startswith("inspect")] or [np.nan])
    return {"clients": n_clients, "requests": len(out.latencies), "errors": len(out.errors) + stuck,
            "repeat_fraction": out.repeats / max(1, len(out.latencies) + len(out.errors)),
            "by_kind": {k: {"n": len(v), "p50_s": float(np.percentile(v, 50)), "p95_s": float(np.percentile(v, 95))}
                        for k in dict(MIX) if (v := [s for kk, s in out.latencies if kk == k])},
            "error_examples": sorted(set(out.errors))[:5], "p50_s": float(np.percentile(lat, 50)),
            "p95_s": float(np.percentile(lat, 95)), "inspect_p50_s": float(np.percentile(ins, 50)),
            "inspect_p95_s": float(np.percentile(ins, 95)), "rss_mb": rss_bytes(pid) / 2**20,
            "rss_peak_mb": max(peak) / 2**20, "app_cpu_ms_per_request": 1000 * app_cpu / max(1, len(out.latencies)),
            "app_cores_busy": app_cpu / wall, "clients_cores_busy": own_cpu / wall}


def table(r: dict) -> str:
    head = f"{'clients':>7} {'requests':>8} {'p50 s':>7} {'p95 s':>7} {'Inspect p50':>11} {'Inspect p95':>11} " \
           f"{'errors':>6} {'RSS MB':>7} {'peak MB':>7} {'app CPU ms/req':>14} {'app cores':>9} {'client cores':>12} " \
           f"{'repeats':>7}"
    lines = [head]
    for p in (r["single"], r["loaded"]):
        lines.append(f"{p['clients']:>7} {p['requests']:>8} {p['p50_s']:>7.3f} {p['p95_s']:>7.3f} "
                     f"{p['inspect_p50_s']:>11.3f} {p['inspect_p95_s']:>11.3f} {p['errors']:>6} "
                     f"{p['rss_mb']:>7.0f} {p['rss_peak_mb']:>7.0f} {p['app_cpu_ms_per_request']:>14.0f} "
                     f"{p['app_cores_busy']:>9.2f} {p['clients_cores_busy']:>12.2f} {p['repeat_fraction']:>7.0%}")
    ok = r["p95_ratio"] <= TARGETS["p95_ratio"] and r["errors"] == 0
    lines.append(f"p95_ratio {r['p95_ratio']:.2f} (target <= {TARGETS['p95_ratio']:g}), errors {r['errors']} "
                 f"(target 0): {'ok' if ok else 'NOT MET'}")
    for p in (r["single"], r["loaded"]):
        lines.append(f"  {p['clients']} client(s), p50/p95 by kind: " + ", ".join(
            f"{k} {v['p50_s']:.3f}/{v['p95_s']:.3f}" for k, v in p["by_kind"].items()))
    for e in r["loaded"]["error_examples"]:
        lines.append(f"  error: {e}")
    return "\n".join(lines)


def run_pair(args: argparse.Namespace, home: Path, view_cache: bool) -> dict:
    """The single-client and the N-client phase, each against a freshly started app (so neither finds the
    other's cached views; within a phase, sessions share the app's caches as a Space's visitors do)."""
    out: dict = {}
    for name, n, seed in (("single", 1, args.seed), ("loaded", args.clients, args.seed + 1000)):
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        proc = start_app(args.app_dir.resolve(), home, port, view_cache)
        try:
            c = make_client(args.client, url, args.timeout)
            try:
                samples = Samples.of(c)
            finally:
                c.close()
            out.setdefault("rss_idle_mb", rss_bytes(proc.pid) / 2**20)
            out[name] = phase(args.client, url, n, args.seconds, args.think, args.timeout, samples, proc.pid, seed)
        finally:
            stop(proc)
    single, loaded = out["single"], out["loaded"]
    return {**out, "p95_ratio": loaded["p95_s"] / single["p95_s"], "p50_ratio": loaded["p50_s"] / single["p50_s"],
            "errors": single["errors"] + loaded["errors"], "app_dir": str(args.app_dir), "cpus": os.cpu_count(),
            "seconds": args.seconds, "think_s": args.think, "client": args.client, "clients": args.clients,
            "view_cache": view_cache, "targets": TARGETS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=20, help="concurrent sessions of the loaded phase")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each phase (single, loaded)")
    ap.add_argument("--think", type=float, default=1.0, help="mean pause between a client's requests (s)")
    ap.add_argument("--timeout", type=float, default=30.0, help="a request unanswered this long is an error (s)")
    ap.add_argument("--home", type=Path, default=None, help="data root to build (or reuse); default: a temp folder")
    ap.add_argument("--app-dir", type=Path, default=ROOT, help="the checkout whose app.py to start")
    ap.add_argument("--client", choices=("http", "gradio"), default="http",
                    help="plain HTTP (Gradio's /call API; light) or gradio_client (heavier on the client side)")
    ap.add_argument("--view-cache", choices=("on", "off", "both"), default="on",
                    help="the app's view caches (TOKVIZ_VIEW_CACHE): on (as shipped), off, or both side by side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.think < 0 or args.timeout <= 0:
        raise ValueError("--clients must be >= 1, --seconds and --timeout > 0, --think >= 0")
    home = args.home or Path(tempfile.mkdtemp(prefix="tokviz-load-"))
    home.mkdir(parents=True, exist_ok=True)
    build_data(home)
    caches = {"on": [True], "off": [False], "both": [True, False]}[args.view_cache]
    results = {}
    try:
        for cache in caches:
            results["on" if cache else "off"] = run_pair(args, home, cache)
    finally:
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    result = results[args.view_cache if args.view_cache != "both" else "on"]
    if args.view_cache == "both":
        result = {**result, "without_view_cache": results["off"]}
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for name, r in results.items():
            print(f"app {args.app_dir}, view caches {name}, {args.client} clients, {os.cpu_count()} cpus, "
                  f"{args.seconds:g} s per phase, think {args.think:g} s, idle RSS {r['rss_idle_mb']:.0f} MB")
            print(table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
