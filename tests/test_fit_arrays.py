import json

import numpy as np
import pytest
import xarray as xr

from reduce.errors import ReduceError
from reduce.fit_arrays import fit_arrays
from reduce.reduced import ReducedModel, evaluate, split_by_block
from tests.test_reduced import simulate

QUICK = dict(n_alphas=4, cv=3, n_bootstrap=4)


def write(dataset, path):
    dataset.to_netcdf(path, engine="h5netcdf")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    dataset, _, _ = simulate(1500, seed=11, n_blocks=40)
    return dataset, write(dataset, tmp_path_factory.mktemp("data") / "arrays.nc")


def test_writes_the_promised_files_and_honest_metrics(data, tmp_path):
    dataset, path = data
    summary = fit_arrays(path, "bernoulli", tmp_path, **QUICK)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for name in ("reduced.nc", "bootstrap.nc", "figures/spatial.png", "figures/temporal.png", "figures/history.png", "figures/nonlinearity.png"):
        assert (tmp_path / name).stat().st_size > 0 and name in summary["files"]
    with xr.open_dataset(tmp_path / "reduced.nc", engine="h5netcdf") as stored:
        assert {"filter", "spatial_filter", "temporal_filter", "history_filter", "intercept"} <= set(stored.data_vars)
        assert stored["filter"].dims == ("group", "distance", "lag")
    assert summary["converged"] and 0.7 < summary["test_auroc"] <= 1.0 and 0.0 < summary["test_deviance_explained"] < 1.0
    assert set(summary["controls"]) == {"no_history", "no_spatial", "no_temporal", "no_sign"}
    assert all(control["drop"] == pytest.approx(summary["test_auroc"] - control["test_auroc"]) for control in summary["controls"].values())
    lower, upper = summary["ci"]["test_auroc"]
    assert lower <= upper
    # the saved model, scored on the same held-out blocks, gives the reported number
    _, test = split_by_block(dataset["block"].values, 0.2, seed=0)
    loaded = ReducedModel.load(tmp_path / "reduced.nc")
    assert evaluate(loaded, dataset.isel(sample=test))["auroc"] == pytest.approx(summary["test_auroc"], abs=1e-12)
    assert summary["n_test_blocks"] == 8 and summary["n_train"] + summary["n_test"] == 1500


@pytest.mark.filterwarnings("ignore:.*Zarr")  # zarr's own notes on writing string coordinates
def test_gaussian_zarr_without_history(tmp_path):
    dataset, _, _ = simulate(800, "gaussian", seed=12, n_blocks=30)
    dataset = dataset.drop_vars(["history", "history_lag"])
    dataset.to_zarr(tmp_path / "arrays.zarr", mode="w")
    summary = fit_arrays(tmp_path / "arrays.zarr", "gaussian", tmp_path / "out", controls=False, figures=False, n_bootstrap=0, structure="full", temporal_basis="log-cosine:5", cv=3)
    assert "test_r2" in summary and "test_auroc" not in summary and summary["test_r2"] > 0.5
    assert "controls" not in summary and "ci" not in summary
    with xr.open_dataset(tmp_path / "out" / "reduced.nc", engine="h5netcdf") as stored:
        assert "history_filter" not in stored and "filter" in stored


def test_non_convergence_reports_no_numbers(data, tmp_path):
    _, path = data
    summary = fit_arrays(path, "bernoulli", tmp_path, alpha=1e-4, max_iter=1, controls=False, figures=False, n_bootstrap=0)
    assert summary["converged"] is False
    assert summary["test_auroc"] is None and summary["test_deviance_explained"] is None


def _bad_inputs(dataset):
    return {
        "missing inputs": (dataset.drop_vars("inputs"), "bernoulli", "inputs"),
        "missing target": (dataset.drop_vars("target"), "bernoulli", "target"),
        "inputs dims": (dataset.assign(inputs=dataset["inputs"].isel(lag=0)), "bernoulli", "inputs"),
        "history dims": (dataset.assign(history=dataset["history"].rename(history_lag="when")), "bernoulli", "history"),
        "NaN inputs": (dataset.assign(inputs=dataset["inputs"].where(dataset["inputs"] < 3)), "bernoulli", "inputs"),
        "inf history": (dataset.assign(history=dataset["history"].where(dataset["history"] < 1, np.inf)), "bernoulli", "history"),
        "one class": (dataset.assign(target=dataset["target"] * 0), "bernoulli", "target"),
        "not 0/1": (dataset.assign(target=dataset["target"] + 1), "bernoulli", "target"),
        "constant target": (dataset.assign(target=dataset["target"] * 0 + 2.5), "gaussian", "target"),
        "non-count target": (dataset.assign(target=dataset["target"] + 0.5), "poisson", "target"),
        "text lags": (dataset.assign_coords(lag=[f"t-{i}" for i in dataset["lag"].values]), "bernoulli", "lag"),
        "one block": (dataset.assign_coords(block=("sample", np.zeros(dataset.sizes["sample"], int))), "bernoulli", "block"),
        "too few blocks for cv": (dataset.assign_coords(block=("sample", dataset["block"].values % 4)), "bernoulli", "block"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs(simulate(60, seed=13, n_blocks=10)[0])))
def test_rejects_bad_input_naming_file_and_field(case, tmp_path):
    dataset, _, _ = simulate(200, seed=13, n_blocks=10)
    broken, family, field = _bad_inputs(dataset)[case]
    path = write(broken, tmp_path / "bad.nc")
    with pytest.raises(ReduceError) as error:
        fit_arrays(path, family, tmp_path / "out", figures=False, n_bootstrap=0, controls=False)
    assert (error.value.file, error.value.field) == (str(path), field)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_unreadable_file_and_unknown_option(tmp_path):
    garbage = tmp_path / "garbage.nc"
    garbage.write_text("not netcdf")
    with pytest.raises(ReduceError) as error:
        fit_arrays(garbage, "bernoulli", tmp_path / "out")
    assert (error.value.file, error.value.field) == (str(garbage), "data")
    with pytest.raises(ReduceError) as error:
        fit_arrays(garbage, "bernoulli", tmp_path / "out", smoothness=3)
    assert error.value.field == "smoothness"
    with pytest.raises(ReduceError, match="bad basis"):
        fit_arrays(garbage, "bernoulli", tmp_path / "out", spatial_basis="spline:3")
