import numpy as np
import pytest
import xarray as xr

from reduce.errors import ReduceError
from reduce.features import GroupedFeatures, covariance_by_lag


def _run(seed=0, prompts=12, width=6, units=(4, 4)):
    """A fake run: two sites (layers 0 and 1), ragged lengths, target at the last position."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, width + 1, prompts)
    real = np.arange(width)[None, :] < lengths[:, None]
    data = {
        "blocks.0.mlp.hook_post": (("prompt", "pos", "unit"), rng.normal(size=(prompts, width, units[0])) * real[..., None]),
        "blocks.1.mlp.hook_post": (("prompt", "pos", "unit"), rng.normal(size=(prompts, width, units[1])) * real[..., None]),
        "target": (("prompt", "pos"), rng.normal(size=(prompts, width)) * real),
        "target_mask": (("prompt", "pos"), np.arange(width)[None, :] == (lengths - 1)[:, None]),
        "length": ("prompt", lengths),
        "counted": (("prompt", "pos"), real & (np.arange(width) > 0)[None, :]),  # position 0 holds a BOS token
    }
    activations = xr.Dataset(data)
    n = sum(units)
    stats = xr.Dataset(
        {"peak": ("unit", rng.normal(size=n) * 0.1), "mean": ("unit", np.zeros(n)), "var": ("unit", np.ones(n))},
        coords={
            "site": ("unit", ["blocks.0.mlp.hook_post"] * units[0] + ["blocks.1.mlp.hook_post"] * units[1]),
            "layer": ("unit", [0] * units[0] + [1] * units[1]),
            "kind": ("unit", ["mlp"] * n),
            "index": ("unit", list(range(units[0])) + list(range(units[1]))),
        },
    )
    return activations, stats


def test_features_equal_weighted_deviation_sums_by_hand():
    activations, stats = _run()
    lags = np.arange(0, 3)
    connection = xr.DataArray(np.random.default_rng(1).normal(size=(8, 3)), dims=("unit", "lag"), coords={"lag": lags})
    features = GroupedFeatures(max_lag=2, history_lags=2).fit(stats, connection, target_layer=2).transform(activations)
    assert features["inputs"].dims == ("sample", "group", "distance", "lag")
    assert list(features["distance"].values) == [1, 2]
    sample = 5
    p, t = int(features["prompt"][sample]), int(features["position"][sample])
    expected = np.zeros((2, 2, 3))
    for unit in range(8):
        site = str(stats["site"][unit].values)
        index = int(stats["index"][unit])
        distance = 2 - int(stats["layer"][unit])
        for lag in lags:
            if t - lag < 1:  # before the prompt, or its BOS
                continue
            c = connection.values[unit, lag]
            deviation = activations[site].values[p, t - lag, index] - stats["peak"].values[unit]
            expected[0 if c >= 0 else 1, distance - 1, lag] += abs(c) * deviation
    np.testing.assert_allclose(features["inputs"].values[sample], expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(features["history"].values[sample], [activations["target"].values[p, t - h] if t - h >= 1 else 0.0 for h in (1, 2)])
    assert (features["block"].values == features["prompt"].values).all()


def test_replace_expresses_an_ablation_exactly():
    activations, stats = _run()
    connection = xr.DataArray(np.ones((8, 2)), dims=("unit", "lag"), coords={"lag": [0, 1]})
    grouped = GroupedFeatures(max_lag=1, history_lags=0, deviation_from="peak").fit(stats, connection, target_layer=2)
    # Ablating every unit to its peak removes all input.
    peaks = {site: stats["peak"].values[stats["site"].values == site] for site in ("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post")}
    ablated = grouped.transform(activations, replace=lambda site, prompts, values: np.broadcast_to(peaks[site], values.shape))
    np.testing.assert_allclose(ablated["inputs"].values, 0, atol=1e-12)


def test_units_at_or_after_the_target_are_excluded():
    activations, stats = _run()
    connection = xr.DataArray(np.ones((8, 1)), dims=("unit", "lag"), coords={"lag": [0]})
    grouped = GroupedFeatures(max_lag=0, history_lags=0).fit(stats, connection, target_layer=1, target_site="blocks.1.mlp.hook_post")
    assert list(grouped.distances_) == [1]
    assert (grouped.synapses_["weight"].values[4:] == 0).all()
    with pytest.raises(ReduceError, match="upstream"):
        GroupedFeatures(max_lag=0).fit(stats, connection, target_layer=0)


def test_unit_inputs_and_covariance_signs():
    activations, stats = _run(prompts=40)
    lags = np.array([0, 1])
    covariance = covariance_by_lag(activations, stats, lags, np.arange(40))
    assert covariance.shape == (8, 2)
    grouped = GroupedFeatures(max_lag=1, history_lags=0).fit(stats, covariance, target_layer=2)
    design = grouped.unit_inputs(activations, n_candidates=5)
    assert design["inputs"].shape == (40, 5)
    # Each column is the synapse's deviation oriented so that positive pushes the target up.
    column = 0
    unit, lag = int(design["unit"][column]), int(design["lag"][column])
    p, t = int(design["prompt"][3]), int(design["position"][3])
    site, index = str(stats["site"][unit].values), int(stats["index"][unit])
    sign = np.sign(covariance.values[unit, list(lags).index(lag)])
    expected = sign * (activations[site].values[p, t - lag, index] - stats["peak"].values[unit]) if t - lag >= 1 else 0
    assert design["inputs"].values[3, column] == pytest.approx(expected)


def test_saved_map_transforms_identically(tmp_path):
    from reduce.store import write_netcdf

    activations, stats = _run()
    connection = xr.DataArray(np.random.default_rng(3).normal(size=(8, 3)), dims=("unit", "lag"), coords={"lag": [0, 1, 2]})
    grouped = GroupedFeatures(max_lag=2, history_lags=1).fit(stats, connection, target_layer=2)
    write_netcdf(grouped.to_dataset(), tmp_path / "map.nc")
    reloaded = GroupedFeatures.from_dataset(xr.open_dataset(tmp_path / "map.nc", engine="h5netcdf"))
    xr.testing.assert_identical(grouped.transform(activations), reloaded.transform(activations))


def test_special_positions_give_no_input():
    """A BOS activation is the same in every prompt: as an input it would only add an intercept."""
    activations, stats = _run()
    connection = xr.DataArray(np.ones((8, 3)), dims=("unit", "lag"), coords={"lag": [0, 1, 2]})
    grouped = GroupedFeatures(max_lag=2, history_lags=2).fit(stats, connection, target_layer=2)
    spiked = activations.copy(deep=True)
    for site in ("blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post", "target"):
        spiked[site][:, 0] = 1e6
    xr.testing.assert_identical(grouped.transform(activations), grouped.transform(spiked))
    xr.testing.assert_identical(grouped.unit_inputs(activations), grouped.unit_inputs(spiked))
