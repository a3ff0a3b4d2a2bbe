"""Fit a condition's reduced models: the grouped GLM (filters + history) and the unit-level circuit.

Prompts are split into train and test once (``fit.test_fraction``, ``seed``); everything that
learns from data — synapse signs and weights, the penalty, the filters, the threshold of a
Bernoulli target — sees only the training prompts. Writes to the run directory:

* ``feature_map.nc``  the fitted synapse grouping (unit × lag: group, distance, weight)
* ``reduced.nc``      the grouped reduced model (filters, history, intercept, parameters)
* ``circuit.nc``      the unit-level sparse GLM's selected synapses and coefficients
* ``fit.json``        held-out metrics with bootstrap intervals, the controls, the split
* ``figures/``        the seed's filter figures
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .basis import Identity, LogRaisedCosine, TwoSided
from .condition import Condition, load_condition, open_model, resolve
from .errors import ReduceError
from .features import GroupedFeatures, covariance_by_lag
from .progress import progress_bar
from .record import record
from .reduced import PRIMARY_METRIC, ReducedModel, UnitGLM, bootstrap, evaluate, fit_controls, split_by_block
from .store import RunDir, fingerprint, write_json, write_netcdf

STAGE = "fit"
OUTPUTS = ("feature_map.nc", "reduced.nc", "circuit.nc", "fit.json")


def fit(condition, run_dir, *, model=None, progress: bool = True) -> dict:
    """Fit both levels of reduced model for ``condition`` in ``run_dir`` (recording first if needed).

    Returns the contents of ``fit.json``. A run directory whose fit matches the condition is reused.
    """
    condition = condition if isinstance(condition, Condition) else load_condition(condition)
    run_dir = Path(run_dir)
    with RunDir(run_dir) as run:
        model = open_model(condition) if model is None else model
        activations = record(condition, run_dir, model=model, progress=progress)
        key = fingerprint(condition.fingerprint("fit"), condition.seed, run.stage_key("record"))  # chained: a new recording refits
        if run.is_done(STAGE, key, outputs=OUTPUTS):
            return json.loads((run_dir / "fit.json").read_text())
        run.forget(STAGE)
        summary = _fit(resolve(condition, model), activations, xr.load_dataset(run_dir / "stats.nc", engine="h5netcdf"), run_dir, progress)
        run.mark_done(STAGE, key)
    return summary


def target_layer(resolved) -> tuple[int, str | None]:
    """Where the target is read: a neuron's own layer and site, or past the last layer for logits."""
    target = resolved.target
    if target.kind == "neuron":
        return target.site.layer, target.site.name
    return resolved.model.n_layers, None


def split_prompts(condition: Condition, n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) prompt indices: the one split every stage uses."""
    if n_prompts < 4:
        raise ReduceError(f"a reduced model needs at least 4 prompts to split into train and test, got {n_prompts}", file=condition.path, field="prompts")
    return split_by_block(np.arange(n_prompts), condition.fit.test_fraction, condition.seed)


def connection_by_lag(resolved, activations, stats, prompts, lags, progress: bool) -> xr.DataArray:
    """(unit, lag) sign-and-weight source: mean target gradient, or covariance with the target."""
    from .attribution import mean_gradient_by_lag
    from .baselines import UnitTable
    from .batching import encode

    spec = resolved.condition.fit
    if spec.sign == "correlation":
        return covariance_by_lag(activations, stats, lags, prompts)
    model, prompt_set = resolved.model, resolved.prompts
    size = resolved.condition.record.batch_size

    def batches():
        for start in progress_bar(range(0, len(prompts), size), desc="gradients", enabled=progress):
            rows = prompts[start : start + size]
            ids = [None if column is None else torch.as_tensor(column[rows]) for column in (prompt_set.answer_ids, prompt_set.wrong_ids)]
            yield encode(model, [prompt_set.texts[i] for i in rows]), *ids

    return mean_gradient_by_lag(model, batches(), resolved.target, UnitTable.from_dataset(stats), max_lag=int(lags.max()))


def reduced_model_for(condition: Condition, causal: bool) -> ReducedModel:
    spec = condition.fit
    spatial = LogRaisedCosine(spec.spatial_basis) if spec.spatial_basis else Identity()
    temporal = LogRaisedCosine(spec.temporal_basis) if spec.temporal_basis else Identity()
    return ReducedModel(
        family=spec.family,
        structure="separable" if spec.separable else "full",
        spatial_basis=spatial,
        temporal_basis=temporal if causal else TwoSided(temporal),
        cv=spec.folds,
        random_state=condition.seed,
        n_jobs=-1,  # the cross-validation fits on every core: the chosen alpha and the fit do not depend on it
    )


def bernoulli_threshold(condition: Condition, values: np.ndarray) -> float:
    """The condition's threshold, or "auto": the target's peak (modal bin) plus one standard deviation.

    "auto" is kept between the 20th and 80th percentiles of the training values, so that
    both classes have enough samples to fit and score; an explicit threshold is taken as is.
    """
    threshold = condition.fit.threshold
    if threshold == "auto":
        counts, edges = np.histogram(values, bins=min(50, max(5, values.size // 10)))
        peak = (edges[np.argmax(counts)] + edges[np.argmax(counts) + 1]) / 2
        threshold = np.clip(peak + values.std(), *np.quantile(values, [0.2, 0.8]))
    fires = values > threshold
    if fires.all() or not fires.any():
        raise ReduceError(
            f"threshold {float(threshold):g} leaves one class only on the training samples (target range {values.min():g}..{values.max():g})",
            file=condition.path,
            field="fit.threshold",
        )
    return float(threshold)


def _fit(resolved, activations, stats, run_dir: Path, progress: bool) -> dict:
    condition, model = resolved.condition, resolved.model
    spec = condition.fit
    train, test = split_prompts(condition, activations.sizes["prompt"])
    layer, site = target_layer(resolved)
    grouped = GroupedFeatures(max_lag=spec.max_lag, history_lags=spec.history_lags, deviation_from=spec.deviation_from, weights=spec.weights, causal=model.causal)
    connection = connection_by_lag(resolved, activations, stats, train, grouped.lags, progress)
    grouped.fit(stats, connection, target_layer=layer, target_site=site)
    features = grouped.transform(activations)
    is_train = np.isin(features["prompt"].values, train)
    threshold = None
    if spec.family == "bernoulli":
        threshold = bernoulli_threshold(condition, features["target"].values[is_train])
        features["value"] = features["target"]
        features["target"] = (features["value"] > threshold).astype(float)
    X_train, X_test = features.isel(sample=is_train), features.isel(sample=~is_train)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is reported in fit.json, not as a warning
        reduced = reduced_model_for(condition, model.causal).fit(X_train)
        controls = fit_controls(reduced, X_train, X_test)
        intervals = bootstrap(reduced, X_train, X_test=X_test, n=spec.bootstrap, seed=condition.seed) if spec.bootstrap else None
        circuit, circuit_metrics = _fit_circuit(condition, grouped, activations, train, test, threshold)

    metric = PRIMARY_METRIC[spec.family]
    held_out = evaluate(reduced, X_test)
    summary = {
        "condition": condition.name,
        "model": model.name,
        "target": resolved.target.name,
        "family": spec.family,
        "threshold": threshold,
        "metric": metric,
        "converged": bool(reduced.converged_),
        "train_prompts": int(train.size),
        "test_prompts": int(test.size),
        "train_samples": int(X_train.sizes["sample"]),
        "test_samples": int(X_test.sizes["sample"]),
        "alpha": float(reduced.alpha_),
        "held_out": held_out if reduced.converged_ else None,
        "interval": {name: [float(v) for v in intervals[name].values] for name in held_out if intervals is not None and name in intervals} if reduced.converged_ else None,
        "controls": {name: {"metric": c.get(metric), "drop": c["drop"], "deviance_drop": c["deviance_drop"], "converged": bool(c["converged"])} for name, c in controls["controls"].items()},
        "circuit": circuit_metrics,
        "firing_rate": float(features["target"].values.mean()) if threshold is not None else None,
    }
    write_netcdf(grouped.to_dataset(), run_dir / "feature_map.nc")
    reduced.save(run_dir / "reduced.nc")
    write_netcdf(circuit, run_dir / "circuit.nc")
    if intervals is not None:
        write_netcdf(intervals, run_dir / "bootstrap.nc")
    _filter_figures(reduced, intervals, run_dir / "figures")
    write_json(run_dir / "fit.json", summary)
    return summary


def _fit_circuit(condition: Condition, grouped: GroupedFeatures, activations, train, test, threshold) -> tuple[xr.Dataset, dict]:
    """The unit-level sparse GLM over the strongest synapses: which units form the circuit."""
    design = grouped.unit_inputs(activations)
    target = design["target"].values if threshold is None else (design["target"].values > threshold).astype(float)
    is_train = np.isin(design["prompt"].values, train)
    # The lowest cross-validated deviance, not the one-standard-error rule: folds of a few dozen
    # prompts differ so much that "within one SE of the best" reached the null model's side and
    # kept a single unit (SVA: 1 unit, held-out R² 0.18, against 11 units and 0.73 at the minimum).
    glm = UnitGLM(condition.fit.family, cv=condition.fit.folds, alpha_rule="min", random_state=condition.seed, n_jobs=-1)
    glm.fit(design["inputs"].values[is_train], target[is_train], blocks=design["block"].values[is_train])
    held_out = evaluate(glm, design["inputs"].values[~is_train], target[~is_train])
    coef = np.asarray(glm.coef_).ravel()
    circuit = xr.Dataset(
        {"coef": ("synapse", coef), "selected": ("synapse", coef != 0)},
        coords={name: design[name] for name in ("unit", "lag", "site", "layer", "kind", "index")},
        attrs={"intercept": float(np.ravel(glm.intercept_)[0]), "family": condition.fit.family},
    )
    units = np.unique(design["unit"].values[coef != 0])
    return circuit, {"candidates": int(coef.size), "selected_synapses": int((coef != 0).sum()), "selected_units": int(units.size), "held_out": held_out}


def _filter_figures(reduced, intervals, out_dir: Path) -> None:
    from .figures_filters import plot_filters

    plot_filters(reduced, out_dir, ci=intervals)
