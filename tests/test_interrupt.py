"""Interrupted runs lose nothing: a `reduce` process SIGKILLed at any point resumes to outputs
identical to an uninterrupted run, and a second process on the same run directory is refused.

Two ways to choose the moment of the kill:

* polling: the real ``python -m reduce`` is killed as soon as a file appears (the manifest of
  the store being filled), wherever it then is;
* exact points: a small launcher (``STOP_AT`` below) runs the same CLI but stops itself with
  SIGSTOP at a named point — after the store is created, after k batches, between storing a
  batch and listing it in the manifest, between the statistics and the rename, between the
  rename and the stage's mark — and the test SIGKILLs it there. The production code has no hook
  for this; the launcher wraps the functions at those points.

Each interrupted run is resumed in this process and compared with an uninterrupted one: every
byte of the zarr stores, and the netCDF files as exactly equal datasets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import xarray as xr

from reduce.ablate import ABLATIONS, ATTRIBUTION, ablate
from reduce.errors import ReduceError
from reduce.models import load_model
from reduce.record import ACTIVATIONS, STATS, record
from tests.runs import (
    ROOT,
    assert_one_line_error,
    cli_env,
    leftovers,
    reduce_cli,
    tree_bytes,
    write_condition,
)

STOP_AT = r'''
"""Run the reduce CLI, stopping this process (SIGSTOP) at one named point: argv = POINT K ARGS."""
import json
import signal
import sys
import threading

import reduce.ablate as ablate
import reduce.record as record
import reduce.store as store

point, k, arguments = sys.argv[1], int(sys.argv[2]), sys.argv[3:]


def stop():
    # Sent to this very thread, the stop takes effect before it runs another line (sent to the
    # process, it may land on another thread while this one carries on writing).
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)  # the test SIGKILLs us here


def wrap(owner, name, *, before=False, when=lambda *args: True):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before and when(*args):
            stop()
        result = original(*args, **kwargs)
        if not before and when(*args):
            stop()
        return result

    setattr(owner, name, wrapped)


POINTS = {
    "record: store created, no manifest yet": lambda: wrap(record, "_create_store"),
    "record: k batches stored and listed": lambda: wrap(record, "write_manifest", when=lambda run, key, done: len(done) == k),
    "record: batch k stored, not yet listed": lambda: wrap(record, "write_manifest", before=True, when=lambda run, key, done: len(done) == k),
    "record: manifest of k batches in its temporary file, not renamed": lambda: wrap(
        store, "replace_path", before=True, when=lambda temporary, path: path.name == record._MANIFEST and len(json.loads(open(temporary).read())["done"]) == k
    ),
    "record: statistics written, store not renamed": lambda: wrap(record, "replace_path", before=True),
    "record: store renamed, stage not marked done": lambda: wrap(store.RunDir, "mark_done", before=True),
    "ablate: store created, no block yet": lambda: wrap(ablate._AblationStore, "open"),
    "ablate: k blocks stored and listed": lambda: wrap(ablate._AblationStore, "write_block", when=lambda self, *rest: len(self.done) == k),
    "ablate: block k stored, not yet listed": lambda: wrap(
        store, "write_json", before=True, when=lambda path, data: path.name == ablate._MANIFEST and len(data["done"]) == k
    ),
    "ablate: every block stored, store not renamed": lambda: wrap(ablate._AblationStore, "finish", before=True),
}
POINTS[point]()

from reduce.cli import main

sys.exit(main(arguments))
'''


def start_cli(tmp_path, *arguments, stop_at: str | None = None, k: int = 0) -> subprocess.Popen:
    """``python -m reduce ARGS``, or the same through the stopping launcher; output to a log file
    (a pipe nobody reads could block the child before it reaches its point)."""
    if stop_at is None:
        command = [sys.executable, "-m", "reduce", *map(str, arguments)]
    else:
        launcher = tmp_path / "stop_at.py"
        launcher.write_text(STOP_AT)
        command = [sys.executable, str(launcher), stop_at, str(k), *map(str, arguments)]
    with open(tmp_path / "child.log", "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=cli_env())


def wait_until_stopped(child: subprocess.Popen, tmp_path) -> None:
    _, status = os.waitpid(child.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        child.returncode = os.waitstatus_to_exitcode(status)
        pytest.fail(f"the child ended (status {child.returncode}) before its stopping point:\n{(tmp_path / 'child.log').read_text()[-3000:]}")


def kill_at(tmp_path, point: str, k: int, *arguments) -> None:
    """Run the CLI until ``point`` and SIGKILL it there."""
    child = start_cli(tmp_path, *arguments, stop_at=point, k=k)
    wait_until_stopped(child, tmp_path)
    child.kill()
    assert child.wait() == -signal.SIGKILL


def kill_when(tmp_path, path, *arguments) -> None:
    """Run ``python -m reduce ARGS`` and SIGKILL it as soon as ``path`` exists."""
    child = start_cli(tmp_path, *arguments)
    while child.poll() is None and not path.exists():
        time.sleep(0.001)
    child.kill()
    if child.wait() != -signal.SIGKILL:
        pytest.fail(f"the child ended before {path.name} appeared:\n{(tmp_path / 'child.log').read_text()[-3000:]}")


def assert_same_datasets(expected, actual) -> None:
    with xr.open_dataset(expected, engine="h5netcdf") as a, xr.open_dataset(actual, engine="h5netcdf") as b:
        assert a.load().identical(b.load()), f"{actual} differs from {expected}"


# --- the condition and its uninterrupted runs --------------------------------------------------------


@pytest.fixture(scope="module")
def condition(tmp_path_factory):
    """sva_tiny in batches of 2 prompts (10 batches), with 88 random-pruning ablations (3 blocks)."""

    def edit(data):
        data["record"]["batch_size"] = 2
        data["ablation"] = {"plans": ["random"], "baselines": ["zero", "mean"], "fractions": [i / 10 for i in range(11)], "seeds": [0, 1, 2, 3], "max_eval_sequences": 1}

    return write_condition(tmp_path_factory.mktemp("condition") / "interrupt.toml", edit)


@pytest.fixture(scope="module")
def tiny():
    return load_model("zoo:tiny")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, condition, tiny):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    record(condition, run, model=tiny, progress=False)
    recorded = tmp_path_factory.mktemp("recorded") / "run"
    shutil.copytree(run, recorded)  # the starting point of the ablation scenarios
    ablate(condition, run, model=tiny, progress=False)
    return run, recorded


def assert_recording_as_uninterrupted(run, reference) -> None:
    assert tree_bytes(run / ACTIVATIONS) == tree_bytes(reference / ACTIVATIONS)
    assert_same_datasets(reference / STATS, run / STATS)
    assert (run / "condition.toml").read_bytes() == (reference / "condition.toml").read_bytes()
    assert json.loads((run / "stages.json").read_text())["record"] == json.loads((reference / "stages.json").read_text())["record"]
    assert leftovers(run) == []


# --- recording ----------------------------------------------------------------------------------------

# (point, k, batches the manifest lists when killed; None: no manifest)
RECORD_POINTS = [
    ("record: store created, no manifest yet", 0, None),
    ("record: k batches stored and listed", 3, [0, 1, 2]),
    ("record: batch k stored, not yet listed", 5, [0, 1, 2, 3]),
    ("record: manifest of k batches in its temporary file, not renamed", 4, [0, 1, 2]),
    ("record: statistics written, store not renamed", 0, list(range(10))),
    ("record: store renamed, stage not marked done", 0, None),
]


def path_pid(run) -> str:
    return next(run.glob("*.tmp")).name.split(".")[-2]


def point_id(point: str, k: int) -> str:
    return point.split(": ")[1].replace(" k ", f" {k} ")


@pytest.mark.parametrize(("point", "k", "listed"), RECORD_POINTS, ids=[point_id(p, k) for p, k, _ in RECORD_POINTS])
def test_recording_killed_at_a_point_resumes_to_the_same_outputs(tmp_path, condition, uninterrupted, tiny, point, k, listed):
    run = tmp_path / "run"
    kill_at(tmp_path, point, k, "record", condition, "--out", run, "-q")
    manifest = run / ".activations.zarr.manifest.json"
    assert (json.loads(manifest.read_text())["done"] if manifest.exists() else None) == listed
    if "temporary file" in point:  # the killed write's temporary is there, to be cleared on resume
        assert [path.name for path in run.glob("*.tmp")] == [f"..activations.zarr.manifest.json.{path_pid(run)}.tmp"]
    record(condition, run, model=tiny, progress=False)
    assert_recording_as_uninterrupted(run, uninterrupted[0])


def test_recording_killed_when_its_manifest_appears_resumes_through_the_cli(tmp_path, condition, uninterrupted):
    run = tmp_path / "run"
    kill_when(tmp_path, run / ".activations.zarr.manifest.json", "record", condition, "--out", run, "-q")
    assert not (run / ACTIVATIONS).exists()
    result = reduce_cli("record", condition, "--out", run, "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_recording_as_uninterrupted(run, uninterrupted[0])


def test_a_damaged_manifest_restarts_the_recording(tmp_path, condition, uninterrupted, tiny):
    """A manifest that cannot be read (or belongs to another recording) is no reason to trust
    the partial store: it is recorded afresh."""
    run = tmp_path / "run"
    kill_at(tmp_path, "record: k batches stored and listed", 4, "record", condition, "--out", run, "-q")
    (run / ".activations.zarr.manifest.json").write_text('{"fingerprint": "0123", "do')
    record(condition, run, model=tiny, progress=False)
    assert_recording_as_uninterrupted(run, uninterrupted[0])


def test_a_second_process_is_refused_while_the_first_holds_the_run(tmp_path, condition, uninterrupted):
    run = tmp_path / "run"
    first = start_cli(tmp_path, "record", condition, "--out", run, "-q", stop_at="record: k batches stored and listed", k=3)
    wait_until_stopped(first, tmp_path)
    try:
        before = tree_bytes(run)
        second = reduce_cli("record", condition, "--out", run, "-q")
        assert_one_line_error(second, f"{run}: lock: another reduce process is using this run directory")
        with pytest.raises(ReduceError) as caught:  # the Python API says the same
            record(condition, run, progress=False)
        assert caught.value.field == "lock"
        assert tree_bytes(run) == before  # the refused processes touched nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait() == 0, (tmp_path / "child.log").read_text()[-3000:]
    assert_recording_as_uninterrupted(run, uninterrupted[0])


# --- ablation -----------------------------------------------------------------------------------------

# (point, k, blocks the manifest lists when killed)
ABLATE_POINTS = [
    ("ablate: store created, no block yet", 0, []),
    ("ablate: k blocks stored and listed", 1, [0]),
    ("ablate: block k stored, not yet listed", 2, [0]),
    ("ablate: every block stored, store not renamed", 0, [0, 1, 2]),
]


def assert_ablations_as_uninterrupted(run, reference) -> None:
    assert_ablations_as_uninterrupted_stages(run, reference)
    assert json.loads((run / "stages.json").read_text()) == json.loads((reference / "stages.json").read_text())


def assert_ablations_as_uninterrupted_stages(run, reference) -> None:
    assert tree_bytes(run / ABLATIONS) == tree_bytes(reference / ABLATIONS)
    assert_same_datasets(reference / ATTRIBUTION, run / ATTRIBUTION)
    stages, expected = (json.loads((path / "stages.json").read_text()) for path in (run, reference))
    assert (stages["record"], stages["ablate"]) == (expected["record"], expected["ablate"])
    assert leftovers(run) == []


@pytest.mark.slow
@pytest.mark.parametrize(("point", "k", "listed"), ABLATE_POINTS, ids=[point_id(p, k) for p, k, _ in ABLATE_POINTS])
def test_ablation_killed_at_a_point_resumes_to_the_same_outputs(tmp_path, condition, uninterrupted, tiny, point, k, listed):
    reference, recorded = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    kill_at(tmp_path, point, k, "ablate", condition, "--out", run, "-q")
    assert json.loads((run / f".{ABLATIONS}.partial" / "reduce_manifest.json").read_text())["done"] == listed
    ablate(condition, run, model=tiny, progress=False)
    assert_ablations_as_uninterrupted(run, reference)


@pytest.mark.slow
def test_ablation_killed_when_its_manifest_appears_resumes_through_the_cli(tmp_path, condition, uninterrupted):
    reference, recorded = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    kill_when(tmp_path, run / f".{ABLATIONS}.partial" / "reduce_manifest.json", "ablate", condition, "--out", run, "-q")
    assert not (run / ABLATIONS).exists()
    result = reduce_cli("ablate", condition, "--out", run, "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_ablations_as_uninterrupted(run, reference)


# --- the whole pipeline -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_pipeline_killed_while_ablating_resumes_to_the_same_outputs(tmp_path, condition, uninterrupted):
    """``reduce run`` killed in its ablate stage (the recording done): run again, it reuses the
    recording, finishes the ablations and the remaining stages, and matches the uninterrupted stages."""
    reference, _ = uninterrupted
    run = tmp_path / "run"
    kill_when(tmp_path, run / f".{ABLATIONS}.partial" / "reduce_manifest.json", "run", condition, "--out", run, "-q")
    assert (run / ACTIVATIONS).is_dir() and not (run / ABLATIONS).exists()
    result = reduce_cli("run", condition, "--out", run, "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[1/5] record reused" in result.stderr
    assert_recording_as_uninterrupted(run, reference)
    assert_ablations_as_uninterrupted_stages(run, reference)
    assert {"record", "ablate", "fit", "validate"} <= set(json.loads((run / "stages.json").read_text()))
    assert json.loads((run / "summary.json").read_text())["condition"] == "sva_tiny"
