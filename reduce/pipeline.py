"""The main job: every stage for one condition, resumable stage by stage.

    check → record (activations, statistics) → ablate (plans × baselines) → fit (reduced
    models) → validate (counterfactual faithfulness) → report (summary.json, report.html)

Each stage skips itself when its outputs exist and were made from the same parts of the
condition (see :class:`reduce.store.RunDir`); ``force`` redoes them all. ``summary.json`` holds
the headline numbers and is deterministic for a given condition and seed; wall times go to
``timings.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .condition import Condition, load_condition, open_model, resolve
from .store import RunDir, write_json

DEFAULT_CONDITION = Path(__file__).resolve().parent.parent / "conditions" / "sva.toml"
STAGES = ("record", "ablate", "fit", "validate", "report")


def run(condition=None, run_dir=None, *, force: bool = False, progress: bool = True, log=sys.stderr) -> dict:
    """Run every stage of ``condition`` (default: the bundled SVA condition) into ``run_dir``.

    ``run_dir`` defaults to ``runs/<condition name>``. Returns the summary.
    """
    from .ablate import ablate
    from .fit import fit
    from .record import record
    from .validate import validate

    condition = load_condition(condition or DEFAULT_CONDITION) if not isinstance(condition, Condition) else condition
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / condition.name
    steps = {
        "record": lambda model: record(condition, run_dir, model=model, progress=progress),
        "ablate": lambda model: ablate(condition, run_dir, model=model, progress=progress),
        "fit": lambda model: fit(condition, run_dir, model=model, progress=progress),
        "validate": lambda model: validate(condition, run_dir, model=model, progress=progress),
    }
    with RunDir(run_dir) as run:
        if force:
            for stage in STAGES:
                run.forget(stage)
        started = time.perf_counter()
        model = open_model(condition)
        resolve(condition, model)  # every check up front, before any stage writes
        timings = {"load_model": time.perf_counter() - started}
        for index, (stage, step) in enumerate(steps.items(), start=1):
            timings[stage] = _timed_stage(run, stage, index, lambda: step(model), log)
        summary = _timed_stage(run, "report", len(STAGES), lambda: write_summary(condition, run_dir), log, keep_result=True)
        timings["report"] = summary.pop("_seconds")
        timings["total"] = time.perf_counter() - started
        write_json(run_dir / "timings.json", {name: round(seconds, 3) for name, seconds in timings.items()})
    print(f"done in {timings['total']:.0f} s: {run_dir / 'report.html'}", file=log)
    return summary


def _timed_stage(run: RunDir, stage: str, index: int, step, log, *, keep_result: bool = False):
    before = run.stage_key(stage)
    print(f"[{index}/{len(STAGES)}] {stage} ...", file=log, flush=True)
    started = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - started
    reused = before is not None and before == run.stage_key(stage)
    print(f"[{index}/{len(STAGES)}] {stage} {'reused' if reused else f'done in {seconds:.1f} s'}", file=log, flush=True)
    if keep_result:
        result["_seconds"] = seconds
        return result
    return seconds


def write_summary(condition: Condition, run_dir: Path) -> dict:
    """summary.json (headline numbers) and the report, from the stages' outputs."""
    import xarray as xr

    from .ablate import degradation_table
    from .report import write_report

    run_dir = Path(run_dir)
    fitted = json.loads((run_dir / "fit.json").read_text())
    validation = json.loads((run_dir / "validation.json").read_text())
    ablations = xr.open_zarr(run_dir / "ablations.zarr")
    summary = {
        "condition": condition.name,
        "model": condition.model.name,
        "target": fitted["target"],
        "seed": condition.seed,
        "reduced_model": {name: fitted[name] for name in ("family", "metric", "converged", "held_out", "interval", "controls", "threshold", "train_prompts", "test_prompts")},
        "circuit": fitted["circuit"],
        "faithfulness": validation["baselines"],
        "most_faithful_baseline": validation["most_faithful_baseline"],
        "degradation": _degradation(degradation_table(ablations)) if "random" in set(ablations["plan"].values.tolist()) else None,
    }
    write_json(run_dir / "summary.json", summary)
    write_report(run_dir)
    return summary


def _degradation(table) -> dict:
    """{metric: {pruning: {baseline: [mean, sd]}}} from seed 004's Table 2 frame."""
    out: dict = {}
    for row in table.itertuples(index=False):
        out.setdefault(row.metric, {}).setdefault(str(row.pruning), {})[row.baseline] = [round(float(row.mean), 6), round(float(row.sd), 6)]
    return out
