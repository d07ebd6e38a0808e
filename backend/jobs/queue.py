"""The job queue: jobs run as separate processes (``python -m backend KIND ...``), a few at a time.

    q = JobQueue(max_running=1, on_exit=lambda job: print(job.status))
    job = q.submit(TrainConfig(task="arith", steps=4, trace_every=2))   # any kind; started when a slot is free
    q.snapshot()                  # [JobView(...)]: status, progress and ETA read from the run's events.jsonl
    q.log_tail(job.job_id)        # the last lines of the job's stdout + stderr
    q.cancel(job.job_id)          # SIGINT to the job's process group (the job records its failure), then SIGKILL
    q.submit_command("fake", [sys.executable, "script.py"], run_id, run_dir)   # any command that writes a run dir

The web app's Launch tab and anything else that launches jobs use this queue. A job's kind comes from its
config's class (backend.jobs.registry); the queue writes the config to the run directory's ``config.json`` and
runs ``python -m backend KIND --config <that file>``, so a launched job is exactly the object the form built.
``TOKVIZ_MAX_JOBS`` sets how many run at once (default 1). No torch here: the app imports this module at start.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from backend.jobs import registry
from backend.jobs.config import JobConfig
from backend.store import paths
from backend.store.rundir import CONFIG, MANIFEST, RunDir, new_run_id, queue_config, read_events

STATUSES = ("queued", "running", "finished", "failed", "cancelled")
ACTIVE = ("queued", "running")
POLL_S = 0.25              # how often the watcher looks at running processes
CANCEL_GRACE_S = 5.0       # SIGINT first (the job records its own failure), SIGKILL after this
LOG_TAIL_BYTES = 16_384
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def max_jobs_from_env() -> int:
    """``TOKVIZ_MAX_JOBS`` (default 1): jobs that may run at the same time."""
    raw = os.environ.get("TOKVIZ_MAX_JOBS", "1")
    try:
        n = int(raw)
    except ValueError as e:
        raise ValueError(f"TOKVIZ_MAX_JOBS must be an integer >= 1, got {raw!r}") from e
    if n < 1:
        raise ValueError(f"TOKVIZ_MAX_JOBS must be an integer >= 1, got {n}")
    return n


# ------------------------------------------------------------------------------------------ paths
def confine_paths(cfg: JobConfig, roots: list[Path]) -> None:
    """Refuse a config whose user-given paths leave ``roots``: its kind's ``path_fields`` (dataset, runs_root,
    an adapter, ...) and ``model_fields``. A model named like a hub id (``org/name``) or a bare name
    (``default``) is not a path; anything that exists on disk, starts with ``.``, ``/`` or ``~``, or has more
    than one ``/`` is, and must resolve inside the roots. Raises ValueError naming the field.
    """
    spec = registry.for_config(cfg)
    for name in spec.path_fields:
        if getattr(cfg, name):
            paths.resolve_inside(getattr(cfg, name), roots, what=name)
    for name in spec.model_fields:
        m = getattr(cfg, name)
        path_like = (m.startswith((".", "/", "~")) or m.count("/") > 1 or "\\" in m
                     or Path(m).expanduser().exists() or (("/" in m) and not _HUB_ID.match(m)))
        if path_like:
            paths.resolve_inside(m, roots, what=name)
        elif "/" in m and any(part in (".", "..") for part in m.split("/")):
            raise ValueError(f"{name} {m!r} is neither a hub id (org/name) nor a path inside the data root")


# ------------------------------------------------------------------------------------------ jobs
@dataclass
class Job:
    job_id: str
    kind: str
    argv: list[str]                  # the full command line
    run_id: str
    run_dir: Path
    log_path: Path
    title: str = ""
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    message: str = ""                # why it failed or was cancelled
    proc: subprocess.Popen | None = field(default=None, repr=False)
    cancel_at: float | None = None   # when SIGINT was sent


@dataclass(frozen=True)
class JobView:
    """What a jobs table shows about one job (a snapshot; no process handle)."""
    job_id: str
    kind: str
    title: str
    status: str
    run_id: str
    run_dir: str
    step: int | None
    total: int | None
    eta_s: float | None
    elapsed_s: float | None
    last_event: str
    message: str
    command: str
    phase: str = ""                 # loading the model, training, evaluating (before/after training)

    @property
    def fraction(self) -> float | None:
        if self.status == "finished":
            return 1.0
        if self.step is None or not self.total:
            return None
        return min(1.0, self.step / self.total)


def progress_of(run_dir: Path) -> dict:
    """Phase (loading the model, training, evaluating), its step and total, ETA and the last event's type from
    a run's events.jsonl (empty if it has none yet).
    A torn last line (the job is writing it) is left out by ``read_events``."""
    try:
        events = read_events(run_dir)
    except ValueError as e:       # a corrupt line in the middle: show it rather than hide the job
        return {"last_event": f"unreadable events: {e}"}
    out: dict = {}
    for e in events:
        t = e.get("type")
        if t == "progress":
            out.update(phase="training", step=e.get("step"), total=e.get("total"), eta_s=e.get("eta_s"))
        elif t == "evaluating":
            out.update(phase=f"evaluating ({e.get('when', 'after')} training)", step=e.get("done"),
                       total=e.get("total"), eta_s=e.get("eta_s"))
        elif t == "loading":
            out.update(phase="loading the model", step=None, total=None, eta_s=None)
        if e.get("type") == "error":
            out["error"] = e.get("error")
    shown = [e for e in events if e.get("type") != "heartbeat"]      # "still alive" is not news in a jobs table
    if shown:
        out["last_event"] = str(shown[-1].get("type", ""))
    return out


class JobQueue:
    """Jobs as child processes, at most ``max_running`` at once, started in submission order.

    ``on_exit(job)`` runs on the watcher thread once a job's process has ended (whatever the outcome):
    the app ingests the run there. An error it raises is printed and added to the job's ``message``; the
    queue keeps running the other jobs. ``logs_dir`` (default ``<data root>/jobs``) holds one log per job.
    """

    def __init__(self, max_running: int = 1, on_exit: Callable[[Job], None] | None = None,
                 logs_dir: Path | None = None, python: str = sys.executable) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        self.max_running = max_running
        self.on_exit = on_exit
        self.logs_dir = Path(logs_dir) if logs_dir is not None else paths.data_root() / "jobs"
        self.python = python
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._watcher: threading.Thread | None = None
        self._closed = False
        self._count = 0

    # ---- submitting
    def submit(self, cfg: JobConfig, title: str = "") -> Job:
        """Queue the job of ``cfg``'s kind (``python -m backend KIND --config RUN_DIR/config.json``). The run id,
        and so the run directory, is fixed now, and the config is written there before the job starts: the
        job reads exactly this object back, whatever its fields hold (commas, quotes, leading dashes)."""
        spec = registry.for_config(cfg)
        if not cfg.run_id:
            cfg = replace(cfg, run_id=new_run_id(spec.name, getattr(cfg, "name", "") or ""))
        root = paths.runs_dir(cfg.runs_root)
        run_dir = root / cfg.run_id
        queue_config(run_dir, spec.name, cfg)
        argv = [self.python, "-m", "backend", spec.name, "--quiet", "--config", str(run_dir / CONFIG)]
        return self.submit_command(spec.name, argv, cfg.run_id, run_dir, title or getattr(cfg, "name", "") or spec.name)

    def submit_command(self, kind: str, argv: list[str], run_id: str, run_dir: Path, title: str = "") -> Job:
        """Queue any command that writes the run directory ``run_dir`` (its events give the progress)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the job queue is shut down")
            self._count += 1
            job_id = f"job{self._count}-{run_id}"
            job = Job(job_id, kind, argv, run_id, run_dir, self.logs_dir / f"{job_id}.log", title)
            self._jobs.append(job)
            self._ensure_watcher()
        self._wake.set()
        return job

    # ---- reading
    def snapshot(self) -> list[JobView]:
        """Every job, newest first, with progress read from its run's events."""
        with self._lock:
            jobs = list(self._jobs)
        views = []
        for j in reversed(jobs):
            p = progress_of(j.run_dir) if j.run_dir.exists() else {}
            end = j.ended or time.time()
            views.append(JobView(
                job_id=j.job_id, kind=j.kind, title=j.title, status=j.status, run_id=j.run_id,
                run_dir=str(j.run_dir), step=p.get("step"), total=p.get("total"),
                eta_s=p.get("eta_s") if j.status == "running" else None,
                elapsed_s=(end - j.started) if j.started else None, last_event=p.get("last_event", ""),
                message=j.message or (p.get("error") or ""), command=" ".join(j.argv[1:]),
                phase=p.get("phase", "") if j.status == "running" else ""))
        return views

    def get(self, job_id: str) -> Job:
        with self._lock:
            for j in self._jobs:
                if j.job_id == job_id:
                    return j
            known = [j.job_id for j in self._jobs]
        raise ValueError(f"no job {job_id!r}; jobs: {', '.join(known) or 'none'}")

    def active(self) -> bool:
        with self._lock:
            return any(j.status in ACTIVE for j in self._jobs)

    def log_tail(self, job_id: str, max_bytes: int = LOG_TAIL_BYTES) -> str:
        """The end of a job's log (stdout and stderr together); empty before it starts."""
        log = self.get(job_id).log_path
        if not log.exists():
            return ""
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - max_bytes))
            return f.read().decode("utf-8", errors="replace")

    # ---- cancelling
    def cancel(self, job_id: str, reason: str = "cancelled by the user") -> Job:
        """Cancel a queued job, or interrupt a running one (SIGINT, then SIGKILL after a grace period: a job
        started with SIGINT ignored, e.g. from a background shell, cannot record its own end)."""
        job = self.get(job_id)
        with self._lock:
            if job.status == "queued":
                job.status, job.ended, job.message = "cancelled", time.time(), f"{reason} before it started"
                _record_end(job)
            elif job.status == "running" and job.cancel_at is None:
                job.cancel_at = time.time()
                job.message = reason
                _signal_group(job.proc, signal.SIGINT)
            elif job.status not in ACTIVE:
                raise ValueError(f"job {job_id} already ended ({job.status})")
        self._wake.set()
        return job

    def wait(self, job_id: str, timeout: float) -> Job:
        """Block until the job has ended and its ``on_exit`` ran (tests, scripts); TimeoutError otherwise."""
        deadline = time.time() + timeout
        job = self.get(job_id)
        while time.time() < deadline:
            if job.status not in ACTIVE and job.ended is not None and job.proc is None:
                return job
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} still {job.status} after {timeout:g} s")

    def shutdown(self, timeout: float = 15.0) -> None:
        """Cancel everything and stop the watcher (app exit, tests)."""
        with self._lock:
            self._closed = True
            ids = [j.job_id for j in self._jobs if j.status in ACTIVE]
        for i in ids:
            try:
                self.cancel(i, reason="stopped: the app shut down")
            except ValueError:
                pass      # it ended between the listing and the cancel: nothing left to stop
        deadline = time.time() + timeout
        while self.active() and time.time() < deadline:
            self._wake.set()
            time.sleep(0.05)
        if self._watcher is not None:
            self._wake.set()
            self._watcher.join(timeout=max(0.0, deadline - time.time()) + 1.0)

    # ---- the watcher thread
    def _ensure_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="tokviz-jobs", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while True:
            try:
                ended = self._step()
            except Exception as e:  # noqa: BLE001 -- reported: one bad poll must not stop every later job
                print(f"tokviz: the job watcher hit {type(e).__name__}: {e} (it keeps watching)",
                      file=sys.stderr, flush=True)
                ended = []
            for job in ended:
                self._finish(job)
            with self._lock:
                if self._closed and not any(j.status in ACTIVE or j.proc is not None for j in self._jobs):
                    return
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _step(self) -> list[Job]:
        """Reap ended processes, escalate slow cancels, start queued jobs; returns the jobs that ended."""
        ended = []
        with self._lock:
            for j in self._jobs:
                if j.status != "running" or j.proc is None:
                    continue
                rc = j.proc.poll()
                if rc is None:
                    if j.cancel_at is not None and time.time() - j.cancel_at > CANCEL_GRACE_S:
                        _signal_group(j.proc, signal.SIGKILL)
                    continue
                j.returncode, j.ended = rc, time.time()
                if j.cancel_at is not None:
                    j.status = "cancelled"
                elif rc == 0 and (j.run_dir / MANIFEST).exists():
                    j.status = "finished"
                else:
                    j.status = "failed"
                    try:
                        j.message = j.message or _failure(j)
                    except OSError as e:      # its run directory or log went away: still a failed job
                        j.message = f"exited with code {rc} (its log is unreadable: {e})"
                ended.append(j)
            running = sum(j.status == "running" for j in self._jobs)
            for j in self._jobs:
                if running >= self.max_running or self._closed:
                    break
                if j.status == "queued":
                    self._start(j)
                    running += 1
        return ended

    def _start(self, j: Job) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKVIZ_HOME": str(paths.data_root())}
        try:
            j.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(j.log_path, "ab") as log:
                log.write(f"$ {' '.join(j.argv)}\n".encode())
                log.flush()
                j.proc = subprocess.Popen(j.argv, cwd=paths.PROJECT_ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        except OSError as e:         # no log folder, no interpreter, ...: this job fails, the queue goes on
            j.status, j.ended, j.message = "failed", time.time(), f"could not start: {e}"
            print(f"tokviz: job {j.job_id} (run {j.run_id}) could not start: {e}", file=sys.stderr, flush=True)
            return
        j.status, j.started = "running", time.time()

    def _finish(self, j: Job) -> None:
        """Record a cancelled or failed job's end and run ``on_exit``. Whatever they raise is reported (stderr
        and the job's message) and goes no further: the watcher thread must keep starting and reaping the other
        jobs."""
        try:
            if j.status in ("cancelled", "failed"):
                _record_end(j)
            if self.on_exit is not None:
                self.on_exit(j)
        except Exception as e:  # noqa: BLE001 -- on_exit is the caller's code (the app's ingest): reported below
            why = f"after it ended: {type(e).__name__}: {e}"
            with self._lock:
                j.message = (j.message + "; " if j.message else "") + why
            print(f"tokviz: job {j.job_id} (run {j.run_id}) {why}", file=sys.stderr, flush=True)
        finally:
            with self._lock:
                j.proc = None


def _record_end(j: Job) -> None:
    """A job that ended without recording why (cancelled while queued, killed, or failed before its own
    ``start``, e.g. on a bad config): say so in its run's events, so the index shows the run as failed
    rather than queued or interrupted."""
    if (j.run_dir / CONFIG).exists() and not (j.run_dir / MANIFEST).exists() and "error" not in progress_of(j.run_dir):
        RunDir(j.run_dir, j.run_id).event("error", error=j.message)


def _signal_group(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass       # it exited between the poll and the signal


def _failure(j: Job) -> str:
    """The most telling line of a failed job: its recorded error, else the last 'error:' line of its log."""
    err = progress_of(j.run_dir).get("error") if j.run_dir.exists() else None
    if err:
        return str(err)
    if j.log_path.exists():
        lines = [ln for ln in j.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        for ln in reversed(lines):
            if ln.startswith("error") or "Error" in ln:
                return ln.strip()
        if lines:
            return lines[-1].strip()
    return f"exited with code {j.returncode}"
