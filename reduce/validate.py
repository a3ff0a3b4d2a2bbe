"""Counterfactual validation: does the reduced model predict what the network does under ablation?

For each baseline (zero, mean, peak, resample …) and each plan of ablations on the held-out
prompts, three predictors of the target are compared with the network's actual target:

* **direct**: the reduced model fed the clean activations with only the ablated units set to
  the baseline — what the reduced model alone claims the ablation does;
* **propagated**: the reduced model fed the upstream activations recorded while the ablation
  ran — downstream units' responses (compensation, seed 000) included;
* **attribution**: gradient attribution's linear estimate, ``Σ_units (baseline − a) · ∂target/∂a``.

All are scored as changes from the unablated run (:func:`reduce.faithfulness.score_changes`);
``direct − propagated`` is the compensation gap. Writes ``validation.nc`` (per ablation and
prompt, and the scores), ``validation.json`` (headline numbers), and figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .ablate import Ablation, AblationRunner, Evaluation, Measures, PromptBatch, SitesMeasure, TargetMeasure, condition_baselines, random_pruning, single_units, unit_groups
from .attribution import attribute
from .baselines import BaselineSource, UnitTable
from .batching import encode
from .condition import Condition, load_condition, open_model, resolve
from .errors import ReduceError
from .faithfulness import score_changes
from .features import GroupedFeatures
from .fit import fit, split_prompts
from .progress import progress_bar
from .reduced import ReducedModel
from .store import RunDir, fingerprint, write_json, write_netcdf

STAGE = "validate"
OUTPUTS = ("validation.nc", "validation.json")
PREDICTORS = ("direct", "propagated", "attribution")
METRICS = ("r2", "spearman", "sign_agreement")
FRACTIONS = (0.02, 0.05, 0.1, 0.25)
SEEDS = (0, 1, 2)
TOP_SINGLE_UNITS = 8
CHUNK = 16  # ablations per evaluation: bounds the memory of the sites recorded under ablation


def validate(condition, run_dir, *, model=None, progress: bool = True) -> dict:
    """Validate the fitted reduced model of ``run_dir`` under every baseline of the condition."""
    condition = condition if isinstance(condition, Condition) else load_condition(condition)
    run_dir = Path(run_dir)
    with RunDir(run_dir) as run:
        model = open_model(condition) if model is None else model
        fit(condition, run_dir, model=model, progress=progress)
        key = fingerprint(condition.fingerprint("ablation"), run.stage_key("fit"))  # chained: a refit revalidates
        if run.is_done(STAGE, key, outputs=OUTPUTS):
            return json.loads((run_dir / "validation.json").read_text())
        run.forget(STAGE)
        summary = _validate(resolve(condition, model), run_dir, progress)
        run.mark_done(STAGE, key)
    return summary


def validation_plan(units: UnitTable, grouped: GroupedFeatures, circuit: xr.Dataset, baseline, seed: int) -> list[Ablation]:
    """Random subsets of the upstream units, whole synapse groups, the circuit, the strongest single units."""
    synapses = grouped.synapses_
    upstream = np.flatnonzero(synapses["upstream"].values)
    plan = [a for a in random_pruning(upstream, [baseline], fractions=FRACTIONS, seeds=SEEDS)]
    # A unit belongs to the group of its strongest synapse.
    strongest = synapses["weight"].values.argmax(axis=1)
    group_of = synapses["group"].values[np.arange(len(strongest)), strongest]
    distance = synapses["distance"].values
    groups = {f"{g}@{d}": upstream[(group_of[upstream] == g) & (distance[upstream] == d)] for g in np.unique(group_of[upstream]) for d in grouped.distances_}
    plan += unit_groups({name: rows for name, rows in groups.items() if rows.size}, [baseline], plan="groups")
    selected = np.unique(circuit["unit"].values[circuit["selected"].values])
    if selected.size:
        plan += unit_groups({"circuit": selected}, [baseline], plan="circuit")
    top = upstream[np.argsort(synapses["weight"].values[upstream].max(axis=1))[::-1][:TOP_SINGLE_UNITS]]
    plan += single_units(top, [baseline])
    return plan


def _validate(resolved, run_dir: Path, progress: bool) -> dict:
    condition, model, prompts = resolved.condition, resolved.model, resolved.prompts
    activations = xr.open_zarr(run_dir / "activations.zarr")
    stats = xr.load_dataset(run_dir / "stats.nc", engine="h5netcdf")
    grouped = GroupedFeatures.from_dataset(xr.load_dataset(run_dir / "feature_map.nc", engine="h5netcdf"))
    reduced = ReducedModel.load(run_dir / "reduced.nc")
    circuit = xr.load_dataset(run_dir / "circuit.nc", engine="h5netcdf")
    fitted = json.loads((run_dir / "fit.json").read_text())
    if not fitted["converged"]:
        raise ReduceError("the reduced model did not converge, so there is nothing to validate", file=run_dir / "fit.json", field="converged")
    _, test = split_prompts(condition, activations.sizes["prompt"])
    test = np.sort(test)
    clean = activations.isel(prompt=test).load()

    units = UnitTable.from_dataset(stats)
    source = BaselineSource(model, units, stats, seed=condition.seed, counterfactual_texts=prompts.counterfactuals)
    runner = AblationRunner(model, units)
    device = model.device
    answer_ids = None if prompts.answer_ids is None else torch.as_tensor(prompts.answer_ids)
    wrong_ids = None if prompts.wrong_ids is None else torch.as_tensor(prompts.wrong_ids)
    size = condition.record.batch_size
    parts = []
    for start in range(0, test.size, size):
        keys = test[start : start + size]
        answers = [None if ids is None else ids[keys].to(device) for ids in (answer_ids, wrong_ids)]
        measure = Measures((TargetMeasure(resolved.target, *answers), SitesMeasure(tuple(units.sites))))
        parts.append(PromptBatch(encode(model, [prompts.texts[k] for k in keys]).to(device), keys, measure))
    evaluation = Evaluation(runner, parts, source)
    is_bernoulli = reduced.family == "bernoulli"

    def predict(features):
        return reduced.decision_function(features) if is_bernoulli else reduced.predict(features)

    clean_features = grouped.transform(activations, prompts=test)
    clean_predicted = _per_prompt(predict(clean_features), clean_features, test)
    clean_actual = evaluation.clean["target"].astype(np.float64)

    records = []
    baselines = [b for b in condition_baselines(condition.ablation) if evaluation.supports(b)]
    for baseline in progress_bar(baselines, desc="validate", enabled=progress):
        offsets = _offsets_by_prompt(source, baseline, parts, clean, units)
        attributions = _attributions(model, parts, resolved.target, units, source, baseline, answer_ids, wrong_ids)
        plan = validation_plan(units, grouped, circuit, baseline, condition.seed)
        for start in range(0, len(plan), CHUNK):
            chunk = plan[start : start + CHUNK]
            outcome = evaluation.run(chunk)
            for i, ablation in enumerate(chunk):
                ablated = np.zeros(len(units), bool)
                ablated[list(ablation.units)] = True
                direct = grouped.transform(clean, replace=_ablation_replacement(ablated, offsets, units), prompts=np.arange(test.size))
                propagated = grouped.transform(_ablated_activations(clean, outcome, i, units), prompts=np.arange(test.size))
                records.append(
                    {
                        "ablation": ablation,
                        "actual": outcome["target"][i].astype(np.float64),
                        "direct": _per_prompt(predict(direct), direct, np.arange(test.size)),
                        "propagated": _per_prompt(predict(propagated), propagated, np.arange(test.size)),
                        "attribution_change": attributions[:, ablated].sum(axis=1),
                    }
                )
    dataset = _dataset(records, test, clean_actual, clean_predicted, condition)
    scores = _scores(dataset, is_bernoulli)
    summary = _summary(dataset, scores)
    # The per-ablation coordinates are named baseline and plan; the score table's dims get their own names.
    write_netcdf(dataset.assign(score=scores.rename(baseline="score_baseline", plan="score_plan")), run_dir / "validation.nc")
    write_json(run_dir / "validation.json", summary)
    _figures(dataset, scores, run_dir / "figures")
    return summary


def _per_prompt(values: np.ndarray, features: xr.Dataset, prompts: np.ndarray) -> np.ndarray:
    """Mean prediction over each prompt's target positions (one value for "last" targets)."""
    index = np.searchsorted(prompts, features["prompt"].values)
    totals = np.bincount(index, values, minlength=prompts.size)
    counts = np.bincount(index, minlength=prompts.size)
    return totals / np.maximum(counts, 1)


def _offsets_by_prompt(source: BaselineSource, baseline, parts, clean: xr.Dataset, units: UnitTable) -> dict[str, np.ndarray]:
    """Each unit site's offset as (prompt, pos, units) over the test prompts, or (units,) if constant."""
    per_site: dict[str, list] = {}
    for part in parts:
        for name, offset in source.offsets(baseline, part.batch, part.keys).items():
            per_site.setdefault(name, []).append(offset.detach().float().cpu().numpy())
    width = clean.sizes["pos"]
    out = {}
    for name, pieces in per_site.items():
        if pieces[0].ndim == 1:
            out[name] = pieces[0].astype(np.float64)
        else:
            padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=np.nan) for p in pieces]
            out[name] = np.concatenate(padded).astype(np.float64)
    return out


def _ablation_replacement(ablated: np.ndarray, offsets: dict[str, np.ndarray], units: UnitTable):
    """``replace`` for GroupedFeatures.transform: the ablation formula on clean activations."""

    def replace(site_name, prompts, values):
        site = next(s for s in units.sites if s.name == site_name)
        keep = 1.0 - units.scatter(ablated.astype(np.float64), site, values.shape[-1])
        offset = offsets[site_name]
        offset = offset[prompts, : values.shape[1]] if offset.ndim == 3 else offset
        return values * keep + np.nan_to_num(offset) * (1.0 - keep)

    return replace


def _ablated_activations(clean: xr.Dataset, outcome: dict, index: int, units: UnitTable) -> xr.Dataset:
    """The test prompts' activations recorded under ablation ``index``, laid out like activations.zarr."""
    width = clean.sizes["pos"]
    data = {}
    for site in units.sites:
        values = outcome[site.name][index]
        values = np.pad(values, ((0, 0), (0, width - values.shape[1]), (0, 0)), constant_values=np.nan)
        data[site.name] = (("prompt", "pos", f"{site.name}.unit"), values)
    target = outcome["target_by_pos"][index]
    data["target"] = (("prompt", "pos"), np.pad(target, ((0, 0), (0, width - target.shape[1])), constant_values=np.nan))
    return xr.Dataset({**data, "target_mask": clean["target_mask"], "length": clean["length"]})


def _attributions(model, parts, target, units, source, baseline, answer_ids, wrong_ids) -> np.ndarray:
    """(prompt, unit) attribution-patching estimates of every unit's ablation effect."""
    estimates = []
    for part in parts:
        offsets = source.offsets(baseline, part.batch, part.keys)
        answers = [None if ids is None else ids[part.keys].to(model.device) for ids in (answer_ids, wrong_ids)]
        estimates.append(attribute(model, part.batch, target, units, offsets, answer_ids=answers[0], wrong_ids=answers[1]).values)
    return np.concatenate(estimates)


def _dataset(records, test, clean_actual, clean_predicted, condition) -> xr.Dataset:
    ablations = [r["ablation"] for r in records]
    stack = lambda name: np.stack([r[name] for r in records])  # noqa: E731
    return xr.Dataset(
        {
            "actual": (("ablation", "prompt"), stack("actual")),
            "direct": (("ablation", "prompt"), stack("direct")),
            "propagated": (("ablation", "prompt"), stack("propagated")),
            "attribution_change": (("ablation", "prompt"), stack("attribution_change")),
            "clean_actual": ("prompt", clean_actual),
            "clean_predicted": ("prompt", clean_predicted),
        },
        coords={
            "prompt": test,
            "baseline": ("ablation", [a.baseline.value for a in ablations]),
            "plan": ("ablation", [a.plan for a in ablations]),
            "group": ("ablation", [a.group for a in ablations]),
            "fraction": ("ablation", [a.fraction for a in ablations]),
            "seed": ("ablation", [a.seed for a in ablations]),
            "n_units": ("ablation", [len(a.units) for a in ablations]),
        },
        attrs={"condition": condition.name},
    )


def changes(dataset: xr.Dataset) -> dict[str, xr.DataArray]:
    """Actual and predicted changes from the unablated run, per (ablation, prompt)."""
    return {
        "actual": dataset["actual"] - dataset["clean_actual"],
        "direct": dataset["direct"] - dataset["clean_predicted"],
        "propagated": dataset["propagated"] - dataset["clean_predicted"],
        "attribution": dataset["attribution_change"],
    }


def _scores(dataset: xr.Dataset, is_bernoulli: bool) -> xr.DataArray:
    """score (baseline, plan, predictor, metric); "all" pools the plans. R² needs a target-scale predictor."""
    change = changes(dataset)
    baselines = list(dict.fromkeys(dataset["baseline"].values.tolist()))
    plans = [*dict.fromkeys(dataset["plan"].values.tolist()), "all"]
    values = np.full((len(baselines), len(plans), len(PREDICTORS), len(METRICS)), np.nan)
    for b, baseline in enumerate(baselines):
        for p, plan in enumerate(plans):
            chosen = dataset["baseline"].values == baseline
            if plan != "all":
                chosen &= dataset["plan"].values == plan
            for k, predictor in enumerate(PREDICTORS):
                scores = score_changes(change["actual"].values[chosen], change[predictor].values[chosen])
                if is_bernoulli and predictor != "attribution":
                    scores["r2"] = math.nan  # the drive is on the logit scale, not the target's
                values[b, p, k] = [scores[m] for m in METRICS]
    return xr.DataArray(values, dims=("baseline", "plan", "predictor", "metric"), coords={"baseline": baselines, "plan": plans, "predictor": list(PREDICTORS), "metric": list(METRICS)})


def _summary(dataset: xr.Dataset, scores: xr.DataArray) -> dict:
    """Per baseline: faithfulness of each predictor (all plans pooled), the compensation gap, and
    how much the baseline moves the target (seed 004's question, asked of our reduced model)."""
    actual_change = np.abs(changes(dataset)["actual"])
    per_baseline = {}
    for baseline in scores["baseline"].values.tolist():
        pooled = scores.sel(baseline=baseline, plan="all")
        spearman = {p: _number(pooled.sel(predictor=p, metric="spearman")) for p in PREDICTORS}
        per_baseline[baseline] = {
            **{f"{p}_{m}": _number(pooled.sel(predictor=p, metric=m)) for p in PREDICTORS for m in METRICS},
            "compensation_gap": _difference(spearman["direct"], spearman["propagated"]),
            "mean_abs_target_change": float(actual_change.values[dataset["baseline"].values == baseline].mean()),
        }
    ranked = sorted((b for b in per_baseline if per_baseline[b]["propagated_spearman"] is not None), key=lambda b: -per_baseline[b]["propagated_spearman"])
    return {"baselines": per_baseline, "most_faithful_baseline": ranked[0] if ranked else None, "ablations": int(dataset.sizes["ablation"]), "test_prompts": int(dataset.sizes["prompt"])}


def _number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _difference(a, b):
    return None if a is None or b is None else a - b


def _figures(dataset: xr.Dataset, scores: xr.DataArray, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    out_dir.mkdir(parents=True, exist_ok=True)
    change = changes(dataset)
    frames = []
    for predictor in ("direct", "propagated"):
        frame = pd.DataFrame(
            {
                "actual change": change["actual"].values.ravel(),
                "predicted change": change[predictor].values.ravel(),
                "baseline": np.repeat(dataset["baseline"].values, dataset.sizes["prompt"]),
                "predictor": predictor,
            }
        )
        frames.append(frame)
    grid = sns.relplot(data=pd.concat(frames), x="actual change", y="predicted change", col="baseline", row="predictor", s=8, alpha=0.4, height=2.6, facet_kws={"sharey": False})
    grid.set_titles("{row_name} · {col_name}")
    grid.savefig(out_dir / "validation_scatter.png", dpi=110)
    plt.close(grid.figure)

    random = dataset["plan"].values == "random"
    rows = []
    for i in np.flatnonzero(random):
        for predictor in PREDICTORS:
            score = score_changes(change["actual"].values[i], change[predictor].values[i])
            rows.append({"baseline": dataset["baseline"].values[i], "fraction ablated": float(dataset["fraction"].values[i]), "predictor": predictor, "Spearman ρ": score["spearman"]})
    if rows:
        grid = sns.relplot(data=pd.DataFrame(rows), x="fraction ablated", y="Spearman ρ", hue="baseline", col="predictor", kind="line", marker="o", height=3, errorbar="sd")
        grid.savefig(out_dir / "validation_faithfulness.png", dpi=110)
        plt.close(grid.figure)
