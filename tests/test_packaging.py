"""pyproject.toml: its dependencies are requirements.txt's (read from it), it packages every module of backend/
and tokviz/, and its ``tokviz`` console script dispatches as ``python -m backend`` does (``app`` serves the app as
``python app.py`` does). Tests never need the package installed: the entry function is called in-process."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")          # Python >= 3.11; the package itself supports 3.10

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement_lines(path: Path) -> list[str]:
    """Requirement specifiers of a requirements file: comments and blank lines dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _normalised(spec: str) -> str:
    from packaging.requirements import Requirement
    return str(Requirement(spec))


def test_pyproject_dependencies_are_requirements_txt(project, tmp_path, monkeypatch):
    """The metadata setuptools builds (what pip installs) requires exactly requirements.txt's lines."""
    from email.parser import Parser

    from setuptools import build_meta
    assert project["dynamic"] == ["dependencies"] and "dependencies" not in project
    lines = _requirement_lines(ROOT / "requirements.txt")
    assert lines and not [s for s in lines if s.startswith("-")], "pip options in requirements.txt: " \
        "setuptools cannot read them as dependencies"
    for name in ("pyproject.toml", "requirements.txt", "README.md", "backend/__init__.py", "tokviz/__init__.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    (tmp_path / "meta").mkdir()
    monkeypatch.chdir(tmp_path)                  # the build writes its egg-info next to pyproject.toml
    dist_info = build_meta.prepare_metadata_for_build_wheel(str(tmp_path / "meta"))
    meta = Parser().parsestr((tmp_path / "meta" / dist_info / "METADATA").read_text())
    assert sorted(meta.get_all("Requires-Dist") or []) == sorted(_normalised(s) for s in lines)
    assert meta["Requires-Python"] == ">=3.10"


def test_package_discovery_finds_every_module():
    from setuptools import find_packages
    found = set(find_packages(where=str(ROOT), include=["backend*", "tokviz*"]))
    with_modules = {str(p.parent.relative_to(ROOT)).replace("/", ".")
                    for top in ("backend", "tokviz") for p in (ROOT / top).rglob("*.py")
                    if "__pycache__" not in p.parts}
    assert with_modules <= found, f"folders with modules but no __init__.py (left out of the wheel): " \
                                  f"{sorted(with_modules - found)}"


def _entry(project) -> object:
    module, func = project["scripts"]["tokviz"].split(":")
    return getattr(importlib.import_module(module), func)


def test_console_script_help_lists_app_and_backend_commands(project, capsys):
    main = _entry(project)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "tokviz app" in out
    for command in ("train", "verify", "index", "analyze", "compare", "resume", "clean"):
        assert f"\n  {command} " in out, command


def test_console_script_commands_are_python_m_backend(project, capsys):
    from backend.__main__ import main as backend_main
    main = _entry(project)
    for argv in (["train", "--help"], ["verify", "--help"]):
        with pytest.raises(SystemExit) as ours:
            main(argv)
        mine = capsys.readouterr().out
        with pytest.raises(SystemExit) as theirs:
            backend_main(argv)
        assert (ours.value.code, mine) == (theirs.value.code, capsys.readouterr().out) and mine
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_console_script_app_serves_like_app_py(project, monkeypatch, capsys):
    import tokviz.cli
    served = []
    monkeypatch.setattr(tokviz.cli, "serve_app", lambda host=None, port=None: served.append((host, port)))
    main = _entry(project)
    assert main(["app", "--host", "127.0.0.1", "--port", "7861"]) == 0
    assert main(["app"]) == 0
    import app  # python app.py calls the same function
    app.main()
    assert served == [("127.0.0.1", 7861), (None, None), (None, None)]
    for bad in ("0", "65536", "http"):
        with pytest.raises(SystemExit) as e:
            main(["app", "--port", bad])
        assert e.value.code == 2 and "allowed" in capsys.readouterr().err


def test_app_port_from_environment_is_checked(monkeypatch):
    import tokviz.cli
    monkeypatch.setenv("GRADIO_SERVER_PORT", "99999")
    with pytest.raises(ValueError, match="99999 is outside the allowed range 1..65535"):
        tokviz.cli.serve_app()


@pytest.mark.slow          # a venv and a real `pip install -e .` (--no-deps; the isolated build fetches setuptools)
def test_editable_install_runs_from_anywhere_and_finds_the_shipped_model(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TOKVIZ_HOME")}
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-e", str(ROOT)],
                         capture_output=True, text=True, env=env, check=False)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    probe = ("from backend.lm.models import resolve_model_source; from backend.store import paths; "
             "print(resolve_model_source('default')[0]); print(paths.data_root())")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(ROOT / "data" / "models" / "tiny-arith"), str(ROOT / "data")]
    helped = subprocess.run([str(venv / "bin" / "tokviz"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, check=False)
    assert helped.returncode == 0 and "tokviz app" in helped.stdout and "  train " in helped.stdout
