"""Validation on cases with a known answer."""

import numpy as np
import pytest
import xarray as xr

from reduce.baselines import UnitTable
from reduce.basis import Identity
from reduce.faithfulness import score_changes
from reduce.features import GroupedFeatures
from reduce.reduced import ReducedModel
from reduce.validate import _ablation_replacement
from tests.test_features import _run


def _linear_run(seed=0):
    """A fake run whose target is exactly Σ_u w_u (a_u − peak_u) at the target position."""
    activations, stats = _run(seed=seed, prompts=60, width=6)
    rng = np.random.default_rng(seed + 1)
    weights = rng.normal(size=stats.sizes["unit"])
    sites = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    deviation = np.concatenate([activations[s].values for s in sites], axis=-1) - stats["peak"].values
    target = np.nan_to_num(deviation) @ weights
    activations["target"] = (("prompt", "pos"), target)
    connection = xr.DataArray(weights[:, None], dims=("unit", "lag"), coords={"lag": [0]})
    return activations, stats, connection, weights


def _actual_under(activations, stats, weights, ablated, offsets, units):
    """The 'network': the same linear function, of the ablated activations."""
    replace = _ablation_replacement(ablated, offsets, units)
    prompts = np.arange(activations.sizes["prompt"])
    sites = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    values = np.concatenate([replace(s, prompts, activations[s].values) for s in sites], axis=-1)
    target = (values - stats["peak"].values) @ weights
    mask = activations["target_mask"].values
    return target[mask]


@pytest.mark.parametrize("baseline", ["zero", "mean", "peak", "resample"])
def test_a_linear_target_is_predicted_exactly_under_every_baseline(baseline):
    activations, stats, connection, weights = _linear_run()
    units = UnitTable.from_dataset(stats)
    grouped = GroupedFeatures(max_lag=0, history_lags=0).fit(stats, connection, target_layer=2)
    features = grouped.transform(activations)
    model = ReducedModel(family="gaussian", structure="full", spatial_basis=Identity(), temporal_basis=Identity(), alpha=1e-9, tol=1e-10, max_iter=20000).fit(features)
    assert model.score(features) > 1 - 1e-8
    rng = np.random.default_rng(7)
    shape = activations["blocks.0.mlp.hook_post"].shape
    offsets = {
        site: {
            "zero": np.zeros(4),
            "mean": stats["mean"].values[rows] + 0.3,
            "peak": stats["peak"].values[rows],
            "resample": rng.normal(size=shape),
        }[baseline]
        for site, rows in (("blocks.0.mlp.hook_post", slice(0, 4)), ("blocks.1.mlp.hook_post", slice(4, 8)))
    }
    clean = model.predict(features)
    for subset in ([0], [1, 5], [0, 2, 4, 6, 7], list(range(8))):
        ablated = np.zeros(8, bool)
        ablated[subset] = True
        direct = model.predict(grouped.transform(activations, replace=_ablation_replacement(ablated, offsets, units)))
        actual = _actual_under(activations, stats, weights, ablated, offsets, units)
        np.testing.assert_allclose(direct, actual, atol=1e-6)
        scores = score_changes(actual - features["target"].values, direct - clean)
        assert scores["r2"] == pytest.approx(1.0, abs=1e-8) or np.ptp(actual - features["target"].values) < 1e-9
        assert scores["sign_agreement"] == 1.0 or np.isnan(scores["sign_agreement"])
