"""The seed's figures for a fitted reduced model: its filters, history penalty and nonlinearity."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import xarray as xr

from .reduced import FAMILIES, ReducedModel
from .store import atomic_path


def plot_filters(model: ReducedModel, out_dir, ci: xr.Dataset | None = None) -> list[Path]:
    """Write ``spatial.png``, ``temporal.png``, ``filter.png``, ``history.png`` (when fitted with
    history) and ``nonlinearity.png`` into ``out_dir``; return their paths.

    ``ci`` (from :func:`reduce.reduced.bootstrap`) adds confidence bands to the spatial, temporal
    and history filters.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="paper")
    written = [
        _save(_profile(model.spatial_filter_, "distance", "layer distance", "spatial filter s_g (scale and sign)", ci), out_dir / "spatial.png"),
        _save(_profile(model.temporal_filter_, "lag", "token lag", "temporal filter t_g (unit norm)", ci), out_dir / "temporal.png"),
        _save(_heatmaps(model.filter_), out_dir / "filter.png"),
    ]
    if model.history_filter_ is not None:
        written.append(_save(_profile(model.history_filter_, "history_lag", "history lag", "history weight", ci), out_dir / "history.png"))
    written.append(_save(_nonlinearity(model), out_dir / "nonlinearity.png"))
    return written


def _profile(filters: xr.DataArray, dim: str, xlabel: str, ylabel: str, ci: xr.Dataset | None):
    """One line per group (or a single line) along ``dim``, with its bootstrap band when given."""
    frame = filters.to_dataframe(name="weight").reset_index()
    hue = "group" if "group" in filters.dims else None
    if hue:
        frame["group"] = frame["group"].astype(str)
    figure, axes = plt.subplots(figsize=(4.5, 3.2))
    sns.lineplot(data=frame, x=dim, y="weight", hue=hue, marker="o", ax=axes)
    if ci is not None and filters.name in ci:
        band = ci[filters.name]
        groups = band["group"].values if hue else [None]
        colours = sns.color_palette(n_colors=len(groups))
        for group, colour in zip(groups, colours):
            selected = band.sel(group=group) if hue else band
            axes.fill_between(selected[dim].values, selected.sel(bound="lower").values, selected.sel(bound="upper").values, color=colour, alpha=0.25, linewidth=0)
        axes.set_title(f"{ci.attrs['level']:.0%} block-bootstrap bands, n = {ci.attrs['n']}", fontsize="small")
    axes.axhline(0.0, color="0.3", linewidth=0.8)
    axes.set(xlabel=xlabel, ylabel=ylabel)
    return figure


def _heatmaps(filters: xr.DataArray):
    groups = filters["group"].values
    figure, all_axes = plt.subplots(1, len(groups), figsize=(4.0 * len(groups), 3.2), squeeze=False)
    limit = float(np.abs(filters.values).max()) or 1.0
    for group, axes in zip(groups, all_axes[0]):
        frame = filters.sel(group=group).to_pandas()
        sns.heatmap(frame, ax=axes, cmap="RdBu_r", center=0.0, vmin=-limit, vmax=limit, cbar_kws={"label": "F_g(distance, lag)"})
        axes.set(title=f"group {group}", xlabel="token lag", ylabel="layer distance")
    figure.tight_layout()
    return figure


def _nonlinearity(model: ReducedModel):
    """The empirical rate per drive bin (monotone) against the GLM's link."""
    knots = model.nonlinearity_
    drive = knots["drive"].values
    grid = np.linspace(drive.min(), drive.max(), 200)
    figure, axes = plt.subplots(figsize=(4.5, 3.2))
    sns.lineplot(x=grid, y=FAMILIES[model.family].mean(grid), ax=axes, label="link")
    sns.scatterplot(x=drive, y=knots.values, ax=axes, label="empirical (training bins)", color="C1")
    used = "empirical" if model.nonlinearity == "empirical" else "link"
    axes.set(xlabel="drive", ylabel="expected target", title=f"output nonlinearity (predictions use the {used})")
    return figure


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
