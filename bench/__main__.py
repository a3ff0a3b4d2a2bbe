"""``python -m bench [--quick]``: every benchmark of ``reduce`` in one process, one table of ratios vs goals.

Runs, in order: recording overhead (:mod:`bench.record_overhead`) and the peers nnsight and
TransformerLens (:mod:`bench.peers`) on MiniLM, the zoo default and (full run only) a randomly
initialised GPT-2 small; the streaming peak vs the seed paper's method (:mod:`bench.peak`); the
scaling of ``reduce record`` with prompts and units, including ``peak_memory_growth``
(:mod:`bench.scaling`); the ablation engine and attribution (:mod:`bench.ablation`); the reduced
GLM (:mod:`bench.glm`). Every timing is interleaved with the arms it is compared to and reported
as medians and ratios (:mod:`bench.timing`).

Writes ``bench/results/latest.json`` (``--quick``: also ``bench/results/quick.json``; a full
run: also ``bench/results/scaling.png``), and prints the ratio table. A benchmark that fails is reported in
``errors`` and its ratios as not measured; the others still run.

``--quick`` (a smoke run): fewer prompts and repetitions, one batch per model, no GPT-2 small,
peers on the zoo default only, no full ``record`` reference arm, 1,000 GLM samples instead of
10,000, and the scaling processes running beside the other benchmarks instead of after them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

# Before anything imports the hub client or a tokenizer: everything here is local, and the
# machine's cores are shared (spinning OpenMP threads of one process slow every other one).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("REDUCE_PROGRESS", "0")


def _sizes(quick: bool) -> dict:
    """Prompt counts, repetitions and which arms run, per mode."""
    if quick:
        return {"minilm_prompts": 32, "zoo_prompts": 64, "gpt2_small": None, "repetitions": 3, "gpt2_small_repetitions": 0, "full_record_arm": False, "peer_models": ["zoo"]}
    return {
        "minilm_prompts": 256,
        "zoo_prompts": 512,
        "gpt2_small": {"prompts": 8, "batch_size": 8, "max_length": 32},
        "repetitions": 5,
        "gpt2_small_repetitions": 5,
        "full_record_arm": True,
        "peer_models": ["minilm", "zoo", "gpt2_small"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer prompts and repetitions, no GPT-2 small")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every arm (default 1: the cores are shared, and ratios need a steady machine more than a fast one)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from . import ablation, glm, peak, peers, record_overhead, scaling
    from .machine import describe_machine, load_average
    from .report import RESULTS, document, format_table, goal_rows, write_json
    from .workloads import gpt2_small_workload, minilm_workload, zoo_workload

    results = RESULTS if args.out is None else Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    sizes = _sizes(args.quick)
    started_at, started = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    machine = describe_machine()
    benchmarks: dict = {}
    errors: dict = {}
    progress: dict = {}
    progress_cpu: dict = {}
    running = results / "running.json.tmp"

    def stage(name: str, function):
        began, began_cpu = time.perf_counter(), time.process_time()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            benchmarks[name] = function()
        except Exception as error:  # reported, and the other benchmarks still run
            errors[name] = f"{type(error).__name__}: {error}"
            traceback.print_exc(file=sys.stderr)
        progress[name] = round(time.perf_counter() - began, 1)
        progress_cpu[name] = round(time.process_time() - began_cpu, 1)
        print(f"[bench] {name}: {progress[name]} s ({progress_cpu[name]} s CPU)", file=sys.stderr, flush=True)
        # What has finished so far, in case the run is stopped (ignored by git; removed at the end).
        write_json({"mode": mode, "complete": False, "machine": machine, "stage_seconds": progress, "benchmarks": benchmarks, "errors": errors}, running)

    workloads = {}

    def build_workloads():
        workloads["minilm"] = minilm_workload(prompts=sizes["minilm_prompts"])
        workloads["zoo"] = zoo_workload(prompts=sizes["zoo_prompts"])
        if sizes["gpt2_small"]:
            workloads["gpt2_small"] = gpt2_small_workload(**sizes["gpt2_small"], stand_in_tokenizer=workloads["zoo"].tokenizer)
        return {key: workload.describe() for key, workload in workloads.items()}

    def per_workload(module, keys=None, **options):
        def run():
            out = {}
            for key, workload in workloads.items():
                if keys is None or key in keys:
                    repetitions = sizes["gpt2_small_repetitions"] if key == "gpt2_small" else sizes["repetitions"]
                    out[workload.key] = module.run_workload(workload, repetitions, **options)
            return out

        return run

    # The scaling runs are separate processes. In a quick run they go on beside the other
    # benchmarks (their timings then share the machine with them); a full run waits for them.
    probe = scaling.launch(args.quick, threads=args.threads) if args.quick else None
    stage("workloads", build_workloads)
    if "workloads" in benchmarks:
        stage("record_overhead", per_workload(record_overhead, full_record=sizes["full_record_arm"]))
        stage("peers", per_workload(peers, keys=sizes["peer_models"]))
        stage("peak", lambda: peak.run(args.quick, workload=workloads["zoo"]))
    # Only a full run draws bench/results/scaling.png (a quick run's few points would replace it).
    stage("scaling", lambda: scaling.summarise(probe or scaling.launch(args.quick, threads=args.threads), plot_path=None if args.quick else results / "scaling.png"))
    stage("ablation", lambda: ablation.run(args.quick))
    stage("glm", lambda: glm.run(args.quick))

    seconds = time.perf_counter() - started
    machine["load_average_at_end"] = load_average()
    settings = {"torch_threads": args.threads, "quick": args.quick, "sizes": sizes, "stage_seconds": progress, "stage_cpu_seconds": progress_cpu, "cpu_seconds": time.process_time()}
    report = document(mode=mode, machine=machine, settings=settings, benchmarks=benchmarks, errors=errors, started=started_at, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"), seconds=seconds)
    latest = write_json(report, results / "latest.json")
    running.unlink(missing_ok=True)
    if args.quick:
        shutil.copyfile(latest, results / "quick.json.tmp")
        os.replace(results / "quick.json.tmp", results / "quick.json")
    print(f"\n{mode} run, {seconds:.0f} s; {machine['cpu_model']}, {machine['logical_cpus']} CPUs, torch {machine['versions']['torch']} with {args.threads} thread(s); load average {machine['load_average_1_5_15_min']} -> {machine['load_average_at_end']}")
    print(format_table(goal_rows(benchmarks, errors)))
    print(f"\nwrote {latest}" + (f" and {results / 'quick.json'}" if args.quick else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
