"""Scale-out on a Dask cluster: recording sharded by prompt batches, and many targets fitted at once.

:func:`record_distributed` gives the recording :func:`reduce.record.record` gives, with the
batches computed on the workers. The driver creates the full-size store (record.py's
helpers, so either path resumes what the other left), each task runs a shard of batches and
writes its rows of that same zarr store (a batch owns its chunks: no two tasks touch one), and
returns the shard's :class:`~reduce.stats.RunningStats`; the driver merges them and updates the
manifest as shards finish. Activations are exactly the serial ones, and so are the statistics:
each batch's accumulator, merged in batch order, adds what streaming that batch adds (a run
resumed after an out-of-order interruption agrees to rounding).

:func:`fit_many` fits a reduced model for each of many ``(site, unit)`` targets (e.g. every MLP
neuron of a layer) from one recording of the condition, one task per target, each in its own
``RUN_DIR/targets/SITE.UNIT/``. Fits run on one thread wherever they run, so a target's numbers
do not depend on the machine's thread count or on the cluster: they are those of the serial path
(``client=None``).

Workers load the condition's model once per process and need the run directory at the same path
(a shared file system on a real cluster). See README.md, "Scaling out".
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from .condition import Condition, load_condition, open_model, resolve
from .errors import ReduceError
from .progress import progress_bar
from .record import (
    _PARTIAL,
    ACTIVATIONS,
    STAGE,
    STATS,
    Recording,
    _accumulate,
    _check_finite,
    _store_dtype,
    discard_partial_store,
    open_partial_store,
    publish_recording,
    record,
    recording_key,
    save_condition,
    special_ids,
    write_batch,
    write_manifest,
)
from .stats import RunningStats
from .store import RunDir, fingerprint, reading, write_json

TARGETS = "targets"  # RUN_DIR/targets/SITE.UNIT/: one fit per target
FIT_MANY = "fit_many.json"


# --- clusters --------------------------------------------------------------------------------------


@contextlib.contextmanager
def cluster_client(scheduler: str | None = None, workers: int | None = None):
    """A ``distributed.Client``: connected to the scheduler at ``scheduler`` (e.g.
    ``tcp://10.0.0.5:8786``, one started by ``dask scheduler``, dask-jobqueue or the Dask
    Kubernetes operator), or to a new local cluster of ``workers`` single-threaded processes
    listening on 127.0.0.1 only."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler)  # waits distributed.comm.timeouts.connect (Dask config; 30 s by default)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ReduceError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}", field="--scheduler") from None
        with client:
            yield client
        return
    if workers is None or workers < 1:
        raise ReduceError(f"--workers must be at least 1, got {workers}", field="--workers")
    # Its own log lines (workers starting, stopping) would interleave with reduce's one-line output.
    quiet = logging.ERROR
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None, silence_logs=quiet) as cluster, Client(cluster) as client:
        yield client


# --- one model per worker process -------------------------------------------------------------------

_LOADED: dict = {}  # "model": (spec, LoadedModel), "recording": (key, Recording)
# A task installs hooks on the model for its forwards; a worker with several threads must not
# interleave two tasks' hooks on one module.
_MODEL_LOCK = threading.Lock()


def _worker_model(condition: Condition, model=None):
    """The condition's model: ``model`` when given (the serial path), else loaded once per process."""
    if model is not None:
        return model
    cached = _LOADED.get("model")
    if cached is None or cached[0] != condition.model:
        _LOADED.pop("recording", None)
        _LOADED["model"] = (condition.model, open_model(condition))
    return _LOADED["model"][1]


def _worker_recording(condition: Condition, model) -> Recording:
    """The condition's prompts encoded and cut into batches, once per process."""
    key = (condition.to_toml(), str(condition.path), id(model))
    cached = _LOADED.get("recording")
    if cached is None or cached[0] != key:
        _LOADED["recording"] = (key, Recording(resolve(condition, model)))
    return _LOADED["recording"][1]


# --- recording -----------------------------------------------------------------------------------------


def record_distributed(condition, run_dir, client, *, model=None, batches_per_task: int = 1, progress: bool = True):
    """Record ``condition`` into ``run_dir`` with the prompt batches spread over ``client``'s workers.

    Same outputs, stage fingerprint and resumption as :func:`reduce.record.record` (a recording
    either one started, the other finishes). ``model``: the driver's copy, for the checks and the
    store's layout; the workers load their own. ``batches_per_task``: batches a task runs in a row
    (more amortises scheduling; fewer spreads the load).
    """
    import xarray as xr
    from distributed import as_completed

    condition = condition if isinstance(condition, Condition) else load_condition(condition)
    resolved = resolve(condition, model)
    key = recording_key(resolved)
    run_dir = Path(run_dir).resolve()
    with RunDir(run_dir) as run:
        save_condition(condition, run.path)
        if not run.is_done(STAGE, key, outputs=(ACTIVATIONS, STATS)):
            run.forget(STAGE)
            recording = Recording(resolved)
            _group, done, stats = open_partial_store(recording, run.path, key)
            todo = [index for index in range(len(recording)) if index not in done]
            shards = [todo[i : i + batches_per_task] for i in range(0, len(todo), batches_per_task)]
            futures = [client.submit(_record_shard, condition, str(run_dir / _PARTIAL), shard, pure=False) for shard in shards]
            arrived: dict[int, dict[str, RunningStats]] = {}  # batches stored but not yet merged
            merged = 0  # todo[:merged] are in ``stats``
            try:
                finished = as_completed(futures, with_results=True)
                for _future, batch_stats in progress_bar(finished, total=len(futures), desc="record (cluster)", enabled=progress):
                    arrived.update(batch_stats)
                    done.update(batch_stats)
                    write_manifest(run.path, key, done)
                    # Merged in batch order, a batch's own accumulator adds exactly what the serial
                    # path's update of that batch adds: the statistics come out bit for bit the same.
                    while merged < len(todo) and todo[merged] in arrived:
                        for name, part in arrived.pop(todo[merged]).items():
                            stats[name].merge(part)
                        merged += 1
            except ReduceError:
                client.cancel(futures)
                discard_partial_store(run.path)  # as the serial path: a data fault recurs on resume
                raise
            except BaseException:
                client.cancel(futures)  # a kill or Ctrl-C keeps the finished shards, to resume from
                raise
            publish_recording(stats, resolved, run.path)
            run.mark_done(STAGE, key)
    with reading(run_dir / ACTIVATIONS, STAGE):
        return xr.open_zarr(run_dir / ACTIVATIONS)


def _record_shard(condition: Condition, store: str, indices: list[int]) -> dict[int, dict[str, RunningStats]]:
    """On a worker: forward batches ``indices``, write their rows of ``store``; return each batch's
    statistics, ``{batch: {site: RunningStats}}``."""
    import zarr

    with _MODEL_LOCK:
        model = _worker_model(condition)
        recording = _worker_recording(condition, model)
        resolved = recording.resolved
        group = zarr.open_group(store, mode="r+")
        dtype, special = _store_dtype(model), special_ids(model)
        per_batch = {}
        with contextlib.closing(recording.forwards(indices)) as batches:
            for activations in batches:
                _check_finite(activations, resolved)
                arrays = activations.to_numpy(dtype, special)
                stats = {site.name: RunningStats(model.n_units(site), condition.record.bins) for site in resolved.unit_sites}
                _accumulate(stats, arrays)
                write_batch(group, arrays)
                per_batch[arrays.index] = stats
    return per_batch


# --- many targets ----------------------------------------------------------------------------------------


def neuron_targets(condition: Condition, site: str, units=None, *, model=None) -> list[tuple[str, int]]:
    """``(site, unit)`` for each of ``units`` of ``site`` (default: every unit of the site)."""
    from .sites import Site

    parsed = Site.parse(site, source=condition.path, field="--neurons")
    model = _worker_model(condition, model)
    if parsed.layer >= model.n_layers:
        raise ReduceError(f"site {site!r} does not exist: the model has layers 0..{model.n_layers - 1}", file=condition.path, field="--neurons")
    size = model.n_units(parsed)
    units = range(size) if units is None else list(units)
    outside = [unit for unit in units if not 0 <= unit < size]
    if outside:
        raise ReduceError(f"unit {outside[0]} is out of range: {site} has {size} units (0..{size - 1})", file=condition.path, field="--units")
    return [(site, int(unit)) for unit in units]


def fit_many(condition, run_dir, targets, client=None, *, model=None, progress: bool = True) -> dict[tuple[str, int], dict]:
    """Fit a reduced model of each ``(site, unit)`` target from one recording of ``condition``.

    Each target is the condition with ``[target]`` made that neuron (same position); its fit
    (``reduce.fit``'s outputs) goes to ``RUN_DIR/targets/SITE.UNIT/`` and is reused when redone.
    With a ``client`` the recording is :func:`record_distributed` and every fit a task; without,
    everything runs here, in order. Returns ``{(site, unit): fit.json contents}``; a target that
    cannot be fitted (e.g. a dead neuron: one class only) maps to ``{"error": message}``.
    ``RUN_DIR/fit_many.json`` lists them all.
    """
    condition = condition if isinstance(condition, Condition) else load_condition(condition)
    run_dir = Path(run_dir).resolve()
    model = _worker_model(condition, model)  # the driver's copy, for the checks (workers load their own)
    targets = [(str(site), int(unit)) for site, unit in targets]
    if not targets:
        raise ReduceError("no targets to fit", file=condition.path, field="targets")
    with RunDir(run_dir) as run:
        if client is None:
            record(condition, run_dir, model=model, progress=progress)
        else:
            record_distributed(condition, run_dir, client, model=model, progress=progress)
        recorded = _recorded_sites(run_dir)
        for site, unit in targets:
            if site not in recorded:
                raise ReduceError(f"target site {site!r} is not recorded; recorded: {', '.join(recorded)}", file=condition.path, field="record.sites")
        record_key = run.stage_key(STAGE)
        if client is None:
            outcomes = [_fit_target(condition, str(run_dir), site, unit, record_key, model) for site, unit in progress_bar(targets, desc="fit", enabled=progress)]
        else:
            from distributed import as_completed

            futures = [client.submit(_fit_target, condition, str(run_dir), site, unit, record_key, pure=False) for site, unit in targets]
            for _ in progress_bar(as_completed(futures), total=len(futures), desc="fit (cluster)", enabled=progress):
                pass
            outcomes = client.gather(futures)
        results = dict(zip(targets, outcomes))
        write_json(run_dir / FIT_MANY, {"condition": condition.name, "targets": [{"site": site, "unit": unit, **_listing(outcome)} for (site, unit), outcome in results.items()]})
    return results


def _listing(outcome: dict) -> dict:
    if "error" in outcome:
        return {"error": outcome["error"]}
    return {"converged": outcome["converged"], "metric": outcome["metric"], "held_out": outcome["held_out"]}


def _recorded_sites(run_dir: Path) -> list[str]:
    import xarray as xr

    with reading(run_dir / ACTIVATIONS, STAGE):
        dataset = xr.open_zarr(run_dir / ACTIVATIONS)
    return [name for name in dataset.data_vars if name not in ("target", "target_mask")]


def target_dir(run_dir, site: str, unit: int) -> Path:
    return Path(run_dir) / TARGETS / f"{site}.{unit}"


def _fit_target(condition: Condition, run_dir: str, site: str, unit: int, record_key: str, model=None) -> dict:
    """Fit one neuron target from the condition's recording: the recorded site's unit is the target."""
    import dask
    import xarray as xr

    from .fit import OUTPUTS, _fit
    from .fit import STAGE as FIT_STAGE

    run_dir = Path(run_dir)
    neuron = replace(condition, target=replace(condition.target, kind="neuron", site=site, unit=unit))
    out = target_dir(run_dir, site, unit)
    key = fingerprint(condition.fingerprint("fit"), condition.seed, record_key, site, unit)
    # Reading the store computes dask arrays; inside a worker's task the default scheduler would
    # be the cluster itself, and a task waiting on tasks of its own can starve the workers.
    with _MODEL_LOCK, RunDir(out) as run, dask.config.set(scheduler="synchronous"):
        if run.is_done(FIT_STAGE, key, outputs=OUTPUTS):
            return json.loads((out / "fit.json").read_text())
        try:
            resolved = resolve(neuron, _worker_model(condition, model))
            with reading(run_dir / ACTIVATIONS, site):
                activations = xr.open_zarr(run_dir / ACTIVATIONS)
                activations = activations.assign(target=(("prompt", "pos"), _unit_values(activations[site], unit)))
            stats = xr.load_dataset(run_dir / STATS, engine="h5netcdf")
            run.forget(FIT_STAGE)
            with _one_thread():
                summary = _fit(resolved, activations, stats, out, False)
        except ReduceError as error:
            return {"error": str(error)}
        run.mark_done(FIT_STAGE, key)
    return summary


def _unit_values(variable, unit: int) -> np.ndarray:
    """``(prompt, pos)`` float64 values of flat unit ``unit`` of a recorded site: what recording
    the condition with this neuron as its target would store as ``target``."""
    values = np.asarray(variable.values)
    return values.reshape(*values.shape[:2], -1)[:, :, unit].astype(np.float64)


@contextlib.contextmanager
def _one_thread():
    """Torch and BLAS on one thread: reductions split over threads add in another order, and a
    target's numbers must not depend on the thread count of the machine that fitted it."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)
