"""Fit a reduced model to array data that does not come from a transformer.

``DATA`` is a netCDF file or a zarr store holding ``inputs`` (sample, group, distance, lag),
``target`` (sample), optionally ``history`` (sample, history_lag) and a ``block`` coordinate on
``sample``. The fit is evaluated honestly: whole blocks are held out for testing, the penalty is
cross-validated within the training blocks, and the controls and bootstrap intervals use the same
split. Outputs, in ``out_dir``:

- ``reduced.nc``: ``filter``, ``spatial_filter``, ``temporal_filter``, ``history_filter`` (when
  the data has history), ``intercept`` and the model's parameters (:meth:`ReducedModel.load`);
- ``bootstrap.nc``: percentile intervals of the filters and held-out metrics;
- ``summary.json``: held-out metrics (``test_auroc`` / ``test_r2``, ``test_deviance_explained``),
  control drops and intervals; metrics are ``null`` when the fit did not converge;
- ``figures/*.png`` (:func:`reduce.figures_filters.plot_filters`).
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xarray as xr
from sklearn.exceptions import ConvergenceWarning

from .basis import as_basis
from .errors import ReduceError
from .reduced import PRIMARY_METRIC, ReducedModel, bootstrap, check_dataset, check_target, evaluate, fit_controls, sample_blocks, split_by_block
from .store import write_json, write_netcdf

MODEL_OPTIONS = tuple(name for name in inspect.signature(ReducedModel).parameters if name != "family")


def open_arrays(data_path) -> xr.Dataset:
    """The dataset at ``data_path`` (netCDF, or zarr for ``*.zarr`` and directories), in memory."""
    path = Path(data_path)
    if not path.exists():
        raise ReduceError("no such file or directory", file=path, field="data")
    is_zarr = path.is_dir() or path.suffix == ".zarr"
    try:
        dataset = xr.open_zarr(path) if is_zarr else xr.open_dataset(path, engine="h5netcdf")
        return dataset.load()
    except (OSError, ValueError, KeyError) as error:
        kind = "a zarr store" if is_zarr else "a netCDF file"
        raise ReduceError(f"cannot be read as {kind}: {error}", file=path, field="data") from None


def fit_arrays(
    data_path,
    family: str,
    out_dir,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    n_bootstrap: int = 50,
    controls: bool = True,
    figures: bool = True,
    **model_options,
) -> dict:
    """Fit, evaluate and save a :class:`ReducedModel` for the arrays in ``data_path``.

    ``model_options`` are :class:`ReducedModel` parameters (``structure``, ``spatial_basis``,
    ``temporal_basis``, ``alpha``, ``cv``, ...); a basis may also be a spelling for
    :func:`reduce.basis.parse_basis` (``"log-cosine:6"``) or a number of log raised cosines.
    Returns the summary written to ``summary.json``.
    """
    if family not in PRIMARY_METRIC:
        raise ReduceError(f"family must be one of {sorted(PRIMARY_METRIC)}, got {family!r}", field="family")
    model = ReducedModel(family=family, random_state=seed, **_model_options(model_options))
    dataset = check_dataset(open_arrays(data_path), family, source=data_path)
    blocks = sample_blocks(dataset)
    with _naming(data_path):
        train, test = split_by_block(blocks, test_fraction, seed)
    train_set, test_set = dataset.isel(sample=train), dataset.isel(sample=test)
    if family == "bernoulli":
        for part, values in (("train", train_set["target"].values), ("test", test_set["target"].values)):
            if len(np.unique(values)) < 2:
                raise ReduceError(f"the {part} blocks hold one class only; the data needs more blocks with both classes", file=data_path, field="target")
    else:
        check_target(train_set["target"].values, family, source=data_path)

    out_dir = Path(out_dir)
    with warnings.catch_warnings(), _naming(data_path):
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported in the summary instead
        model.fit(train_set)
    files = [model.save(out_dir / "reduced.nc")]
    summary = {
        "data": str(data_path),
        "family": family,
        "structure": model.structure,
        "n_samples": int(dataset.sizes["sample"]),
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "n_train_blocks": int(len(np.unique(blocks[train]))),
        "n_test_blocks": int(len(np.unique(blocks[test]))),
        "has_history": "history" in dataset,
        "alpha": model.alpha_,
        "converged": model.converged_,
        "n_iter": model.n_iter_,
    }
    metrics = evaluate(model, test_set)
    metric_names = [PRIMARY_METRIC[family]] + ([] if family == "poisson" else ["deviance_explained"])
    summary.update({f"test_{name}": _reported(model, metrics[name]) for name in metric_names})
    if controls:
        result = fit_controls(model, train_set, test_set)
        summary["controls"] = {
            name: {f"test_{result['metric']}": _reported(model, scores[result["metric"]]), "drop": _reported(model, scores["drop"]), "converged": scores["converged"]}
            for name, scores in result["controls"].items()
        }
    intervals = None
    if n_bootstrap > 0:
        intervals = bootstrap(model, train_set, X_test=test_set, n=n_bootstrap, seed=seed)
        write_netcdf(intervals, out_dir / "bootstrap.nc")
        files.append(out_dir / "bootstrap.nc")
        summary["ci"] = {f"test_{name}": [float(v) for v in intervals[name].values] for name in metric_names}
        summary["ci_level"] = intervals.attrs["level"]
        summary["n_bootstrap"] = n_bootstrap
        summary["n_bootstrap_not_converged"] = intervals.attrs["n_not_converged"]
    if figures:
        from .figures_filters import plot_filters

        files.extend(plot_filters(model, out_dir / "figures", ci=intervals))
    summary["files"] = [str(path.relative_to(out_dir)) for path in files] + ["summary.json"]
    write_json(out_dir / "summary.json", summary)
    return summary


@contextmanager
def _naming(data_path):
    """Errors raised about the data (too few blocks, ...) name the data file."""
    try:
        yield
    except ReduceError as error:
        if error.file is not None:
            raise
        raise ReduceError(error.message, file=data_path, field=error.field) from None


def _model_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        raise ReduceError(f"unknown option(s) {unknown}; known: {sorted(MODEL_OPTIONS)}", field=unknown[0])
    parsed = dict(options)
    for name in ("spatial_basis", "temporal_basis"):
        if name in parsed:
            try:
                parsed[name] = as_basis(parsed[name])
            except ValueError as error:
                raise ReduceError(str(error), field=name) from None
    return parsed


def _reported(model: ReducedModel, value: float):
    """A metric as reported: ``None`` when the fit did not converge or the value is undefined."""
    return float(value) if model.converged_ and np.isfinite(value) else None
