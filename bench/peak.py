"""The peak (modal activation) of every unit: reduce's streaming histograms against the seed paper's method.

- ``peak_speedup``: the seed paper's method (store every activation, then per neuron a
  ``torch.histc`` in a Python loop and the centre of its fullest bin) over reduce's streaming
  statistics (``RunningStats.update`` on each batch as it arrives, then the refined peak of every
  unit), side by side on the same batches of activations (goal >= 10). The seed arm gets the
  stored activations transposed once so each neuron's column is contiguous (its fastest form).
  Also reported: the memory each needs (the seed stores every value; the streaming state is a
  histogram per unit) and how far the two peaks lie apart, in seed bins.
- ``peak_memory_growth``: peak RSS of ``reduce record`` when the prompt count grows 10x (goal
  <= 1.2), from :mod:`bench.scaling`'s runs (each a ``reduce record`` in its own process).
"""

from __future__ import annotations

import numpy as np
import torch

from reduce.stats import RunningStats

from .timing import interleaved

BINS = 256


def seed_paper_peaks(values: torch.Tensor, bins: int = BINS) -> torch.Tensor:
    """Seed paper 004's peak of each column of ``values`` (tokens, units): a ``torch.histc`` per
    neuron over its own range, the centre of the fullest bin."""
    columns = values.T.contiguous()
    peaks = torch.empty(columns.shape[0], dtype=torch.float64)
    for unit, column in enumerate(columns):
        low, high = float(column.min()), float(column.max())
        if high <= low:
            peaks[unit] = low
            continue
        counts = torch.histc(column, bins=bins, min=low, max=high)
        peaks[unit] = low + (int(counts.argmax()) + 0.5) * (high - low) / bins
    return peaks


def streaming_peaks(batches: list[dict[str, np.ndarray]], bins: int = BINS) -> dict[str, torch.Tensor]:
    """reduce's peak of every unit, one ``RunningStats`` per site updated batch by batch."""
    statistics = {name: RunningStats(values.shape[1], bins) for name, values in batches[0].items()}
    for batch in batches:
        for name, values in batch.items():
            statistics[name].update(torch.from_numpy(values))
    return {name: accumulator.peak("refined") for name, accumulator in statistics.items()}


def stored_peaks(batches: list[dict[str, np.ndarray]], bins: int = BINS) -> dict[str, torch.Tensor]:
    """The seed paper's way: keep every batch, then per site concatenate and loop over the neurons."""
    stored = {name: [] for name in batches[0]}
    for batch in batches:
        for name, values in batch.items():
            stored[name].append(values)
    return {name: seed_paper_peaks(torch.from_numpy(np.concatenate(parts)), bins) for name, parts in stored.items()}


def synthetic_activations(batches: int, tokens: int, units: int, *, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """GELU of shifted, scaled Gaussians: one site, ``batches`` batches of (tokens, units) float32."""
    rng = np.random.default_rng(seed)
    scale, shift = rng.uniform(0.5, 3.0, units), rng.normal(0.0, 1.0, units)
    return [{"synthetic": torch.nn.functional.gelu(torch.from_numpy((rng.standard_normal((tokens, units)) * scale + shift).astype(np.float32))).numpy()} for _ in range(batches)]


def recorded_activations(workload) -> list[dict[str, np.ndarray]]:
    """Each batch's unit sites at its counted tokens (real, not special), as ``reduce.record`` feeds its statistics."""
    from .record_overhead import record_to_memory

    batches = []

    def keep(arrays) -> None:
        batches.append({name: np.ascontiguousarray(values.reshape(*values.shape[:2], -1)[arrays.counted]) for name, values in arrays.sites.items()})

    record_to_memory(workload, keep)
    return batches


def peak_speedup(batches: list[dict[str, np.ndarray]], *, bins: int = BINS, repetitions: int = 3, source: str = "synthetic") -> dict:
    """Seed method over streaming, interleaved; JSON-ready."""
    timings = interleaved({"streaming": lambda: streaming_peaks(batches, bins), "seed_store_then_histc": lambda: stored_peaks(batches, bins)}, repetitions)
    ours, theirs = streaming_peaks(batches, bins), stored_peaks(batches, bins)
    sites = list(batches[0])
    tokens = sum(len(batch[sites[0]]) for batch in batches)
    units = sum(batch_values.shape[1] for batch_values in batches[0].values())
    seed_bin = {}
    for name in sites:
        values = np.concatenate([batch[name] for batch in batches])
        seed_bin[name] = torch.from_numpy((values.max(0) - values.min(0)).astype(np.float64) / bins)
    distance = torch.cat([((ours[name] - theirs[name]).abs() / seed_bin[name].clamp(min=1e-30)) for name in sites])
    return {
        "source": source,
        "batches": len(batches),
        "tokens": tokens,
        "units": units,
        "sites": len(sites),
        "bins": bins,
        "threads": torch.get_num_threads(),
        "timings": timings.summary(),
        "peak_speedup": timings.ratio_summary("seed_store_then_histc", "streaming"),
        "seed_stored_bytes": int(tokens * units * 4),
        "streaming_state_bytes": int(units * (bins + 7) * 8),
        "median_peak_distance_in_seed_bins": float(distance.median()),
        "share_of_units_within_one_seed_bin": float((distance <= 1.0).double().mean()),
    }


def run(quick: bool = False, workload=None) -> dict:
    """On the zoo default's recorded activations (``workload``; built here when None)."""
    from .workloads import zoo_workload

    workload = workload if workload is not None else zoo_workload(prompts=128 if quick else 512)
    result = peak_speedup(recorded_activations(workload), repetitions=3 if quick else 5, source=f"{workload.key} on {workload.prompt_source}")
    result["model"] = workload.key
    result["batch_size"] = workload.describe()["batch_size"]
    result["prompts"] = workload.prompts
    result["sequence_length_max"] = workload.describe()["sequence_length_max"]
    return result
