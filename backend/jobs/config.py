"""Job configs: one dataclass per job kind, built the same way by the CLI, a YAML/JSON file and the web form.

    @dataclass
    class ProbeConfig(JobConfig):
        layer: int = option(-1, "decoder layer (negative: from the end)")
        ratio: float = option(0.5, "a ratio", range=(0, 1, True, False))          # (0, 1]

    cfg = ProbeConfig.from_dict({"ratio": 0.2})              # invalid values raise ValueError naming the field
    cfg = ProbeConfig.from_file("run.yaml")                   # YAML or JSON (the queue hands jobs config.json)
    add_config_args(parser, ProbeConfig); cfg = config_from_args(parser.parse_args(argv), ProbeConfig)

Every field carries ``help`` and, where it has one, an allowed range or a list of choices; ``__post_init__``
rejects a bad value naming the field and what is allowed. Every kind's ``run_id`` (the name of its run
directory) is checked here too, whichever way the config was built: a non-empty one must be a safe folder name
(``backend.store.rundir.check_run_id``: letters, digits, ``-``, ``_``, ``.``; no ``..``; not starting with ``.``
or ``-``).
``runs_root`` is not confined here: a CLI user may write runs anywhere, the web app confines it itself.
No torch here: the web app builds its forms from these classes.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, Field, asdict, field, fields
from pathlib import Path
from typing import Any

import yaml

from backend.store.rundir import check_run_id
from backend.store.yamltext import load_yaml

INF = math.inf


def option(default: Any, help: str, range: tuple | None = None, choices: tuple | None = None, **kw) -> Any:
    meta = {"help": help}
    if range is not None:
        meta["range"] = range          # (low, high, low_open, high_open)
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check_range(what: str, v: float, rng: tuple) -> None:
    """Raise ValueError naming ``what`` unless ``v`` lies in ``rng`` = (low, high, low_open, high_open)."""
    lo, hi, lo_open, hi_open = rng
    if not ((v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{what}={v} is outside the allowed range {interval}")


POS = (0, INF, True, True)        # > 0
NONNEG = (0, INF, False, True)    # >= 0


class JobConfig:
    """Base of every job kind's config dataclass: fields declared with ``option`` (help, range, choices) are
    type- and range-checked on construction; ``validate`` adds a kind's own checks.

    Subclasses are ``@dataclass`` classes whose fields are JSON-able (int, float, str, bool, list, dict), so a
    config round-trips through ``config.json``, YAML, command-line flags and the web form.
    """

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            expect = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}[f.type]
            if not isinstance(v, expect) or (f.type in ("int", "float") and isinstance(v, bool)):
                raise ValueError(f"{f.name}: expected {f.type}, got {v!r}")
            if "choices" in f.metadata and v not in f.metadata["choices"]:
                raise ValueError(f"{f.name}={v!r} is not allowed; choose one of: {', '.join(f.metadata['choices'])}")
            if "range" in f.metadata:
                check_range(f.name, v, f.metadata["range"])
        if getattr(self, "run_id", ""):       # every kind has one (the registry asserts it); "" = choose one
            check_run_id(self.run_id)
        self._floats_as_floats()
        self.validate()

    def validate(self) -> None:
        """A kind's checks across fields; raise ValueError naming the field and what is allowed."""

    def _floats_as_floats(self) -> None:
        """Store float fields as floats (YAML and JSON give ints for 1, 2, ...)."""
        for f in fields(self):
            if f.type == "float" and isinstance(getattr(self, f.name), int):
                setattr(self, f.name, float(getattr(self, f.name)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path):
        """A config from a YAML or JSON file of field: value, or from a run's ``config.json`` (the queue hands
        a job its config this way)."""
        from backend.jobs import registry
        from backend.store.rundir import read_config_record
        kind, d = read_config_record(Path(path))
        mine = [k for k, spec in registry.kinds().items() if spec.config is cls]
        if kind is not None and mine and kind not in mine:
            raise ValueError(f"config file {path} is a {kind!r} run's config, not a {mine[0]!r} one: run it with "
                             f"`python -m backend {kind} --config {path}`")
        return cls.from_dict(d)

    from_yaml = from_file


def default_of(f: Field) -> Any:
    """A dataclass field's default value (calling its factory)."""
    return f.default if f.default is not MISSING else f.default_factory()


# ---- command line: flags generated from the dataclass, so the CLI and the form cannot drift apart -------------

def parse_mapping(text: str) -> dict:
    """'{a: 1, b: {c: 2}}' (a YAML flow mapping, as in a config file; JSON is one too) or 'a=1,b=0.5' (YAML
    scalars) -> dict."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        out = _yaml_value(text, "a mapping such as {a: 1, b: {c: 2}}")
        if not isinstance(out, dict):
            raise argparse.ArgumentTypeError(f"not a mapping such as {{a: 1, b: {{c: 2}}}}: {text!r}")
        return out
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _yaml_value(v.strip(), f"a value for {k.strip()!r}")
    return out


def parse_list(text: str) -> list:
    """'a,b' or '[a, b]' (a YAML flow list, as in a config file) -> list of strings."""
    text = text.strip()
    if text.startswith("["):
        out = _yaml_value(text, "a list such as [a, b]")
        if not isinstance(out, list):
            raise argparse.ArgumentTypeError(f"not a list such as [a, b]: {text!r}")
        return [str(t) for t in out]
    return [t.strip() for t in text.split(",") if t.strip()]


def _yaml_value(text: str, what: str):
    """JSON or YAML text -> its value (``load_yaml``); a malformed one is a usage error naming ``what``."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not {what}: {e}") from e


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("--config", help="a YAML file of config fields; flags given here override it")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        h = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else f.default_factory()
        h = f"{h} (default: {default!r})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=h)
        else:
            conv = {"int": int, "float": float, "str": str, "list": parse_list, "dict": parse_mapping}[f.type]
            parser.add_argument(flag, type=conv, default=argparse.SUPPRESS, help=h,
                                choices=f.metadata.get("choices"))


def config_from_args(args: argparse.Namespace, cls: type) -> JobConfig:
    base = {}
    if getattr(args, "config", None):
        base = cls.from_yaml(args.config).to_dict()
    names = {f.name for f in fields(cls)}
    base.update({k: v for k, v in vars(args).items() if k in names})
    return cls.from_dict(base)
