"""Run directories: atomic files, one writer at a time, and stage fingerprints for resumption.

A stage is *done* when its outputs exist and its recorded fingerprint (a hash of the parts of
the condition it depends on) matches; otherwise it reruns. Files are written to a temporary
name and renamed into place, so a killed process leaves either the old file or the new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import ReduceError


@contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; on success it replaces ``path`` (file or directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    remove_path(temporary)
    try:
        yield temporary
        replace_path(temporary, path)
    finally:
        remove_path(temporary)


def replace_path(temporary, path) -> None:
    """Move a finished ``temporary`` file or directory onto ``path``, replacing what is there."""
    temporary, path = Path(temporary), Path(path)
    if path.is_dir() and temporary.is_dir():
        # Directories cannot be replaced in one rename: move the old one aside first.
        aside = path.with_name(f".{path.name}.{os.getpid()}.old")
        remove_path(aside)
        os.replace(path, aside)
        os.replace(temporary, path)
        remove_path(aside)
    else:
        os.replace(temporary, path)


@contextmanager
def atomic_write(path, mode: str = "w"):
    """``open`` for writing, atomically."""
    with atomic_path(path) as temporary:
        with open(temporary, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


@contextmanager
def reading(path, field: str | None = None):
    """Report a run-directory file that cannot be read (truncated, corrupted, half a store) as a
    ReduceError naming it, instead of a traceback from deep inside zarr or HDF5."""
    try:
        yield
    except ReduceError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        detail = (str(error).splitlines() or [""])[0][:200]
        raise ReduceError(
            f"cannot be read ({type(error).__name__}: {detail}); it is damaged: rerun the stage that wrote it into a fresh run directory",
            file=path,
            field=field,
        ) from None


def write_json(path, data) -> None:
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=_json_default)
        handle.write("\n")


def write_netcdf(dataset, path) -> None:
    with atomic_path(path) as temporary:
        dataset.to_netcdf(temporary, engine="h5netcdf")


def fingerprint(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_HELD: dict[Path, list] = {}  # run directory -> [locked file, depth] held by this process


class RunDir:
    """A run directory held by one process at a time (an advisory lock on ``.lock``)."""

    def __init__(self, path):
        self.path = Path(path)

    def __truediv__(self, name) -> Path:
        return self.path / name

    def __enter__(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        held = _HELD.get(key)
        if held is None:
            handle = open(self.path / ".lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise ReduceError("another reduce process is using this run directory; wait for it or choose another --out", file=self.path, field="lock") from None
            held = _HELD[key] = [handle, 0]
            _remove_stale_temporaries(self.path)
        held[1] += 1  # a stage called inside the pipeline re-enters the lock this process holds
        self._key = key
        return self

    def __exit__(self, *exc) -> None:
        held = _HELD[self._key]
        held[1] -= 1
        if held[1] == 0:
            fcntl.flock(held[0], fcntl.LOCK_UN)
            held[0].close()
            del _HELD[self._key]

    def _stages(self) -> dict:
        path = self.path / "stages.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def stage_key(self, stage: str) -> str | None:
        """The fingerprint ``stage`` last finished with, or None."""
        return self._stages().get(stage)

    def is_done(self, stage: str, key: str, outputs=()) -> bool:
        """True when ``stage`` finished with fingerprint ``key`` and its outputs still exist."""
        return self._stages().get(stage) == key and all((self.path / o).exists() for o in outputs)

    def mark_done(self, stage: str, key: str) -> None:
        stages = self._stages()
        stages[stage] = key
        write_json(self.path / "stages.json", stages)

    def forget(self, stage: str) -> None:
        stages = self._stages()
        if stages.pop(stage, None) is not None:
            write_json(self.path / "stages.json", stages)


_TEMPORARY = re.compile(r"\..+\.(\d+)\.(tmp|old)")  # atomic_path's and replace_path's names


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Temporaries that a killed process left mid-write (atomic_path's ``.NAME.PID.tmp``, a
    directory moved aside as ``.NAME.PID.old``): garbage once their process is gone. Stores are
    not searched; zarr writes their chunks atomically itself."""
    for folder, subfolders, files in os.walk(run_dir):
        stale = [name for name in (*subfolders, *files) if (match := _TEMPORARY.fullmatch(name)) and not _alive(int(match.group(1)))]
        for name in stale:
            remove_path(Path(folder) / name)
        subfolders[:] = [name for name in subfolders if name not in stale and not name.endswith((".zarr", ".partial"))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _json_default(value):
    import numpy as np

    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
