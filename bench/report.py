"""Goals, the ratio table and ``bench/results/latest.json``.

Every headline ratio has one row per model it was measured on, with its goal (or "report" where
there is none) and whether the measurement meets it. A ratio that could not be measured (a peer
that cannot run a model, a benchmark that failed) appears with the reason instead of a number.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Row:
    ratio: str
    model: str
    goal: str  # e.g. "<= 1.10", ">= 1.15", "report"
    measured: float | None
    met: bool | None  # None: no goal, or not measured
    note: str = ""


def _check(measured: float | None, goal: str) -> bool | None:
    if measured is None or goal == "report" or (isinstance(measured, float) and math.isnan(measured)):
        return None
    operator, threshold = goal.split()
    return measured <= float(threshold) if operator == "<=" else measured >= float(threshold)


def _row(ratio: str, model: str, goal: str, measured, note: str = "") -> Row:
    measured = None if measured is None else float(measured)
    return Row(ratio, model, goal, measured, _check(measured, goal), note)


def goal_rows(benchmarks: dict, errors: dict) -> list[Row]:
    """Rows for every ratio the brief names, from whatever the benchmarks produced."""
    rows: list[Row] = []

    def missing(ratio: str, model: str, goal: str, benchmark: str) -> None:
        rows.append(Row(ratio, model, goal, None, None, f"not measured: {errors.get(benchmark, 'benchmark not run')}"))

    recording = benchmarks.get("record_overhead")
    for ratio, goal in (("record_vs_forward", "<= 1.10"), ("stats_vs_forward", "<= 1.25")):
        if recording is None:
            missing(ratio, "all", goal, "record_overhead")
            continue
        for model, result in recording.items():
            summary = result[ratio]
            rows.append(_row(ratio, model, goal, summary["paired_median"], f"CPU-time ratio {summary['cpu']:.3f}"))

    peers = benchmarks.get("peers")
    for peer, ratio in (("nnsight", "nnsight_vs_record"), ("transformerlens", "transformerlens_vs_record")):
        if peers is None:
            missing(ratio, "all", ">= 1.0", "peers")
            continue
        for model, result in peers.items():
            goal = ">= 1.15" if model.startswith("zoo:") else ">= 1.0"
            if peer in result["not_run"]:
                rows.append(Row(ratio, model, goal, None, None, f"cannot run: {result['not_run'][peer]}"))
                continue
            summary = result["peers"][peer]
            rows.append(_row(ratio, model, goal, summary["vs_record"]["paired_median"], f"arm {summary['vs_record']['numerator']}; full forward {summary['full_forward_vs_record']['paired_median']:.2f}, stopped after the last block {summary['stopped_vs_record']['paired_median']:.2f}; CPU {summary['vs_record']['cpu']:.2f}"))
    if peers is not None:
        for model, result in peers.items():
            if "transformerlens_stats_vs_ours" in result:
                rows.append(_row("transformerlens_stats_vs_ours", model, "report", result["transformerlens_stats_vs_ours"]["paired_median"], "TransformerLens cache + mean + per-unit histc mode over reduce's streaming statistics"))
            elif "transformerlens" in result["not_run"]:
                rows.append(Row("transformerlens_stats_vs_ours", model, "report", None, None, f"cannot run: {result['not_run']['transformerlens']}"))

    peak = benchmarks.get("peak")
    if peak is None:
        missing("peak_speedup", "zoo", ">= 10", "peak")
    else:
        rows.append(_row("peak_speedup", peak["model"], ">= 10", peak["peak_speedup"]["paired_median"], f"{peak['tokens']} tokens x {peak['units']} units; seed stores {peak['seed_stored_bytes'] / 2**20:.1f} MB, streaming state {peak['streaming_state_bytes'] / 2**20:.1f} MB"))

    scaling = benchmarks.get("scaling")
    if scaling is None:
        missing("peak_memory_growth", "zoo", "<= 1.2", "scaling")
    else:
        low, high = scaling["peak_memory_growth_prompts"]
        rows.append(_row("peak_memory_growth", scaling["model"], "<= 1.2", scaling["peak_memory_growth"], f"peak RSS of reduce record, {low} -> {high} prompts"))
        for axis in ("prompts", "units"):
            result = scaling[f"vs_{axis}"]
            rows.append(_row(f"scaling_time_exponent_vs_{axis}", scaling["model"], "report", result["time_exponent"], f"{axis} {result['x']}"))
            rows.append(_row(f"scaling_peak_rss_exponent_vs_{axis}", scaling["model"], "report", result["peak_rss_exponent"], f"{axis} {result['x']}"))

    ablation = benchmarks.get("ablation")
    ablation_goals = (
        ("batched_ablation_speedup", ">= 1.3", ""),
        ("layer_reuse_speedup", None, ""),
        ("sweep_vs_naive", ">= 5", "an aim, not a hard goal"),
        ("attribution_cost", "<= 4", ""),
        ("attribution_spearman", "report", "attribution patching vs exact single-unit ablation effects"),
    )
    for ratio, goal, note in ablation_goals:
        if ablation is None:
            missing(ratio, "zoo", goal or ">= 0.8 L", "ablation")
            continue
        goal = goal or f">= {ablation['layer_reuse_goal']:.2f}"
        note = note or ("0.8 x n_layers" if ratio == "layer_reuse_speedup" else "")
        rows.append(_row(ratio, ablation["model"], goal, ablation[ratio], note))

    glm = benchmarks.get("glm")
    if glm is None:
        for ratio, goal in (("glm_seconds_per_target", "<= 1"), ("glm_vs_cobyla_speedup", ">= 50"), ("glm_vs_statsmodels", "report")):
            missing(ratio, "simulated", goal, "glm")
    else:
        data = f"{glm['samples']} samples x {glm['features']} features"
        rows.append(_row("glm_seconds_per_target", "simulated", "<= 1", glm["glm_seconds_per_target"], f"{data}; CV on {glm['cores']} cores, {glm['glm_cpu_seconds_per_target']:.2f} CPU s; one thread {glm['glm_seconds_per_target_one_thread']:.2f} s" + ("" if glm["samples"] == 10_000 else "; the goal is set at 10,000 samples")))
        rows.append(_row("glm_vs_cobyla_speedup", "simulated", ">= 50", glm["glm_vs_cobyla_speedup"], f"both unpenalised; with CV {glm['glm_vs_cobyla_speedup_with_cv']:.1f}, at the alpha CV chose {glm['glm_vs_cobyla_speedup_fixed_alpha']:.1f}; AUROC {glm['glm_separable_unpenalised']['test_auroc']:.3f} vs COBYLA {glm['cobyla']['test_auroc']:.3f}"))
        rows.append(_row("glm_vs_statsmodels", "simulated", "report", glm["glm_vs_statsmodels"]["time_ratio"], f"statsmodels time / reduce full grid with CV; at a fixed alpha {glm['glm_vs_statsmodels']['time_ratio_fixed_alpha']:.2f}"))
    return rows


def ratios_mapping(rows: list[Row]) -> dict:
    """``{ratio: value}`` or ``{ratio: {model: value}}``; an unmeasured entry is ``{"not_measured": reason}``."""
    by_ratio: dict[str, dict] = {}
    for row in rows:
        value = row.measured if row.measured is not None else {"not_measured": row.note}
        by_ratio.setdefault(row.ratio, {})[row.model] = value
    return {ratio: next(iter(models.values())) if len(models) == 1 and ratio not in _PER_MODEL else models for ratio, models in by_ratio.items()}


_PER_MODEL = {"record_vs_forward", "stats_vs_forward", "nnsight_vs_record", "transformerlens_vs_record", "transformerlens_stats_vs_ours"}


def format_table(rows: list[Row]) -> str:
    header = ("ratio", "model", "goal", "measured", "met", "note")
    lines = [header]
    for row in rows:
        measured = "—" if row.measured is None else f"{row.measured:.3f}"
        met = "—" if row.met is None else ("yes" if row.met else "no")
        lines.append((row.ratio, row.model, row.goal, measured, met, row.note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths)) + "  " + line[-1] for line in lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| ratio | model | goal | measured | met |", "|---|---|---|---|---|"]
    for row in rows:
        measured = "—" if row.measured is None else f"{row.measured:.3g}"
        met = "—" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(f"| `{row.ratio}` | {row.model} | {row.goal} | {measured} | {met} |")
    return "\n".join(lines)


def _json_ready(value):
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch scalars and arrays
        return _json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(document: dict, path: Path) -> Path:
    """Written to a temporary file beside ``path`` and renamed over it: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(_json_ready(document), indent=1, allow_nan=False) + "\n")
    os.replace(temporary, path)
    return path


def document(*, mode: str, machine: dict, settings: dict, benchmarks: dict, errors: dict, started: str, finished: str, seconds: float) -> dict:
    rows = goal_rows(benchmarks, errors)
    return {
        "schema": "reduce-bench/1",
        "mode": mode,
        "command": "python -m bench" + (" --quick" if mode == "quick" else ""),
        "started": started,
        "finished": finished,
        "duration_s": seconds,
        "machine": machine,
        "settings": settings,
        "ratios": ratios_mapping(rows),
        "goals": [asdict(row) for row in rows],
        "benchmarks": benchmarks,
        "errors": errors,
    }
