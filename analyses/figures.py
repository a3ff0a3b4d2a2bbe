"""The paper's figures, from the runs: ``paper/figures/*.png``.

The filter rows are the runs' own filter figures side by side (so the paper shows exactly what
each run's report shows); the ablation figure is :func:`reduce.ablate.plot_degradation` over the
three conditions; the faithfulness figure is drawn here; the universality figures are the
comparison's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reduce.report import PREDICTORS, baseline_label, ordered_baselines
from reduce.store import atomic_path

from .runs import CONDITIONS
from .tables import validated

FILTER_PANELS = ("spatial.png", "temporal.png", "history.png")
UNIVERSALITY_FIGURES = {"filters_overlay.png": "filters", "similarity.png": "similarity", "transfer.png": "transfer"}  # saved as universality_KEY_NAME.png


def filters_figure_name(key: str) -> str:
    return f"{key}_filters.png"


def side_by_side(images: list[Path], out: Path) -> Path:
    """The PNGs in one row, tops aligned, on white."""
    from PIL import Image

    opened = [Image.open(path).convert("RGB") for path in images]
    width = sum(image.width for image in opened)
    height = max(image.height for image in opened)
    row = Image.new("RGB", (width, height), "white")
    left = 0
    for image in opened:
        row.paste(image, (left, 0))
        left += image.width
    with atomic_path(out) as temporary:
        row.save(temporary, format="PNG", optimize=True)
    return out


def copy_figure(source: Path, out: Path) -> Path:
    with atomic_path(out) as temporary:
        temporary.write_bytes(Path(source).read_bytes())
    return out


def faithfulness_figure(run_dirs: dict[str, Path], out: Path) -> Path:
    """Spearman ρ of predicted against actual ablation effects: a panel per condition, bars per baseline and predictor."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = []
    for condition in validated(run_dirs):
        validation = json.loads((run_dirs[condition.key] / "validation.json").read_text())
        for baseline in ordered_baselines(validation["baselines"]):
            for predictor in PREDICTORS:
                value = validation["baselines"][baseline][f"{predictor}_spearman"]
                rows.append({"condition": condition.label, "baseline": baseline_label(baseline), "predictor": predictor, "Spearman ρ": np.nan if value is None else value})
    frame = pd.DataFrame(rows)
    sns.set_theme(style="whitegrid", context="paper")
    grid = sns.catplot(data=frame, kind="bar", x="baseline", y="Spearman ρ", hue="predictor", col="condition", height=3.2, aspect=1.25, palette="deep", sharex=False)
    grid.set_titles("{col_name}")
    grid.set(ylim=(-0.5, 1.0))
    for axes in grid.axes.flat:
        axes.axhline(0.0, color="0.3", linewidth=0.8)
        axes.tick_params(axis="x", labelrotation=30)
        axes.set_xlabel("")
    grid.figure.suptitle("Predicted vs actual change of the target under ablation (held-out prompts)", y=1.03, fontsize="medium")
    with atomic_path(out) as temporary:
        grid.figure.savefig(temporary, format="png", dpi=130, bbox_inches="tight")
    plt.close(grid.figure)
    return out


def degradation_figure(run_dirs: dict[str, Path], out: Path) -> Path:
    """Seed 004's Figure 2 for every condition's model: a row per condition."""
    import xarray as xr

    from reduce.ablate import plot_degradation

    ablations = {condition.label: xr.open_zarr(run_dirs[condition.key] / "ablations.zarr") for condition in CONDITIONS}
    plot_degradation(ablations, out)
    return out


def write_figures(run_dirs: dict[str, Path], universality_dirs: dict[str, Path], out_dir: Path) -> list[Path]:
    """Every figure of the paper into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for condition in CONDITIONS:
        panels = [run_dirs[condition.key] / "figures" / name for name in FILTER_PANELS]
        written.append(side_by_side([p for p in panels if p.exists()], out_dir / filters_figure_name(condition.key)))
    written.append(degradation_figure(run_dirs, out_dir / "degradation.png"))
    written.append(faithfulness_figure(run_dirs, out_dir / "faithfulness.png"))
    first = CONDITIONS[0]
    written.append(copy_figure(run_dirs[first.key] / "figures" / "validation_scatter.png", out_dir / f"{first.key}_validation_scatter.png"))
    for key, directory in universality_dirs.items():
        for source, name in UNIVERSALITY_FIGURES.items():
            written.append(copy_figure(directory / source, out_dir / f"universality_{key}_{name}.png"))
    return written
