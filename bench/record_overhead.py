"""Recording overhead: hooked forwards copied to memory, and with streaming statistics, over plain forwards.

For each workload (:mod:`bench.workloads`) these arms run side by side on the same batches:

- ``forward``: forwards only, no hooks (the floor);
- ``record_to_memory``: what ``reduce.record`` does per batch before touching disk: its own
  hooked forwards (:func:`reduce.record.hooked_forwards`) of every MLP neuron and attention
  pre-out unit plus a neuron target (so each forward ends at that target's layer, as ``record``'s
  do), and each batch's sites as numpy, padding set to NaN (``BatchActivations.to_numpy``);
- ``record_with_stats``: the same, plus ``RunningStats.update`` of every unit site on every counted
  token (what ``record``'s writer thread does, here inline) and the refined peak at the end;
- ``record_full`` (workloads built from a condition): the whole ``reduce.record`` into a fresh run
  directory (zarr store, streaming statistics, stats.nc), for reference.

``record_vs_forward`` = record_to_memory / forward (goal <= 1.10); ``stats_vs_forward`` =
record_with_stats / forward (goal <= 1.25).

    python -m bench.record_overhead [--quick]
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import torch

from reduce.batching import forward
from reduce.record import BatchArrays, _accumulate, hooked_forwards, record, special_ids
from reduce.stats import RunningStats

from .timing import interleaved

BINS = 256


def forward_all(workload) -> None:
    """Plain forwards of every batch."""
    with torch.inference_mode():
        for batch in workload.batches:
            forward(workload.model, batch)


def record_to_memory(workload, consume=None) -> None:
    """``reduce.record``'s forwards (:func:`reduce.record.hooked_forwards`), each batch's sites and
    target copied to numpy once (``consume(BatchArrays)`` after each)."""
    special = special_ids(workload.model)
    starts = itertools.accumulate((len(batch) for batch in workload.batches), initial=0)
    for activations in hooked_forwards(workload.model, zip(itertools.count(), starts, workload.batches), workload.sites, workload.target):
        arrays = activations.to_numpy(special_ids=special)
        if consume is not None:
            consume(arrays)


def new_statistics(workload) -> dict[str, RunningStats]:
    return {site.name: RunningStats(workload.model.n_units(site), BINS) for site in workload.sites}


def record_with_stats(workload) -> dict[str, RunningStats]:
    """:func:`record_to_memory` plus the streaming statistics of every unit, as ``reduce.record`` accumulates them."""
    statistics = new_statistics(workload)

    def accumulate(arrays: BatchArrays) -> None:
        _accumulate(statistics, arrays)

    record_to_memory(workload, accumulate)
    for accumulator in statistics.values():
        accumulator.peak("refined")
    return statistics


def run_workload(workload, repetitions: int, *, full_record: bool = True) -> dict:
    arms = {
        "forward": lambda: forward_all(workload),
        "record_to_memory": lambda: record_to_memory(workload),
        "record_with_stats": lambda: record_with_stats(workload),
    }
    with tempfile.TemporaryDirectory(prefix="bench-record-") as scratch:
        if full_record and workload.condition is not None:
            runs = itertools.count()
            arms["record_full"] = lambda: record(workload.condition, Path(scratch) / f"run{next(runs)}", model=workload.model, progress=False)
        timings = interleaved(arms, repetitions)
    result = {
        **workload.describe(),
        "timings": timings.summary(),
        "record_vs_forward": timings.ratio_summary("record_to_memory", "forward"),
        "stats_vs_forward": timings.ratio_summary("record_with_stats", "forward"),
    }
    if "record_full" in arms:
        result["record_full_vs_forward"] = timings.ratio_summary("record_full", "forward")
    return result


def run(quick: bool = False, workloads=None) -> dict:
    """Every workload (by default MiniLM and the zoo default, sized for ``quick``)."""
    from .workloads import minilm_workload, zoo_workload

    if workloads is None:
        workloads = [minilm_workload(prompts=64 if quick else 256), zoo_workload(prompts=128 if quick else 512)]
    repetitions = 3 if quick else 7
    return {workload.key: run_workload(workload, repetitions) for workload in workloads}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for key, result in run(quick=args.quick).items():
        print(key, json.dumps({name: result[name]["paired_median"] for name in ("record_vs_forward", "stats_vs_forward")}))
