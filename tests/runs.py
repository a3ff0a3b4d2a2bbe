"""Helpers for tests that drive ``reduce`` as a user does: condition files edited from a bundled
one, the CLI in a subprocess, and run directories checked for leftovers or compared byte by byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

from reduce.condition import dumps_toml

ROOT = Path(__file__).resolve().parents[1]
SVA_TINY = ROOT / "conditions" / "sva_tiny.toml"
# What an unfinished write leaves: atomic_path temporaries, a store being filled, its manifest.
LEFTOVER_SUFFIXES = (".tmp", ".partial", ".old", "manifest.json")


def cli_env(**extra) -> dict:
    """The environment of a CLI subprocess: this checkout importable from any working directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDUCE_PROGRESS": "0", **extra}
    return {key: value for key, value in env.items() if value is not None}


def reduce_cli(*args, cwd=ROOT, env=None, timeout=600) -> subprocess.CompletedProcess:
    """``python -m reduce ARGS`` in a subprocess; its output is captured as text."""
    return subprocess.run([sys.executable, "-m", "reduce", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env or cli_env(), timeout=timeout, check=False)


def assert_one_line_error(result, *fragments) -> None:
    """Exit status 2 and exactly one line on stderr (no traceback) holding every fragment."""
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith("reduce "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in {result.stderr!r}"


def leftovers(run_dir) -> list[str]:
    """Paths under ``run_dir`` that only an unfinished write leaves: temporaries, partial stores,
    manifests, and zarr stores without their metadata (half a store)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return []
    found = []
    for path in run_dir.rglob("*"):
        if path.name.endswith(LEFTOVER_SUFFIXES) or (path.is_dir() and path.suffix == ".zarr" and not (path / "zarr.json").is_file()):
            found.append(str(path.relative_to(run_dir)))
    return sorted(found)


def condition_data(path=SVA_TINY) -> dict:
    return tomllib.loads(Path(path).read_text())


def write_condition(path, edit=None, base=SVA_TINY) -> Path:
    """``base``'s TOML data, changed in place by ``edit(data)`` when given, written to ``path``."""
    data = condition_data(base)
    if edit is not None:
        edit(data)
    path = Path(path)
    path.write_text(dumps_toml(data))
    return path


def tree_bytes(path) -> dict[str, bytes]:
    """Every file under ``path`` (a store or a run directory) by relative path, with its bytes."""
    path = Path(path)
    return {str(file.relative_to(path)): file.read_bytes() for file in sorted(path.rglob("*")) if file.is_file()}
