"""Universality: filter similarity, its split-half ceiling, transfer and unit matching, on known answers."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import xarray as xr

from reduce.basis import Identity
from reduce.cli import main
from reduce.condition import load_condition
from reduce.errors import ReduceError
from reduce.reduced import ReducedModel, as_dataset
from reduce.universality import (
    best_partners,
    cosine,
    cross_half_similarity,
    default_models,
    contribution_filter,
    input_spread,
    half_filters,
    load_run,
    normalised_profiles,
    null_units,
    run_name,
    source_drive,
    transfer_ratio,
    transfer_score,
    universality,
)
from reduce.zoo import zoo_path

CONDITIONS = Path(__file__).parents[1] / "conditions"
LAGS = 6
EARLY = np.array([1.0, 0.6, 0.3, 0.1, 0.0, 0.0])
LATE = np.array([0.0, 0.0, 0.1, 0.4, 1.0, 0.6])
# Separable generating filters (group, distance, lag), as the separable reduced model can represent:
# near inputs at early lags; mostly far inputs at mostly late lags, whose cosine with the first is
# about 0.3 (not 0, so that similarity and transfer are checked against a calibrated answer).
NEAR_EARLY = np.stack([np.outer([1.0, 0.5, 0.2], EARLY), np.outer([-0.6, -0.3, -0.1], EARLY)])
MOSTLY_FAR_LATE = np.stack([np.outer([0.2, 0.5, 1.0], LATE + 0.6 * EARLY), np.outer([-0.3, -0.4, -0.5], LATE + 0.6 * EARLY)])


def simulate(filters, seed, n_prompts=180, per_prompt=4, noise=0.5, input_scale=(1.0, 1.0, 1.0)):
    """A Gaussian target driven by ``filters`` from white inputs (times ``input_scale`` per distance).

    The true filter's R² is var(drive) / (var(drive) + noise²).
    """
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(n_prompts * per_prompt, *filters.shape)) * np.asarray(input_scale)[:, None]
    target = np.tensordot(inputs, filters, axes=3) + noise * rng.normal(size=len(inputs))
    return as_dataset(inputs, target, blocks=np.repeat(np.arange(n_prompts), per_prompt))


def split(dataset, test_prompts=60):
    is_test = dataset["block"].values < test_prompts
    return dataset.isel(sample=~is_test), dataset.isel(sample=is_test)


def estimator():
    return ReducedModel(family="gaussian", spatial_basis=Identity(), temporal_basis=Identity(), n_alphas=5, cv=3)


# Model "rescaled" computes what "a" computes from inputs 10× larger at distance 1: its filter there is 10× smaller.
RESCALE = np.array([10.0, 1.0, 1.0])
MODELS = {"a": (NEAR_EARLY, 1, (1.0, 1.0, 1.0)), "b": (NEAR_EARLY, 2, (1.0, 1.0, 1.0)), "c": (MOSTLY_FAR_LATE, 3, (1.0, 1.0, 1.0)), "rescaled": (NEAR_EARLY / RESCALE[:, None], 4, RESCALE)}


@pytest.fixture(scope="module")
def synthetic():
    """Each model's (train, test) data, its fit, its contribution filter and its halves' (one split)."""
    data = {name: split(simulate(filters, seed, input_scale=scale)) for name, (filters, seed, scale) in MODELS.items()}
    fitted = {name: estimator().fit(train) for name, (train, _) in data.items()}
    spread = {name: input_spread(train) for name, (train, _) in data.items()}
    contribution = {name: contribution_filter(fitted[name], spread[name]) for name in MODELS}
    halves = {name: contribution_filter(half_filters(fitted[name], data[name][0], n_splits=1)["filter"], spread[name]) for name in ("a", "b", "c")}
    return data, fitted, contribution, halves


def test_same_generating_filter_is_as_similar_as_the_ceiling_and_transfers_fully(synthetic):
    data, fitted, contribution, halves = synthetic
    ceiling = cross_half_similarity(halves["a"], halves["a"])
    assert 0.9 < ceiling < 1.0  # two fits on disjoint halves agree, up to their noise
    assert cross_half_similarity(halves["a"], halves["b"]) == pytest.approx(ceiling, abs=0.03)
    assert cosine(contribution["a"], contribution["b"]) > 0.97
    train_b, test_b = data["b"]
    assert transfer_ratio(fitted["a"], fitted["b"], train_b, test_b) == pytest.approx(1.0, abs=0.03)
    spreads = dict(source_spread=input_spread(data["a"][0]), own_spread=input_spread(train_b))
    assert transfer_ratio(fitted["a"], fitted["b"], train_b, test_b, **spreads) == pytest.approx(1.0, abs=0.03)
    assert transfer_ratio(fitted["b"], fitted["b"], train_b, test_b) == 1.0  # the model's own filter: 1 by construction


def test_contribution_filters_see_the_same_computation_through_other_input_scales(synthetic):
    data, fitted, contribution, _ = synthetic
    assert cosine(contribution["a"], contribution["rescaled"]) > 0.97
    assert cosine(fitted["a"].filter_, fitted["rescaled"].filter_) < 0.9  # the raw filters differ where the inputs' scale does
    train, test = data["rescaled"]
    assert transfer_ratio(fitted["a"], fitted["rescaled"], train, test) < 0.9  # and so do their raw drives,
    spreads = dict(source_spread=input_spread(data["a"][0]), own_spread=input_spread(train))
    assert transfer_ratio(fitted["a"], fitted["rescaled"], train, test, **spreads) == pytest.approx(1.0, abs=0.03)  # not their contributions
    # A cell whose input never varies (a lag no prompt reaches) adds nothing, whatever the fit extrapolated there.
    spread = xr.Dataset({"inputs": xr.ones_like(fitted["a"].filter_).where(fitted["a"].filter_["lag"] < 5, 0.0)})
    extrapolated = fitted["a"].filter_.where(fitted["a"].filter_["lag"] < 5, 1e3)
    assert cosine(contribution_filter(fitted["a"], spread), contribution_filter(extrapolated, spread)) == pytest.approx(1.0)
    assert cosine(fitted["a"].filter_, extrapolated) < 0.1


def test_overlay_normalisation_keeps_the_excitation_inhibition_balance(synthetic):
    _, _, contribution, _ = synthetic
    spatial, temporal = normalised_profiles(contribution["a"])
    assert float(np.abs(spatial).max()) == pytest.approx(1.0)
    balance = np.linalg.norm(contribution["a"].sel(group=1)) / np.linalg.norm(contribution["a"].sel(group=0))
    # (the profiles are the rank-1 parts of nearly rank-1 contribution filters)
    assert float(np.linalg.norm(spatial.sel(group=1)) / np.linalg.norm(spatial.sel(group=0))) == pytest.approx(balance, rel=0.01)
    assert (spatial.sel(group=0) > 0).all() and (spatial.sel(group=1) < 0).all()  # inhibition shows as a negative spatial profile
    np.testing.assert_allclose(np.abs(temporal).max("lag").values, 1.0)


def test_a_different_filter_is_as_dissimilar_as_its_cosine_and_transfers_as_its_square(synthetic):
    data, fitted, contribution, halves = synthetic
    true_cosine = cosine(xr.DataArray(NEAR_EARLY), xr.DataArray(MOSTLY_FAR_LATE))
    assert 0.25 < true_cosine < 0.35
    assert cosine(contribution["a"], contribution["c"]) == pytest.approx(true_cosine, abs=0.05)
    assert cross_half_similarity(halves["a"], halves["c"]) == pytest.approx(true_cosine, abs=0.05)
    assert cross_half_similarity(halves["c"], halves["c"]) > 0.9
    # With white inputs, A's drive on C's data correlates with C's true drive as the two filters'
    # cosine, so a scale-and-intercept refit keeps about cosine² of C's own R² (and the other way round).
    assert transfer_ratio(fitted["a"], fitted["c"], *data["c"]) == pytest.approx(true_cosine**2, abs=0.04)
    assert transfer_ratio(fitted["c"], fitted["a"], *data["a"]) == pytest.approx(true_cosine**2, abs=0.04)


def test_a_half_that_cannot_be_fitted_is_recorded_not_fatal(synthetic):
    data, fitted, _, _ = synthetic
    two_prompts = data["a"][0].isel(sample=slice(0, 8))
    two_prompts = two_prompts.assign(target=("sample", np.repeat([0.0, 1.0], 4)))  # each half's target is constant
    halves = half_filters(fitted["a"], two_prompts, n_splits=1)
    assert halves["failed"].all() and not halves["converged"].any() and np.isnan(halves["filter"]).all()
    assert np.isnan(cross_half_similarity(halves["filter"], halves["filter"]))


def test_transfer_uses_only_the_grid_both_models_share(synthetic):
    data, fitted, _, _ = synthetic
    model = fitted["a"]
    deeper = data["a"][0].assign_coords(distance=[1, 2, 5])  # a model whose distance 3 is missing and 5 is new to A
    drive = source_drive(model.filter_, None, deeper)
    shared = np.einsum("sgdl,gdl->s", deeper["inputs"].sel(distance=[1, 2]).values, model.filter_.sel(distance=[1, 2]).values)
    np.testing.assert_allclose(drive, shared)
    assert cosine(model.filter_, model.filter_.sel(distance=[1, 2])) == pytest.approx(1.0)


def test_best_partners_find_a_permutation_and_respect_kinds():
    rng = np.random.default_rng(0)
    activity = rng.normal(size=(400, 6))
    order = np.array([3, 0, 5, 1, 4, 2])
    other = activity[:, order] + 0.05 * rng.normal(size=(400, 6))
    other[:, 4] *= -1  # an attention unit with its sign flipped (activity column 4 → other column 4)
    kinds = np.array(["mlp", "mlp", "mlp", "mlp", "attn", "attn"])
    kinds_other = kinds[order]
    partner, r = best_partners(activity, other, kinds, kinds_other)
    np.testing.assert_array_equal(partner, np.argsort(order))
    assert (r > 0.99).all()
    flipped_mlp = other.copy()
    flipped_mlp[:, np.argsort(order)[0]] *= -1  # an MLP neuron's sign is meaningful: no match
    _, r = best_partners(activity[:, :1], flipped_mlp, kinds[:1], kinds_other)
    assert r[0] < 0.2


def test_null_units_are_random_non_circuit_units_of_the_circuits_kinds():
    kinds = np.array(["attn"] * 40 + ["mlp"] * 60)
    circuit = np.array([3, 50, 51, 90])
    null = null_units(kinds, circuit[:3], circuit, np.random.default_rng(0), multiple=4)
    assert (kinds[null] == "attn").sum() == 4 and (kinds[null] == "mlp").sum() == 8
    assert np.unique(null).size == null.size and not np.isin(null, circuit).any()


def test_default_models_and_run_names(tmp_path):
    condition = load_condition(CONDITIONS / "sva.toml")
    models = default_models(condition)
    assert "zoo:gpt2-d128-s0" in models and "zoo:tiny" not in models and len(models) >= 2
    with pytest.raises(ReduceError, match="not a zoo model"):
        default_models(replace(condition, model=replace(condition.model, name="gpt2")))
    assert run_name("zoo:gpt2-d64-s0") == "gpt2-d64-s0" and run_name("org/model") == "org--model"
    with pytest.raises(ReduceError, match="listed twice"):
        universality(condition, ["zoo:tiny", "zoo:tiny"], tmp_path / "out")
    with pytest.raises(ReduceError, match="unknown zoo model 'nope'"):  # before any model is fitted
        universality(condition, ["zoo:tiny", "zoo:nope"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def neuron_permuted_tiny(folder: Path) -> list[np.ndarray]:
    """zoo:tiny with each layer's MLP neurons reordered: the same function, so the same reduced model."""
    source = zoo_path("tiny")
    module = transformers.AutoModelForCausalLM.from_pretrained(source)
    generator = torch.Generator().manual_seed(1)
    orders = []
    with torch.no_grad():
        for block in module.transformer.h:
            order = torch.randperm(block.mlp.c_fc.weight.shape[1], generator=generator)
            block.mlp.c_fc.weight.copy_(block.mlp.c_fc.weight[:, order])  # GPT-2's Conv1D is (in, out)
            block.mlp.c_fc.bias.copy_(block.mlp.c_fc.bias[order])
            block.mlp.c_proj.weight.copy_(block.mlp.c_proj.weight[order, :])
            orders.append(order.numpy())
    module.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return orders


def test_universality_end_to_end_on_a_neuron_permuted_copy(tmp_path, capsys):
    orders = neuron_permuted_tiny(tmp_path / "tiny-permuted")
    condition = load_condition(CONDITIONS / "sva_tiny.toml")
    condition = replace(condition, fit=replace(condition.fit, family="gaussian", bootstrap=0, max_lag=4, folds=2))
    condition_file = tmp_path / "sva_tiny.toml"
    condition_file.write_text(condition.to_toml())
    out = tmp_path / "universality"
    argv = ["universality", str(condition_file), "--models", "zoo:tiny", str(tmp_path / "tiny-permuted"), "--out", str(out), "--splits", "1", "-q"]
    assert main(argv) == 0
    assert "2 models: filter similarity" in capsys.readouterr().out

    for name in ("similarity.nc", "transfer.nc", "unit_matches.nc", "filters_overlay.png", "similarity.png", "transfer.png", "unit_matches.png", "universality.md"):
        assert (out / name).stat().st_size > 0, name
    for model in ("tiny", "tiny-permuted"):
        assert (out / "runs" / model / "fit.json").exists() and (out / "runs" / model / "split_halves.nc").exists()
    headline = json.loads((out / "universality.json").read_text())
    assert headline["models"] == ["tiny", "tiny-permuted"] and headline["metric"] == "r2"
    assert set(headline) >= {"similarity", "transfer", "unit_matches", "per_model"}
    assert set(headline["similarity"]) >= {"mean_cross_model", "mean_cross_model_halves", "mean_ceiling", "cross_model_over_ceiling"}
    assert set(headline["per_model"]["tiny"]) >= {"architecture", "layers", "units", "held_out", "ceiling", "circuit_units"}
    assert "| tiny-permuted |" in (out / "universality.md").read_text()

    # The copy computes the same function, so its reduced model and its halves' are the same.
    similarity = xr.load_dataset(out / "similarity.nc")
    assert similarity["similarity"].dims == ("model", "model2")
    assert headline["similarity"]["mean_cross_model"] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(similarity["ceiling"].values[0], similarity["ceiling"].values[1], atol=1e-6)
    transfer = xr.load_dataset(out / "transfer.nc")
    assert transfer["transfer"].dims == ("model_from", "model_to")
    tiny, permuted = (load_run(condition, name, model, out / "runs" / name) for name, model in (("tiny", "zoo:tiny"), ("tiny-permuted", str(tmp_path / "tiny-permuted"))))
    assert transfer_score(tiny.reduced, permuted.train, permuted.test) == pytest.approx(transfer_score(permuted.reduced, permuted.train, permuted.test), rel=1e-4)  # float32 sums in another order

    # Every circuit unit of tiny is found again where the permutation put it, and is in the copy's circuit.
    matches = xr.load_dataset(out / "unit_matches.nc")
    stats = xr.load_dataset(out / "runs" / "tiny" / "stats.nc")
    circuit = matches["circuit_unit"].sel(model="tiny").values
    circuit = circuit[circuit >= 0]
    assert circuit.size > 0
    for rank, unit in enumerate(circuit):
        site, index = str(stats["site"].values[unit]), int(stats["index"].values[unit])
        expected_index = np.argsort(orders[int(site.split(".")[1])])[index] if ".mlp." in site else index
        expected = np.flatnonzero((stats["site"].values == site) & (stats["index"].values == expected_index))[0]
        assert matches["partner"].sel(model="tiny", model2="tiny-permuted", rank=rank) == expected
        assert matches["partner_r"].sel(model="tiny", model2="tiny-permuted", rank=rank) > 0.999
    assert matches["match_rate"].sel(model="tiny", model2="tiny-permuted") == 1.0
    assert headline["unit_matches"]["mean_partner_in_circuit"] == 1.0

    # Run again: every model's fit and split halves are reused, and the results are the same.
    written = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/*") if path.suffix in (".nc", ".json")}
    assert universality(condition, ["zoo:tiny", str(tmp_path / "tiny-permuted")], out, progress=False, n_splits=1) == headline
    assert written == {path: path.stat().st_mtime_ns for path in written}
