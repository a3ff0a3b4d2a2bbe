"""Universality: do models trained on the same task reduce to the same computation?

Seed 003 fitted its reduced model to 7 neuron models of different shapes and found the same
computation in all of them, with filters of slightly different shapes. Here the "neuron models"
are transformers trained on the same task (the zoo's seeds, widths and architectures, or any list
of models): :func:`universality` fits one condition on each model, every model in its own run
directory ``DIR/runs/NAME`` through :func:`reduce.fit.fit` (so a fitted model is skipped when
the command is run again), and compares the reduced models four ways:

* **filters**: every model's filters are read as *contribution filters*, F(group, distance,
  lag) × the spread of that input (:func:`contribution_filter` says why), and their normalised
  spatial and temporal profiles are overlaid (``filters_overlay.png``) against layer distance
  and token lag, so models of different depths share an axis; grouped features make models of
  different widths comparable.
* **similarity** (``similarity.nc``, dims ``model`` × ``model2``): the cosine of the flattened
  contribution filter on the grid both models have. Its yardstick is the
  within-model **ceiling**: the same model fitted on two disjoint halves of its training prompts.
  ``similarity_halves`` puts cross-model pairs on the same footing (model A fitted on one half,
  model B on the other, so both numbers compare fits of the same data size with independent
  noise): its diagonal *is* the ceiling.
* **transfer** (``transfer.nc``, dims ``model_from`` × ``model_to``): model A's reduced model
  (filter and history, carried over as contributions: :func:`source_weights`) drives model B's
  features; only a scale and an intercept are refitted on B's training prompts (a 1-D GLM), and
  the held-out metric on B is divided by what B's own reduced model scores under the same refit
  (above chance: AUROC counts from 0.5). 1 means A's filters predict B as well as B's own; the
  diagonal is 1 by construction. Also without history, and with A's raw coefficients.
* **unit matches** (``unit_matches.nc``): for models that tokenise the prompts identically,
  each of model A's top-k circuit units (``circuit.nc``) is paired with the unit of the same
  kind in model B whose activation correlates best with it over every counted token of the same
  prompts; a match is r > ``match_threshold`` (|r| for attention units, whose sign is arbitrary:
  flipping a value direction and its output column leaves the model unchanged). Reported: the
  share of A's circuit units with a match, and the share of matches whose partner is in B's circuit.

``universality.json`` holds the headline numbers, ``universality.md`` the tables for the paper.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import xarray as xr
from sklearn.base import clone

from .condition import Condition, load_condition
from .errors import ReduceError
from .features import GroupedFeatures
from .fit import fit, split_prompts
from .models import resolve_model_path
from .progress import progress_bar
from .record import ACTIVATIONS, STATS
from .reduced import PRIMARY_METRIC, ReducedModel, UnitGLM, evaluate, sample_blocks
from .store import RunDir, atomic_write, fingerprint, write_json, write_netcdf

RUNS = "runs"
HALVES = "split_halves.nc"
HALVES_STAGE = "universality_halves"
HALVES_FORMAT = 2  # part of the cache key: a split_halves.nc written by older code is recomputed
CHANCE = {"auroc": 0.5, "r2": 0.0, "deviance_explained": 0.0}
# A tiny ridge on the standardised drive keeps the 1-D refit finite when a Bernoulli target is
# perfectly separated; elsewhere it shrinks the scale by about one part in 10⁴.
REFIT_RIDGE = 1e-4
NULL_MULTIPLE = 5  # random units per circuit unit for the chance level of a unit match
SIMILARITY_MEASURE = "cosine of the flattened contribution filter F(group, distance, lag) × input spread, on the grid both models share"
NORMALISATION = (
    "Filters are compared and drawn as contribution filters, C_g(d, l) = F_g(d, l) × the standard deviation of "
    "that input cell over the training samples: the drive a typical deviation of the cell adds. (F alone is not "
    "identified where its input never varies, e.g. at lags beyond every prompt, and scales inversely with its "
    "input.) Each C_g is factorised as the fit factorises F: a spatial profile s_g carrying scale and sign, and a "
    "temporal profile t_g of unit norm with Σ_l t_g(l) ≥ 0. For the overlay, each model's spatial profiles are "
    "divided by their largest |s_g(d)| over both groups (so the balance between excitation and inhibition "
    "survives), and each temporal profile by its own largest |t_g(l)|; a group the fit dropped (s_g = 0) has no "
    "temporal profile to draw. Similarities are cosines, which no positive rescaling changes."
)


# ----------------------------------------------------------------------------------------------
# Which models


def default_models(condition: Condition) -> list[str]:
    """Every zoo model trained on the same corpus as the condition's (zoo) model, except ``tiny``.

    The zoo's tasks are the corpus's constructions, so a model trained on that corpus knows the
    condition's task; ``tiny`` (2 layers, 32 wide) is there for tests only.
    """
    from .zoo import list_zoo, read_card

    name = condition.model.name
    if not name.startswith("zoo:"):
        raise ReduceError(f"the condition's model {name!r} is not a zoo model, so which models share its task is unknown; list them with --models", file=condition.path, field="models")
    corpus = read_card(name.removeprefix("zoo:"))["corpus_seed"]
    return [f"zoo:{row['name']}" for row in list_zoo() if row["name"] != "tiny" and read_card(row["name"])["corpus_seed"] == corpus]


def run_name(model: str) -> str:
    """The run-directory name of a model: the zoo name, a folder's name, or a hub id with ``/`` → ``--``."""
    if model.startswith("zoo:"):
        return model.removeprefix("zoo:")
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model.replace("/", "--")


def condition_for(condition: Condition, model: str) -> Condition:
    """``condition`` with its model replaced (a folder given relative to the working directory becomes absolute)."""
    path = Path(model).expanduser()
    name = str(path.resolve()) if not model.startswith("zoo:") and path.is_dir() else model
    return replace(condition, model=replace(condition.model, name=name))


# ----------------------------------------------------------------------------------------------
# Metrics on fitted reduced models and feature datasets (no run directory needed)


def cosine(a: xr.DataArray, b: xr.DataArray) -> float:
    """Cosine of two arrays over the coordinates they share (NaN when either is zero there).

    Not Pearson's r: a filter's zero means "no effect", so its mean is no offset to subtract.
    """
    a, b = xr.align(a, b, join="inner")
    x, y = a.values.ravel(), b.transpose(*a.dims).values.ravel()
    norm = np.linalg.norm(x) * np.linalg.norm(y)
    return float(x @ y / norm) if norm > 0 else float("nan")


def input_spread(data: xr.Dataset) -> xr.Dataset:
    """The standard deviation over samples of each input cell (``inputs``: group, distance, lag) and,
    where the data has them, of each history lag (``history``)."""
    return data[[name for name in ("inputs", "history") if name in data]].std("sample")


def contribution_filter(model_or_filter, spread: xr.Dataset) -> xr.DataArray:
    """F(group, distance, lag) × the spread of its input: the drive a typical deviation of each cell adds.

    This, not F itself, is what models are compared on. F is only identified where its input
    varies: at a lag no prompt reaches, the fitted F is the smooth basis' extrapolation (often
    its largest values), which would dominate a comparison of raw filters while predicting
    nothing. And where two models' inputs differ in scale (other widths, other gradients),
    their filters differ inversely for the same computation; the contribution does not.
    """
    filter_ = model_or_filter.filter_ if isinstance(model_or_filter, ReducedModel) else model_or_filter
    return filter_ * spread["inputs"]


def rank_one_profiles(contribution: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """(spatial, temporal) rank-1 factors of a contribution filter per group, in the fit's convention:
    the scale and sign in the spatial factor, the temporal factor of unit norm with Σ_l t(l) ≥ 0."""
    from .reduced import _rank_one  # the same factorisation and sign convention as the fitted filters

    spatial, temporal, _ = _rank_one(contribution.transpose("group", "distance", "lag").values, np.eye(contribution.sizes["lag"]))
    coords = {dim: contribution[dim].values for dim in ("group", "distance", "lag")}
    return (
        xr.DataArray(spatial, dims=("group", "distance"), coords={k: coords[k] for k in ("group", "distance")}),
        xr.DataArray(temporal, dims=("group", "lag"), coords={k: coords[k] for k in ("group", "lag")}),
    )


def normalised_profiles(contribution: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """(spatial, temporal) profiles scaled for overlays as :data:`NORMALISATION` states."""
    spatial, temporal = rank_one_profiles(contribution)
    largest = float(np.abs(spatial).max())
    spatial = spatial / largest if largest > 0 else spatial
    alive = np.abs(spatial).max("distance") > 0
    return spatial, (temporal / np.abs(temporal).max("lag")).where(alive)


def spatial_similarity(a: xr.DataArray, b: xr.DataArray) -> float:
    """Cosine of two contribution filters' spatial profiles s(group, distance) on the common distances."""
    return cosine(rank_one_profiles(a)[0], rank_one_profiles(b)[0])


def temporal_similarity(a: xr.DataArray, b: xr.DataArray) -> float:
    """Cosine of two contribution filters' temporal profiles t(group, lag), over the groups alive in both (NaN if none)."""
    (spatial_a, temporal_a), (spatial_b, temporal_b) = rank_one_profiles(a), rank_one_profiles(b)
    alive = [g for g in temporal_a["group"].values if np.abs(spatial_a.sel(group=g)).max() > 0 and np.abs(spatial_b.sel(group=g)).max() > 0]
    return cosine(temporal_a.sel(group=alive), temporal_b.sel(group=alive)) if alive else float("nan")


def prompt_halves(blocks, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` random splits of the blocks (prompts) into two disjoint halves, as block values.

    The draws depend only on the set of blocks and ``seed``, so models fitted on the same prompts
    get the same halves (which :func:`cross_half_similarity` relies on).
    """
    names = np.unique(np.asarray(blocks))
    if names.size < 2:
        raise ReduceError(f"splitting into halves needs at least 2 prompts, found {names.size}", field="block")
    rng = np.random.default_rng(seed)
    halves = []
    for _ in range(n_splits):
        order = rng.permutation(names)
        halves.append((np.sort(order[: names.size // 2]), np.sort(order[names.size // 2 :])))
    return halves


def half_filters(model: ReducedModel, train: xr.Dataset, *, n_splits: int = 2, seed: int = 0) -> xr.Dataset:
    """Refit ``model``'s estimator (same settings, its own cross-validated α) on each half of each split.

    Returns ``filter`` (split, half, group, distance, lag), ``converged`` and ``failed`` (split,
    half). A half that cannot be fitted at all (one class only, or a numerically singular
    problem) is ``failed``, with a NaN filter, rather than the end of the comparison.
    """
    blocks = sample_blocks(train)
    filters, converged, failed = [], [], []
    for halves in prompt_halves(blocks, n_splits, seed):
        pair = []
        for half in halves:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # non-convergence is recorded in ``converged``
                    refit = clone(model).fit(train.isel(sample=np.isin(blocks, half)))
                pair.append(refit.filter_)
                converged.append(refit.converged_)
                failed.append(False)
            except (ReduceError, np.linalg.LinAlgError):
                pair.append(xr.full_like(model.filter_, np.nan))
                converged.append(False)
                failed.append(True)
        filters.append(xr.concat(pair, dim="half"))
    filter_ = xr.concat(filters, dim="split").assign_coords(split=np.arange(n_splits), half=[0, 1])
    status = {name: (("split", "half"), np.reshape(values, (n_splits, 2))) for name, values in (("converged", converged), ("failed", failed))}
    return xr.Dataset({"filter": filter_, **status}, attrs={"seed": seed})


def cross_half_similarity(halves_a: xr.DataArray, halves_b: xr.DataArray) -> float:
    """Mean cosine of A's (contribution) filter on one half with B's on the other, over splits and both ways.

    With ``halves_b`` = ``halves_a`` this is the within-model split-half similarity: the ceiling.
    """
    values = [cosine(halves_a.sel(split=s, half=h), halves_b.sel(split=s, half=1 - h)) for s in halves_a["split"].values for h in (0, 1)]
    return float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")


def source_weights(source: ReducedModel, source_spread: xr.Dataset | None = None, target_spread: xr.Dataset | None = None) -> tuple[xr.DataArray, xr.DataArray | None]:
    """``source``'s filter and history filter, as they are or carried over to another model's inputs.

    With both spreads, every coefficient is multiplied by source spread / target spread (and a cell
    whose input does not vary in the target gets 0): the source's *contributions* are what is
    carried over, so a cell the source never saw vary (its coefficient an extrapolation) adds
    nothing, and inputs of another scale get coefficients of the inverse scale. Without spreads the
    raw coefficients are used.
    """
    weights, history = source.filter_, source.history_filter_
    if source_spread is None or target_spread is None:
        return weights, history

    def carried(coefficients, name):
        ratio = (source_spread[name] / target_spread[name]).where(target_spread[name] > 0, 0.0)
        return coefficients * ratio

    return carried(weights, "inputs"), None if history is None or "history" not in target_spread else carried(history, "history")


def source_drive(weights: xr.DataArray, history: xr.DataArray | None, data: xr.Dataset) -> np.ndarray:
    """The drive (without intercept) of a filter and an optional history filter on a feature dataset.

    Only the grid both share counts: a distance one model lacks contributes nothing.
    """
    drive = xr.dot(data["inputs"], weights, dim=["group", "distance", "lag"])
    if history is not None and "history" in data:
        drive = drive + xr.dot(data["history"], history, dim="history_lag")
    return np.asarray(drive.transpose("sample").values, dtype=float)


def transfer_score(source: ReducedModel, train: xr.Dataset, test: xr.Dataset, *, source_spread: xr.Dataset | None = None, history: bool = True) -> float:
    """Held-out primary metric on ``test`` of ``source``'s drive, with only scale and intercept refitted on ``train``.

    ``source_spread`` (:func:`input_spread` of the source's training data) carries the source's
    contributions over rather than its raw coefficients (:func:`source_weights`); ``history=False``
    leaves the history term out.
    """
    weights, history_weights = source_weights(source, source_spread, input_spread(train) if source_spread is not None else None)
    history_weights = history_weights if history else None
    glm = UnitGLM(source.family, alpha=REFIT_RIDGE, l1_ratio=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a perfectly separated Bernoulli target warns; the ridge keeps the fit finite
        glm.fit(source_drive(weights, history_weights, train)[:, None], train["target"].values)
    return evaluate(glm, source_drive(weights, history_weights, test)[:, None], test["target"].values)[PRIMARY_METRIC[source.family]]


def transfer_ratio(source: ReducedModel, own: ReducedModel, train: xr.Dataset, test: xr.Dataset, *, source_spread=None, own_spread=None, history: bool = True) -> float:
    """``source``'s transfer score on this data over ``own``'s under the same refit, both above chance.

    Give both spreads to carry contributions over (the own model's then changes only where an
    input does not vary), or neither to use raw coefficients.
    """
    scores = (xr.DataArray(transfer_score(model, train, test, source_spread=spread, history=history)) for model, spread in ((source, source_spread), (own, own_spread)))
    return float(_relative(*scores, own.family))


def _relative(score, own_score, family: str):
    """(score − chance) / (own score − chance); NaN where the model's own score is not above chance."""
    chance = CHANCE[PRIMARY_METRIC[family]]
    reference = own_score - chance
    with np.errstate(invalid="ignore", divide="ignore"):
        return xr.where(reference > 0, (score - chance) / reference, np.nan)


def _standardised(activity: np.ndarray) -> np.ndarray:
    centred = activity - activity.mean(axis=0)
    norm = np.linalg.norm(centred, axis=0)
    return np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)


def best_partners(activity_a: np.ndarray, activity_b: np.ndarray, kinds_a, kinds_b) -> tuple[np.ndarray, np.ndarray]:
    """For each column of ``activity_a`` (token × unit), the column of ``activity_b`` of the same kind
    that correlates best with it: (partner index, r). Attention units are matched by |r|."""
    r = _standardised(np.asarray(activity_a, dtype=np.float64)).T @ _standardised(np.asarray(activity_b, dtype=np.float64))
    kinds_a, kinds_b = np.asarray(kinds_a), np.asarray(kinds_b)
    score = np.where(kinds_a[:, None] == "attn", np.abs(r), r)
    score[kinds_a[:, None] != kinds_b[None, :]] = -np.inf
    partner = score.argmax(axis=1)
    return partner, np.take_along_axis(score, partner[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------------------------
# One fitted run, as the comparisons need it


@dataclass
class FittedRun:
    """A model's fit, read back from its run directory."""

    name: str
    model: str
    run_dir: Path
    summary: dict  # fit.json
    reduced: ReducedModel
    train: xr.Dataset  # grouped features of the training prompts, target as fitted (thresholded for bernoulli)
    test: xr.Dataset
    spread: xr.DataArray  # input_spread(train): what contribution filters are scaled by
    family: str  # architecture family
    n_layers: int
    n_units: int
    circuit_units: np.ndarray  # global unit indices, strongest first
    tokens: np.ndarray  # (prompt, pos) token strings: equal arrays mean the units can be compared token by token


def load_run(condition: Condition, name: str, model: str, run_dir) -> FittedRun:
    """Read back what :func:`reduce.fit.fit` wrote and rebuild the features it was fitted on."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "fit.json").read_text())
    feature_map = xr.load_dataset(run_dir / "feature_map.nc", engine="h5netcdf")
    activations = xr.open_zarr(run_dir / ACTIVATIONS)
    features = GroupedFeatures.from_dataset(feature_map).transform(activations.load())
    if summary["threshold"] is not None:  # as fit.py does for a Bernoulli target
        features["target"] = (features["target"] > summary["threshold"]).astype(float)
    train, _ = split_prompts(condition, activations.sizes["prompt"])
    is_train = np.isin(features["prompt"].values, train)
    circuit = xr.load_dataset(run_dir / "circuit.nc", engine="h5netcdf")
    return FittedRun(
        name=name,
        model=model,
        run_dir=run_dir,
        summary=summary,
        reduced=ReducedModel.load(run_dir / "reduced.nc"),
        train=features.isel(sample=is_train),
        test=features.isel(sample=~is_train),
        spread=input_spread(features.isel(sample=is_train)),
        family=str(activations.attrs.get("family", "")),
        n_layers=int(activations.attrs["n_layers"]),
        n_units=int(feature_map.sizes["unit"]),
        circuit_units=circuit_units(circuit, feature_map),
        tokens=activations["tokens"].values.astype(object),
    )


def circuit_units(circuit: xr.Dataset, feature_map: xr.Dataset) -> np.ndarray:
    """The circuit's units, strongest first: Σ over a unit's selected lags of |coef| × the unit's spread.

    The unit-level GLM's inputs are raw deviations, so |coef| alone would favour units of small
    spread; times the spread it is the drive a typical deviation of the unit contributes.
    """
    selected = circuit.isel(synapse=circuit["selected"].values)
    units = selected["unit"].values
    effect = np.abs(selected["coef"].values) * feature_map["spread"].values[units]
    unique = np.unique(units)
    strength = np.array([effect[units == unit].sum() for unit in unique])
    return unique[np.argsort(-strength, kind="stable")]


def unit_activity(run_dir) -> tuple[np.ndarray, np.ndarray]:
    """(token × unit activations over every counted token, unit kinds), columns in unit-table order.

    Counted tokens are the real, non-special ones (the recording's ``counted``): a BOS token
    repeats one context-free value in every prompt, and that shared spike would correlate every
    pair of units.
    """
    activations = xr.open_zarr(Path(run_dir) / ACTIVATIONS)
    stats = xr.open_dataset(Path(run_dir) / STATS, engine="h5netcdf")
    counted = activations["counted"].values
    columns = []
    for site in dict.fromkeys(stats["site"].values.tolist()):  # the unit table runs site by site
        values = activations[site].values
        columns.append(values.reshape(values.shape[0], values.shape[1], -1)[counted])
    kinds = stats["kind"].values.astype(str)
    stats.close()
    return np.concatenate(columns, axis=1), kinds


# ----------------------------------------------------------------------------------------------
# The comparison


def universality(condition, models, out_dir, *, progress: bool = True, n_splits: int = 2, top_k: int = 10, match_threshold: float = 0.8, seed: int = 0) -> dict:
    """Fit ``condition`` on every model in ``models`` (default: :func:`default_models`) and compare them.

    Each model is fitted in ``out_dir/runs/NAME`` (skipped when already fitted); the split-half
    refits are kept there too (``split_halves.nc``). Writes ``similarity.nc``, ``transfer.nc``,
    ``unit_matches.nc``, ``filters_overlay.png``, ``similarity.png``, ``transfer.png``,
    ``unit_matches.png``, ``universality.json`` and ``universality.md`` into ``out_dir``;
    returns the contents of ``universality.json``.

    ``n_splits``: random splits of each model's training prompts into halves for the ceiling;
    ``top_k``: circuit units per model to match; ``match_threshold``: the correlation a match needs.
    """
    condition = condition if isinstance(condition, Condition) else load_condition(condition)
    models = default_models(condition) if not models else list(models)
    names = [run_name(model) for model in models]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ReduceError(f"models {', '.join(repeated)} are listed twice (each model gets one run directory)", field="models")
    if len(models) < 2:
        raise ReduceError(f"universality compares models: give at least two, got {len(models)}", field="models")
    if n_splits < 1 or top_k < 1:
        raise ReduceError("n_splits and top_k must be at least 1", field="n_splits" if n_splits < 1 else "top_k")
    for model in models:  # an unknown model fails now, not after the others' fits
        resolve_model_path(model, field="models")
    out_dir = Path(out_dir)
    with RunDir(out_dir):
        runs, halves = [], []
        bar = progress_bar(list(zip(names, models)), desc="universality", enabled=progress)
        for name, model in bar:
            bar.set_postfix_str(f"fit {name}")
            model_condition = condition_for(condition, model)
            fit(model_condition, out_dir / RUNS / name, progress=progress)
            runs.append(load_run(model_condition, name, model, out_dir / RUNS / name))
            bar.set_postfix_str(f"split halves {name}")
            halves.append(_cached_half_filters(runs[-1], n_splits, seed))
        similarity = _similarity(runs, halves)
        transfer = _transfer(runs, progress)
        matches = _unit_matches(runs, top_k, match_threshold, progress, seed)
        headline = _headline(condition, runs, similarity, transfer, matches, n_splits)
        write_netcdf(similarity, out_dir / "similarity.nc")
        write_netcdf(transfer, out_dir / "transfer.nc")
        write_netcdf(matches, out_dir / "unit_matches.nc")
        _figures(runs, similarity, transfer, matches, out_dir)
        with atomic_write(out_dir / "universality.md") as handle:
            handle.write(markdown(headline, similarity, transfer, matches))
        write_json(out_dir / "universality.json", headline)
    return headline


def _cached_half_filters(run: FittedRun, n_splits: int, seed: int) -> xr.Dataset:
    """:func:`half_filters` of a run, kept in its run directory until the fit or the settings change."""
    digest = hashlib.sha256()
    for output in ("reduced.nc", "feature_map.nc"):
        digest.update((run.run_dir / output).read_bytes())
    key = fingerprint(digest.hexdigest(), n_splits, seed, HALVES_FORMAT)
    with RunDir(run.run_dir) as directory:
        if directory.is_done(HALVES_STAGE, key, outputs=(HALVES,)):
            return xr.load_dataset(run.run_dir / HALVES, engine="h5netcdf")
        directory.forget(HALVES_STAGE)
        halves = half_filters(run.reduced, run.train, n_splits=n_splits, seed=seed)
        write_netcdf(halves, run.run_dir / HALVES)
        directory.mark_done(HALVES_STAGE, key)
    return halves


def _pairwise(names, function, dims=("model", "model2")) -> xr.DataArray:
    values = np.array([[function(i, j) for j in range(len(names))] for i in range(len(names))], dtype=float)
    return xr.DataArray(values, dims=dims, coords={dims[0]: names, dims[1]: names})


def _similarity(runs: list[FittedRun], halves: list[xr.Dataset]) -> xr.Dataset:
    names = [run.name for run in runs]
    contributions = [contribution_filter(run.reduced, run.spread) for run in runs]
    half_contributions = [contribution_filter(h["filter"], run.spread) for run, h in zip(runs, halves)]
    raw = [run.reduced.filter_ for run in runs]
    dataset = xr.Dataset(
        {
            "similarity": _pairwise(names, lambda i, j: cosine(contributions[i], contributions[j])),
            "similarity_halves": _pairwise(names, lambda i, j: cross_half_similarity(half_contributions[i], half_contributions[j])),
            "spatial_similarity": _pairwise(names, lambda i, j: spatial_similarity(contributions[i], contributions[j])),
            "temporal_similarity": _pairwise(names, lambda i, j: temporal_similarity(contributions[i], contributions[j])),
            "raw_filter_similarity": _pairwise(names, lambda i, j: cosine(raw[i], raw[j])),
        }
    )
    dataset["ceiling"] = ("model", np.diag(dataset["similarity_halves"].values).copy())
    dataset["halves_converged"] = ("model", [bool(h["converged"].all()) for h in halves])
    dataset["halves_failed"] = ("model", [int(h["failed"].sum()) for h in halves])
    dataset.attrs.update(
        measure=SIMILARITY_MEASURE,
        similarity="fits on all training prompts (diagonal 1 by definition)",
        similarity_halves="model fitted on one half of the training prompts vs model2 on the other half, mean over splits and both ways; diagonal = ceiling",
        spatial_similarity="cosine of the contribution filters' rank-1 spatial profiles (group, distance)",
        temporal_similarity="cosine of the contribution filters' rank-1 temporal profiles (group, lag), groups alive in both",
        raw_filter_similarity="cosine of the fitted filters F themselves, for reference: dominated by cells whose input never varies",
        n_splits=int(halves[0].sizes["split"]),
    )
    return dataset


def _transfer(runs, progress: bool) -> xr.Dataset:
    names = [run.name for run in runs]
    family = runs[0].reduced.family
    metric = PRIMARY_METRIC[family]
    variants = {"": dict(carried=True, history=True), "_filter_only": dict(carried=True, history=False), "_raw_coefficients": dict(carried=False, history=True)}
    bar = progress_bar(None, total=len(variants) * len(runs) ** 2, desc="transfer", enabled=progress)

    def scores(carried: bool, history: bool) -> xr.DataArray:
        def score(i, j):
            bar.update()
            return transfer_score(runs[i].reduced, runs[j].train, runs[j].test, source_spread=runs[i].spread if carried else None, history=history)

        return _pairwise(names, score, ("model_from", "model_to"))

    dataset = xr.Dataset({"own_metric": ("model_to", [_own_metric(run) for run in runs])}, coords={"model_to": names})
    for suffix, settings in variants.items():
        matrix = scores(**settings)
        own = xr.DataArray(np.diag(matrix.values), dims="model_to", coords={"model_to": names})  # each model's own filters, same refit
        dataset[f"score{suffix}"] = matrix
        dataset[f"transfer{suffix}"] = _relative(matrix, own, family).transpose(*matrix.dims)
    bar.close()
    dataset.attrs.update(
        metric=metric,
        chance=CHANCE[metric],
        score=f"held-out {metric} on model_to of model_from's filter and history filter carried over as contributions (coefficient × model_from's input spread / model_to's), with only scale and intercept refitted on model_to's training prompts",
        transfer="(score − chance) / (model_to's own score under the same refit − chance): 1 on the diagonal by construction",
        score_filter_only="the same without the history term",
        score_raw_coefficients="the same with model_from's raw coefficients applied to model_to's inputs",
        own_metric=f"model_to's own reduced model, held-out {metric} as fitted (fit.json)",
    )
    return dataset


def _own_metric(run: FittedRun) -> float:
    held_out = run.summary["held_out"]
    return float(held_out[run.summary["metric"]]) if held_out else float("nan")


def null_units(kinds: np.ndarray, top: np.ndarray, circuit: np.ndarray, rng, multiple: int = NULL_MULTIPLE) -> np.ndarray:
    """Random units outside the circuit, ``multiple`` times as many of each kind as ``top`` holds.

    Their match rate is the chance level of a match: in small models on a small vocabulary, many
    units follow token identity, so a high-correlation partner can exist for almost any unit.
    """
    chosen = [np.zeros(0, dtype=int)]
    for kind in np.unique(kinds[top]):
        pool = np.setdiff1d(np.flatnonzero(kinds == kind), circuit)
        chosen.append(rng.choice(pool, size=min(multiple * int((kinds[top] == kind).sum()), pool.size), replace=False))
    return np.concatenate(chosen)


def _unit_matches(runs, top_k: int, threshold: float, progress: bool, seed: int = 0) -> xr.Dataset:
    names = [run.name for run in runs]
    n = len(runs)
    top = [run.circuit_units[:top_k] for run in runs]
    comparable = np.array([[i != j and runs[i].tokens.shape == runs[j].tokens.shape and (runs[i].tokens == runs[j].tokens).all() for j in range(n)] for i in range(n)])
    shape = (n, n, top_k)
    partner, partner_r, in_circuit = np.full(shape, -1), np.full(shape, np.nan), np.zeros(shape, dtype=bool)
    # Two passes, so that only one model's full (token × unit) activity is in memory at a time:
    # first every model's top circuit columns, then each model's full activity as the partner side.
    null_rate = np.full((n, n), np.nan)
    circuit_columns, null_columns = {}, {}
    rng = np.random.default_rng(seed)
    for i in progress_bar(np.flatnonzero(comparable.any(axis=1)), desc="circuit units", enabled=progress):
        activity, kinds = unit_activity(runs[i].run_dir)
        circuit_columns[i] = (activity[:, top[i]], kinds[top[i]])
        null = null_units(kinds, top[i], runs[i].circuit_units, rng)
        null_columns[i] = (activity[:, null], kinds[null])
    for j in progress_bar(np.flatnonzero(comparable.any(axis=0)), desc="unit matches", enabled=progress):
        activity, kinds = unit_activity(runs[j].run_dir)
        for i in np.flatnonzero(comparable[:, j]):
            columns, column_kinds = circuit_columns[i]
            found, r = best_partners(columns, activity, column_kinds, kinds)
            partner[i, j, : found.size], partner_r[i, j, : found.size] = found, r
            in_circuit[i, j, : found.size] = np.isin(found, runs[j].circuit_units)
            columns, column_kinds = null_columns[i]
            if column_kinds.size:
                null_rate[i, j] = float((best_partners(columns, activity, column_kinds, kinds)[1] > threshold).mean())
    matched = partner_r > threshold
    counts = np.array([len(units) for units in top])
    with np.errstate(invalid="ignore", divide="ignore"):
        match_rate = np.where(comparable, matched.sum(axis=2) / counts[:, None], np.nan)
        partner_in_circuit = np.where(comparable, (matched & in_circuit).sum(axis=2) / matched.sum(axis=2), np.nan)
    circuit_unit = np.full((n, top_k), -1)
    for i, units in enumerate(top):
        circuit_unit[i, : units.size] = units
    dims = ("model", "model2", "rank")
    return xr.Dataset(
        {
            "match_rate": (("model", "model2"), match_rate),
            "partner_in_circuit": (("model", "model2"), partner_in_circuit),
            "null_match_rate": (("model", "model2"), null_rate),
            "comparable": (("model", "model2"), comparable),
            "circuit_unit": (("model", "rank"), circuit_unit),
            "circuit_size": ("model", [run.circuit_units.size for run in runs]),
            "partner": (dims, partner),
            "partner_r": (dims, partner_r),
            "partner_is_circuit_unit": (dims, in_circuit),
        },
        coords={"model": names, "model2": names, "rank": np.arange(top_k)},
        attrs={
            "threshold": threshold,
            "top_k": top_k,
            "match_rate": "share of model's top-k circuit units (by |coef| x spread) whose best partner of the same kind in model2 has r > threshold (|r| for attention units), over every counted token of the same prompts",
            "partner_in_circuit": "share of those matched units whose partner is in model2's circuit",
            "null_match_rate": f"the same match rate for {NULL_MULTIPLE}x as many random non-circuit units of model, of the same kinds: the chance level",
            "comparable": "the two models tokenise every prompt identically (the diagonal is left out)",
            "units": "global unit indices: rows of each run's unit table (stats.nc); -1 where a circuit has fewer than top_k units",
        },
    )


# ----------------------------------------------------------------------------------------------
# Headline, tables and figures


def _off_diagonal(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[~np.eye(len(values), dtype=bool)]


def _mean(values) -> float | None:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def _headline(condition: Condition, runs, similarity: xr.Dataset, transfer: xr.Dataset, matches: xr.Dataset, n_splits: int) -> dict:
    cross_halves = _mean(_off_diagonal(similarity["similarity_halves"].values))
    ceiling = _mean(similarity["ceiling"].values)
    return {
        "condition": condition.name,
        "models": [run.name for run in runs],
        "metric": transfer.attrs["metric"],
        "similarity": {
            "measure": SIMILARITY_MEASURE,
            "mean_cross_model": _mean(_off_diagonal(similarity["similarity"].values)),
            "mean_cross_model_halves": cross_halves,
            "mean_ceiling": ceiling,
            "cross_model_over_ceiling": cross_halves / ceiling if cross_halves is not None and ceiling else None,
            "mean_spatial": _mean(_off_diagonal(similarity["spatial_similarity"].values)),
            "mean_temporal": _mean(_off_diagonal(similarity["temporal_similarity"].values)),
            "n_splits": n_splits,
        },
        "transfer": {
            "mean_ratio": _mean(_off_diagonal(transfer["transfer"].values)),
            "min_ratio": _nanmin(_off_diagonal(transfer["transfer"].values)),
            "mean_ratio_filter_only": _mean(_off_diagonal(transfer["transfer_filter_only"].values)),
            "mean_ratio_raw_coefficients": _mean(_off_diagonal(transfer["transfer_raw_coefficients"].values)),
        },
        "unit_matches": {
            "threshold": matches.attrs["threshold"],
            "top_k": matches.attrs["top_k"],
            "comparable_pairs": int(matches["comparable"].values.sum()),
            "mean_match_rate": _mean(matches["match_rate"].values),
            "mean_null_match_rate": _mean(matches["null_match_rate"].values),
            "mean_partner_in_circuit": _mean(matches["partner_in_circuit"].values),
        },
        "per_model": {
            run.name: {
                "model": run.model,
                "architecture": run.family,
                "layers": run.n_layers,
                "units": run.n_units,
                "held_out": _finite(_own_metric(run)),
                "ceiling": _finite(similarity["ceiling"].sel(model=run.name)),
                "halves_converged": bool(similarity["halves_converged"].sel(model=run.name)),
                "halves_failed": int(similarity["halves_failed"].sel(model=run.name)),
                "circuit_units": int(run.circuit_units.size),
            }
            for run in runs
        },
    }


def _nanmin(values) -> float | None:
    values = np.asarray(values, dtype=float)
    return float(np.nanmin(values)) if np.isfinite(values).any() else None


def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _number(value, digits: int = 2) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _matrix_table(array: xr.DataArray, digits: int = 2) -> str:
    rows, columns = array.dims
    names = [str(v) for v in array[columns].values]
    lines = [f"| {rows} \\ {columns} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in array[rows].values:
        lines.append(f"| {row} | " + " | ".join(_number(float(v), digits) for v in array.sel({rows: row}).values) + " |")
    return "\n".join(lines)


def markdown(headline: dict, similarity: xr.Dataset, transfer: xr.Dataset, matches: xr.Dataset) -> str:
    """The universality tables for the paper (GitHub-flavoured markdown)."""
    metric, s, t, u = headline["metric"], headline["similarity"], headline["transfer"], headline["unit_matches"]
    lines = [
        f"# Universality: {headline['condition']} across {len(headline['models'])} models",
        "",
        f"- Filter similarity ({s['measure']}): cross-model {_number(s['mean_cross_model_halves'])} on disjoint prompt halves "
        f"against a within-model ceiling of {_number(s['mean_ceiling'])} (ratio {_number(s['cross_model_over_ceiling'])}; "
        f"{s['n_splits']} random half splits per model); {_number(s['mean_cross_model'])} between fits on all training prompts "
        f"(spatial filters {_number(s['mean_spatial'])}, temporal filters {_number(s['mean_temporal'])}).",
        f"- Transfer: another model's reduced model (its contributions carried over to this model's input scale), with only "
        f"scale and intercept refitted, keeps on average {_number(t['mean_ratio'])} of the model's own held-out {metric} above "
        f"chance (worst pair {_number(t['min_ratio'])}; filters alone, without history: {_number(t['mean_ratio_filter_only'])}; "
        f"raw coefficients instead of contributions: {_number(t['mean_ratio_raw_coefficients'])}).",
        f"- Unit matches: of each model's top {u['top_k']} circuit units, on average {_number(u['mean_match_rate'])} have a partner "
        f"with r > {u['threshold']} in another model (random units of the same kinds: {_number(u['mean_null_match_rate'])}), and "
        f"{_number(u['mean_partner_in_circuit'])} of those partners are in that model's circuit "
        f"({u['comparable_pairs']} ordered pairs of models that tokenise the prompts identically).",
        "",
        NORMALISATION,
        "",
        "A dash marks a number that is undefined: a filter the fit set to zero, or a model whose own reduced model does not beat chance.",
        "",
        "## Models",
        "",
        f"| model | architecture | layers | units | held-out {metric} | ceiling | circuit units |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in headline["per_model"].items():
        ceiling = _number(row["ceiling"]) + ("" if row["halves_converged"] else " (not converged)") + (f" ({row['halves_failed']} halves failed)" if row["halves_failed"] else "")
        lines.append(f"| {name} | {row['architecture']} | {row['layers']} | {row['units']} | {_number(row['held_out'], 3)} | {ceiling} | {row['circuit_units']} |")
    lines += [
        "",
        "## Filter similarity on disjoint prompt halves (diagonal: within-model ceiling)",
        "",
        _matrix_table(similarity["similarity_halves"]),
        "",
        "## Filter similarity of the fits on all training prompts",
        "",
        _matrix_table(similarity["similarity"]),
        "",
        f"## Transfer ratio (rows: filters from; columns: model predicted; held-out {metric} above chance relative to the model's own)",
        "",
        _matrix_table(transfer["transfer"]),
        "",
        f"## Unit match rate (rows: circuit units of; columns: partner found in; r > {u['threshold']})",
        "",
        _matrix_table(matches["match_rate"]),
        "",
        "## Share of matched partners that are in the other model's circuit",
        "",
        _matrix_table(matches["partner_in_circuit"]),
        "",
        f"## Match rate of random non-circuit units of the same kinds (the chance level; r > {u['threshold']})",
        "",
        _matrix_table(matches["null_match_rate"]),
        "",
    ]
    return "\n".join(lines)


def _figures(runs, similarity: xr.Dataset, transfer: xr.Dataset, matches: xr.Dataset, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    from .figures_filters import _save as save_figure

    sns.set_theme(style="whitegrid", context="paper")
    frames = {"spatial": [], "temporal": []}
    for run in runs:
        spatial, temporal = normalised_profiles(contribution_filter(run.reduced, run.spread))
        for kind, profile in (("spatial", spatial), ("temporal", temporal)):
            frames[kind].append(profile.to_dataframe(name="weight").reset_index().assign(model=run.name, architecture=run.family))
    groups = runs[0].reduced.filter_["group"].values
    figure, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.4), squeeze=False, sharey="row")
    for row, (kind, x, label) in enumerate((("spatial", "distance", "layer distance"), ("temporal", "lag", "token lag"))):
        frame = pd.concat(frames[kind], ignore_index=True)
        for column, group in enumerate(groups):
            ax = axes[row, column]
            sns.lineplot(
                data=frame[frame["group"] == group], x=x, y="weight", hue="model", hue_order=[run.name for run in runs], style="architecture",
                marker="o", ax=ax, legend=row == 0 and column == len(groups) - 1,
            )
            ax.axhline(0.0, color="0.3", linewidth=0.8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(xlabel=label, ylabel=f"{kind} profile (normalised)", title=f"{group}")
    if axes[0, -1].get_legend() is not None:
        sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle("Contribution filters (F × input spread) of every model: spatial s_g / max|s| per model; temporal t_g / max|t_g|", fontsize="small")
    figure.tight_layout()
    save_figure(figure, out_dir / "filters_overlay.png")

    panels = [
        (similarity["similarity"], "fits on all training prompts", "cosine"),
        (similarity["similarity_halves"], "disjoint halves (diagonal: ceiling)", "cosine"),
    ]
    _heatmaps(panels, out_dir / "similarity.png", plt, sns, save_figure, limits=(-1, 1))
    _heatmaps([(transfer["transfer"], "transfer ratio (rows: from)", "ratio")], out_dir / "transfer.png", plt, sns, save_figure, limits=(0, 1))
    threshold = matches.attrs["threshold"]
    panels = [(matches["match_rate"], f"circuit units with a partner (r > {threshold})", "rate"), (matches["null_match_rate"], "random units of the same kinds (chance)", "rate")]
    _heatmaps(panels, out_dir / "unit_matches.png", plt, sns, save_figure, limits=(0, 1))


def _heatmaps(panels, path: Path, plt, sns, save_figure, limits) -> None:
    size = len(panels[0][0])
    figure, axes = plt.subplots(1, len(panels), figsize=(0.55 * size * len(panels) + 2.5 * len(panels), 0.5 * size + 2.0), squeeze=False)
    for ax, (array, title, label) in zip(axes[0], panels):
        sns.heatmap(array.to_pandas(), ax=ax, vmin=limits[0], vmax=limits[1], cmap="RdBu_r" if limits[0] < 0 else "viridis", annot=size <= 12, fmt=".2f", cbar_kws={"label": label}, square=True)
        ax.set(title=title)
    figure.tight_layout()
    save_figure(figure, path)
