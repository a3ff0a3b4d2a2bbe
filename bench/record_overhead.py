"""Recording overhead on MiniLM: hooked forwards copied to numpy vs plain forwards, side by side.

Three ways through the same batches of the example condition ``conditions/minilm_neuron.toml``:

- ``plain``: forwards only, no hooks (the floor);
- ``memory``: what ``reduce.record`` does per batch before touching disk, i.e. forwards with the
  recording hooks plus the target, and each batch's sites copied to numpy once (target <= 1.10x);
- ``record``: the whole ``reduce.record`` into a fresh run directory (tokenising, the zarr store,
  streaming statistics of every unit, stats.nc), for reference.

Repetitions are interleaved (rotating the order) and summarised by medians.

    python bench/record_overhead.py [--quick] [--threads N]     (with reduce installed: pip install -e .)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

CONDITION = Path(__file__).resolve().parents[1] / "conditions" / "minilm_neuron.toml"


def run(quick: bool = False) -> dict:
    from reduce.batching import forward
    from reduce.condition import load_condition, open_model, resolve
    from reduce.record import Recording, record

    prompts, batch_size, repetitions = (64, 32, 3) if quick else (256, 64, 7)
    condition = load_condition(CONDITION)
    condition = dataclasses.replace(
        condition,
        prompts=dataclasses.replace(condition.prompts, max_prompts=prompts),
        record=dataclasses.replace(condition.record, batch_size=batch_size),
    )
    model = open_model(condition)
    recording = Recording(resolve(condition, model))
    batches = range(len(recording))

    def plain():
        with torch.inference_mode():
            for index in batches:
                forward(model, recording.batch(index))

    def memory():
        for activations in recording.forwards(batches):
            activations.to_numpy()

    with tempfile.TemporaryDirectory() as scratch:
        runs = iter(range(10**6))

        def full():
            record(condition, Path(scratch) / f"run{next(runs)}", model=model, progress=False)

        ways = {"plain": plain, "memory": memory, "record": full}
        for way in ways.values():  # warm up caches, allocator and lazy imports
            way()
        times = {name: [] for name in ways}
        order = list(ways)
        for repetition in range(repetitions):
            for name in order[repetition % len(order) :] + order[: repetition % len(order)]:
                started = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - started)

    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "model": "minilm (all-MiniLM-L6-v2, 6 layers, d_model 384)",
        "prompts": len(recording.resolved.prompts),
        "batch_size": batch_size,
        "batches": len(recording),
        "seq_length": recording.width,
        "sites": len(recording.resolved.sites),
        "units": sum(model.n_units(s) for s in recording.resolved.unit_sites),
        "threads": torch.get_num_threads(),
        "repetitions": repetitions,
        "median_s": medians,
        "memory_over_plain": medians["memory"] / medians["plain"],
        "record_over_plain": medians["record"] / medians["plain"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repetitions")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(quick=args.quick)
    print(
        f"{result['model']}: {result['prompts']} prompts in {result['batches']} batches of {result['batch_size']}, "
        f"{result['seq_length']} tokens, {result['sites']} sites ({result['units']} units), {result['threads']} threads, "
        f"median of {result['repetitions']} interleaved repetitions"
    )
    for name, seconds in result["median_s"].items():
        print(f"  {name:7s} {seconds * 1000:9.1f} ms   {seconds / result['median_s']['plain']:.3f}x plain")
    print(f"recording to memory / plain forward = {result['memory_over_plain']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
