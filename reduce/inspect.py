"""Neuron activation analysis on a recorded run (seed 001): what a unit responds to.

:func:`inspect_unit` lists a unit's top-activating tokens, each shown in its prompt, and plots the
unit's activation histogram with zero, the mean and the peak (mode) marked, as in seed 004's
Figure 1. :func:`rank_selectivity` ranks units by how well they separate two values of a prompt
label (e.g. singular vs plural) at the target position, by AUROC and d'.

Both read ``RUN_DIR/activations.zarr`` and write to ``RUN_DIR/inspect/``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ReduceError
from .record import ACTIVATIONS
from .store import atomic_path, atomic_write, reading

if TYPE_CHECKING:
    import pandas

INSPECT = "inspect"
_NOT_SITES = ("target", "target_mask")


@dataclass
class UnitReport:
    """A unit's top activations (a DataFrame), summary statistics, printable text and saved files."""

    site: str
    unit: int
    top: "pandas.DataFrame"  # value, prompt, pos, token, context
    summary: dict[str, float]
    text: str
    files: list[Path] = field(default_factory=list)


def open_activations(run_dir):
    import xarray as xr

    path = Path(run_dir) / ACTIVATIONS
    if not path.is_dir():
        raise ReduceError(f"no {ACTIVATIONS} here; run `reduce record CONDITION --out {run_dir}` first", file=run_dir, field="record")
    with reading(path, "record"):
        return xr.open_zarr(path)


def site_names(dataset) -> list[str]:
    return [name for name in dataset.data_vars if name not in _NOT_SITES]


def unit_values(dataset, site: str, unit: int, *, source=None) -> np.ndarray:
    """``(prompt, pos)`` activations of flat unit ``unit`` of ``site`` (NaN on padding)."""
    if site not in dataset.data_vars or site in _NOT_SITES:
        raise ReduceError(f"site {site!r} was not recorded; recorded sites: {', '.join(site_names(dataset))}", file=source, field="site")
    variable = dataset[site]
    unit_dims = variable.dims[2:]
    shape = [variable.sizes[d] for d in unit_dims]
    size = int(np.prod(shape))
    if not 0 <= unit < size:
        raise ReduceError(f"unit {unit} is out of range: {site} has {size} units (0..{size - 1})", file=source, field="unit")
    index = dict(zip(unit_dims, np.unravel_index(unit, shape)))
    return np.asarray(variable.isel({d: int(i) for d, i in index.items()}).values, dtype=np.float64)


def inspect_unit(run_dir, site: str, unit: int, top: int = 20) -> UnitReport:
    """Top-``top`` activating tokens of a unit, and its histogram; saved under ``RUN_DIR/inspect/``."""
    import pandas as pd
    import torch

    from .stats import RunningStats

    run_dir = Path(run_dir)
    dataset = open_activations(run_dir)
    with reading(run_dir / ACTIVATIONS, site):
        values = unit_values(dataset, site, unit, source=run_dir)
        texts = dataset["text"].values
        tokens = dataset["tokens"].values
        starts, ends = dataset["token_start"].values, dataset["token_end"].values
    real = ~np.isnan(values)
    flat = np.where(real, values, -np.inf).ravel()
    order = np.argsort(-flat, kind="stable")[: min(top, int(real.sum()))]
    prompts, positions = np.unravel_index(order, values.shape)
    table = pd.DataFrame(
        {
            "value": values[prompts, positions],
            "prompt": prompts,
            "pos": positions,
            "token": [str(tokens[p, i]) for p, i in zip(prompts, positions)],
            "context": [_highlight(str(texts[p]), tokens[p], i, starts[p, i], ends[p, i]) for p, i in zip(prompts, positions)],
        }
    )
    stats = RunningStats(1, int(_bins(run_dir))).update(torch.from_numpy(values[real][:, None]))
    summary = {
        "tokens": int(stats.count[0]),
        "mean": float(stats.mean[0]),
        "std": float(stats.std[0]),
        "min": float(stats.min[0]),
        "max": float(stats.max[0]),
        "peak": float(stats.peak("refined")[0]),
        "peak_naive": float(stats.peak("naive")[0]),
    }
    name = f"{site}.{unit}"
    text = _unit_text(site, unit, summary, table)
    folder = run_dir / INSPECT
    files = [folder / f"{name}.txt", folder / f"{name}.csv", folder / f"{name}.png"]
    with atomic_write(files[0]) as handle:
        handle.write(text)
    with atomic_write(files[1]) as handle:
        table.to_csv(handle, index=False)
    _histogram_figure(stats, summary, f"{site} unit {unit}", files[2])
    return UnitReport(site, unit, table, summary, text, files)


def _bins(run_dir: Path) -> int:
    """The run's histogram bin count, so plots match ``stats.nc``."""
    import xarray as xr

    from .condition import RecordSpec
    from .record import STATS

    path = run_dir / STATS
    if not path.exists():
        return RecordSpec.bins
    with reading(path, "record"), xr.open_dataset(path, engine="h5netcdf") as stats:
        return int(stats.attrs.get("bins", RecordSpec.bins))


def _highlight(text: str, tokens, pos: int, start: int, end: int) -> str:
    """The prompt with token ``pos`` in [[double brackets]] (by character span when known)."""
    if 0 <= start < end <= len(text):
        return f"{text[:start]}[[{text[start:end]}]]{text[end:]}"
    shown = [f"[[{t}]]" if i == pos else str(t) for i, t in enumerate(tokens) if str(t) or i == pos]
    return " ".join(shown)


def _unit_text(site: str, unit: int, summary: dict, table) -> str:
    lines = [
        f"{site} unit {unit}: {summary['tokens']} tokens, mean {summary['mean']:.4g}, std {summary['std']:.4g}, "
        f"min {summary['min']:.4g}, max {summary['max']:.4g}, peak {summary['peak']:.4g} (naive {summary['peak_naive']:.4g})",
        f"top {len(table)} activations:",
    ]
    lines += [f"{row.value:10.4f}  prompt {row.prompt:>5} pos {row.pos:>3}  {row.context}" for row in table.itertuples()]
    return "\n".join(lines) + "\n"


def _histogram_figure(stats, summary: dict, title: str, path: Path) -> None:
    import pandas as pd
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = stats.histogram[0].numpy()
    edges = stats.edges[0].numpy()
    used = np.flatnonzero(counts)
    keep = slice(used[0], used[-1] + 1)
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    bins = pd.DataFrame({"activation": (edges[:-1] + edges[1:])[keep] / 2, "count": counts[keep]})
    sns.histplot(bins, x="activation", weights="count", bins=edges[used[0] : used[-1] + 2].tolist(), ax=axes, color="0.6", edgecolor="none")
    for value, label, colour, style in ((0.0, "zero", "black", ":"), (summary["mean"], "mean", "tab:blue", "--"), (summary["peak"], "peak", "tab:red", "-")):
        axes.axvline(value, color=colour, linestyle=style, linewidth=1.2, label=f"{label} = {value:.3g}")
    axes.set(title=f"{title} ({summary['tokens']} tokens)", xlabel="activation", ylabel="count")
    axes.legend(frameon=False, fontsize="small")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)


def rank_selectivity(run_dir, label: str, site_pattern: str = "*", *, values: tuple[str, str] | None = None):
    """Units ranked by how well they separate two values of prompt label ``label``.

    Observations are the target positions (``target_mask``) of every prompt. For each unit:
    ``auroc`` = P(activation under ``values[0]`` > under ``values[1]``) (ties count half),
    ``d_prime`` = difference of means over the pooled standard deviation. Rows are sorted by
    ``|auroc - 0.5|``, then ``|d_prime|``. The full table goes to
    ``RUN_DIR/inspect/selectivity_LABEL.csv``; returns it as a DataFrame.
    """
    import pandas as pd
    from scipy.stats import rankdata

    run_dir = Path(run_dir)
    dataset = open_activations(run_dir)
    labels = [name for name, coord in dataset.coords.items() if coord.dims == ("prompt",) and name not in ("prompt", "text", "length", "answer_id", "wrong_id")]
    if label not in labels:
        raise ReduceError(f"no prompt label {label!r}; labels of this run: {', '.join(labels) or 'none'}", file=run_dir, field="label")
    with reading(run_dir / ACTIVATIONS, label):
        per_prompt = np.asarray(dataset[label].values).astype(object)
        mask = dataset["target_mask"].values
    first, second = _two_values(per_prompt, values, run_dir)
    observed = np.repeat(per_prompt, mask.sum(1))
    group = np.concatenate([np.flatnonzero(observed == first), np.flatnonzero(observed == second)])
    n_first = int((observed == first).sum())
    sites = [s for s in site_names(dataset) if fnmatch.fnmatchcase(s, site_pattern)]
    if not sites:
        raise ReduceError(f"no recorded site matches {site_pattern!r}; recorded: {', '.join(site_names(dataset))}", file=run_dir, field="site")
    rows = []
    for site in sites:
        variable = dataset[site]
        with reading(run_dir / ACTIVATIONS, site):
            activations = _at_mask(variable, mask)[group]  # (observations, units)
        a, b = activations[:n_first], activations[n_first:]
        ranks = rankdata(activations, axis=0)
        auroc = (ranks[:n_first].sum(0) - n_first * (n_first + 1) / 2) / (len(a) * len(b))
        pooled = np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / 2)
        difference = a.mean(0) - b.mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            d_prime = np.where(difference == 0, 0.0, difference / pooled)
        rows.append(
            pd.DataFrame(
                {
                    "site": site,
                    "layer": variable.attrs.get("layer", -1),
                    "kind": variable.attrs.get("kind", ""),
                    "index": np.arange(activations.shape[1]),
                    "auroc": auroc,
                    "d_prime": d_prime,
                    f"mean_{first}": a.mean(0),
                    f"mean_{second}": b.mean(0),
                }
            )
        )
    table = pd.concat(rows, ignore_index=True)
    table = table.assign(_auroc=(table.auroc - 0.5).abs(), _d=table.d_prime.abs())
    table = table.sort_values(["_auroc", "_d"], ascending=False, kind="stable").drop(columns=["_auroc", "_d"]).reset_index(drop=True)
    table.attrs.update(label=label, values=(first, second), observations=(len(a), len(b)))
    with atomic_write(run_dir / INSPECT / f"selectivity_{label}.csv") as handle:
        table.to_csv(handle, index=False)
    return table


def _at_mask(variable, mask: np.ndarray) -> np.ndarray:
    """``(observations, units)``: a site's values where ``mask`` (prompt, pos) is set, read chunk by chunk."""
    step = (variable.chunks[0][0] if variable.chunks else None) or 256
    parts = []
    for start in range(0, mask.shape[0], step):
        rows = slice(start, start + step)
        values = variable.isel(prompt=rows).values
        parts.append(values.reshape(*values.shape[:2], -1)[mask[rows]])
    return np.concatenate(parts)


def _two_values(per_prompt: np.ndarray, values, run_dir) -> tuple[str, str]:
    present = list(dict.fromkeys(per_prompt.tolist()))
    if values is None:
        if len(present) != 2:
            raise ReduceError(f"the label has {len(present)} values ({', '.join(present[:10])}); choose two", file=run_dir, field="values")
        return present[0], present[1]
    missing = [v for v in values if v not in present]
    if len(values) != 2 or missing:
        raise ReduceError(f"choose two of the label's values ({', '.join(present[:10])}); got {', '.join(values)}", file=run_dir, field="values")
    return values[0], values[1]


def format_selectivity(table, top: int = 20) -> str:
    """The first ``top`` rows of a :func:`rank_selectivity` table as text."""
    first, second = table.attrs["values"]
    n_first, n_second = table.attrs["observations"]
    header = f"selectivity for {table.attrs['label']}: {first!r} ({n_first} observations) vs {second!r} ({n_second})"
    return header + "\n" + table.head(top).to_string(index=False, float_format=lambda v: f"{v:.4g}") + "\n"
