"""YAML text (config files, the flags' mappings, the app's config API) read the way a user writes numbers.

    load_yaml("lr: 1e-5\nsteps: 200")           # {'lr': 1e-05, 'steps': 200}

PyYAML resolves YAML 1.1, where a float needs a dot: ``1e-5`` (and JSON's ``1e-05``, which ``json.dumps`` writes
for every float below 1e-4) would load as the *string* '1e-05', and a config then refuses ``lr``. The loader here
adds YAML 1.2's float forms (an exponent without a dot) to PyYAML's safe loader; everything else is its own.
Text that parses as JSON is read as JSON.
"""
from __future__ import annotations

import json
import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader plus YAML 1.2 floats: 1e-5, 2E+3, -3e4 (ints and strings as before)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """JSON text as JSON (exact: PyYAML reads an escaped emoji, \\ud83d\\ude80 in a config.json, as two lone
    halves), anything else as YAML with 1.2's exponent floats; raises ``yaml.YAMLError`` as ``safe_load`` does."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.load(text, Loader=_Loader)
