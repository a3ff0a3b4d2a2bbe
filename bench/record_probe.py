"""Time and peak memory of ``reduce record`` runs, each in a process of its own.

    python -m bench.record_probe SPEC.json RESULT.json

``SPEC.json``: ``{"warmup": {"condition": PATH, "out": RUN_DIR}, "runs": [{"name": ..., "condition":
PATH, "out": RUN_DIR}, ...]}``. This interpreter runs the (tiny) warm-up recording once, so every
import the command makes lazily (transformers loads a model family's code on first use: over ten
seconds here) is done, then forks one child per run; the child
runs the command line ``reduce record CONDITION --out RUN_DIR -q`` (``reduce.cli.main``) and
exits. The parent takes each child's own resource usage from ``os.wait4`` (``ru_maxrss``: its
peak resident memory: the libraries' pages it touches and everything the command allocates, as
for a fresh ``reduce record`` process), the child reports its resident memory before the command
and the seconds the command took (imports excluded, so growth with the prompt count is not hidden
under start-up).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path


def _resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _warm_up(run: dict) -> None:
    """One ``reduce record`` here, so the children start from an interpreter with everything imported."""
    import contextlib
    import io

    from reduce.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        if main(["record", run["condition"], "--out", run["out"], "-q"]) != 0:
            raise RuntimeError(f"warm-up recording of {run['condition']} failed")


def measure(run: dict) -> dict:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one reduce record, then straight out
        os.close(read)
        status = 1
        try:
            from reduce.cli import main

            # After fork only the pages this process touches count as its own, so its start is its own reading.
            start_rss = _resident_mb()
            started = time.perf_counter()
            status = main(["record", run["condition"], "--out", run["out"], "-q"])
            os.write(write, json.dumps({"seconds": time.perf_counter() - started, "start_rss_mb": start_rss}).encode())
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as pipe:
        reported = json.loads(pipe.read() or "{}")
    _, status, usage = os.wait4(pid, 0)
    shutil.rmtree(run["out"], ignore_errors=True)  # runs of thousands of prompts fill gigabytes
    peak = usage.ru_maxrss / 1024
    return {
        "name": run["name"],
        "returncode": os.waitstatus_to_exitcode(status),
        "seconds": reported.get("seconds"),
        "peak_rss_mb": peak,
        "start_rss_mb": reported.get("start_rss_mb"),
        "record_rss_increase_mb": peak - reported["start_rss_mb"] if "start_rss_mb" in reported else None,
    }


def main(argv=None) -> int:
    spec_path, result_path = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    _warm_up(spec["warmup"])
    results = [measure(run) for run in spec["runs"]]
    Path(result_path).write_text(json.dumps({"runs": results}))
    return 0 if all(result["returncode"] == 0 for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
