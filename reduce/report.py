"""The run report: one run directory as a Markdown file and a self-contained HTML page.

:func:`write_report` reads only what the stages wrote into the run directory and writes
``report.md`` (figures linked by relative path, readable on a code host) and ``report.html``
(the same text, figures embedded as base64 PNG, inline CSS, no external assets). Sections:

1. the condition (model, target, prompts, sites);
2. the reduced model: held-out accuracy with bootstrap intervals, the controls' drops, the
   filters (seed 003's figures);
3. the unit-level circuit (``circuit.nc``);
4. the ablation baselines in seed 004's Table 2 / Figure 2 layout, and attribution-ranked circuits;
5. counterfactual validation per baseline: direct, propagated and attribution predictions;
6. neuron analysis of the three strongest circuit units (seed 001, :func:`reduce.inspect.inspect_unit`);
7. timings (``timings.json``): the only part that changes between identical runs.

Everything else is a function of the run's files, so the same run gives byte-identical reports.
:func:`markdown_to_html` is the page builder the paper (``analyses/``) reuses.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import xarray as xr

from .errors import ReduceError
from .store import atomic_write, reading

REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"
FIGURES = "figures"
TOP_UNITS = 3  # circuit units given a neuron analysis
TOP_SYNAPSES = 15  # circuit synapses listed
TOP_CONTEXTS = 5  # highlighted prompts per analysed unit
CIRCUIT_RESTORES = 0.9  # the faithfulness a circuit must reach to count as restoring the task

# The filter figures, laid out in rows (small figures side by side).
FILTER_FIGURES = (
    (
        ("spatial.png", "spatial filter s_g over layer distance, per group (scale and sign), with block-bootstrap bands"),
        ("temporal.png", "temporal filter t_g over token lag, per group (unit norm)"),
    ),
    (("filter.png", "full filter F_g(distance, lag) = s_g(distance) · t_g(lag), per group"),),
    (
        ("history.png", "history filter: weight of the target's own value at earlier positions (seed 003's post-spike term)"),
        ("nonlinearity.png", "output nonlinearity: the GLM link against the empirical mean target per drive bin (training prompts)"),
    ),
)
CONTROLS = {
    "no_history": "history term removed",
    "no_spatial": "flat spatial filter (one weight for every layer distance)",
    "no_temporal": "flat temporal filter (one weight for every lag)",
    "no_sign": "excitatory and inhibitory synapses merged into one group",
}
PREDICTORS = {
    "direct": "reduced model, only the ablated units' features changed",
    "propagated": "reduced model fed the upstream activations recorded under the ablation",
    "attribution": "gradient attribution, Σ (baseline − activation) · ∂target/∂activation",
}


# ----------------------------------------------------------------------------------------------
# Entry point


def write_report(run_dir) -> tuple[Path, Path]:
    """Write ``RUN_DIR/report.md`` and ``RUN_DIR/report.html``; return their paths (html, md).

    Needs at least ``condition.toml``, ``activations.zarr``, ``stats.nc`` and the fit stage's
    outputs; sections whose stage did not run (no ``ablations.zarr``, no ``validation.json``)
    say so. The ablation figure and the neuron analyses are written on the way, into
    ``RUN_DIR/figures/`` and ``RUN_DIR/inspect/``.
    """
    run = RunFiles(Path(run_dir))
    text = report_markdown(run)
    page = markdown_to_html(text, base_dir=run.path, title=report_title(run))
    markdown_path, html_path = run.path / REPORT_MARKDOWN, run.path / REPORT_HTML
    with atomic_write(markdown_path) as handle:
        handle.write(text)
    with atomic_write(html_path) as handle:
        handle.write(page)
    return html_path, markdown_path


@dataclass
class RunFiles:
    """The files of one run directory, read on first use."""

    path: Path

    def require(self, name: str) -> Path:
        file = self.path / name
        if not file.exists():
            raise ReduceError(f"the report needs {name}; run the stage that writes it first (`reduce run`)", file=self.path, field=name)
        return file

    def json(self, name: str) -> dict | None:
        file = self.path / name
        if not file.exists():
            return None
        with reading(file, name):
            return json.loads(file.read_text())

    @cached_property
    def condition(self):
        from .condition import load_condition

        return load_condition(self.require("condition.toml"))

    @cached_property
    def fit(self) -> dict:
        self.require("fit.json")
        return self.json("fit.json")

    @cached_property
    def validation(self) -> dict | None:
        return self.json("validation.json")

    @cached_property
    def timings(self) -> dict | None:
        return self.json("timings.json")

    @cached_property
    def activations(self) -> xr.Dataset:
        with reading(self.require("activations.zarr"), "record"):
            return xr.open_zarr(self.path / "activations.zarr")

    def netcdf(self, name: str) -> xr.Dataset:
        with reading(self.require(name), name):
            return xr.load_dataset(self.path / name, engine="h5netcdf")

    @cached_property
    def stats(self) -> xr.Dataset:
        return self.netcdf("stats.nc")

    @cached_property
    def circuit(self) -> xr.Dataset:
        return self.netcdf("circuit.nc")

    @cached_property
    def feature_map(self) -> xr.Dataset:
        return self.netcdf("feature_map.nc")

    @cached_property
    def ablations(self) -> xr.Dataset | None:
        path = self.path / "ablations.zarr"
        if not path.is_dir():
            return None
        with reading(path, "ablate"):
            return xr.open_zarr(path)

    @cached_property
    def validation_scores(self) -> xr.DataArray | None:
        if not (self.path / "validation.nc").exists():
            return None
        return self.netcdf("validation.nc")["score"]

    @cached_property
    def interval_level(self) -> float | None:
        """The confidence level of fit.json's bootstrap intervals (``bootstrap.nc``), None without a bootstrap."""
        if not (self.path / "bootstrap.nc").exists():
            return None
        return float(self.netcdf("bootstrap.nc").attrs["level"])

    def figure(self, name: str) -> Path | None:
        path = self.path / FIGURES / name
        return path if path.exists() else None


def report_title(run: RunFiles) -> str:
    return f"Reduced model of {target_description(run.condition)} in {run.condition.model.name}"


def report_markdown(run: RunFiles) -> str:
    """The whole report as Markdown, figures referenced relative to the run directory."""
    sections = [
        ("Condition", condition_section(run)),
        ("Reduced model", reduced_model_section(run)),
        ("Unit-level circuit", circuit_section(run)),
        ("Ablation baselines", ablation_section(run)),
        ("Counterfactual validation", validation_section(run)),
        ("Neuron analysis", neuron_section(run)),
        ("Timings", timings_section(run)),
    ]
    lines = [f"# {escape_markdown(report_title(run))}", "", f"Condition `{run.condition.name}`: {escape_markdown(run.condition.description)}", ""]
    lines += headline_lines(run)
    lines += ["", "Contents: " + " · ".join(f"[{title}](#{slug(title)})" for title, _ in sections), ""]
    for title, body in sections:
        lines += [f"## {title}", "", *body, ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# Sections


def target_description(condition) -> str:
    target = condition.target
    if target.kind == "neuron":
        return f"{target.site} unit {target.unit}"
    return {"logit": "the answer logit", "logit_diff": "the answer − wrong logit difference"}[target.kind]


def held_out_text(fit: dict, level: float | None) -> str:
    """``held-out R² = 0.935 (95% CI 0.894–0.953, 130 held-out prompts)``, or why there is none."""
    metric = fit["metric"]
    if fit["held_out"] is None:
        return f"no held-out {metric_label(metric)}: the reduced model did not converge"
    value = fit["held_out"][metric]
    interval = (fit.get("interval") or {}).get(metric)
    spread = f"{level:.0%} CI {number(interval[0])}–{number(interval[1])}, " if interval and level else ""
    return f"held-out {metric_label(metric)} = {number(value)} ({spread}{fit['test_prompts']} held-out prompts)"


def headline_lines(run: RunFiles) -> list[str]:
    fit = run.fit
    lines = [f"- **Reduced model**: {held_out_text(fit, run.interval_level)}."]
    circuit = fit["circuit"]
    lines.append(f"- **Circuit**: {circuit['selected_synapses']} of {circuit['candidates']} candidate synapses selected, on {circuit['selected_units']} units.")
    if run.validation and run.validation.get("most_faithful_baseline"):
        best = run.validation["most_faithful_baseline"]
        rho = run.validation["baselines"][best]["propagated_spearman"]
        lines.append(f"- **Most faithful baseline**: {baseline_label(best)} (propagated Spearman ρ = {number(rho)} between predicted and actual ablation effects).")
    return lines


def condition_section(run: RunFiles) -> list[str]:
    condition, fit = run.condition, run.fit
    sites = list(dict.fromkeys(strings(run.stats["site"])))
    target = condition.target
    rows = [
        ("name", f"`{condition.name}`"),
        ("model", f"`{condition.model.name}` ({run.activations.attrs['family']}, {run.activations.attrs['n_layers']} layers)"),
        ("target", f"{escape_markdown(target_description(condition))} ({target.kind}, position {target.position})"),
        ("prompts", f"{run.activations.sizes['prompt']} ({fit['train_prompts']} train, {fit['test_prompts']} test, split by prompt)"),
        ("recorded sites", f"{len(sites)} sites ({', '.join(f'`{p}`' for p in condition.record.sites)}), {run.stats.sizes['unit']} units"),
        ("reduced model", f"{fit['family']} GLM, features as deviations from each unit's {condition.fit.deviation_from}, lags up to {condition.fit.max_lag}, {condition.fit.history_lags} history lags"),
        ("seed", str(condition.seed)),
    ]
    if fit.get("threshold") is not None:
        rows.append(("threshold", f"target > {number(fit['threshold'])} counts as firing (firing rate {number(fit['firing_rate'])})"))
    return [markdown_table(["field", "value"], rows, align="ll")]


def reduced_model_section(run: RunFiles) -> list[str]:
    from .reduced import ReducedModel

    fit, spec = run.fit, run.condition.fit
    reduced = ReducedModel.load(run.require("reduced.nc"))
    groups = strings(reduced.filter_["group"])
    lines = [
        f"{capitalised(held_out_text(fit, run.interval_level))}; {fit['train_samples']} training samples, penalty α = {number(fit['alpha'], 3, scientific=True)}"
        + ("" if fit["converged"] else "; **the fit did not converge**")
        + ".",
        "",
        f"Synapses (unit × lag) are grouped by sign ({', '.join(groups)}), layer distance and token lag; each group's filter "
        + (
            f"is a spatial filter over layer distance ({spec.spatial_basis or 'one weight per distance'} log raised-cosine functions) "
            f"times a temporal filter over lag ({spec.temporal_basis or 'one weight per lag'})"
            if reduced.structure == "separable"
            else f"is a full distance × lag grid in the product of the spatial ({spec.spatial_basis or 'identity'}) and temporal ({spec.temporal_basis or 'identity'}) bases"
        )
        + f": {parameter_count(reduced)} parameters in all, history and intercept included. "
        "Share of each group's full filter in its rank-1 (separable) part: "
        + ", ".join(f"{group} {number(float(value))}" for group, value in zip(groups, reduced.separability_.values))
        + ".",
        "",
        "Controls: the same model refitted with one part removed, scored on the same held-out prompts.",
        "",
    ]
    metric = metric_label(fit["metric"])
    rows = [
        (f"`{name}`", CONTROLS.get(name, name), number(control["metric"]), signed(control["drop"]), signed(control["deviance_drop"]), "yes" if control["converged"] else "no")
        for name, control in fit["controls"].items()
    ]
    lines += [markdown_table(["control", "what is removed", f"held-out {metric}", "drop", "drop in deviance explained", "converged"], rows, align="llrrrl"), ""]
    for row in FILTER_FIGURES:
        lines += figure_row_lines([(f"{FIGURES}/{name}", caption) for name, caption in row if run.figure(name)])
    return lines


def parameter_count(reduced) -> int:
    """Free parameters of the separable reduced model: per group the spatial and temporal basis
    weights, plus the history lags and the intercept."""
    groups, distances, lags = reduced.filter_.shape
    spatial = getattr(reduced.spatial_basis, "n_basis", distances)
    temporal = getattr(reduced.temporal_basis, "n_basis", lags)
    per_group = spatial * temporal if reduced.structure == "full" else spatial + temporal
    history = 0 if reduced.history_filter_ is None else reduced.history_filter_.size
    return groups * per_group + history + 1


def circuit_synapses(circuit: xr.Dataset) -> "pandas.DataFrame":  # noqa: F821
    """Selected synapses of the unit-level GLM, strongest |coef| first: site, index, layer, kind, lag, coef, unit."""
    import pandas as pd

    chosen = circuit.isel(synapse=np.flatnonzero(circuit["selected"].values))
    frame = pd.DataFrame({name: chosen[name].values for name in ("site", "index", "layer", "kind", "lag", "unit")})
    frame["coef"] = chosen["coef"].values
    frame["site"] = frame["site"].astype(str)
    frame["kind"] = frame["kind"].astype(str)
    return frame.iloc[np.argsort(-np.abs(frame["coef"].values), kind="stable")].reset_index(drop=True)


def circuit_section(run: RunFiles) -> list[str]:
    fit = run.fit["circuit"]
    metric = run.fit["metric"]
    held_out = fit["held_out"].get(metric) if fit.get("held_out") else None
    lines = [
        f"A sparse GLM over single synapses (the {fit['candidates']} strongest unit × lag candidates, ranked by gradient weight × unit spread) "
        f"selected {fit['selected_synapses']} synapses on {fit['selected_units']} units; held-out {metric_label(metric)} = {number(held_out)}.",
        "",
    ]
    synapses = circuit_synapses(run.circuit)
    if synapses.empty:
        return lines + ["The penalty chosen by cross-validation removed every synapse: no unit-level circuit to list."]
    rows = [(f"`{row.site}`", row.index, row.layer, row.kind, row.lag, signed(row.coef, 4)) for row in synapses.head(TOP_SYNAPSES).itertuples()]
    lines.append(markdown_table(["site", "unit", "layer", "kind", "lag", "coefficient"], rows, align="lrrlrr"))
    if len(synapses) > TOP_SYNAPSES:
        lines += ["", f"The {len(synapses) - TOP_SYNAPSES} further synapses are in `circuit.nc`."]
    return lines


def ablation_section(run: RunFiles) -> list[str]:
    from .ablate import degradation_markdown, degradation_table, plot_degradation

    ablations = run.ablations
    if ablations is None:
        return ["The ablation stage did not run: no `ablations.zarr`."]
    plans = set(strings(ablations["plan"]))
    lines = [baseline_legend(dict.fromkeys(strings(ablations["baseline"]))), ""]
    if "random" in plans:
        lines += [
            "Random pruning as in seed 004: a random fraction of all recorded units is set to each baseline, on held-out text; "
            "mean ± sd over seeds (top-1 accuracy in percent, best baseline in bold).",
            "",
            degradation_markdown(degradation_table(ablations)).rstrip(),
            "",
        ]
        plot_degradation(ablations, run.path / FIGURES / "degradation.png")
        lines += figure_lines(f"{FIGURES}/degradation.png", "Seed 004's Figure 2 for this model: held-out metrics against the fraction of units pruned, one line per baseline (± sd over seeds).")
    else:
        lines += ["No random-pruning plan was run (`ablation.plans`), so there is no seed 004 table.", ""]
    if {"circuit", "circuit_complement"} <= plans:
        lines += circuit_curve_lines(ablations)
    return lines


def restoring_circuits(ablations: xr.Dataset) -> tuple[str, dict[str, dict]]:
    """Per baseline, the smallest attribution-ranked circuit with faithfulness ≥ :data:`CIRCUIT_RESTORES`.

    Returns (the task metric scored, ``{baseline: {"size", "faithfulness", "completeness"}}``);
    size None when no circuit short of every unit restores the task.
    """
    from .circuits import circuit_table

    metric = "logit_diff" if "logit_diff" in ablations else "target"
    curves = circuit_table(ablations, metric=metric)
    found = {}
    for baseline in strings(curves["baseline"]):
        curve = curves.sel(baseline=baseline)
        # the largest "circuit" keeps every candidate unit: faithful by definition, so it does not count
        short = curve["size"].values < curve["size"].values.max()
        restoring = np.flatnonzero((curve["faithfulness"].values >= CIRCUIT_RESTORES) & short)
        first = restoring[0] if restoring.size else None
        found[baseline] = {
            "size": None if first is None else int(curve["size"].values[first]),
            "faithfulness": None if first is None else float(curve["faithfulness"].values[first]),
            "completeness": None if first is None else float(curve["completeness"].values[first]),
        }
    return metric, found


def circuit_curve_lines(ablations: xr.Dataset) -> list[str]:
    """Per baseline: the smallest attribution-ranked circuit that restores the task, and what is left without it."""
    metric, found = restoring_circuits(ablations)
    rows = [(baseline_label(b), "none short of every unit" if c["size"] is None else c["size"], number(c["faithfulness"]), number(c["completeness"])) for b, c in found.items()]
    return [
        f"Attribution-ranked circuits: the top-n units by attribution are kept and every other unit is ablated to the baseline. "
        f"Faithfulness (m(C) − m(∅)) / (m(M) − m(∅)) of the {metric} on the condition's prompts; completeness is the same ratio with the circuit ablated instead.",
        "",
        markdown_table(["baseline", f"smallest circuit with faithfulness ≥ {CIRCUIT_RESTORES:g}", "faithfulness", "completeness"], rows, align="lrrr"),
    ]


def faithfulness_rows(validation: dict) -> list[tuple]:
    """Rows (baseline, predictor) of ``validation.json``: Spearman ρ, sign agreement and R² of the predicted
    against the actual changes; the baseline's compensation gap and mean |actual change| on its first row."""
    rows = []
    for baseline in ordered_baselines(validation["baselines"]):
        scores = validation["baselines"][baseline]
        for index, predictor in enumerate(PREDICTORS):
            shared = (signed(scores["compensation_gap"]), number(scores["mean_abs_target_change"])) if index == 0 else ("", "")
            label = baseline_label(baseline) if index == 0 else ""
            rows.append((label, predictor, *(number(scores[f"{predictor}_{metric}"]) for metric in ("spearman", "sign_agreement", "r2")), *shared))
    return rows


FAITHFULNESS_HEADER = ["baseline", "predictor", "Spearman ρ", "sign agreement", "R²", "compensation gap", "mean abs. target change"]


def validation_section(run: RunFiles) -> list[str]:
    validation = run.validation
    if validation is None:
        return ["The validation stage did not run: no `validation.json`."]
    lines = [
        f"For each baseline, {validation['ablations']} ablations (random subsets of the upstream units, whole synapse groups, the circuit, "
        f"the strongest single units) on the {validation['test_prompts']} held-out prompts. Each predictor's change of the target is compared "
        "with the network's actual change:",
        "",
        *(f"- **{name}**: {text};" for name, text in PREDICTORS.items()),
        "",
        "The compensation gap is direct − propagated Spearman ρ: how much of the network's response comes from downstream units "
        "reacting to the ablation (seed 000). R² is undefined (–) where the reduced model predicts on the logit scale (Bernoulli).",
        "",
        markdown_table(FAITHFULNESS_HEADER, faithfulness_rows(validation), align="llrrrrr"),
        "",
    ]
    best = validation.get("most_faithful_baseline")
    if best:
        lines += [f"**Most faithful baseline: {baseline_label(best)}** — the reduced model fed propagated activations tracks the network best under it.", ""]
    scores = run.validation_scores
    if scores is not None:
        plans = strings(scores["score_plan"])
        rows = [
            (baseline_label(b), *(number(float(scores.sel(score_baseline=b, score_plan=p, predictor="propagated", metric="spearman"))) for p in plans))
            for b in strings(scores["score_baseline"])
        ]
        lines += ["Propagated Spearman ρ by ablation plan:", "", markdown_table(["baseline", *plans], rows, align="l" + "r" * len(plans)), ""]
    captions = {
        "validation_scatter.png": "Predicted against actual change of the target per ablation and prompt: one column per baseline, direct and propagated predictions in rows.",
        "validation_faithfulness.png": "Spearman ρ of predicted and actual changes against the fraction of upstream units ablated at random, per predictor and baseline.",
    }
    for name, caption in captions.items():
        if run.figure(name):
            lines += figure_lines(f"{FIGURES}/{name}", caption)
    return lines


def important_units(run: RunFiles, n: int = TOP_UNITS) -> tuple[list[int], str]:
    """The ``n`` most important units (global unit indices) and how they were ranked.

    The circuit's units, strongest first as :func:`reduce.universality.circuit_units` ranks them;
    when the circuit has fewer than ``n``, the rest are the strongest remaining synapse candidates
    by gradient weight × unit spread, the ranking the circuit's candidates were drawn by.
    """
    from .universality import circuit_units

    chosen = circuit_units(run.circuit, run.feature_map)[:n].tolist()
    ranking = f"the circuit's {len(chosen)} strongest unit{'' if len(chosen) == 1 else 's'} by Σ |coefficient| × unit spread"
    if len(chosen) < n:
        synapses = run.feature_map
        strength = (synapses["weight"].values * synapses["spread"].values[:, None]).max(axis=1)
        strength[~synapses["upstream"].values] = 0.0
        filled = [int(u) for u in np.argsort(-strength, kind="stable") if strength[u] > 0 and u not in chosen][: n - len(chosen)]
        by_candidates = "the upstream units with the largest gradient weight × unit spread (the ranking the circuit's candidates are drawn by)"
        if not chosen:
            ranking = f"the circuit selected no unit, so {by_candidates}"
        elif filled:
            ranking = f"{ranking}, then {by_candidates}"
        chosen += filled
    return chosen, ranking


def neuron_section(run: RunFiles) -> list[str]:
    from .inspect import inspect_unit

    units, ranking = important_units(run)
    if not units:
        return ["No upstream unit carries weight in the reduced model, so there is no unit to analyse."]
    table = run.stats
    synapses = circuit_synapses(run.circuit)
    lines = [
        f"The {len(units)} most important units: {ranking}. For each, its top-activating tokens over every recorded prompt (highlighted) "
        "and its activation histogram with zero, mean and peak marked (seed 004's Figure 1).",
        "",
    ]
    for unit in units:
        site, index = str(table["site"].values[unit]), int(table["index"].values[unit])
        layer, kind = int(table["layer"].values[unit]), str(table["kind"].values[unit])
        report = inspect_unit(run.path, site, index)
        own = synapses[synapses["unit"] == unit]
        role = "; in the circuit at " + ", ".join(f"lag {row.lag} (coefficient {signed(row.coef, 4)})" for row in own.itertuples()) if len(own) else ""
        summary = report.summary
        lines += [
            f"### `{site}` unit {index}",
            "",
            f"Layer {layer} {'MLP neuron' if kind == 'mlp' else 'attention pre-out unit'}{role}. Over {summary['tokens']} tokens: mean {number(summary['mean'])}, "
            f"sd {number(summary['std'])}, range {number(summary['min'])} to {number(summary['max'])}, peak {number(summary['peak'])} (naive {number(summary['peak_naive'])}).",
            "",
            markdown_table(["activation", "prompt (token highlighted)"], [(number(row.value), highlighted(row.context)) for row in report.top.head(TOP_CONTEXTS).itertuples()], align="rl"),
            "",
            *figure_lines(Path(report.files[2]).relative_to(run.path).as_posix(), f"Activation histogram of {site} unit {index}."),
        ]
    return lines


def timings_section(run: RunFiles) -> list[str]:
    timings = run.timings
    if not timings:
        return ["No `timings.json` in this run directory."]
    rows = [(name, f"{float(seconds):.1f}") for name, seconds in timings.items()]
    return ["Wall-clock seconds per stage of the run that wrote `timings.json` (the only part of this report that varies between identical runs).", "", markdown_table(["stage", "seconds"], rows, align="lr")]


# ----------------------------------------------------------------------------------------------
# Markdown helpers


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~])")
_HIGHLIGHT = re.compile(r"\[\[(.*?)\]\]")


def strings(array) -> list[str]:
    """An array's values as Python strings (zarr hands back numpy's variable-width StringDType)."""
    return [str(value) for value in np.asarray(array).ravel().tolist()]


def escape_markdown(text: str) -> str:
    """Text that Markdown shows literally (also inside table cells)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def highlighted(context: str) -> str:
    """An :func:`~reduce.inspect.inspect_unit` context, its ``[[token]]`` as ``<mark>token</mark>``, the rest escaped."""
    parts = _HIGHLIGHT.split(str(context))
    # split() alternates plain text and the captured highlights
    return "".join(f"<mark>{escape_markdown(part)}</mark>" if i % 2 else escape_markdown(part) for i, part in enumerate(parts))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], *, align: str | None = None) -> str:
    """A pipe table; ``align`` is one letter per column, ``l`` or ``r``."""
    header = [str(h) for h in header]
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} letters for {len(header)} columns")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for row in rows:
        cells = [str(cell) for cell in row]
        if len(cells) != len(header):
            raise ValueError(f"a row has {len(cells)} cells for {len(header)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure_lines(path: str, caption: str) -> list[str]:
    """A figure (path relative to the document) and its caption, as Markdown paragraphs."""
    return figure_row_lines([(path, caption)])


def figure_row_lines(figures: Sequence[tuple[str, str]]) -> list[str]:
    """Figures side by side (one paragraph of images; the HTML page tiles them) and one caption naming each."""
    if not figures:
        return []
    images = " ".join(f"![{escape_markdown(caption)}]({path})" for path, caption in figures)
    if len(figures) == 1:
        caption = figures[0][1]
    else:
        places = ("Left", "right") if len(figures) == 2 else [f"({chr(ord('a') + i)})" for i in range(len(figures))]
        caption = "; ".join(f"{place}: {text}" for place, (_, text) in zip(places, figures))
    caption = caption[0].upper() + caption[1:]
    return [images, "", f"*{escape_markdown(caption.rstrip('.'))}.*", ""]


def number(value, digits: int = 3, *, scientific: bool = False) -> str:
    """A number for the text: ``digits`` decimals (or significant digits in scientific form); – for none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if scientific:
        return f"{float(value):.{digits - 1}e}"
    return f"{float(value):.{digits}f}"


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def signed(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{float(value):+.{digits}f}"


def metric_label(metric: str) -> str:
    return {"r2": "R²", "auroc": "AUROC", "deviance_explained": "deviance explained"}.get(metric, metric)


def baseline_label(baseline: str) -> str:
    """Seed 004's name of a baseline (RS2 for ``resample_tokens``); :func:`baseline_legend` maps them back."""
    from .baselines import Baseline

    return Baseline(baseline).label


def ordered_baselines(names: Iterable[str]) -> list[str]:
    """Baselines in the order :class:`~reduce.baselines.Baseline` lists them (zero, mean, peak, resamples)."""
    from .baselines import Baseline

    order = [b.value for b in Baseline]
    return sorted(names, key=order.index)


def baseline_legend(baselines: Iterable[str]) -> str:
    return "Baselines: " + ", ".join(f"{baseline_label(b)} = `{b}`" for b in baselines) + "."


def slug(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


# ----------------------------------------------------------------------------------------------
# HTML

STYLE = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0b5cad; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--ink);
  font: 16px/1.6 -apple-system, "Segoe UI", "Noto Sans", Helvetica, Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 32px 40px 64px; }
h1 { font-size: 1.9em; line-height: 1.25; margin: 0 0 .4em; padding-bottom: .3em; border-bottom: 1px solid var(--line); }
h2 { font-size: 1.45em; margin: 2em 0 .6em; padding-bottom: .25em; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.15em; margin: 1.6em 0 .5em; }
p, ul, ol { margin: 0 0 1em; }
li { margin: .2em 0; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code { font: .88em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--soft); padding: .1em .35em; border-radius: 4px; }
table { display: block; max-width: 100%; overflow-x: auto; border-collapse: collapse; margin: 0 0 1.2em; font-size: .88em;
  font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 5px 10px; vertical-align: top; }
th { background: var(--soft); font-weight: 600; text-align: left; }
tbody tr:nth-child(even) { background: #fbfcfd; }
img { display: block; max-width: 100%; height: auto; margin: 1em auto .3em; }
img.tile { display: inline-block; vertical-align: top; margin: 1em 4px .3em; }
p:has(> img.tile) { text-align: center; }
p > em:only-child { display: block; text-align: center; color: var(--muted); font-size: .9em; }
mark { background: #ffe58a; padding: 0 .15em; border-radius: 3px; }
blockquote { margin: 0 0 1em; padding: 0 1em; color: var(--muted); border-left: 4px solid var(--line); }
@media print { main { max-width: none; padding: 0; } h2 { break-after: avoid; } img, table { break-inside: avoid; } }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<main>
{body}</main>
</body>
</html>
"""


def markdown_to_html(text: str, *, base_dir, title: str) -> str:
    """A self-contained HTML page from Markdown: images under ``base_dir`` embedded as base64, headings with GitHub's anchors.

    CommonMark with tables; inline HTML (``<mark>``) passes through. A missing image is an error,
    so a page never points at a file that is not in it.
    """
    from markdown_it import MarkdownIt

    base_dir = Path(base_dir)
    parser = MarkdownIt("commonmark", {"html": True}).enable("table")

    def image(renderer, tokens, index, options, env):
        token = tokens[index]
        source = token.attrGet("src")
        path = base_dir / source
        if not path.is_file():
            raise ReduceError(f"the page shows {source}, which does not exist", file=base_dir, field=source)
        mime = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml"}.get(path.suffix.lower().lstrip("."), "application/octet-stream")
        alt = renderer.renderInlineAsText(token.children or [], options, env)
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        # images sharing a paragraph are a row of figures: each takes its share of the width
        shared = sum(1 for sibling in tokens if sibling.type == "image")
        tile = f' class="tile" style="width: calc({100 / shared:.4g}% - 12px)"' if shared > 1 else ""
        return f'<img src="data:{mime};base64,{encoded}" alt="{html.escape(alt)}"{tile}>'

    def heading(renderer, tokens, index, options, env):
        tokens[index].attrSet("id", slug(tokens[index + 1].content))
        return renderer.renderToken(tokens, index, options, env)

    parser.add_render_rule("image", image)
    parser.add_render_rule("heading_open", heading)
    return PAGE.format(title=html.escape(title), style=STYLE.strip(), body=parser.render(text))
