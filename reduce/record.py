"""Record a condition's activations and target to ``RUN_DIR/activations.zarr``, with streaming
statistics of every unit to ``RUN_DIR/stats.nc``, in one pass over the prompts.

The zarr store is created at full size before the first forward and filled batch by batch;
a manifest beside it lists finished batches, so a killed run resumes where it stopped (the
statistics of finished batches are rebuilt from the store). It is filled under a temporary name
and renamed when complete, so ``activations.zarr`` is always whole. The hot path stays lean: the
hooks keep references to what the model computes anyway, each batch is copied to numpy once,
and a background thread writes it and updates the statistics while the next batch runs, so
memory stays bounded by two batches.

Layout (openable with plain ``xarray.open_zarr``)::

    blocks.L.mlp.hook_post   (prompt, pos, unit)          float, NaN on padding
    blocks.L.attn.hook_z     (prompt, pos, head, d_head)
    blocks.L.hook_resid_*    (prompt, pos, d_model)
    target                   (prompt, pos)                the target at every position
    target_mask              (prompt, pos)                where the target is evaluated
    coords: text, length, tokens (prompt, pos), token_start / token_end (character offsets,
            -1 where unknown), answer, wrong, answer_id, wrong_id, counterfactual, labels
"""

from __future__ import annotations

import contextlib
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batching import Batch, encode, forward, token_strings
from .condition import Condition, Resolved, load_condition, resolve
from .errors import ReduceError
from .hooks import hooked
from .progress import progress_bar
from .stats import RunningStats
from .store import RunDir, atomic_write, fingerprint, reading, remove_path, replace_path, write_json, write_netcdf

ACTIVATIONS = "activations.zarr"
STATS = "stats.nc"
CONDITION = "condition.toml"
STAGE = "record"
_PARTIAL = ".activations.zarr.partial"
_MANIFEST = ".activations.zarr.manifest.json"
_CHUNK_BYTES = 32 * 2**20


def record(condition, run_dir, *, model=None, progress: bool = True):
    """Record ``condition`` (a :class:`Condition` or a path) into ``run_dir``; returns the activations.

    ``model``: an already loaded :class:`~reduce.models.LoadedModel` (else the condition's is
    loaded). A run directory that already holds this recording (same fingerprint) is reused.
    """
    import xarray as xr

    condition = condition if isinstance(condition, Condition) else load_condition(condition)
    resolved = resolve(condition, model)
    key = recording_key(resolved)
    with RunDir(run_dir) as run:
        save_condition(condition, run.path)
        if not run.is_done(STAGE, key, outputs=(ACTIVATIONS, STATS)):
            run.forget(STAGE)
            _write_recording(resolved, run.path, key, progress)
            run.mark_done(STAGE, key)
    with reading(Path(run_dir) / ACTIVATIONS, STAGE):
        return xr.open_zarr(Path(run_dir) / ACTIVATIONS)


RECORDING_FORMAT = 2  # 2: the ``counted`` coordinate; a recording without it is made again


def recording_key(resolved: Resolved) -> str:
    """The record stage's fingerprint: the parts of the condition it depends on, and the weights."""
    condition = resolved.condition
    return fingerprint(condition.fingerprint("model", "prompts", "target", "record"), resolved.model.weights_fingerprint(), RECORDING_FORMAT)


def save_condition(condition: Condition, run_dir) -> None:
    """The resolved condition (absolute paths, overrides applied) as ``RUN_DIR/condition.toml``."""
    with atomic_write(Path(run_dir) / CONDITION) as handle:
        handle.write(condition.to_toml())


@dataclass
class BatchArrays:
    """One batch as numpy, NaN on padding: sites ``(batch, pos, units)`` and the target ``(batch, pos)``."""

    index: int
    start: int
    stop: int
    real: np.ndarray  # (batch, pos) bool
    counted: np.ndarray  # (batch, pos) bool: real tokens that enter the statistics
    sites: dict[str, np.ndarray]
    target: np.ndarray


@dataclass
class BatchActivations:
    """One batch's recorded sites and target, still on the model's device."""

    index: int
    start: int
    stop: int
    batch: Batch
    sites: dict[str, torch.Tensor]  # site name -> (batch, pos, units)
    target: torch.Tensor  # (batch, pos)

    @property
    def real(self) -> torch.Tensor:
        return self.batch.attention_mask.bool()

    def to_numpy(self, dtype=np.float32, special_ids=()) -> BatchArrays:
        """The batch as numpy, padding set to NaN.

        Off a CPU model in the store's dtype this is no copy at all: the arrays are the model's
        own activation tensors, which no later computation reads once the forward is over (the
        next forward allocates new ones), so their padding is overwritten in place.
        """
        real = self.real.cpu().numpy()
        counted = counted_tokens(self.batch.input_ids.cpu().numpy(), real, special_ids)
        as_dtype = torch.float64 if dtype == np.float64 else torch.float32
        arrays = {}
        for name, values in self.sites.items():
            arrays[name] = values.to(device="cpu", dtype=as_dtype).contiguous().numpy()
            arrays[name][~real] = np.nan
        target = self.target.to(device="cpu", dtype=torch.float64, copy=True).numpy()
        target[~real] = np.nan
        return BatchArrays(self.index, self.start, self.stop, real, counted, arrays, target)


class Recording:
    """A resolved condition's prompts, encoded once and cut into right-padded batches."""

    def __init__(self, resolved: Resolved):
        self.resolved = resolved
        self.model = resolved.model
        prompts = resolved.prompts
        self.encoded = encode(self.model, prompts.texts)
        self.batch_size = resolved.condition.record.batch_size
        device = self.model.device
        self._answer_ids = None if prompts.answer_ids is None else torch.as_tensor(prompts.answer_ids, device=device)
        self._wrong_ids = None if prompts.wrong_ids is None else torch.as_tensor(prompts.wrong_ids, device=device)

    def __len__(self) -> int:
        return -(-len(self.resolved.prompts) // self.batch_size)

    @property
    def width(self) -> int:
        return self.encoded.width

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.batch_size
        return start, min(start + self.batch_size, len(self.resolved.prompts))

    def batch(self, index: int) -> Batch:
        """Batch ``index``, trimmed to its longest prompt (right padding makes that exact)."""
        start, stop = self.bounds(index)
        width = int(self.encoded.lengths[start:stop].max())
        rows = slice(start, stop)
        return Batch(self.encoded.input_ids[rows, :width], self.encoded.attention_mask[rows, :width], self.encoded.lengths[rows]).to(self.model.device)

    def forwards(self, indices, *, progress: bool = False):
        """Yield :class:`BatchActivations` for each batch index (see :func:`hooked_forwards`)."""
        resolved = self.resolved
        batches = ((index, self.bounds(index)[0], self.batch(index)) for index in indices)
        bar = progress_bar(batches, total=len(indices), desc="record", enabled=progress)
        yield from hooked_forwards(self.model, bar, resolved.sites, resolved.target, self._answer_ids, self._wrong_ids)


def hooked_forwards(model, batches, sites, target, answer_ids=None, wrong_ids=None):
    """For each ``(index, first prompt, Batch)``, the :class:`BatchActivations` of ``sites`` and
    ``target``, hooks installed once for all; ``answer_ids`` / ``wrong_ids``: per prompt of the set.

    Runs under ``torch.inference_mode``, which stays on between yields; a batch's tensors are
    the model's own and are replaced by the next forward. A target that does not read the output
    (a neuron) lets each forward end at the last site it needs.
    """
    stored = [site.name for site in sites]
    needed = tuple(dict.fromkeys([*sites, *target.sites]))
    with torch.inference_mode(), hooked(model, record=needed, stop_after_record=not target.reads_output) as recorded:
        for index, start, batch in batches:
            stop = start + len(batch)
            output = forward(model, batch)
            answer = None if answer_ids is None else answer_ids[start:stop]
            wrong = None if wrong_ids is None else wrong_ids[start:stop]
            yield BatchActivations(index, start, stop, batch, {name: recorded[name] for name in stored}, target.values(output, recorded, answer, wrong))


def _write_recording(resolved: Resolved, run_dir: Path, key: str, progress: bool) -> None:
    recording = Recording(resolved)
    group, done, stats = open_partial_store(recording, run_dir, key)
    model = resolved.model
    dtype = _store_dtype(model)
    todo = [i for i in range(len(recording)) if i not in done]
    try:
        with _BatchWriter(group, stats, run_dir / _MANIFEST, key, done) as writer:
            with contextlib.closing(recording.forwards(todo, progress=progress)) as batches:
                for activations in batches:
                    _check_finite(activations, resolved)
                    writer.submit(activations.to_numpy(dtype, special_ids(model)))
    except ReduceError:
        # A fault in the data (a non-finite activation) recurs on every resume: leave no half
        # store behind. A kill or Ctrl-C keeps it, to resume from.
        discard_partial_store(run_dir)
        raise
    publish_recording(stats, resolved, run_dir)


def open_partial_store(recording: Recording, run_dir: Path, key: str):
    """``(group, done, stats)``: the store being filled (created at full size unless an interrupted
    recording with the same ``key`` left one), the batches it holds, and their statistics.

    Serial recording and :func:`reduce.distributed.record_distributed` share this, so either
    resumes what the other left.
    """
    import zarr

    partial, manifest = run_dir / _PARTIAL, run_dir / _MANIFEST
    done = _finished_batches(manifest, key) if partial.is_dir() else None
    if done is None:
        _create_store(recording, partial)
        done = set()
        write_json(manifest, {"fingerprint": key, "done": []})
    group = zarr.open_group(str(partial), mode="r+")
    resolved = recording.resolved
    stats = {site.name: RunningStats(resolved.model.n_units(site), resolved.condition.record.bins) for site in resolved.unit_sites}
    for index in sorted(done):
        _accumulate(stats, _stored_batch(group, recording, index, stats))
    return group, done, stats


def write_batch(group, arrays: BatchArrays) -> None:
    """A batch's activations and target into its rows of the store (no other batch shares its chunks)."""
    rows, width = slice(arrays.start, arrays.stop), arrays.real.shape[1]
    for name, values in arrays.sites.items():
        store = group[name]
        store[rows, :width] = values.reshape(len(values), width, *store.shape[2:])
    group["target"][rows, :width] = arrays.target


def write_manifest(run_dir: Path, key: str, done) -> None:
    write_json(run_dir / _MANIFEST, {"fingerprint": key, "done": sorted(done)})


def publish_recording(stats: dict[str, RunningStats], resolved: Resolved, run_dir: Path) -> None:
    """Every batch is stored: write ``stats.nc``, then rename the store into place."""
    import zarr

    partial = run_dir / _PARTIAL
    _write_stats(stats, resolved, run_dir / STATS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr notes that consolidated metadata is not in the v3 spec
        zarr.consolidate_metadata(str(partial))
    replace_path(partial, run_dir / ACTIVATIONS)
    (run_dir / _MANIFEST).unlink()


def discard_partial_store(run_dir: Path) -> None:
    remove_path(run_dir / _PARTIAL)
    remove_path(run_dir / _MANIFEST)


class _BatchWriter:
    """Stores batches and accumulates their statistics in one background thread, so disk and
    statistics overlap the next forward; at most one batch waits, keeping memory to two batches."""

    def __init__(self, group, stats: dict[str, RunningStats], manifest: Path, key: str, done: set[int]):
        self.group, self.stats, self.manifest, self.key, self.done = group, stats, manifest, key, done
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reduce-record")
        self._pending = None

    def __enter__(self) -> "_BatchWriter":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()

    def submit(self, arrays: BatchArrays) -> None:
        self._wait()
        self._pending = self._pool.submit(self._write, arrays)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, arrays: BatchArrays) -> None:
        _accumulate(self.stats, arrays)
        write_batch(self.group, arrays)
        self.done.add(arrays.index)
        write_manifest(self.manifest.parent, self.key, self.done)


def _accumulate(stats: dict[str, RunningStats], arrays: BatchArrays) -> None:
    """Add a batch's counted tokens (real, not special) to the statistics of its unit sites."""
    rows = arrays.counted.reshape(-1)
    for name, accumulator in stats.items():
        values = arrays.sites[name]
        accumulator.update(values.reshape(len(rows), -1), rows)


def _stored_batch(group, recording: "Recording", index: int, sites) -> BatchArrays:
    """A batch an earlier, interrupted run already stored (its statistics are rebuilt from it)."""
    start, stop = recording.bounds(index)
    real = recording.encoded.attention_mask[start:stop].bool().numpy()
    counted = counted_tokens(recording.encoded.input_ids[start:stop].numpy(), real, special_ids(recording.model))
    width = group["target"].shape[1]
    arrays = {name: np.asarray(group[name][start:stop]) for name in sites}
    return BatchArrays(index, start, stop, real[:, :width], counted[:, :width], arrays, np.asarray(group["target"][start:stop]))


def special_ids(model) -> list[int]:
    return list(getattr(model.tokenizer, "all_special_ids", None) or [])


def counted_tokens(input_ids: np.ndarray, real: np.ndarray, special: list[int]) -> np.ndarray:
    """Real tokens that are not special (BOS/CLS/SEP/pad).

    A special token's activations repeat one context-free value in every prompt; counted, that
    spike would win the histogram and make the peak baseline the BOS activation.
    """
    return real & ~np.isin(input_ids, special)


def _finished_batches(manifest_path: Path, key: str) -> set[int] | None:
    """Batches a previous, interrupted run of the same recording finished (None: start afresh)."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    return set(manifest["done"]) if manifest.get("fingerprint") == key else None


def _store_dtype(model):
    return np.float64 if next(model.module.parameters()).dtype == torch.float64 else np.float32


def _create_store(recording: Recording, path: Path) -> None:
    """The full-size store: coordinates and masks written, activations to be filled by region."""
    import dask.array
    import xarray as xr

    remove_path(path)
    resolved, model = recording.resolved, recording.model
    prompts, encoded = resolved.prompts, recording.encoded
    n, width, batch = len(prompts), recording.width, recording.batch_size
    dtype = _store_dtype(model)
    variables, encoding = {}, {}
    for site in resolved.sites:
        shape = model.unit_shape(site)
        dims = ("prompt", "pos", *shape)
        sizes = (n, width, *shape.values())
        chunks = _chunks(sizes, batch, np.dtype(dtype).itemsize)
        variables[site.name] = xr.Variable(dims, dask.array.zeros(sizes, chunks=chunks, dtype=dtype), attrs={"site": site.name, "layer": site.layer, "kind": site.kind})
        encoding[site.name] = {"_FillValue": np.nan}
    variables["target"] = xr.Variable(("prompt", "pos"), dask.array.zeros((n, width), chunks=(batch, width), dtype=np.float64), attrs={"name": resolved.target.name, "kind": resolved.target.kind})
    encoding["target"] = {"_FillValue": np.nan}
    mask = resolved.target.position_mask(encoded.lengths, width)
    variables["target_mask"] = xr.Variable(("prompt", "pos"), mask.numpy(), attrs={"position": str(resolved.target.position)})
    dataset = xr.Dataset(variables, coords=_prompt_coords(recording))
    dataset.attrs.update(
        condition=resolved.condition.name,
        model=model.name,
        family=model.arch.family,
        causal=int(model.causal),
        n_layers=model.n_layers,
        target=resolved.target.name,
    )
    dataset.to_zarr(str(path), mode="w", compute=False, consolidated=False, encoding=encoding)


def _chunks(sizes: tuple[int, ...], batch: int, itemsize: int) -> tuple[int, ...]:
    """Chunks of one batch of prompts, split along the first unit axis to stay under _CHUNK_BYTES."""
    rows = min(batch, sizes[0])
    per_unit = rows * sizes[1] * int(np.prod(sizes[3:], dtype=np.int64)) * itemsize
    units = max(1, min(sizes[2], _CHUNK_BYTES // max(per_unit, 1)))
    return (rows, sizes[1], units, *sizes[3:])


def _prompt_coords(recording: Recording) -> dict:
    prompts, encoded, model = recording.resolved.prompts, recording.encoded, recording.model
    strings = lambda values: np.array(values, dtype=object)  # noqa: E731
    coords = {
        "prompt": np.arange(len(prompts)),
        "text": ("prompt", strings(prompts.texts)),
        "length": ("prompt", encoded.lengths.numpy()),
        "tokens": (("prompt", "pos"), strings(token_strings(model, encoded))),
        "counted": (("prompt", "pos"), counted_tokens(encoded.input_ids.numpy(), encoded.attention_mask.bool().numpy(), special_ids(model))),
    }
    start, end = _offsets(model, prompts.texts, recording.width)
    coords["token_start"], coords["token_end"] = (("prompt", "pos"), start), (("prompt", "pos"), end)
    for name, values in (("answer", prompts.answers), ("wrong", prompts.wrongs), ("counterfactual", prompts.counterfactuals)):
        if values is not None:
            coords[name] = ("prompt", strings(values))
    for name, ids in (("answer_id", prompts.answer_ids), ("wrong_id", prompts.wrong_ids)):
        if ids is not None:
            coords[name] = ("prompt", ids)
    coords.update({name: ("prompt", strings(values)) for name, values in prompts.labels.items()})
    return coords


def _offsets(model, texts, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Character spans of every token in its prompt (-1 for padding, or without a fast tokenizer)."""
    start = np.full((len(texts), width), -1, dtype=np.int32)
    end = start.copy()
    if getattr(model.tokenizer, "is_fast", False):
        for row, spans in enumerate(model.tokenizer(list(texts), return_offsets_mapping=True)["offset_mapping"]):
            spans = np.asarray(spans, dtype=np.int32).reshape(-1, 2)
            start[row, : len(spans)], end[row, : len(spans)] = spans[:, 0], spans[:, 1]
    return start, end


def _check_finite(activations: BatchActivations, resolved: Resolved) -> None:
    real = activations.real
    for name, values in [*activations.sites.items(), ("target", activations.target[..., None])]:
        finite = torch.isfinite(values)
        if bool(finite.all()) or bool(finite[real].all()):  # padding may hold anything
            continue
        bad = (~finite & real[..., None]).nonzero()[0].tolist()
        prompt, pos, unit = bad[0] + activations.start, bad[1], bad[2]
        text = resolved.prompts.texts[prompt]
        where = "" if name == "target" else f", unit {unit}"
        raise ReduceError(
            f"non-finite value {values[tuple(bad)].item()} at prompt {prompt} ({text!r}), token {pos}{where}; "
            "usually an overflow in half precision (try model.dtype = \"float32\") or broken weights",
            file=resolved.condition.path,
            field=name,
        )


def _write_stats(stats: dict[str, RunningStats], resolved: Resolved, path: Path) -> None:
    from .baselines import UnitTable

    units = UnitTable.for_sites(resolved.model, resolved.unit_sites)
    parts = list(stats.values()) or [RunningStats(0, resolved.condition.record.bins)]
    dataset = RunningStats.concat(parts).to_dataset(units.coords())
    dataset.attrs.update(condition=resolved.condition.name, model=resolved.model.name, tokens="every real (non-padding) token of every prompt")
    write_netcdf(dataset, path)
