"""The paper's tables, from the runs: ``paper/tables/NAME.md``, cited in the template as ``{{table:NAME}}``."""

from __future__ import annotations

import json
from pathlib import Path

from reduce.report import CONTROLS, baseline_label, markdown_table, number, ordered_baselines, signed

from .runs import CONDITIONS


def reduced_models_table(numbers: dict) -> str:
    """One row per condition: model, target, data, held-out accuracy with its interval, size of the model and the circuit."""
    rows = []
    for condition in CONDITIONS:
        n = {key.removeprefix(f"{condition.key}."): value for key, value in numbers.items() if key.startswith(f"{condition.key}.")}
        rows.append(
            (
                condition.label,
                f"`{n['model']}` ({n['layers']} layers)",
                n["target"],
                f"{n['train_prompts']} / {n['test_prompts']}",
                f"{n['metric']} {number(n['held_out'])} [{number(n['held_out_low'])}, {number(n['held_out_high'])}]" if n["held_out"] is not None else "did not converge",
                number(n["auroc"]),
                n["parameters"],
                f"{n['circuit.selected_units']} ({n['circuit.selected_synapses']} synapses)",
            )
        )
    header = ["condition", "model", "target", "train / test prompts", "held-out score [95% CI]", "held-out AUROC", "parameters", "circuit units"]
    return markdown_table(header, rows, align="lllrrrrr")


def controls_table(numbers: dict) -> str:
    """Drop of the held-out score when one part of the reduced model is removed, per condition."""
    # a control's drop is measured from the full model's held-out score, which an unconverged fit lacks
    converged = {c.key: numbers[f"{c.key}.held_out"] is not None for c in CONDITIONS}
    def cell(key: str, name: str) -> str:
        if not converged[key]:
            return "–"
        drop, deviance = numbers.get(f"{key}.control.{name}.drop"), numbers.get(f"{key}.control.{name}.deviance_drop")
        return signed(drop) if numbers[f"{key}.metric"] == "R²" else f"{signed(drop)} ({signed(deviance)})"

    rows = [(text, *(cell(c.key, name) for c in CONDITIONS)) for name, text in CONTROLS.items()]
    return markdown_table(["control", *(f"{c.label} ({numbers[f'{c.key}.metric']})" for c in CONDITIONS)], rows, align="l" + "r" * len(CONDITIONS))


def degradation_table(run_dirs: dict[str, Path]) -> str:
    """Seed 004's Table 2 with a column per condition's model."""
    import xarray as xr

    from reduce.ablate import degradation_markdown
    from reduce.ablate import degradation_table as table_of

    ablations = {condition.label: xr.open_zarr(run_dirs[condition.key] / "ablations.zarr") for condition in CONDITIONS}
    return degradation_markdown(table_of(ablations)).rstrip()


def validated(run_dirs: dict[str, Path]) -> list:
    """The conditions whose run got as far as counterfactual validation."""
    return [condition for condition in CONDITIONS if (run_dirs[condition.key] / "validation.json").exists()]


def faithfulness_table(run_dirs: dict[str, Path]) -> str:
    """Per condition and baseline: Spearman ρ of each predictor, the compensation gap, the size of the actual effect."""
    rows = []
    for condition in validated(run_dirs):
        validation = json.loads((run_dirs[condition.key] / "validation.json").read_text())
        for index, baseline in enumerate(ordered_baselines(validation["baselines"])):
            scores = validation["baselines"][baseline]
            best = " (most faithful)" if baseline == validation.get("most_faithful_baseline") else ""
            rows.append(
                (
                    condition.label if index == 0 else "",
                    baseline_label(baseline) + best,
                    *(number(scores[f"{p}_spearman"]) for p in ("direct", "propagated", "attribution")),
                    signed(scores["compensation_gap"]),
                    number(scores["mean_abs_target_change"]),
                )
            )
    header = ["condition", "baseline", "ρ direct", "ρ propagated", "ρ attribution", "compensation gap", "mean abs. target change"]
    return markdown_table(header, rows, align="llrrrrr")


def universality_table(universality_dir: Path) -> str:
    """One row per zoo model of the comparison."""
    headline = json.loads((Path(universality_dir) / "universality.json").read_text())
    metric = {"r2": "R²", "auroc": "AUROC"}.get(headline["metric"], headline["metric"])
    rows = [
        (f"`{name}`", row["architecture"], row["layers"], row["units"], number(row["held_out"]), number(row["ceiling"]), row["circuit_units"])
        for name, row in headline["per_model"].items()
    ]
    return markdown_table(["model", "architecture", "layers", "units", f"held-out {metric}", "split-half ceiling", "circuit units"], rows, align="llrrrrr")


def write_tables(numbers: dict, run_dirs: dict[str, Path], universality_dirs: dict[str, Path], out_dir: Path) -> dict[str, str]:
    """Every table into ``out_dir/NAME.md``; returns ``{NAME: markdown}``."""
    from reduce.store import atomic_write

    tables = {
        "reduced_models": reduced_models_table(numbers),
        "controls": controls_table(numbers),
        "degradation": degradation_table(run_dirs),
        "faithfulness": faithfulness_table(run_dirs),
    }
    for key, directory in universality_dirs.items():
        tables[f"universality_{key}"] = universality_table(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in tables.items():
        with atomic_write(out_dir / f"{name}.md") as handle:
            handle.write(text + "\n")
    return tables
