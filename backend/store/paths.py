"""Where tokviz keeps its files, and the check that user-given paths stay inside allowed roots.

Data root: ``data/`` next to this package by default; ``TOKVIZ_HOME`` overrides it.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DATA = PROJECT_ROOT / "data"
DEFAULT_MODEL_DIR = SHIPPED_DATA / "models" / "tiny-arith"
MODADD_MODEL_DIR = SHIPPED_DATA / "models" / "tiny-modadd"


def data_root() -> Path:
    """The data root: ``$TOKVIZ_HOME`` if set, else the shipped ``data/`` folder."""
    env = os.environ.get("TOKVIZ_HOME")
    return Path(env).expanduser().resolve() if env else SHIPPED_DATA


def runs_dir(runs_root: str | os.PathLike | None = None) -> Path:
    """Where run directories go: ``runs_root`` (a job's option; ``~`` expanded) if given, else <data root>/runs."""
    return Path(runs_root).expanduser() if runs_root else data_root() / "runs"


def index_path() -> Path:
    return data_root() / "tokviz.duckdb"


def resolve_inside(path: str | os.PathLike, roots: list[Path], what: str = "path") -> Path:
    """Resolve ``path`` (symlinks included) and check it lies inside one of ``roots``.

    Raises ValueError naming the path and the allowed roots otherwise. Relative paths are taken relative
    to the first root.
    """
    if not roots:
        raise ValueError("resolve_inside needs at least one allowed root")
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = roots[0] / p
    resolved = p.resolve()
    for root in roots:
        r = Path(root).resolve()
        if resolved == r or r in resolved.parents:
            return resolved
    allowed = ", ".join(str(Path(r).resolve()) for r in roots)
    raise ValueError(f"{what} {str(path)!r} resolves to {resolved}, outside the allowed roots: {allowed}")
