"""The runs the paper reads, made (or brought up to date) through the Python API.

Every condition goes through :func:`reduce.pipeline.run` into ``runs/<name>``; the pipeline
reuses each stage whose outputs match the condition, so a finished run costs a model load and a
fresh report. The universality comparison goes through :func:`reduce.universality.universality`
into ``runs/universality_<name>``, which reuses every model it has fitted.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PaperCondition:
    """A condition of the paper: its key in the numbers (``sva.…``), its file, and how the text names it."""

    key: str
    path: Path
    label: str


CONDITIONS = (
    PaperCondition("sva", ROOT / "conditions" / "sva.toml", "SVA (zoo)"),
    PaperCondition("twohop", ROOT / "conditions" / "twohop.toml", "two-hop (zoo)"),
    PaperCondition("minilm", ROOT / "conditions" / "minilm_neuron.toml", "MiniLM neuron"),
)
# The conditions compared across every zoo model of their corpus (the universality comparison).
UNIVERSALITY = CONDITIONS[:2]


def run_dir(runs: Path, condition: PaperCondition) -> Path:
    """``runs/<condition file name>``, where ``reduce run`` puts a condition by default (the files are named after their conditions)."""
    return Path(runs) / condition.path.stem


def universality_dir(runs: Path, condition: PaperCondition) -> Path:
    return Path(runs) / f"universality_{condition.key}"


def when_free(action, directory: Path, *, log, wait: float, poll: float):
    """``action()``, retried while another process holds ``directory`` (a run under way elsewhere), for up to ``wait`` s.

    The pipeline and the universality comparison resume from whatever that process finished.
    """
    from reduce.errors import ReduceError

    started = time.perf_counter()
    while True:
        try:
            return action()
        except ReduceError as error:
            if error.field != "lock" or time.perf_counter() - started > wait:
                raise
            print(f"analyses: {directory} is in use by another process; checking again in {poll:.0f} s", file=log, flush=True)
            time.sleep(poll)


def ensure_runs(runs: Path, *, log=sys.stderr, wait: float = 3 * 3600, poll: float = 30) -> tuple[dict[str, Path], dict[str, str]]:
    """Run (or resume, or reuse) every condition; return ``{key: run directory}`` and ``{key: why its run stopped}``.

    A condition whose pipeline stops with a :class:`~reduce.errors.ReduceError` (a reduced model
    that does not converge cannot be validated) keeps what its finished stages wrote, gets a
    report of those, and the paper says what is missing; any other exception is a bug and stops the build.
    """
    from reduce.errors import ReduceError
    from reduce.pipeline import run
    from reduce.report import write_report

    directories, stopped = {}, {}
    for condition in CONDITIONS:
        directory = run_dir(runs, condition)
        started = time.perf_counter()
        print(f"analyses: {condition.key}: reduce.pipeline.run({condition.path.name}) -> {directory}", file=log, flush=True)
        try:
            when_free(partial(run, condition.path, directory, progress=False, log=log), directory, log=log, wait=wait, poll=poll)
        except ReduceError as error:
            if not (directory / "fit.json").exists():
                raise
            stopped[condition.key] = str(error)
            write_report(directory)
            print(f"analyses: {condition.key}: stopped after the fit: {error}", file=log, flush=True)
        print(f"analyses: {condition.key}: ready after {time.perf_counter() - started:.0f} s", file=log, flush=True)
        directories[condition.key] = directory
    return directories, stopped


def ensure_universality(runs: Path, *, log=sys.stderr, wait: float = 3 * 3600, poll: float = 30) -> dict[str, Path]:
    """Fit each universality condition on every zoo model of its corpus and compare them; return ``{key: directory}``."""
    from reduce.universality import universality

    directories = {}
    for condition in UNIVERSALITY:
        directory = universality_dir(runs, condition)
        started = time.perf_counter()
        print(f"analyses: universality of {condition.key} over the zoo -> {directory}", file=log, flush=True)
        when_free(partial(universality, condition.path, None, directory, progress=False), directory, log=log, wait=wait, poll=poll)
        print(f"analyses: universality of {condition.key} ready after {time.perf_counter() - started:.0f} s", file=log, flush=True)
        directories[condition.key] = directory
    return directories
