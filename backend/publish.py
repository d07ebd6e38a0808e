"""Publish runs as a folder ready to push as a Hugging Face Docker Space: ``python -m backend publish``.

    python -m backend publish data/runs/demo-sft-position demo-dft-token --out /tmp/my-space --title "Our runs"
    python -m backend publish RUN... --out DIR --with-adapters --with-state --max-size 500M --no-check

The folder holds the app's code (``app.py``, ``tokviz/``, ``backend/``), ``requirements.txt``, the
``Dockerfile`` (read-only: launching jobs needs the owner's ``TOKVIZ_ADMIN_TOKEN``), a README whose front
matter a Docker Space reads (title, a short description naming the runs), and the runs under ``data/runs/``,
slimmed to what the app reads: configs, events, manifests, Parquet tables, analyses. Adapters (``adapter/``)
and verify's step state (``trace/state/``) only with ``--with-adapters`` / ``--with-state``; checkpoints and
job logs never. A run that owns runs (a scheme comparison) is published with them. ``TOKVIZ_OPEN_RUN`` in the
Dockerfile makes the Space open on the first published run.

It prints the size per run and in total and refuses, before writing anything, a folder larger than
``--max-size`` (default 1G), naming what would shrink it. Unless ``--no-check``, it then starts the published
app from a copy of the folder (``python app.py`` on a free port, its own data root) and checks through the app's
API that it lists exactly the published runs and that each traced run renders in Inspect (its first sample),
Concentration and Layers, and the traced runs together in Compare. Exit codes: 0 published
(and checked), 1 the check failed, 2 bad input (a missing run, an existing non-empty ``--out``, too large).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from backend.store.rundir import CONFIG, child_runs, find_run

CODE = ("app.py", "requirements.txt", "Dockerfile", "tokviz", "backend")
NEVER = ("checkpoint", "logs")                       # resume state and job logs: never published
OPTIONAL = {"adapter": "--with-adapters", "trace/state": "--with-state"}
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'1G', '500M', '2048K' or bytes -> bytes; ValueError naming what is allowed."""
    t = text.strip().upper()
    try:
        n = float(t[:-1]) * UNITS[t[-1]] if t and t[-1] in UNITS else float(t)
    except ValueError:
        raise ValueError(f"--max-size {text!r}: give bytes or a number with K, M or G (e.g. 1G, 500M)") from None
    if not n > 0:
        raise ValueError(f"--max-size {text!r} must be > 0")
    return int(n)


def with_children(runs: list[Path]) -> list[Path]:
    """The runs and, after each, the runs it owns (a comparison's train runs), without repeats."""
    out: list[Path] = []
    for r in runs:
        for p in [r, *child_runs(r)]:
            if p not in out:
                out.append(p)
    return out


def run_files(run: Path, with_adapters: bool, with_state: bool) -> tuple[list[Path], dict[str, int]]:
    """The files of ``run`` to publish (relative paths) and the bytes left out, per reason."""
    skip = set(NEVER) | ({"adapter"} if not with_adapters else set()) | ({"trace/state"} if not with_state else set())
    keep, left = [], {}
    for f in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = f.relative_to(run)
        hit = next((s for s in skip if rel.as_posix() == s or rel.as_posix().startswith(s + "/")), None)
        if hit is None:
            keep.append(rel)
        else:
            left[hit] = left.get(hit, 0) + f.stat().st_size
    return keep, left


def _record(run: Path) -> dict:
    """A run directory's config.json record (run_id, kind, name, config)."""
    d = json.loads((run / CONFIG).read_text())
    if not isinstance(d, dict) or "run_id" not in d:
        raise ValueError(f"{run / CONFIG}: not a run's config record (no run_id)")
    return d


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


def readme(title: str, runs: list[Path]) -> str:
    ids = [_record(r)["run_id"] for r in runs]
    short = f"tokviz: {', '.join(ids)}"
    short = short if len(short) <= 60 else short[:57] + "..."
    listing = "\n".join(f"- `{i}` ({_record(r).get('kind', '?')})" for i, r in zip(ids, runs))
    front = {"title": title, "emoji": "🔬", "colorFrom": "blue", "colorTo": "red", "sdk": "docker",
             "app_port": 7860, "pinned": False, "short_description": short}
    head = "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v).lower()}"
                     for k, v in front.items())
    return (f"---\n{head}\n---\n\n# {title}\n\nPer-token gradient traces published with "
            f"[tokviz](https://github.com/) (`python -m backend publish`). Runs:\n\n{listing}\n\n"
            "The Space is read-only; its owner can allow launching jobs by setting `TOKVIZ_ADMIN_TOKEN`.\n")


def publish(runs: list[Path], out: Path, title: str, with_adapters: bool = False, with_state: bool = False,
            max_size: int = 1 << 30) -> dict:
    """Write the Space folder; returns {"runs": {run_id: bytes}, "code": bytes, "total": bytes, "left_out"}.
    ValueError (nothing written) when ``out`` is a non-empty folder or the total exceeds ``max_size``."""
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; give a new folder")
    runs = with_children(runs)
    root = Path(__file__).resolve().parent.parent
    plan, sizes, left = {}, {}, {}
    for r in runs:
        files, skipped = run_files(r, with_adapters, with_state)
        rid = _record(r)["run_id"]
        plan[rid] = (r, files)
        sizes[rid] = sum((r / f).stat().st_size for f in files)
        for k, v in skipped.items():
            left[k] = left.get(k, 0) + v
    code_files = [p for c in CODE for p in ([root / c] if (root / c).is_file() else
                                            [f for f in (root / c).rglob("*") if f.is_file()
                                             and "__pycache__" not in f.parts])]
    code = sum(f.stat().st_size for f in code_files)
    total = code + sum(sizes.values())
    if total > max_size:
        biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
        raise ValueError(f"the Space would be {_mb(total)}, over --max-size {_mb(max_size)}; largest runs: "
                         + ", ".join(f"{k} {_mb(v)}" for k, v in biggest)
                         + ("; leave out --with-state / --with-adapters" if with_state or with_adapters else "")
                         + "; publish fewer runs, or raise --max-size")
    out.mkdir(parents=True, exist_ok=True)
    for f in code_files:
        dst = out / f.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    first = _record(runs[0])["run_id"]
    docker = (out / "Dockerfile").read_text()
    (out / "Dockerfile").write_text(docker.replace("TOKVIZ_READONLY=1 \\", f"TOKVIZ_READONLY=1 \\\n    "
                                                   f"TOKVIZ_OPEN_RUN={first} \\"))
    (out / "README.md").write_text(readme(title, runs))
    for rid, (r, files) in plan.items():
        for f in files:
            dst = out / "data" / "runs" / rid / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(r / f, dst)
    return {"runs": sizes, "code": code, "total": total, "left_out": left, "open_run": first}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(out: Path, run_ids: list[str], timeout: float = 300.0) -> list[str]:
    """Start the published app (from a copy of the folder, so its index and log do not end up in the Space) and
    ask its API what it lists and renders; returns the problems found, with the app's log tail on failure."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="tokviz-publish-check-") as tmp:
        copy = Path(tmp) / "space"
        shutil.copytree(out, copy)
        problems = _check(copy, run_ids, timeout)
        if problems:
            tail = (copy / ".publish-check.log").read_text(errors="replace")[-2000:]
            problems.append("the app's log ends with:\n" + tail)
        return problems


def _check(out: Path, run_ids: list[str], timeout: float) -> list[str]:
    from gradio_client import Client
    port = _free_port()
    env = {**os.environ, "TOKVIZ_HOME": str(out / "data"), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_SERVER_NAME": "127.0.0.1", "TOKVIZ_READONLY": "1", "HF_HUB_OFFLINE": "1"}
    log = open(out / ".publish-check.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
    problems: list[str] = []
    try:
        url, deadline, client = f"http://127.0.0.1:{port}/", time.monotonic() + timeout, None
        while client is None:
            if proc.poll() is not None:
                return [f"the published app exited with {proc.returncode}"]
            try:
                client = Client(url, verbose=False)
            except Exception:       # noqa: BLE001 - not listening yet: the state waited for is "accepts a client"
                if time.monotonic() > deadline:
                    return [f"the published app did not answer on {url} within {timeout:.0f} s"]
                time.sleep(0.5)
        _, table, _ = client.predict("SELECT run_id, kind, n_traced_steps FROM runs ORDER BY run_id", 100,
                                     api_name="/sql")
        rows = table["data"] if isinstance(table, dict) else table
        listed = sorted(r[0] for r in rows)
        if listed != sorted(run_ids):
            problems.append(f"the app lists {listed}, published {sorted(run_ids)}")
        traced: list[str] = []
        for run_id, kind, n_steps in rows:
            if kind == "train" and int(n_steps or 0) > 0:
                _, steps, _ = client.predict(f"SELECT min(step) FROM tokens WHERE run_id = '{run_id}'", 1,
                                             api_name="/sql")
                step = int((steps["data"] if isinstance(steps, dict) else steps)[0][0])
                html = client.predict(run_id, step, 0, "alignment", None, api_name="/next_sample")
                if 'class="tv-text"' not in str(html):
                    problems.append(f"{run_id}: Inspect rendered no sample at step {step}")
                client.predict(run_id, step, [step], [], api_name="/concentration")     # raises if it cannot
                _, mods, _ = client.predict(f"SELECT min(module) FROM token_modules WHERE run_id = '{run_id}' "
                                            f"AND step = {step}", 1, api_name="/sql")
                module = (mods["data"] if isinstance(mods, dict) else mods)[0][0]
                if module:
                    client.predict(run_id, step, module, api_name="/layer_position_heatmap")
                traced.append(run_id)
        if len(traced) >= 2:
            client.predict(traced, api_name="/compare_runs")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend publish", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories or run ids (under the data root's runs/)")
    ap.add_argument("--out", required=True, help="the Space folder to write (new or empty)")
    ap.add_argument("--title", default="tokviz runs", help="the Space's title")
    ap.add_argument("--with-adapters", action="store_true", help="include each run's adapter/")
    ap.add_argument("--with-state", action="store_true", help="include verify's step state (trace/state/)")
    ap.add_argument("--max-size", default="1G", help="refuse a Space larger than this (default 1G)")
    ap.add_argument("--no-check", action="store_true", help="do not start the published app to check it")
    args = ap.parse_args(argv)
    try:
        runs = [find_run(r) for r in args.runs]
        res = publish(runs, Path(args.out), args.title, args.with_adapters, args.with_state,
                      parse_size(args.max_size))
    except ValueError as e:
        print(f"publish: {e}", file=sys.stderr)
        return 2
    for rid, n in res["runs"].items():
        print(f"  {rid:<48} {_mb(n):>10}")
    print(f"  {'(code)':<48} {_mb(res['code']):>10}\n  {'total':<48} {_mb(res['total']):>10}")
    for what, n in res["left_out"].items():
        print(f"  left out {what}/ ({_mb(n)}; {OPTIONAL.get(what, 'never published')})")
    print(f"wrote {args.out} (opens on {res['open_run']})")
    if args.no_check:
        return 0
    problems = check(Path(args.out), list(res["runs"]))
    if problems:
        print("check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"check passed: the published app lists exactly the {len(res['runs'])} runs and renders them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
