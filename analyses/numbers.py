"""Every number the paper can cite, read from the runs into one flat ``{dotted.key: value}`` dict.

Keys are ``CONDITION.…`` for a condition's run (``sva.held_out``, ``sva.faithfulness.peak.propagated_spearman``),
``universality.KEY.…`` for the zoo comparison of condition KEY and ``anchor.…`` for the quoted neuroscience numbers
(:mod:`analyses.anchors`). Values are numbers or short strings (names, labels); the template
formats them. Everything here is a function of the run directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from reduce.report import RunFiles, baseline_label, metric_label, ordered_baselines, parameter_count, strings, target_description

from .anchors import ANCHORS
from .runs import CONDITIONS, UNIVERSALITY, PaperCondition


# What each control removes, as the text names it ("the costliest removal is the …").
CONTROL_NOUNS = {
    "no_history": "history term",
    "no_spatial": "spatial filter's shape",
    "no_temporal": "temporal filter's shape",
    "no_sign": "excitatory/inhibitory split",
}
FAMILY_WORDS = {
    "gaussian": "Gaussian (continuous-target)",
    "bernoulli": "Bernoulli (target-above-threshold)",
    "poisson": "Poisson (count-target)",
}


def flatten(prefix: str, value) -> dict:
    """``{"a": {"b": 1}}`` → ``{"prefix.a.b": 1}``; lists of scalars are kept whole."""
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}", inner))
        return out
    return {prefix: value}


def condition_numbers(condition: PaperCondition, run_dir: Path) -> dict:
    """The numbers of one condition's run."""
    from reduce.reduced import ReducedModel

    run = RunFiles(Path(run_dir))
    fit, validation = run.fit, run.validation
    reduced = ReducedModel.load(run.require("reduced.nc"))
    metric = fit["metric"]
    numbers = {
        "label": condition.label,
        "name": run.condition.name,
        "model": run.condition.model.name,
        "architecture": run.activations.attrs["family"],
        "layers": int(run.activations.attrs["n_layers"]),
        "units": int(run.stats.sizes["unit"]),
        "target": target_description(run.condition),
        "prompts": int(run.activations.sizes["prompt"]),
        "train_prompts": fit["train_prompts"],
        "test_prompts": fit["test_prompts"],
        "family": FAMILY_WORDS[fit["family"]],
        "metric": metric_label(metric),
        "held_out": fit["held_out"][metric] if fit["held_out"] else None,
        "held_out_low": fit["interval"][metric][0] if fit.get("interval") else None,
        "held_out_high": fit["interval"][metric][1] if fit.get("interval") else None,
        "interval_level": run.interval_level,
        "parameters": parameter_count(reduced),
        "converged": "converged" if fit["converged"] else "did not converge",
        "max_lag": run.condition.fit.max_lag,
        "history_lags": run.condition.fit.history_lags,
        "spatial_basis": run.condition.fit.spatial_basis,
        "temporal_basis": run.condition.fit.temporal_basis,
        "auroc": (thresholded_auroc(run, reduced) if metric != "auroc" else fit["held_out"]["auroc"]) if fit["held_out"] else None,
    }
    if run.condition.model.name.startswith("zoo:"):
        numbers.update(zoo_numbers(run.condition.model.name.removeprefix("zoo:")))
    numbers.update(flatten("separability", {str(g): float(v) for g, v in zip(reduced.separability_["group"].values, reduced.separability_.values)}))
    numbers.update(control_numbers(fit))
    numbers.update(flatten("circuit", {key: fit["circuit"][key] for key in ("candidates", "selected_synapses", "selected_units")}))
    numbers["circuit.held_out"] = (fit["circuit"].get("held_out") or {}).get(metric)
    if validation is not None:
        numbers.update(faithfulness_numbers(validation))
    if run.ablations is not None and "random" in strings(run.ablations["plan"]):
        from reduce.ablate import degradation_table

        numbers.update(degradation_numbers(degradation_table(run.ablations)))
    return {f"{condition.key}.{key}": value for key, value in numbers.items()}


def zoo_numbers(name: str) -> dict:
    """A zoo model's size and its held-out task metrics from its card (what the model can do before it is reduced)."""
    from reduce.zoo import read_card

    card = read_card(name)
    return {"zoo.parameters": card["parameters"], **flatten("zoo.metrics", card["metrics"])}


def control_numbers(fit: dict) -> dict:
    """Each control's held-out metric and drop, and which control costs most."""
    numbers = {}
    for name, control in fit["controls"].items():
        numbers[f"control.{name}.metric"] = control["metric"]
        numbers[f"control.{name}.drop"] = control["drop"]
        numbers[f"control.{name}.deviance_drop"] = control["deviance_drop"]
    # ranked by deviance explained: the primary metric can saturate (an AUROC of 1.0 for every control)
    largest = max(fit["controls"], key=lambda name: fit["controls"][name]["deviance_drop"])
    numbers["control.largest"] = CONTROL_NOUNS[largest]
    numbers["control.largest_drop"] = fit["controls"][largest]["drop"]
    numbers["control.largest_deviance_drop"] = fit["controls"][largest]["deviance_drop"]
    return numbers


def faithfulness_numbers(validation: dict) -> dict:
    """Per baseline every validation score; the means over baselines; the most faithful baselines."""
    baselines = ordered_baselines(validation["baselines"])
    numbers = {"validation.ablations": validation["ablations"], "validation.baselines": len(baselines)}
    for baseline in baselines:
        numbers.update(flatten(f"faithfulness.{baseline}", validation["baselines"][baseline]))
        numbers[f"faithfulness.{baseline}.label"] = baseline_label(baseline)
    for predictor in ("direct", "propagated", "attribution"):
        values = [validation["baselines"][b][f"{predictor}_spearman"] for b in baselines]
        finite = [v for v in values if v is not None]
        numbers[f"faithfulness.average.{predictor}_spearman"] = float(np.mean(finite)) if finite else None
        best = max((b for b in baselines if validation["baselines"][b][f"{predictor}_spearman"] is not None), key=lambda b: validation["baselines"][b][f"{predictor}_spearman"], default=None)
        numbers[f"faithfulness.best.{predictor}"] = baseline_label(best) if best else None
        numbers[f"faithfulness.best.{predictor}_spearman"] = validation["baselines"][best][f"{predictor}_spearman"] if best else None
    gaps = [validation["baselines"][b]["compensation_gap"] for b in baselines if validation["baselines"][b]["compensation_gap"] is not None]
    numbers["faithfulness.average.compensation_gap"] = float(np.mean(gaps)) if gaps else None
    best = validation.get("most_faithful_baseline")
    numbers["most_faithful"] = baseline_label(best) if best else None
    return numbers


def degradation_numbers(table) -> dict:
    """Seed 004's Table 2 cells as ``degradation.METRIC.LEVEL.BASELINE`` (LEVEL: ``clean``, ``50``, ``90``),
    plus ``….best``, the label of the least degrading baseline per metric and pruning level.

    ``table``: :func:`reduce.ablate.degradation_table` of one model (metric, pruning, baseline, mean, sd).
    """
    from reduce.ablate import DEGRADATION_METRICS
    from reduce.baselines import Baseline

    higher_is_better = {label: better for label, better in DEGRADATION_METRICS.values()}
    metric_key = {label: name for name, (label, _) in DEGRADATION_METRICS.items()}
    baseline_key = {b.label: b.value for b in Baseline}
    numbers = {}
    for (metric, pruning), rows in table.groupby(["metric", "pruning"], sort=False):
        prefix = f"degradation.{metric_key[metric]}.{'clean' if pruning == 'Baseline' else pruning.split('%')[0]}"
        if pruning == "Baseline":
            numbers[prefix] = float(rows["mean"].iloc[0])
            continue
        for row in rows.itertuples():
            numbers[f"{prefix}.{baseline_key[row.baseline]}"] = float(row.mean)
            numbers[f"{prefix}.{baseline_key[row.baseline]}.sd"] = float(row.sd)
        best = rows["mean"].idxmax() if higher_is_better[metric] else rows["mean"].idxmin()
        numbers[f"{prefix}.best"] = rows.loc[best, "baseline"]
    return numbers


def thresholded_auroc(run: RunFiles, reduced) -> float:
    """Held-out AUROC of a continuous reduced model's predictions for "target above threshold".

    The threshold is the one a Bernoulli fit of the same condition would use (:func:`reduce.fit.bernoulli_threshold`
    on the training prompts), so the number is scored as seed 003 scored spikes.
    """
    from sklearn.metrics import roc_auc_score

    from reduce.features import GroupedFeatures
    from reduce.fit import bernoulli_threshold, split_prompts

    features = GroupedFeatures.from_dataset(run.feature_map).transform(run.activations.load())
    train, _ = split_prompts(run.condition, run.activations.sizes["prompt"])
    is_train = np.isin(features["prompt"].values, train)
    target = features["target"].values
    threshold = bernoulli_threshold(run.condition, target[is_train])
    test = features.isel(sample=~is_train)
    return float(roc_auc_score(target[~is_train] > threshold, reduced.predict(test)))


def universality_numbers(key: str, directory: Path) -> dict:
    """``universality.json`` of condition ``key`` flattened under ``universality.KEY``, plus counts and ranges over the models."""
    prefix = f"universality.{key}"
    headline = json.loads((Path(directory) / "universality.json").read_text())
    numbers = flatten(prefix, {name: value for name, value in headline.items() if name not in ("models", "per_model", "condition")})
    per_model = headline["per_model"]
    held_out = [row["held_out"] for row in per_model.values() if row["held_out"] is not None]
    summary = {
        "condition": headline["condition"],
        "metric": metric_label(headline["metric"]),
        "models": len(headline["models"]),
        "model_list": ", ".join(headline["models"]),
        "architectures": len({row["architecture"] for row in per_model.values()}),
        "architecture_list": ", ".join(sorted({row["architecture"] for row in per_model.values()})),
        "converged": len(held_out),
        "held_out_min": min(held_out) if held_out else None,
        "held_out_max": max(held_out) if held_out else None,
        "layers_min": min(row["layers"] for row in per_model.values()),
        "layers_max": max(row["layers"] for row in per_model.values()),
    }
    numbers.update({f"{prefix}.{name}": value for name, value in summary.items()})
    return numbers


def relation(value, reference, digits: int = 2) -> str | None:
    """How ``value`` compares with ``reference`` at the precision the text quotes: "above", "below" or "level with"."""
    if value is None or reference is None:
        return None
    value, reference = round(float(value), digits), round(float(reference), digits)
    return "above" if value > reference else "below" if value < reference else "level with"


def comparisons(numbers: dict) -> dict:
    """The words the text needs where it compares two numbers, so that a claim follows its numbers."""
    words = {}
    for condition in CONDITIONS:
        key = condition.key
        words[f"{key}.compare.auroc_anchor"] = relation(numbers.get(f"{key}.auroc"), numbers["anchor.auroc"])
        for predictor in ("attribution", "direct"):
            words[f"{key}.compare.{predictor}_propagated"] = relation(
                numbers.get(f"{key}.faithfulness.average.{predictor}_spearman"), numbers.get(f"{key}.faithfulness.average.propagated_spearman")
            )
    for condition in UNIVERSALITY:
        prefix = f"universality.{condition.key}"
        if f"{prefix}.similarity.mean_cross_model_halves" in numbers:
            words[f"{prefix}.compare.cross_model_ceiling"] = relation(numbers[f"{prefix}.similarity.mean_cross_model_halves"], numbers[f"{prefix}.similarity.mean_ceiling"])
    return words


def collect_numbers(run_dirs: dict[str, Path], universality_dirs: dict[str, Path]) -> dict:
    """Anchors, every condition's numbers, the universality comparisons and the comparisons' words, sorted by key."""
    numbers = dict(ANCHORS)
    for condition in CONDITIONS:
        numbers.update(condition_numbers(condition, run_dirs[condition.key]))
    for key, directory in universality_dirs.items():
        numbers.update(universality_numbers(key, directory))
    numbers.update(comparisons(numbers))
    return {key: to_plain(numbers[key]) for key in sorted(numbers)}


def to_plain(value):
    """JSON-ready: numpy scalars as Python numbers, NaN as None."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    return value

