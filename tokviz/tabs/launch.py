"""Launch: a form per job kind of the registry (``backend.jobs.registry``), each built from the kind's config
dataclass (the one the CLI parses), so the form, the CLI and a YAML file cannot drift apart. The form of the
chosen kind only is on the page, made when the tab first comes on screen and again when the kind changes
(``gr.render``): the four kinds' forms are ~290 components that every page load would otherwise fetch and mount
before its first paint, for a tab most visitors never open. Jobs run through
the app's job queue as ``python -m backend KIND --config ...`` processes; the jobs table shows status, the phase
(loading the model, training, evaluating), a live progress bar and ETA from the run's ``events.jsonl``, the log
tail, and a cancel button. A finished job is ingested and appears in
every run list.

Read-only mode (a Space, or TOKVIZ_READONLY=1): launching is refused unless the owner set
TOKVIZ_ADMIN_TOKEN and the visitor enters it. User-given paths (an uploaded dataset, a model directory)
must stay inside the data root.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import shutil
from dataclasses import Field, dataclass, fields
from pathlib import Path

import gradio as gr
import yaml

from backend.jobs import registry
from backend.jobs.config import JobConfig, default_of, parse_list, parse_mapping
from backend.jobs.queue import JobView, confine_paths
from backend.lm.scheme_specs import SCHEMES
from backend.lm.tasks import TASKS
from backend.store.yamltext import load_yaml
from tokviz import concurrency
from tokviz.context import AppContext
from tokviz.tabs import publish_panel
from tokviz.tabs.publish_panel import PublishPanel

MODELS = ("default", "tiny-arith", "tiny-modadd")
UPLOAD_TYPES = (".jsonl", ".json", ".parquet")
DEFAULT_KIND = "train"


def form_fields(kind: str = DEFAULT_KIND) -> list[Field]:
    """The config fields the form of ``kind`` edits, its launch fields first."""
    spec = registry.get(kind)
    main = spec.launch_fields
    fs = [f for f in fields(spec.config) if f.name not in spec.hidden_fields]
    return sorted(fs, key=lambda f: (f.name not in main, main.index(f.name) if f.name in main else 0))


def form_text(v: object, kind: str) -> str:
    """A config value as the form shows it (lists comma separated, dicts as JSON); parses back with the
    field."""
    if kind == "list":
        return ", ".join(str(x) for x in v)  # type: ignore[union-attr]
    if kind == "dict":
        return json.dumps(v) if v else ""
    return str(v)


def _component(f: Field, job_kind: str, prefix: str = "tv-f") -> gr.components.Component:
    meta, kind = f.metadata, f.type
    default = registry.get(job_kind).form_defaults.get(f.name, default_of(f))
    label, info = f.name, meta.get("help", "")
    if "range" in meta:
        lo, hi, lo_open, hi_open = meta["range"]
        info += f" · allowed {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    eid = f"{prefix}-{f.name}" if job_kind == DEFAULT_KIND else f"{prefix}-{job_kind}-{f.name}"
    # interactive said outright: Gradio infers it from the events a component feeds, and in a form made by a
    # gr.render (``build``) the launch button's event is not among the render's own
    common = {"label": label, "elem_id": eid, "interactive": True}
    if f.name == "scheme":
        return gr.Dropdown(list(SCHEMES), value=default, info=SCHEMES[str(default)].doc, **common)
    if f.name == "task":
        # a kind whose default is not a task ("" = the run's task, actgrad) keeps it as a choice
        choices = list(TASKS) if default in TASKS else [default, *TASKS]
        return gr.Dropdown(choices, value=default, info=info, **common)
    if f.name == "model":
        return gr.Dropdown(list(MODELS), value=default, info=info + " (inside the data root)",
                           allow_custom_value=True, **common)
    if "choices" in meta:
        return gr.Dropdown(list(meta["choices"]), value=default, info=info, **common)
    if kind == "bool":
        return gr.Checkbox(value=bool(default), info=info, **common)
    if kind in ("int", "float"):
        return gr.Number(value=default, info=info, precision=0 if kind == "int" else None, **common)
    if kind == "dict":
        info += " · JSON or key=value, comma separated"
    if kind == "list":
        info += " · comma separated"
    return gr.Textbox(value=form_text(default, kind), info=info, **common)


@dataclass
class KindForm:
    """One job kind's form: an input per config field (and a dataset upload)."""
    kind: str
    fields: dict[str, gr.components.Component]     # config field name -> its input, in form order
    upload: gr.File | None                         # a dataset upload, for kinds with a ``dataset`` field

    @property
    def inputs(self) -> list[gr.components.Component]:
        """What a launch reads: the upload (if any), then the fields in form order (``values``' order)."""
        return ([self.upload] if self.upload is not None else []) + list(self.fields.values())

    def values(self, got: tuple) -> tuple[dict[str, object], str | None]:
        """(field name -> value, the upload's path) from the values of ``inputs``."""
        got = list(got)
        upload = got.pop(0) if self.upload is not None else None
        return dict(zip(self.fields, got)), upload


@dataclass
class LaunchTab:
    notice: gr.Markdown
    token: gr.Textbox
    kind: gr.Radio
    opened: gr.State            # set when the tab first comes on screen (``TabSpec.opened``): the form is made then
    launch: gr.Button
    message: gr.Markdown
    jobs: gr.HTML
    job: gr.Dropdown
    cancel: gr.Button
    log: gr.Textbox
    publish: PublishPanel | None = None


def build(ctx: AppContext) -> LaunchTab:
    s = ctx.settings
    if s.readonly:
        notice = gr.Markdown("**This app is read-only**: launching jobs is disabled"
                             + (". The owner can enter the admin token below to enable it." if s.admin_token
                                else " (no admin token is configured)."), elem_id="tv-readonly")
    else:
        notice = gr.Markdown("A job runs `python -m backend KIND ...` in its own process with these settings; "
                             f"{s.max_jobs} at a time (TOKVIZ_MAX_JOBS).", elem_id="tv-launch-notice")
    token = gr.Textbox(label="Admin token", type="password", visible=s.readonly and bool(s.admin_token),
                       elem_id="tv-admin-token")
    kinds = list(registry.kinds().values())
    kind = gr.Radio([(k.name, k.name) for k in kinds], value=kinds[0].name, label="Job kind",
                    info=" · ".join(f"{k.name}: {k.help}" for k in kinds), visible=len(kinds) > 1,
                    elem_id="tv-kind")
    opened = gr.State(False)

    # The chosen kind's form, and the launch button's event that reads it (an event on a component made in a
    # render is defined in it; the previous form's event goes with that form).
    @gr.render(inputs=[kind, opened], triggers=[kind.input, opened.change], queue=False, show_progress="minimal",
               **concurrency.UI)
    def kind_form(chosen: str, is_open: bool) -> None:
        if is_open and chosen in registry.kinds():
            wire_form(t, ctx, _kind_form(registry.get(chosen)))

    launch = gr.Button("Launch job", variant="primary", elem_id="tv-launch",
                       interactive=not s.readonly or bool(s.admin_token))
    message = gr.Markdown("", elem_id="tv-launch-message")
    gr.Markdown("### Jobs")
    jobs = gr.HTML(jobs_html([]), elem_id="tv-jobs", css_template=JOBS_CSS, js_on_load=None)
    with gr.Row(equal_height=True):
        job = gr.Dropdown(label="Job", choices=[], elem_id="tv-job", scale=4, allow_custom_value=True)
        cancel = gr.Button("Cancel job", variant="stop", elem_id="tv-cancel", scale=0, min_width=140)
    log = gr.Textbox(label="Log tail", lines=10, max_lines=14, interactive=False, autoscroll=True, elem_id="tv-log")
    t = LaunchTab(notice, token, kind, opened, launch, message, jobs, job, cancel, log, publish_panel.build(ctx))
    return t


def _kind_form(spec: registry.JobSpec, prefix: str = "tv-f") -> KindForm:
    """The form of one kind; ``prefix`` starts its inputs' elem_ids (another tab showing a kind's form uses
    its own, so no id is on the page twice)."""
    comps: dict[str, gr.components.Component] = {}
    fs = form_fields(spec.name)
    main = [f for f in fs if f.name in spec.launch_fields]
    rest = [f for f in fs if f.name not in spec.launch_fields]
    upload = None
    with gr.Group():
        for i in range(0, len(main), 3):
            with gr.Row():
                for f in main[i:i + 3]:
                    comps[f.name] = _component(f, spec.name, prefix)
        if "dataset" in {f.name for f in fields(spec.config)}:
            upload = gr.File(label=f"Dataset upload (instead of a task): {', '.join(UPLOAD_TYPES)} with "
                             "prompt/response or messages fields", file_types=list(UPLOAD_TYPES), height=90,
                             elem_id="tv-upload" if spec.name == DEFAULT_KIND else f"tv-upload-{spec.name}",
                             interactive=True)
        with gr.Accordion("Advanced settings", open=False):
            for i in range(0, len(rest), 3):
                with gr.Row():
                    for f in rest[i:i + 3]:
                        comps[f.name] = _component(f, spec.name, prefix)
    return KindForm(spec.name, comps, upload)


def wire_form(t: LaunchTab, ctx: AppContext, form: KindForm) -> None:
    """The events of the form just made (inside ``build``'s render): the launch button queues a job of its
    kind from it; a chosen scheme fills in its parameters."""
    def on_launch(token, *got):
        values, upload = form.values(got)
        try:
            job_id = submit(ctx, values, upload, token, form.kind)
        except (ValueError, PermissionError) as e:
            table, jobs, log = jobs_state(ctx, None)
            return _message(str(e), False), table, jobs, log
        table, jobs, log = jobs_state(ctx, job_id)
        return _message(f"queued {job_id}", True), table, jobs, log

    t.launch.click(on_launch, [t.token, *form.inputs], [t.message, t.jobs, t.job, t.log],
                   api_visibility="private", **concurrency.JOBS)
    follow_scheme(form)


def follow_scheme(form: KindForm) -> None:
    """A form with a scheme: choosing one puts its default parameters in ``scheme_params`` and its doc under it."""
    if "scheme" not in form.fields or "scheme_params" not in form.fields:
        return

    def scheme_defaults(name):
        info = SCHEMES.get(name)
        if info is None:
            return gr.skip(), gr.skip()
        return form_text(info.defaults, "dict"), gr.update(info=info.doc)

    form.fields["scheme"].input(scheme_defaults, form.fields["scheme"],
                                [form.fields["scheme_params"], form.fields["scheme"]],
                                api_visibility="private", **concurrency.UI)


# ---------------------------------------------------------------------------------------------- form -> config
def _value(f: Field, v: object) -> object:
    """One input value as the field's type; ValueError naming the field.

    Text (what the form's textboxes give) is parsed by the field's type: a list comma separated, a dict as JSON
    or key=value pairs, a number as a number. A value that is already typed (the YAML of the ``/launch`` API,
    gr.Number, a checkbox) passes through as it is, so a list stays a list, a dict a dict and a number a
    number; a value of the wrong type is left for the config to refuse, naming the field (never turned into
    its text).
    """
    kind = f.type
    if kind in ("int", "float"):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError(f"{f.name}: expected a {'whole ' if kind == 'int' else ''}number")
        if isinstance(v, str):
            try:
                v = int(v) if kind == "int" and v.strip().lstrip("+-").isdigit() else float(v)   # big ints exact
            except ValueError as e:
                raise ValueError(f"{f.name}: expected a number, got {v!r}") from e
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return v                                   # the config names the field and the type it wants
        if kind == "int":
            if isinstance(v, float) and not v.is_integer():
                raise ValueError(f"{f.name}: expected a whole number, got {v!r}")
            return int(v)
        return float(v)
    if not isinstance(v, str) and v is not None:
        return v                                       # typed already (bool, list, dict, ...): the config checks it
    text = "" if v is None else v
    try:
        if kind == "list":
            return parse_list(text)
        if kind == "dict":
            return parse_mapping(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{f.name}: {e}") from e
    if kind == "bool":
        if text.strip().lower() in ("true", "false"):
            return text.strip().lower() == "true"
        raise ValueError(f"{f.name}: expected true or false, got {v!r}")
    return text.strip()


def config_from_form(values: dict[str, object], dataset: str = "", kind: str = DEFAULT_KIND) -> JobConfig:
    """The config of ``kind`` from the form's values (field name -> value); the config's own ValueErrors name
    the field and what is allowed."""
    config = registry.get(kind).config
    by_name = {f.name: f for f in fields(config)}
    unknown = sorted(str(k) for k in set(values) - set(by_name))
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    d = {k: _value(by_name[k], v) for k, v in values.items()}
    if dataset:
        d["dataset"] = dataset
    return config.from_dict(d)


def store_upload(tmp_path: str, root: Path) -> str:
    """Copy an uploaded dataset into ``<data root>/uploads`` (named by content hash) and return that path."""
    src = Path(tmp_path)
    if src.suffix.lower() not in UPLOAD_TYPES:
        raise ValueError(f"dataset upload {src.name!r}: expected one of {', '.join(UPLOAD_TYPES)}")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", src.stem)[:60] or "dataset"
    dest = root / "uploads" / f"{stem}-{digest}{src.suffix.lower()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copyfile(src, dest)
    return str(dest)


def allowed_roots(ctx: AppContext) -> list[Path]:
    """Where user-given paths may point: the data root (plus TOKVIZ_ALLOWED_DIRS when not read-only)."""
    roots = [ctx.settings.data_root]
    extra = os.environ.get("TOKVIZ_ALLOWED_DIRS", "")
    if extra and not ctx.settings.readonly:
        roots += [Path(p).expanduser() for p in extra.split(os.pathsep) if p]
    return roots


def submit(ctx: AppContext, values: dict[str, object], upload: str | None, token: str | None,
           kind: str = DEFAULT_KIND) -> str:
    """Validate and queue one job; returns its id. Raises PermissionError when launching is not allowed
    here and ValueError for a bad config."""
    if not ctx.settings.may_launch(token):
        raise PermissionError("this app is read-only: launching jobs is disabled"
                              + (" (wrong or missing admin token)" if ctx.settings.admin_token else ""))
    root = ctx.settings.data_root
    dataset = store_upload(upload, root) if upload else ""
    cfg = config_from_form(values, dataset, kind)
    if cfg.runs_root or cfg.run_id:
        raise ValueError("runs_root and run_id are chosen by the app")
    confine_paths(cfg, allowed_roots(ctx))
    return ctx.jobs.submit(cfg).job_id


# ---------------------------------------------------------------------------------------------- jobs view
def _dur(s: float | None) -> str:
    if s is None:
        return ""
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def jobs_html(views: list[JobView]) -> str:
    """The jobs table: status, a progress bar (step / total), ETA, elapsed time, run and message."""
    if not views:
        return '<div class="tv-jobs-empty">No jobs yet in this session of the app.</div>'
    rows = []
    for v in views:
        frac = v.fraction
        phase = f"{html.escape(v.phase)} " if v.phase else ""
        bar = (f'<div class="tv-pbar" title="{frac:.0%}"><div style="width:{frac * 100:.1f}%"></div></div>'
               f'<span class="tv-pnum">{phase}{v.step or 0}/{v.total}</span>' if frac is not None else
               f'<span class="tv-pnum">{phase or "starting"}…</span>' if v.status == "running" else "")
        eta = _dur(v.eta_s) if v.status == "running" and v.eta_s is not None else ""
        rows.append(
            f'<tr class="tv-job tv-{v.status}" data-job="{html.escape(v.job_id, quote=True)}">'
            f'<td>{html.escape(v.title)}</td><td><span class="tv-status">{v.status}</span></td><td>{bar}</td>'
            f'<td>{eta}</td><td>{_dur(v.elapsed_s)}</td><td><code>{html.escape(v.run_id)}</code></td>'
            f'<td>{html.escape(v.message or v.last_event)}</td></tr>')
    head = "<tr><th>job</th><th>status</th><th>progress</th><th>ETA</th><th>elapsed</th><th>run</th><th>note</th></tr>"
    return f'<table class="tv-jobs-table">{head}{"".join(rows)}</table>'


JOBS_CSS = """
.tv-jobs-table { width: 100%; border-collapse: collapse; font-size: .9em; }
.tv-jobs-table th, .tv-jobs-table td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e5e5e5; }
.tv-pbar { display: inline-block; width: 160px; height: 10px; background: #eee; border-radius: 5px; overflow: hidden;
           vertical-align: middle; }
.tv-pbar > div { height: 100%; background: #2b7bd8; transition: width .4s; }
.tv-pnum { margin-left: 6px; font-variant-numeric: tabular-nums; }
.tv-status { padding: 1px 6px; border-radius: 8px; background: #eee; }
.tv-finished .tv-status { background: #d6f5d6; } .tv-failed .tv-status { background: #f8d0d0; }
.tv-running .tv-status { background: #d6e6fb; } .tv-cancelled .tv-status { background: #eee2c8; }
.tv-jobs-empty { color: #666; padding: .5em 0; }
"""


def job_choices(views: list[JobView]) -> list[tuple[str, str]]:
    return [(f"{v.title} · {v.status} · {v.run_id}", v.job_id) for v in views]


def jobs_state(ctx: AppContext, job_id: str | None) -> tuple[str, object, str]:
    """(jobs table, job dropdown update, log tail of the chosen job or the newest)."""
    views = ctx.jobs.snapshot()
    ids = [v.job_id for v in views]
    chosen = job_id if job_id in ids else (ids[0] if ids else None)
    log = ctx.jobs.log_tail(chosen) if chosen else ""
    return jobs_html(views), gr.update(choices=job_choices(views), value=chosen), log


def _message(text: str, ok: bool) -> str:
    return f'<span class="tv-{"ok" if ok else "err"}">{"✅" if ok else "⚠️"} {html.escape(text)}</span>'


# ---------------------------------------------------------------------------------------------- wiring
def wire(t: LaunchTab, ctx: AppContext) -> None:
    def launch_config(config_yaml: str, admin_token: str = "", kind: str = DEFAULT_KIND) -> str:
        """Queue a job of ``kind`` (default train) from its config fields as YAML or JSON text (what a YAML
        config file holds); returns the job id, or the reason it was refused. Values keep their YAML types
        (``lora_targets: [q_proj, v_proj]`` is a list, ``task_params: {p: 97}`` a dict), as in a config file
        given to the CLI."""
        try:
            d = load_yaml(config_yaml or "{}") or {}
            if not isinstance(d, dict):
                raise ValueError(f"the config must be a mapping of {kind} config fields")
            if "dataset" in d:
                raise ValueError("dataset: upload the file on the Launch tab (paths are not accepted here)")
            return submit(ctx, d, None, admin_token, kind)
        except (ValueError, PermissionError, yaml.YAMLError) as e:
            raise gr.Error(str(e), print_exception=False) from e

    gr.api(launch_config, api_name="launch", **concurrency.JOBS)

    def on_cancel(job_id, token):
        if not job_id:
            raise gr.Error("choose a job to cancel", print_exception=False)
        if not ctx.settings.may_launch(token):
            raise gr.Error("this app is read-only: only its owner (with the admin token) can cancel jobs",
                           print_exception=False)
        try:
            ctx.jobs.cancel(job_id)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from e
        return jobs_state(ctx, job_id)

    t.cancel.click(on_cancel, [t.job, t.token], [t.jobs, t.job, t.log], api_name="cancel_job", **concurrency.JOBS)
    t.job.input(lambda j: jobs_state(ctx, j), t.job, [t.jobs, t.job, t.log], api_visibility="private",
                **concurrency.RENDER)
