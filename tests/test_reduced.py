import numpy as np
import pytest
import xarray as xr
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import r2_score, roc_auc_score

from reduce.basis import Identity, LogRaisedCosine
from reduce.errors import ReduceError
from reduce import reduced as reduced_module
from reduce.reduced import ReducedModel, UnitGLM, as_dataset, block_folds, bootstrap, check_dataset, evaluate, fit_controls, split_by_block

DISTANCES, LAGS = np.arange(1, 7), np.arange(10)


def true_filters():
    """A separable excitatory (positive, near, fast) and inhibitory (negative, mid-distance, slow) filter."""
    exc_t, inh_t = LAGS * np.exp(-LAGS / 1.5), (LAGS + 1) * np.exp(-LAGS / 3.0)
    spatial = np.stack([np.exp(-(DISTANCES - 1) / 2.5), -0.9 * np.exp(-((DISTANCES - 3) ** 2) / 4)])
    temporal = np.stack([exc_t / np.linalg.norm(exc_t), inh_t / np.linalg.norm(inh_t)])
    return spatial[:, :, None] * temporal[:, None, :]


def simulate(n, family="bernoulli", *, seed=0, n_blocks=100, history_weights=(-2.5, -1.0, -0.3), noise=1.0):
    """Poisson input counts (rate shared within a block) → drive → bernoulli / gaussian / poisson target."""
    rng = np.random.default_rng(seed)
    filters = true_filters()
    blocks = rng.integers(n_blocks, size=n)
    rate = rng.gamma(4.0, 0.25, size=n_blocks)[blocks]
    inputs = rng.poisson(rate[:, None, None, None] * np.array([1.0, 0.8])[:, None, None], size=(n, 2, len(DISTANCES), len(LAGS))).astype(float)
    history = rng.binomial(1, 0.3, size=(n, len(history_weights))).astype(float)
    drive = np.einsum("ngdl,gdl->n", inputs, filters)
    drive = drive - drive.mean() + history @ np.asarray(history_weights)
    if family == "bernoulli":
        target = rng.binomial(1, 1.0 / (1.0 + np.exp(-(drive - 1.0)))).astype(float)
    elif family == "gaussian":
        target = drive + rng.normal(0.0, noise, n)
    else:
        target = rng.poisson(np.exp(0.4 * drive)).astype(float)
    dataset = as_dataset(inputs, target, history=history, blocks=blocks, groups=["exc", "inh"], distances=DISTANCES, lags=LAGS)
    return dataset, filters, drive


def correlation(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


def split(dataset):
    """Train and test datasets (a quarter of the blocks held out) and the test rows."""
    train, test = split_by_block(dataset["block"].values, 0.25, seed=0)
    return dataset.isel(sample=train), dataset.isel(sample=test), test


@pytest.fixture(scope="module")
def bernoulli_fit():
    dataset, filters, drive = simulate(12000)
    train, test, test_rows = split(dataset)
    return ReducedModel().fit(train), train, test, filters, roc_auc_score(test["target"].values, drive[test_rows])


@pytest.fixture(scope="module")
def small():
    dataset, filters, _ = simulate(4000, seed=1, n_blocks=60)
    train, test, _ = split(dataset)
    return ReducedModel(n_alphas=5, cv=4).fit(train), train, test, filters


def test_recovers_separable_filter_and_generating_auroc(bernoulli_fit):
    model, _, test, filters, truth_auroc = bernoulli_fit
    assert model.converged_
    assert correlation(model.filter_.values, filters) >= 0.95
    assert model.score(test) >= truth_auroc - 0.01
    assert np.all(model.spatial_filter_.sel(group="exc") > -0.05) and model.spatial_filter_.sel(group="inh").min() < -0.2, "sign lives in the spatial filter"
    assert np.allclose(np.linalg.norm(model.temporal_filter_.values, axis=1), 1.0) and np.all(model.temporal_filter_.sum("lag") > 0)
    assert np.allclose(model.separability_, 1.0)
    assert model.history_filter_.values[0] < model.history_filter_.values[1] < 0, "the post-spike penalty is recovered"
    print(f"\nbernoulli recovery: filter r = {correlation(model.filter_.values, filters):.4f}, test AUROC {model.score(test):.4f} vs truth {truth_auroc:.4f}")


def test_full_grid_gaussian_recovers_filter_and_truth_r2():
    dataset, filters, drive = simulate(8000, "gaussian", seed=2)
    train, test, test_rows = split(dataset)
    model = ReducedModel(family="gaussian", structure="full").fit(train)
    truth_r2 = r2_score(test["target"].values, drive[test_rows])
    assert model.converged_
    assert correlation(model.filter_.values, filters) >= 0.95
    assert model.score(test) >= truth_r2 - 0.01
    assert np.all(model.separability_ > 0.95), "a separable truth fitted freely is nearly rank 1"
    print(f"\ngaussian recovery: filter r = {correlation(model.filter_.values, filters):.4f}, test R2 {model.score(test):.4f} vs truth {truth_r2:.4f}")


def test_poisson_with_backtracking_recovers_filter():
    dataset, filters, _ = simulate(6000, "poisson", seed=3)
    model = ReducedModel(family="poisson", alpha=1e-4).fit(dataset)
    assert model.converged_ and model.cv_results_ is None and model.alpha_ == 1e-4
    assert correlation(model.filter_.values, filters) >= 0.95


def test_controls_drop_when_the_removed_part_matters(small):
    model, train, test, _ = small
    result = fit_controls(model, train, test)
    assert result["metric"] == "auroc" and result["full"]["auroc"] == pytest.approx(model.score(test))
    assert set(result["controls"]) == {"no_history", "no_spatial", "no_temporal", "no_sign"}
    for name, scores in result["controls"].items():
        assert scores["drop"] > 0.01, f"{name} should lose accuracy: {scores}"
        assert scores["deviance_drop"] == pytest.approx(result["full"]["deviance_explained"] - scores["deviance_explained"]) and scores["deviance_drop"] > 0


def test_no_history_control_is_harmless_without_history_dependence():
    dataset, _, _ = simulate(4000, seed=4, n_blocks=60, history_weights=(0.0, 0.0, 0.0))
    train, test, _ = split(dataset)
    result = fit_controls(ReducedModel(n_alphas=5, cv=4), train, test)
    assert abs(result["controls"]["no_history"]["drop"]) < 0.01
    assert result["controls"]["no_sign"]["drop"] > 0.01


def test_block_splits_and_folds_never_split_a_block():
    blocks = np.random.default_rng(0).integers(37, size=900).astype(str)
    train, test = split_by_block(blocks, 0.3, seed=5)
    assert not set(blocks[train]) & set(blocks[test])
    assert len(train) + len(test) == len(blocks) and len(np.unique(blocks[test])) == round(0.3 * 37)
    folds = block_folds(blocks, 5, seed=1)
    assert np.array_equal(np.sort(np.concatenate([test for _, test in folds])), np.arange(len(blocks)))
    for fold_train, fold_test in folds:
        assert not set(blocks[fold_train]) & set(blocks[fold_test])
    with pytest.raises(ReduceError) as error:
        split_by_block(np.zeros(10), 0.2)
    assert error.value.field == "block"
    with pytest.raises(ReduceError, match="5-fold"):
        block_folds(np.arange(10) % 3, 5)


def test_save_load_round_trip_gives_identical_predictions(small, tmp_path):
    model, train, test, _ = small
    empirical = clone(model).set_params(nonlinearity="empirical", alpha=model.alpha_).fit(train)
    assert not np.array_equal(empirical.predict(test), model.predict(test))
    for variant in (model, empirical):
        path = variant.save(tmp_path / f"{variant.nonlinearity}.nc")
        loaded = ReducedModel.load(path)
        assert np.array_equal(loaded.decision_function(test), variant.decision_function(test))
        assert np.array_equal(loaded.predict(test), variant.predict(test))
        assert np.array_equal(loaded.predict_proba(test), variant.predict_proba(test))
        assert loaded.get_params() == variant.get_params()
        assert (loaded.alpha_, loaded.converged_, loaded.n_iter_) == (variant.alpha_, variant.converged_, variant.n_iter_)
    assert loaded.cv_results_ is None, "the empirical variant was fitted at a given alpha"
    reloaded = ReducedModel.load(tmp_path / "link.nc")
    for key in ("alphas", "fold_deviance", "mean_deviance", "converged"):
        assert np.array_equal(reloaded.cv_results_[key], model.cv_results_[key])
    with xr.open_dataset(tmp_path / "link.nc", engine="h5netcdf") as stored:
        assert {"filter", "spatial_filter", "temporal_filter", "history_filter", "intercept"} <= set(stored.data_vars)


def test_predicts_ablated_and_reordered_inputs(small):
    model, _, test, _ = small
    drive = model.decision_function(test)
    reordered = test.isel(group=[1, 0], lag=slice(None, None, -1))
    assert np.allclose(model.decision_function(reordered), drive)
    ablated = test.assign(inputs=test["inputs"].where(test["group"] != "inh", 0.0))
    inhibitory = np.einsum("ndl,dl->n", test["inputs"].sel(group="inh").values, model.filter_.sel(group="inh").values)
    assert np.allclose(model.decision_function(ablated), drive - inhibitory)
    with pytest.raises(ReduceError) as error:
        model.decision_function(test.isel(lag=slice(0, 5)))
    assert error.value.field == "inputs"
    with pytest.raises(ReduceError, match="history"):
        model.decision_function(test.drop_vars(["history", "history_lag"]))


def test_numpy_inputs_match_a_dataset_without_coordinates():
    dataset, _, _ = simulate(2000, seed=5, n_blocks=40)
    inputs, target = dataset["inputs"].values, dataset["target"].values
    from_arrays = ReducedModel(alpha=1e-3).fit(inputs, target)
    from_dataset = ReducedModel(alpha=1e-3).fit(as_dataset(inputs, target))
    assert np.array_equal(from_arrays.decision_function(inputs), from_dataset.decision_function(as_dataset(inputs)))
    assert from_arrays.history_filter_ is None
    assert from_arrays.predict_proba(inputs).shape == (2000, 2)


def test_not_converged_is_reported_and_warned():
    dataset, _, _ = simulate(1000, seed=6, n_blocks=20)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        model = ReducedModel(alpha=1e-4, max_iter=1).fit(dataset)
    assert model.converged_ is False


def test_group_lasso_drops_a_group_without_effect():
    rng = np.random.default_rng(7)
    dataset, filters, _ = simulate(6000, "gaussian", seed=7)
    inputs = dataset["inputs"].values
    target = np.einsum("ndl,dl->n", inputs[:, 0], filters[0]) + rng.normal(0, 1.0, len(inputs))
    dataset = dataset.assign(target=("sample", target)).drop_vars(["history", "history_lag"])
    for structure in ("separable", "full"):
        sparse = ReducedModel(family="gaussian", structure=structure, alpha=0.05).fit(dataset)
        assert np.all(sparse.filter_.sel(group="inh").values == 0.0), structure
        assert correlation(sparse.filter_.sel(group="exc").values, filters[0]) > 0.99
        dense = ReducedModel(family="gaussian", structure=structure, alpha=5e-4).fit(dataset)
        assert np.any(dense.filter_.sel(group="inh").values != 0.0), "a weak penalty keeps the noise group"


def test_bootstrap_intervals_bracket_the_estimates(small):
    model, train, test, filters = small
    intervals = bootstrap(model, train, X_test=test, n=12, seed=0)
    assert intervals.attrs["n"] == 12 and list(intervals["bound"].values) == ["lower", "upper"]
    for name in ("filter", "spatial_filter", "temporal_filter", "history_filter", "intercept", "auroc", "deviance_explained"):
        assert np.all(intervals[name].sel(bound="lower") <= intervals[name].sel(bound="upper")), name
    auroc = intervals["auroc"].values
    assert auroc[0] < model.score(test) < auroc[1]
    temporal = intervals["temporal_filter"]
    inside = (temporal.sel(bound="lower") - 0.05 <= model.temporal_filter_) & (model.temporal_filter_ <= temporal.sel(bound="upper") + 0.05)
    assert inside.mean() > 0.9


def test_dataset_checks_name_the_variable():
    dataset, _, _ = simulate(300, seed=8, n_blocks=10)
    cases = {
        "inputs": dataset.drop_vars("inputs"),
        "history": dataset.assign(history=dataset["history"].where(dataset["sample"] != 3, np.nan)),
        "target": dataset.assign(target=dataset["target"] * 2),
        "lag": dataset.assign_coords(lag=[f"l{i}" for i in LAGS]),
    }
    for field, broken in cases.items():
        with pytest.raises(ReduceError) as error:
            check_dataset(broken, "bernoulli", source="data.nc")
        assert (error.value.file, error.value.field) == ("data.nc", field)
    transposed = check_dataset(dataset.transpose("lag", "group", "sample", "distance", "history_lag"))
    assert transposed["inputs"].dims == ("sample", "group", "distance", "lag")


def test_estimator_contract():
    model = ReducedModel(spatial_basis=Identity(), temporal_basis=LogRaisedCosine(4), structure="full", alpha=1e-3)
    assert clone(model).get_params() == model.get_params()
    with pytest.raises(ValueError, match="structure"):
        clone(model).set_params(structure="diagonal").fit(simulate(200, seed=9, n_blocks=10)[0])
    gaussian = ReducedModel(family="gaussian")
    assert not hasattr(gaussian, "predict_proba")


def test_unit_glm_selects_the_units_that_matter():
    rng = np.random.default_rng(10)
    n, n_units, n_lags = 3000, 30, 3
    activity = rng.normal(size=(n, n_units, n_lags))
    weights = np.zeros((n_units, n_lags))
    weights[[2, 11, 25]] = [[1.2, 0.6, 0.2], [-1.0, -0.5, 0.0], [0.0, 0.8, 0.8]]
    blocks = rng.integers(60, size=n)
    target = rng.binomial(1, 1 / (1 + np.exp(-np.einsum("nul,ul->n", activity, weights)))).astype(float)
    features = xr.DataArray(activity.reshape(n, -1), dims=("sample", "feature"), coords={"unit": ("feature", np.repeat(np.arange(n_units), n_lags)), "lag": ("feature", np.tile(np.arange(n_lags), n_units))})
    model = UnitGLM(group_by="unit").fit(features, target, blocks=blocks)
    selected_units = set(model.features_["unit"].values[model.selected_])
    assert selected_units == {2, 11, 25}
    frame = model.summary_frame()
    assert frame.index[0] == "intercept" and len(frame) == 1 + len(model.selected_)
    strong = frame.loc["unit=2,lag=0"]
    assert strong["p_value"] < 1e-6 and strong["ci_lower"] < 1.2 < strong["ci_upper"]
    assert model.score(features, target) > 0.8
    lasso = UnitGLM(cv=4).fit(features.values, target)
    assert set(np.flatnonzero(np.abs(weights.ravel()) >= 0.6)) <= set(lasso.selected_)
    assert np.all(np.abs(lasso.coef_.reshape(n_units, n_lags)[weights == 0]) < 0.1)
    assert list(lasso.summary_frame().columns[:1]) == ["feature"]
    assert evaluate(lasso, features.values, target)["auroc"] > 0.8


def test_unit_glm_with_more_selected_features_than_samples_predicts_but_gives_no_standard_errors():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(12, 40)), rng.normal(size=12)
    # With a ridge part the penalised solution is unique and keeps more features than samples (a
    # pure lasso's optimum keeps at most as many as there are samples, whichever solver finds it).
    glm = UnitGLM("gaussian", alpha=1e-4, l1_ratio=0.5).fit(X, y, blocks=np.arange(12) // 2)
    assert glm.selected_.size > 12 and glm.refit_ is None
    assert np.isfinite(glm.predict(X)).all()
    with pytest.raises(ReduceError, match="collinear"):
        glm.summary_frame()


@pytest.mark.parametrize("family", ["bernoulli", "gaussian", "poisson"])
def test_newton_and_fista_reach_the_same_optimum(family, monkeypatch):
    """Narrow designs are solved by proximal Newton, wide ones by FISTA: the same objective, so
    forcing either solver on one problem gives the same fit (to the tolerance)."""
    dataset, _, _ = simulate(3000, family, seed=3, n_blocks=40)
    fits = {}
    for solver, widest_newton in (("newton", 10**6), ("fista", 0)):
        monkeypatch.setattr(reduced_module, "NEWTON_MAX_COLUMNS", widest_newton)
        for structure in ("separable", "full"):
            fits[solver, structure] = ReducedModel(family=family, structure=structure, alpha=1e-3, tol=1e-8, max_iter=50_000).fit(dataset)
    for structure in ("separable", "full"):
        newton, fista = fits["newton", structure], fits["fista", structure]
        assert newton.converged_ and fista.converged_
        scale = np.abs(fista.filter_.values).max()
        assert np.abs(newton.filter_.values - fista.filter_.values).max() < 1e-3 * scale, structure
        assert newton.intercept_ == pytest.approx(fista.intercept_, abs=1e-3)


def test_cross_validation_on_threads_matches_one_thread(small):
    model, train, _, _ = small
    threaded = clone(model).set_params(n_jobs=2).fit(train)
    assert threaded.alpha_ == model.alpha_
    np.testing.assert_array_equal(threaded.cv_results_["fold_deviance"], model.cv_results_["fold_deviance"])
    np.testing.assert_array_equal(threaded.filter_.values, model.filter_.values)


@pytest.mark.parametrize("over_spatial", [False, True])
def test_contracted_features_are_the_source_times_the_contraction_map(over_spatial):
    rng = np.random.default_rng(4)
    n_groups, n_spatial, n_temporal, n_history = 2, 3, 5, 2
    source = rng.normal(size=(40, n_groups * n_spatial * n_temporal + n_history))
    weights = rng.normal(size=(n_groups, n_spatial if over_spatial else n_temporal))  # s sums over the spatial axis, t over the temporal
    contracted = reduced_module._contract_features(source, n_groups, n_spatial, n_temporal, weights, over_spatial)
    by_loops = np.concatenate(
        [np.einsum("nrc,r->nc" if over_spatial else "nrc,c->nr", source[:, g * 15 : (g + 1) * 15].reshape(40, n_spatial, n_temporal), weights[g]) for g in range(n_groups)] + [source[:, -n_history:]],
        axis=1,
    )
    np.testing.assert_allclose(contracted, by_loops, rtol=1e-12, atol=1e-12)
    combination = reduced_module._contraction_map(n_groups, n_spatial, n_temporal, n_history, weights, over_spatial)
    np.testing.assert_allclose(source @ combination, by_loops, rtol=1e-12, atol=1e-12)
