"""Ablation outcomes: planned sets of units set to a baseline, and what the network does then.

An :class:`Ablation` is a set of rows of the unit table, a :class:`~reduce.baselines.Baseline`
and the positions it acts on. Plans build lists of them (random pruning as in seed 004's
Table 2 / Figure 2, single-unit sweeps, named unit groups, circuits). One
:class:`AblationRunner` evaluates any list on any batch with any :class:`Measure`, with exact
speed-ups:

* **stacked settings**: ``S`` ablations share one forward of the batch repeated ``S`` times;
  the mask becomes a per-row ``(S·batch, pos|1, units)`` tensor (the offsets are shared);
* **layer reuse**: when every ablation of a forward touches only layers ``>= l``, the clean
  ``blocks.l.hook_resid_pre`` is fed in and layers ``< l`` are skipped
  (:func:`reduce.hooks.start_at_layer`); when the units of layer ``l`` reach the residual stream
  only through their linear out-projection, layer ``l`` is skipped as well (:meth:`AblationRunner.entry`;
  for the last layer, only what follows it runs: the final norm and the unembedding).

All give the plain one-ablation-per-forward result (tested to 1e-5, padded batches included).
:class:`Evaluation` runs a whole prompt set; :func:`ablate` is the pipeline stage writing
``RUN_DIR/ablations.zarr``; :func:`degradation_table` / :func:`plot_degradation` reproduce seed
004's Table 2 and Figure 2.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import xarray as xr

from .baselines import Baseline, BaselineSource, UnitTable
from .batching import Batch, forward
from .hooks import Intervention, hooked, start_at_layer
from .sites import Site
from .target import Target

FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Ablation:
    """Units (rows of the unit table) set to ``baseline`` at ``position`` ("all", "last" or a token index)."""

    units: tuple[int, ...]
    baseline: Baseline
    position: str | int = "all"
    plan: str = "units"
    group: str = ""
    fraction: float = math.nan
    seed: int = -1


# --- plans ----------------------------------------------------------------------------------


def random_pruning(candidates, baselines, *, fractions=FRACTIONS, seeds=SEEDS, position="all") -> list[Ablation]:
    """Seed 004's random pruning: per seed one random order of ``candidates``, ablated in nested prefixes.

    The same seed selects the same units for every baseline, so baselines differ only in the value.
    """
    candidates = np.asarray(candidates, dtype=int)
    plan = []
    for baseline in map(Baseline, baselines):
        for seed in seeds:
            order = np.random.default_rng(seed).permutation(candidates)
            for fraction in fractions:
                chosen = order[: int(round(fraction * len(order)))]
                plan.append(Ablation(tuple(sorted(chosen.tolist())), baseline, position, "random", "", float(fraction), int(seed)))
    return plan


def single_units(units, baselines, *, position="all") -> list[Ablation]:
    """One ablation per unit (group name = the unit's row)."""
    return [Ablation((int(u),), Baseline(b), position, "single", str(int(u))) for b in baselines for u in units]


def unit_groups(groups: Mapping[str, Sequence[int]], baselines, *, position="all", plan="groups") -> list[Ablation]:
    """One ablation per named group of units (a layer, a kind, a sign group, a circuit, a named list)."""
    return [Ablation(tuple(sorted(int(u) for u in units)), Baseline(b), position, plan, str(name)) for b in baselines for name, units in groups.items()]


def groups_by(units: UnitTable, *keys: str) -> dict[str, np.ndarray]:
    """Units grouped by coordinates of the table, e.g. ``groups_by(t, "layer")``, ``groups_by(t, "layer", "kind")``."""
    labels = np.array(["/".join(f"{k}={getattr(units, k)[i]}" for k in keys) for i in range(len(units))])
    return {label: np.flatnonzero(labels == label) for label in dict.fromkeys(labels.tolist())}


# --- measures -------------------------------------------------------------------------------


class Measure(Protocol):
    """What a forward is reduced to, per row: ``measure(output, recorded, rows, prompt) -> {name: (rows, ...)}``.

    ``rows`` is the (possibly stacked) batch that ran, ``prompt`` maps each row to its row in the
    original batch; ``sites`` are recorded for it.
    """

    sites: tuple[Site, ...]

    def __call__(self, output: torch.Tensor, recorded: dict, rows: Batch, prompt: torch.Tensor) -> dict[str, torch.Tensor]: ...


def target_per_prompt(values: torch.Tensor, position_mask: torch.Tensor) -> torch.Tensor:
    """A target's value per prompt: its mean over the target positions (the one value for "last" or an index)."""
    mask = position_mask.to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1)


@dataclass
class TargetMeasure:
    """The condition's target per prompt (``target``) and per position (``target_by_pos``, NaN on padding),
    and the logit difference at the target position when answer and wrong tokens are given."""

    target: Target
    answer_ids: torch.Tensor | None = None
    wrong_ids: torch.Tensor | None = None

    @property
    def sites(self) -> tuple[Site, ...]:
        return tuple(self.target.sites)

    def __call__(self, output, recorded, rows, prompt):
        answer = None if self.answer_ids is None else self.answer_ids.to(prompt.device)[prompt]
        wrong = None if self.wrong_ids is None else self.wrong_ids.to(prompt.device)[prompt]
        values = self.target.values(output, recorded, answer, wrong).float()
        where = self.target.position_mask(rows.lengths, rows.width)
        result = {"target": target_per_prompt(values, where), "target_by_pos": values.masked_fill(rows.attention_mask == 0, math.nan)}
        # An encoder without a language-model head outputs hidden states, not logits over the answers.
        if answer is not None and wrong is not None and output.shape[-1] > max(int(answer.max()), int(wrong.max())):
            difference = Target("logit_diff").values(output, recorded, answer, wrong).float()
            result["logit_diff"] = target_per_prompt(difference, where)
        return result


@dataclass
class NextTokenMeasure:
    """Sums per row over real positions: next-token cross-entropy, top-1 hits and the number of predictions."""

    sites: tuple[Site, ...] = ()

    def __call__(self, output, recorded, rows, prompt):
        logits = output[:, :-1].float()
        following = rows.input_ids[:, 1:]
        real = rows.attention_mask[:, 1:].bool()
        loss = F.cross_entropy(logits.transpose(1, 2), following, reduction="none")
        hits = logits.argmax(-1) == following
        return {"ce_sum": (loss * real).sum(1), "correct": (hits & real).sum(1).float(), "tokens": real.sum(1).float()}


@dataclass
class EmbeddingMeasure:
    """Mean-pooled last hidden state over real tokens (the sentence embedding of MiniLM-style encoders)."""

    sites: tuple[Site, ...]

    @classmethod
    def for_model(cls, model) -> "EmbeddingMeasure":
        return cls((Site.parse(f"blocks.{model.n_layers - 1}.hook_resid_post"),))

    def __call__(self, output, recorded, rows, prompt):
        hidden = recorded[self.sites[0].name].float()
        mask = rows.attention_mask[..., None].to(hidden.dtype)
        return {"embedding": (hidden * mask).sum(1) / mask.sum(1)}


@dataclass
class SitesMeasure:
    """The sites themselves under the ablation, ``(rows, pos, units)`` each (for propagated validation)."""

    sites: tuple[Site, ...]

    def __call__(self, output, recorded, rows, prompt):
        return {site.name: recorded[site.name].float() for site in self.sites}


@dataclass
class Measures:
    """Several measures from one forward."""

    parts: tuple

    @property
    def sites(self) -> tuple[Site, ...]:
        return tuple(dict.fromkeys(s for part in self.parts for s in part.sites))

    def __call__(self, output, recorded, rows, prompt):
        return {name: value for part in self.parts for name, value in part(output, recorded, rows, prompt).items()}


# --- the runner -----------------------------------------------------------------------------


@dataclass
class Prepared:
    """A batch with its clean measures and, for layer reuse, the clean residual stream entering
    every layer (``resid_pre[L]``: leaving the last) and the clean unit sites."""

    batch: Batch
    clean: dict[str, np.ndarray]
    resid_pre: list[torch.Tensor | None]
    sites: dict[str, torch.Tensor]
    output_width: int


class AblationRunner:
    """Evaluate lists of :class:`Ablation` on batches; every plan and baseline goes through :meth:`run`.

    ``stack_settings``: share forwards between ablations, up to ``max_rows`` rows per forward (by
    default as many as keep a forward under ``max_tokens`` tokens and its output under
    ``max_elements`` floats). ``reuse_layers``: start each forward where its ablations begin
    (:meth:`entry`). Turning both off gives the plain reference loop.
    """

    def __init__(self, model, units: UnitTable, *, stack_settings: bool = True, reuse_layers: bool = True, max_rows: int | None = None, max_tokens: int | None = None, max_elements: int = 2**26):
        self.model = model
        self.units = units
        self.stack_settings = stack_settings
        self.reuse_layers = reuse_layers
        self.max_rows = max_rows
        # CPU forwards slow down per token once activations outgrow the caches; GPUs want big batches.
        self.max_tokens = max_tokens or (2048 if model.device.type == "cpu" else 2**17)
        self.max_elements = max_elements
        self._sizes = {site.name: model.n_units(site) for site in units.sites}
        self._linear_into_residual: dict[str, bool] = {}

    @torch.no_grad()
    def prepare(self, batch: Batch, measure: Measure) -> Prepared:
        """The clean forward: measures without ablation, and what layer reuse starts from."""
        batch = batch.to(self.model.device)
        last = self.model.n_layers - 1
        resid_sites = [*(Site.parse(f"blocks.{l}.hook_resid_pre") for l in range(1, last + 1)), Site.parse(f"blocks.{last}.hook_resid_post")] if self.reuse_layers else []
        unit_sites = self.units.sites if self.reuse_layers else []
        with hooked(self.model, record=[*measure.sites, *resid_sites, *unit_sites]) as recorded:
            output = forward(self.model, batch)
            clean = measure(output, recorded, batch, torch.arange(len(batch), device=batch.input_ids.device))
        resid_pre = [None] + [recorded[s.name] for s in resid_sites]
        return Prepared(batch, _to_numpy(clean), resid_pre, {s.name: recorded[s.name] for s in unit_sites}, int(output.shape[-1]))

    @torch.no_grad()
    def run(self, prepared: Prepared, ablations: Sequence[Ablation], offsets: Mapping[Baseline, Mapping[str, torch.Tensor]], measure: Measure) -> dict[str, np.ndarray]:
        """``{name: (len(ablations), batch, ...)}`` for every quantity ``measure`` returns.

        ``offsets[baseline]``: ``{site name: (units,) or (batch, pos, units)}`` from
        :meth:`reduce.baselines.BaselineSource.offsets` for this batch.
        """
        if not ablations:
            return {}
        floor = min((s.layer for s in measure.sites), default=self.model.n_layers)
        per_forward = self._settings_per_forward(prepared)
        results: list[dict | None] = [None] * len(ablations)
        for baseline in dict.fromkeys(a.baseline for a in ablations):
            # Neighbours in entry order share the most reusable residual stream.
            group = sorted((i for i, a in enumerate(ablations) if a.baseline is baseline), key=lambda i: self.entry(ablations[i], prepared))
            for start in range(0, len(group), per_forward):
                chunk = group[start : start + per_forward]
                values = self._forward(prepared, [ablations[i] for i in chunk], offsets[baseline], measure, floor)
                for j, i in enumerate(chunk):
                    results[i] = {name: value[j] for name, value in values.items()}
        return {name: np.stack([r[name] for r in results]) for name in results[0]}

    def first_layer(self, ablation: Ablation) -> int:
        """The lowest layer an ablation touches (``n_layers`` when it touches nothing)."""
        return int(self.units.layer[list(ablation.units)].min()) if ablation.units else self.model.n_layers

    def entry(self, ablation: Ablation, prepared: Prepared) -> tuple[int, bool]:
        """(the layer a forward for ``ablation`` can start at, whether its lowest layer enters as a patch).

        Layers below the lowest ablated layer ``l`` are never rerun: the forward starts from the
        cached clean residual stream. When every unit ablated in ``l`` reaches the residual stream
        only through its linear out-projection (MLP units of pre-norm blocks, attention units of
        parallel blocks; checked once per kind), layer ``l`` is skipped too: the forward starts at
        ``l + 1`` from the clean stream plus the projected change (``L``, after the last layer:
        only the final norm and head run).
        """
        first = self.first_layer(ablation)
        if not self.reuse_layers or first >= self.model.n_layers:
            return first, False
        kinds = {str(self.units.kind[u]) for u in ablation.units if self.units.layer[u] == first}
        if all(self._reaches_residual_linearly(kind, prepared) for kind in kinds):
            return first + 1, True
        return first, False

    def _settings_per_forward(self, prepared: Prepared) -> int:
        if not self.stack_settings:
            return 1
        batch = prepared.batch
        rows = self.max_rows or min(self.max_tokens // batch.width, self.max_elements // max(1, batch.width * prepared.output_width))
        return max(1, rows // len(batch))

    def _forward(self, prepared: Prepared, chunk: list[Ablation], offsets, measure, floor: int) -> dict[str, np.ndarray]:
        batch = prepared.batch
        n_settings, n_prompts = len(chunk), len(batch)
        entries = [self.entry(a, prepared) for a in chunk]
        start = min(min(layer for layer, _ in entries), floor) if self.reuse_layers else 0
        ablated = np.zeros((n_settings, len(self.units)), dtype=bool)
        for j, ablation in enumerate(chunk):
            ablated[j, list(ablation.units)] = True
        patch_rows = np.array([patch and layer == start for layer, patch in entries])
        patched = ablated & patch_rows[:, None] & (self.units.layer == start - 1)[None, :]
        if start >= self.model.n_layers and not patched.any():  # nothing ablated upstream of anything measured: the clean run
            return {name: np.repeat(value[None], n_settings, 0) for name, value in prepared.clean.items()}
        positions = None
        if any(a.position != "all" for a in chunk):
            positions = torch.stack([Target("logit", position=a.position).position_mask(batch.lengths, batch.width) for a in chunk])[..., None]
        rows = batch.repeat(n_settings)
        prompt = torch.arange(n_prompts, device=batch.input_ids.device).repeat(n_settings)
        interventions = self._interventions(ablated & ~patched, positions, batch, offsets)
        with ExitStack() as stack:
            if start > 0:
                resid = prepared.resid_pre[start].repeat(n_settings, 1, 1)
                if patched.any():
                    resid = resid + self._residual_patch(patched, positions, prepared, offsets)
                # Entered before `hooked`, so site hooks see the real layers, all at >= start.
                stack.enter_context(start_at_layer(self.model, start, resid))
            recorded = stack.enter_context(hooked(self.model, record=measure.sites, interventions=interventions))
            output = forward(self.model, rows)
            values = measure(output, recorded, rows, prompt)
        return {name: value.reshape(n_settings, n_prompts, *value.shape[1:]) for name, value in _to_numpy(values).items()}

    def _hits(self, ablated: np.ndarray, positions, site: Site) -> torch.Tensor:
        """(settings, batch | 1, pos | 1, site units) bool: where each setting replaces the site's units."""
        hit = torch.from_numpy(self.units.scatter(ablated, site, self._sizes[site.name], fill=False)).to(self.model.device)[:, None, None, :]
        return hit & positions if positions is not None else hit

    def _interventions(self, ablated: np.ndarray, positions, batch: Batch, offsets: Mapping[str, torch.Tensor]) -> dict[Site, Intervention]:
        n_settings, n_prompts = ablated.shape[0], len(batch)
        interventions = {}
        for site in self.units.sites:
            if not ablated[:, self.units.rows(site)].any():
                continue
            hit = self._hits(ablated, positions, site)
            keep = (~hit).float().expand(n_settings, n_prompts, -1, -1).reshape(n_settings * n_prompts, -1, hit.shape[-1])
            offset = offsets[site.name].to(self.model.device)
            if offset.dim() == 3:
                offset = offset.repeat(n_settings, 1, 1)
            interventions[site] = Intervention(keep, offset)
        return interventions

    def _residual_patch(self, patched: np.ndarray, positions, prepared: Prepared, offsets) -> torch.Tensor:
        """Change of the residual stream leaving the patched layer, per stacked row: (offset − clean) @ W_out."""
        n_settings = patched.shape[0]
        change = 0
        for site in self.units.sites:
            if not patched[:, self.units.rows(site)].any():
                continue
            hit = self._hits(patched, positions, site)
            columns = torch.nonzero(hit.flatten(0, -2).any(0)).flatten()
            clean = prepared.sites[site.name][..., columns]
            offset = offsets[site.name].to(clean.device)[..., columns]
            moved = (offset - clean)[None] * hit[..., columns]
            moved = moved.expand(n_settings, *clean.shape).reshape(-1, *clean.shape[1:])
            change = change + moved @ _out_weight(self.model, site)[columns]
        return change

    def _reaches_residual_linearly(self, kind: str, prepared: Prepared) -> bool:
        """Whether a change of this kind's units in layer 0 moves the residual stream leaving layer 0
        by exactly the change times the out-projection (nothing later in the block reads it)."""
        if kind not in self._linear_into_residual:
            site = Site.parse(f"blocks.0.{'mlp.hook_post' if kind == 'mlp' else 'attn.hook_z'}")
            resid = Site.parse("blocks.0.hook_resid_post")
            batch = prepared.batch
            with hooked(self.model, record=[site, resid], stop_after_record=True) as clean:
                forward(self.model, batch)
            generator = torch.Generator().manual_seed(0)
            step = torch.randn(clean[site.name].shape, generator=generator).to(clean[site.name]) * clean[site.name].std().clamp(min=1e-2)
            with hooked(self.model, record=[resid], interventions={site: Intervention(torch.zeros(()), clean[site.name] + step)}, stop_after_record=True) as moved:
                forward(self.model, batch)
            real = batch.attention_mask.bool()
            predicted = (step @ _out_weight(self.model, site))[real]
            error = (moved[resid.name] - clean[resid.name])[real] - predicted
            self._linear_into_residual[kind] = bool(error.abs().max() <= 1e-3 * predicted.abs().max())
        return self._linear_into_residual[kind]


def _out_weight(model, site: Site) -> torch.Tensor:
    """The site's out-projection as an (in, out) matrix (GPT-2's Conv1D stores it so; Linear transposed)."""
    module = model.layer(site.layer).get_submodule(model.arch.mlp_out if site.kind == "mlp" else model.arch.attn_out)
    return module.weight.T if hasattr(module, "in_features") else module.weight


def _to_numpy(values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.detach().float().cpu().numpy() for name, value in values.items()}


# --- a whole prompt set ---------------------------------------------------------------------


@dataclass
class PromptBatch:
    """One batch of a prompt set: ``keys`` are its rows' indices in the set, ``measure`` reads its forwards."""

    batch: Batch
    keys: np.ndarray
    measure: Measure


class Evaluation:
    """Ablations evaluated on a whole prompt set (several batches) through one runner.

    Results are concatenated over batches along the prompt axis, in ``keys`` order; position
    axes are padded with NaN to the widest batch. Offsets are computed per batch and kept for
    the current baseline only (plans run baseline by baseline).
    """

    def __init__(self, runner: AblationRunner, parts: Sequence[PromptBatch], source: BaselineSource, *, stream: str = "prompts"):
        self.runner = runner
        self.parts = list(parts)
        self.source = source
        self.stream = stream
        self.prepared = [runner.prepare(part.batch, part.measure) for part in self.parts]
        self._order = np.argsort(np.concatenate([part.keys for part in self.parts]), kind="stable")
        self._offsets: dict[tuple[Baseline, int], dict[str, torch.Tensor]] = {}

    @property
    def clean(self) -> dict[str, np.ndarray]:
        return self._concatenate([prepared.clean for prepared in self.prepared], axis=0)

    def supports(self, baseline: Baseline) -> bool:
        return self.source.supports(baseline, self.stream)

    def run(self, ablations: Sequence[Ablation]) -> dict[str, np.ndarray]:
        """``{name: (ablation, prompt, ...)}`` over the whole set."""
        per_batch = []
        for i, (part, prepared) in enumerate(zip(self.parts, self.prepared)):
            offsets = {baseline: self._offsets_for(baseline, i) for baseline in dict.fromkeys(a.baseline for a in ablations)}
            per_batch.append(self.runner.run(prepared, ablations, offsets, part.measure))
        return self._concatenate(per_batch, axis=1)

    def _offsets_for(self, baseline: Baseline, index: int) -> dict[str, torch.Tensor]:
        if (baseline, index) not in self._offsets:
            if any(b is not baseline for b, _ in self._offsets):
                self._offsets.clear()
            part = self.parts[index]
            self._offsets[baseline, index] = self.source.offsets(baseline, self.prepared[index].batch, part.keys, stream=self.stream)
        return self._offsets[baseline, index]

    def _concatenate(self, per_batch: list[dict[str, np.ndarray]], axis: int) -> dict[str, np.ndarray]:
        out = {}
        for name in per_batch[0]:
            arrays = [values[name] for values in per_batch]
            if arrays[0].ndim > axis + 1 and len({a.shape[axis + 1] for a in arrays}) > 1:
                width = max(a.shape[axis + 1] for a in arrays)
                arrays = [_pad(a, axis + 1, width) for a in arrays]
            out[name] = np.take(np.concatenate(arrays, axis=axis), self._order, axis=axis)
        return out


def _pad(array: np.ndarray, axis: int, width: int) -> np.ndarray:
    padding = [(0, 0)] * array.ndim
    padding[axis] = (0, width - array.shape[axis])
    return np.pad(array.astype(np.float32), padding, constant_values=np.nan)


# --- seed 004's Table 2 and Figure 2 --------------------------------------------------------

# Task metrics of held-out text, and whether higher is better.
DEGRADATION_METRICS = {"top1": ("Top1 Accuracy", True), "cross_entropy": ("Cross-Entropy Loss", False), "cosine": ("Cosine Similarity", True)}


def degradation_table(ablations, *, fractions=(0.5, 0.9)) -> pd.DataFrame:
    """Seed 004's Table 2 from random-pruning outcomes: mean and sd over seeds per baseline and fraction.

    ``ablations``: an ``ablations.zarr`` dataset, or ``{model name: dataset}`` for side-by-side
    columns. Returns a tidy frame (model, metric, pruning, baseline, mean, sd); pruning
    ``"Baseline"`` is the unablated model. Top-1 accuracy is in percent.
    """
    frames = []
    for model, outcomes in _by_model(ablations).items():
        runs = _random_runs(outcomes)
        for metric, (label, _) in DEGRADATION_METRICS.items():
            if metric not in runs:
                continue
            values = runs[metric] * (100 if metric == "top1" else 1)
            clean = values[runs["fraction"] == 0]
            rows = [("Baseline", "", clean.mean(), 0.0 if clean.nunique() <= 1 else clean.std())]
            for fraction in fractions:
                at = runs[np.isclose(runs["fraction"], fraction)]
                for baseline, group in at.groupby("baseline", sort=False):
                    scores = values[group.index].dropna()
                    if scores.empty:  # e.g. the counterfactual baseline has no held-out text partner
                        continue
                    rows.append((f"{fraction:.0%} Pruning", Baseline(baseline).label, scores.mean(), scores.std() if len(scores) > 1 else 0.0))
            frames.append(pd.DataFrame(rows, columns=["pruning", "baseline", "mean", "sd"]).assign(model=model, metric=label))
    return pd.concat(frames, ignore_index=True)[["model", "metric", "pruning", "baseline", "mean", "sd"]]


def degradation_markdown(table: pd.DataFrame) -> str:
    """The table in seed 004's layout: one block per metric, a column per model, the best baseline in bold."""
    models = list(dict.fromkeys(table["model"]))
    lines = []
    for metric, block in table.groupby("metric", sort=False):
        higher_is_better = next(better for label, better in DEGRADATION_METRICS.values() if label == metric)
        lines += [f"| {metric} | | {' | '.join(models)} |", "|---|---|" + "---|" * len(models)]
        for (pruning, baseline), rows in block.groupby(["pruning", "baseline"], sort=False):
            cells = []
            for model in models:
                row = rows[rows["model"] == model]
                if row.empty:
                    cells.append("-")
                    continue
                mean, sd = float(row["mean"].iloc[0]), float(row["sd"].iloc[0])
                rivals = block[(block["model"] == model) & (block["pruning"] == pruning)]["mean"]
                best = pruning != "Baseline" and mean == (rivals.max() if higher_is_better else rivals.min())
                text = f"{mean:.2f} ± {sd:.2f}"
                cells.append(f"**{text}**" if best else text)
            lines.append(f"| {pruning} | {baseline} | {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def plot_degradation(ablations, path) -> None:
    """Seed 004's Figure 2: each held-out metric against the fraction pruned, a line per baseline (± sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .store import atomic_path

    outcomes = _by_model(ablations)
    metrics = {model: [m for m in DEGRADATION_METRICS if m in dataset] for model, dataset in outcomes.items()}
    columns = max(len(names) for names in metrics.values())
    figure, axes = plt.subplots(len(outcomes), columns, figsize=(4.5 * columns, 3.5 * len(outcomes)), squeeze=False)
    for row, (model, dataset) in enumerate(outcomes.items()):
        runs = _random_runs(dataset).assign(method=lambda frame: [Baseline(b).label for b in frame["baseline"]])
        for column, axis in enumerate(axes[row]):
            if column >= len(metrics[model]):
                axis.set_visible(False)
                continue
            metric = metrics[model][column]
            sns.lineplot(runs, x="fraction", y=metric, hue="method", errorbar="sd", marker="o", ax=axis)
            axis.set(title=model, xlabel="fraction of units pruned", ylabel=DEGRADATION_METRICS[metric][0])
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=Path(path).suffix.lstrip(".") or "png", dpi=150)
    plt.close(figure)


def _by_model(ablations) -> dict:
    if isinstance(ablations, xr.Dataset):
        return {ablations.attrs.get("model", "model"): ablations}
    return dict(ablations)


def _random_runs(ablations) -> pd.DataFrame:
    """One row per random-pruning ablation: baseline, fraction, seed and the held-out metrics."""
    chosen = ablations.isel(ablation=np.flatnonzero(ablations["plan"].values == "random"))
    columns = {name: chosen[name].values for name in ("baseline", "fraction", "seed")}
    columns.update({metric: chosen[metric].values.astype(float) for metric in DEGRADATION_METRICS if metric in chosen})
    return pd.DataFrame(columns)


# --- the stage: RUN_DIR/ablations.zarr ------------------------------------------------------

ABLATIONS = "ablations.zarr"
ATTRIBUTION = "attribution.nc"
STAGE = "ablate"
BLOCK = 32  # ablations per resumable block (and per zarr chunk along `ablation`)
PLAN_LABELS = ("random", "single", "groups", "circuit", "circuit_complement")  # the `plan` coordinate's values
_MANIFEST = "reduce_manifest.json"


def ablate(condition, run_dir, *, model=None, record_sites_for: Sequence[str] = (), progress: bool = True):
    """Run the condition's planned ablations into ``RUN_DIR/ablations.zarr`` (and ``attribution.nc``).

    Plans (``[ablation] plans``): ``random`` (seed 004's random pruning over every unit of the
    table, ``fractions`` × ``seeds``), ``single`` (every unit alone), ``groups`` (every layer,
    every kind, every layer × kind), ``circuit`` (top-``n`` units by gradient attribution, and
    their complements). Each runs for every baseline. Mean and peak baselines read
    ``stats.nc``, so :func:`reduce.record.record` runs first. ``record_sites_for``: plans whose
    ablations also store every recorded site under the ablation (large).

    Layout (``xarray.open_zarr``): ``ablated`` (ablation, unit); ``target`` (ablation, prompt) at
    the target position, ``target_by_pos`` (ablation, prompt, pos); ``logit_diff`` (ablation,
    prompt) when prompts have answers; on held-out text ``top1`` and ``cross_entropy``
    (ablation) for language models, ``cosine`` (ablation) of the mean-pooled embedding to the
    unablated one otherwise (NaN for the counterfactual baseline, which has no text partner);
    ``clean_*`` the same without ablation; coordinates ``baseline``, ``plan``, ``group``,
    ``fraction``, ``seed``, ``position`` over ablations and the unit table over ``unit``.
    ``attribution.nc``: ``attribution`` (baseline, prompt, unit) and ``mean_gradient`` (unit, lag).
    """
    from .condition import Condition, load_condition, resolve
    from .errors import ReduceError
    from .store import RunDir, fingerprint

    unknown = set(record_sites_for) - set(PLAN_LABELS)
    if unknown:
        raise ReduceError(f"record_sites_for names unknown plans {', '.join(sorted(unknown))}; plans are {', '.join(PLAN_LABELS)}", field="record_sites_for")
    condition = condition if isinstance(condition, Condition) else load_condition(condition)
    resolved = resolve(condition, model)
    with RunDir(run_dir) as run:
        # Chained to the recording's key: new weights or prompts redo the ablations too.
        key = fingerprint(condition.fingerprint("ablation"), run.stage_key("record"), resolved.model.weights_fingerprint(), sorted(record_sites_for))
        if not run.is_done(STAGE, key, outputs=(ABLATIONS, ATTRIBUTION)):
            run.forget(STAGE)
            _write_ablations(resolved, run.path, key, tuple(record_sites_for), progress)
            run.mark_done(STAGE, key)
    return xr.open_zarr(Path(run_dir) / ABLATIONS)


def condition_baselines(spec) -> list[Baseline]:
    """The condition's baselines; ``peak`` is the refined or the naive mode as ``[ablation] peak`` says."""
    return [Baseline.PEAK_NAIVE if name == "peak" and spec.peak == "naive" else Baseline.parse(name) for name in spec.baselines]


def eval_texts(spec) -> list[str]:
    """Held-out text for top-1 / cross-entropy: the zoo's filler stream, or the lines of a .txt file."""
    if spec.eval_text == "zoo":
        from .zoo.corpus import heldout_filler

        return heldout_filler(spec.max_eval_sequences)
    lines = [line for line in Path(spec.eval_text).read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[: spec.max_eval_sequences]


def _batches(encoded: Batch, size: int):
    """(rows, batch) pieces of an encoded set, each trimmed to its longest row (exact with right padding)."""
    for start in range(0, len(encoded), size):
        rows = np.arange(start, min(start + size, len(encoded)))
        width = int(encoded.lengths[rows].max())
        yield rows, Batch(encoded.input_ids[rows, :width], encoded.attention_mask[rows, :width], encoded.lengths[rows])


def _write_ablations(resolved, run_dir: Path, key: str, record_sites_for: tuple[str, ...], progress: bool) -> None:
    from .batching import encode
    from .errors import ReduceError
    from .progress import progress_bar
    from .record import STATS
    from .store import write_netcdf

    condition, model, prompts, target = resolved.condition, resolved.model, resolved.prompts, resolved.target
    spec = condition.ablation
    units = UnitTable.for_sites(model, resolved.unit_sites)
    if not len(units):
        raise ReduceError("ablation needs unit sites (blocks.L.mlp.hook_post or blocks.L.attn.hook_z) among record.sites", file=condition.path, field="record.sites")
    baselines = condition_baselines(spec)
    stats = xr.load_dataset(run_dir / STATS, engine="h5netcdf") if (run_dir / STATS).exists() else None
    if stats is None and any(b in (Baseline.MEAN, Baseline.PEAK, Baseline.PEAK_NAIVE) for b in baselines):
        raise ReduceError(f"mean and peak ablation need the unit statistics ({STATS}); run `reduce record` on this run directory first", file=run_dir, field="record")
    source = BaselineSource(model, units, stats, seed=condition.seed, counterfactual_texts=prompts.counterfactuals)
    runner = AblationRunner(model, units)
    device = model.device
    answers = None if prompts.answer_ids is None else torch.as_tensor(prompts.answer_ids, device=device)
    wrongs = None if prompts.wrong_ids is None else torch.as_tensor(prompts.wrong_ids, device=device)
    encoded = encode(model, prompts.texts)
    size = condition.record.batch_size
    pieces = [(rows, batch.to(device)) for rows, batch in _batches(encoded, size)]

    def answers_of(rows):
        return None if answers is None else answers[rows], None if wrongs is None else wrongs[rows]

    on_prompts = Evaluation(runner, [PromptBatch(batch, rows, TargetMeasure(target, *answers_of(rows))) for rows, batch in pieces], source)
    site_measure = SitesMeasure(tuple(resolved.sites))
    site_names = {site.name for site in resolved.sites}
    with_sites = Evaluation(runner, [PromptBatch(batch, rows, Measures((TargetMeasure(target, *answers_of(rows)), site_measure))) for rows, batch in pieces], source) if record_sites_for else None
    language_model = model.causal and model.unembed is not None
    text_measure = NextTokenMeasure() if language_model else EmbeddingMeasure.for_model(model)
    text_batches = [PromptBatch(batch.to(device), rows, text_measure) for rows, batch in _batches(_encode_text(model, eval_texts(spec)), size)]
    on_text = Evaluation(runner, text_batches, source, stream="text")

    with_answers = [(rows, batch, *answers_of(rows)) for rows, batch in pieces]
    attribution = _attribution(model, with_answers, target, units, source, baselines, max_lag=encoded.width - 1)
    write_netcdf(attribution, run_dir / ATTRIBUTION)

    plan = _condition_plan(spec, units, baselines, attribution["attribution"].values)
    clean = on_prompts.clean
    clean_text = on_text.clean
    text_metrics = _text_metrics(clean_text, clean_text)
    store = _AblationStore(run_dir / ABLATIONS, fingerprint_plan(key, plan, units))
    done = store.open(lambda: _template(resolved, units, plan, clean, text_metrics, encoded, record_sites_for, model))
    todo = [b for b in range(-(-len(plan) // BLOCK)) if b not in done]
    for block in progress_bar(todo, desc="ablate", enabled=progress):
        rows = np.arange(block * BLOCK, min(len(plan), (block + 1) * BLOCK))
        chosen = [plan[i] for i in rows]
        values = {}
        recorded = [j for j, a in enumerate(chosen) if a.plan in record_sites_for]
        plain = [j for j in range(len(chosen)) if j not in recorded]
        for indices, evaluation in ((plain, on_prompts), (recorded, with_sites)):
            if not indices:
                continue
            outcome = evaluation.run([chosen[j] for j in indices])
            for name, value in outcome.items():
                if name in site_names:
                    store.write_rows(name, rows[indices], value.reshape(*value.shape[:3], *store.unit_shape(name)))
                else:
                    values.setdefault(name, np.full((len(chosen), *value.shape[1:]), np.nan, dtype=np.float32))[indices] = value
        values.update({name: variable.values for name, variable in held_out_outcomes(on_text, chosen).data_vars.items()})
        store.write_block(block, slice(rows[0], rows[-1] + 1), values)
    store.finish()


def _attribution(model, pieces, target: Target, units: UnitTable, source: BaselineSource, baselines, *, max_lag: int):
    """``attribution`` (baseline, prompt, unit) of every unit for every baseline, and ``mean_gradient`` (unit, lag)."""
    from .attribution import attribute, mean_gradient_by_lag

    per_baseline = [
        np.concatenate([attribute(model, batch, target, units, source.offsets(baseline, batch, rows), answer_ids=answer, wrong_ids=wrong).values for rows, batch, answer, wrong in pieces])
        for baseline in baselines
    ]  # fmt: skip
    lags = mean_gradient_by_lag(model, [(batch, answer, wrong) for _, batch, answer, wrong in pieces], target, units, max_lag=max_lag)
    return xr.Dataset(
        {"attribution": (("baseline", "prompt", "unit"), np.stack(per_baseline)), "mean_gradient": lags},
        coords={"baseline": [b.value for b in baselines], "prompt": np.concatenate([rows for rows, *_ in pieces]), **units.coords()},
        attrs={"target": target.name, "method": "attribution patching: Σ_pos (baseline − activation) · ∂target/∂activation"},
    )


EVAL_TOKENS = 256  # held-out texts are cut to this many tokens (or the model's limit)


def _encode_text(model, texts) -> Batch:
    from .batching import encode
    from .prompts import _max_positions

    encoded = encode(model, texts)
    limit = min(EVAL_TOKENS, _max_positions(model) or EVAL_TOKENS)
    return encoded if encoded.width <= limit else encode(model, texts, width=limit)


def fingerprint_plan(key: str, plan: list[Ablation], units: UnitTable) -> str:
    from .store import fingerprint

    return fingerprint(key, len(units), [(a.units, a.baseline.value, str(a.position), a.plan, a.group, a.fraction, a.seed) for a in plan])


def _condition_plan(spec, units: UnitTable, baselines, attribution) -> list[Ablation]:
    from .circuits import circuit_ablations, circuit_sizes

    everything = np.arange(len(units))
    plan: list[Ablation] = []
    if "random" in spec.plans:
        plan += random_pruning(everything, baselines, fractions=spec.fractions, seeds=spec.seeds)
    if "single" in spec.plans:
        plan += single_units(everything, baselines)
    if "groups" in spec.plans:
        plan += unit_groups({**groups_by(units, "layer"), **groups_by(units, "kind"), **groups_by(units, "layer", "kind")}, baselines)
    if "circuit" in spec.plans:
        for i, baseline in enumerate(baselines):
            plan += circuit_ablations(attribution[i].mean(0), circuit_sizes(len(units)), baseline)
    order = {b: i for i, b in enumerate(baselines)}
    return sorted(plan, key=lambda a: order[a.baseline])  # baseline by baseline: offsets are reused within a block


def _text_metrics(outcome: dict[str, np.ndarray], clean: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Held-out metrics from per-text sums (language models) or pooled embeddings (encoders)."""
    if "embedding" not in outcome:
        tokens = outcome["tokens"].sum(-1)
        return {"top1": outcome["correct"].sum(-1) / tokens, "cross_entropy": outcome["ce_sum"].sum(-1) / tokens}
    embedding, reference = outcome["embedding"], clean["embedding"]
    cosine = (embedding * reference).sum(-1) / (np.linalg.norm(embedding, axis=-1) * np.linalg.norm(reference, axis=-1))
    return {"cosine": cosine.mean(-1)}


def ablation_labels(plan: Sequence[Ablation]) -> dict:
    """Coordinates over ``ablation``: baseline, plan, group, fraction, seed, position."""
    return {
        "baseline": ("ablation", np.array([a.baseline.value for a in plan], dtype=object)),
        "plan": ("ablation", np.array([a.plan for a in plan], dtype=object)),
        "group": ("ablation", np.array([a.group for a in plan], dtype=object)),
        "fraction": ("ablation", np.array([a.fraction for a in plan], dtype=np.float64)),
        "seed": ("ablation", np.array([a.seed for a in plan], dtype=np.int64)),
        "position": ("ablation", np.array([str(a.position) for a in plan], dtype=object)),
    }


def held_out_outcomes(evaluation: Evaluation, plan: Sequence[Ablation]):
    """Per-ablation held-out metrics of an :class:`Evaluation` with :class:`NextTokenMeasure`
    (``top1``, ``cross_entropy``) or :class:`EmbeddingMeasure` (``cosine`` to the unablated
    embedding), labelled as :func:`degradation_table` reads them; NaN where the evaluation's
    stream has no source for the baseline."""
    supported = [i for i, a in enumerate(plan) if evaluation.supports(a.baseline)]
    metrics = _text_metrics(evaluation.run([plan[i] for i in supported]), evaluation.clean) if supported else {}
    variables = {}
    for name, values in metrics.items():
        full = np.full(len(plan), np.nan, dtype=np.float32)
        full[supported] = values
        variables[name] = ("ablation", full)
    return xr.Dataset(variables, coords=ablation_labels(plan))


def _template(resolved, units: UnitTable, plan: list[Ablation], clean, text_metrics, encoded: Batch, record_sites_for, model):
    """The full-size dataset: labels, masks and clean values written, outcomes to be filled block by block."""
    import dask.array
    n, prompts, width = len(plan), len(resolved.prompts), encoded.width
    ablated = np.zeros((n, len(units)), dtype=bool)
    for i, ablation in enumerate(plan):
        ablated[i, list(ablation.units)] = True

    def empty(*shape):
        return dask.array.full(shape, np.nan, dtype=np.float32, chunks=(BLOCK, *shape[1:]))

    variables = {
        "ablated": (("ablation", "unit"), ablated),
        "target": (("ablation", "prompt"), empty(n, prompts)),
        "target_by_pos": (("ablation", "prompt", "pos"), empty(n, prompts, width)),
        "clean_target": (("prompt",), clean["target"]),
        "clean_target_by_pos": (("prompt", "pos"), clean["target_by_pos"]),
    }
    if "logit_diff" in clean:
        variables["logit_diff"] = (("ablation", "prompt"), empty(n, prompts))
        variables["clean_logit_diff"] = (("prompt",), clean["logit_diff"])
    for name, value in text_metrics.items():
        variables[name] = (("ablation",), empty(n))
        if name != "cosine":
            variables[f"clean_{name}"] = ((), np.float32(value))
    if record_sites_for:
        for site in resolved.sites:
            shape = _site_unit_shape(model, site)
            variables[site.name] = (("ablation", "prompt", "pos", *shape), dask.array.full((n, prompts, width, *shape.values()), np.nan, dtype=np.float32, chunks=(1, prompts, width, *shape.values())))
    coords = {
        **ablation_labels(plan),
        **units.coords(),
        "prompt": np.arange(prompts),
        "text": ("prompt", np.array(resolved.prompts.texts, dtype=object)),
        "length": ("prompt", encoded.lengths.numpy()),
    }
    attrs = {"condition": resolved.condition.name, "model": model.name, "target": resolved.target.name, "n_layers": model.n_layers, "causal": int(model.causal)}
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _site_unit_shape(model, site: Site) -> dict[str, int]:
    """A site's unit dimensions as in ``activations.zarr``, with MLP ``unit`` renamed ``neuron``
    (``unit`` here is the unit table)."""
    return {("neuron" if name == "unit" else name): size for name, size in model.unit_shape(site).items()}


class _AblationStore:
    """``ablations.zarr`` filled block by block under a temporary name; a manifest lists finished
    blocks so a killed run resumes, and a rename publishes the finished store."""

    def __init__(self, path: Path, key: str):
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        self.manifest = self.partial / _MANIFEST
        self.key = key
        self.done: set[int] = set()

    def open(self, template) -> set[int]:
        """Finished blocks of an interrupted run of the same plan; else a fresh store from ``template()``."""
        import json

        import zarr

        from .store import remove_path, write_json

        try:
            manifest = json.loads(self.manifest.read_text())
            self.done = set(manifest["done"]) if manifest.get("key") == self.key else None
        except (OSError, ValueError):
            self.done = None
        if self.done is None:
            remove_path(self.partial)
            dataset = template()
            encoding = {name: {"_FillValue": np.nan} for name, variable in dataset.data_vars.items() if variable.dtype.kind == "f"}
            # Numpy-backed variables (labels, masks, clean values) are written now, dask ones only allocated.
            dataset.to_zarr(str(self.partial), mode="w", compute=False, consolidated=False, encoding=encoding)
            self.done = set()
            write_json(self.manifest, {"key": self.key, "done": []})
        self.group = zarr.open_group(str(self.partial), mode="r+")
        return self.done

    def unit_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.group[name].shape[3:])

    def write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        for row, value in zip(rows, values):
            self.group[name][int(row)] = value

    def write_block(self, block: int, rows: slice, values: dict[str, np.ndarray]) -> None:
        from .store import write_json

        for name, value in values.items():
            self.group[name][rows] = value
        self.done.add(block)
        write_json(self.manifest, {"key": self.key, "done": sorted(self.done)})

    def finish(self) -> None:
        import warnings

        import zarr

        from .store import replace_path

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # consolidated metadata is not in the zarr v3 spec
            zarr.consolidate_metadata(str(self.partial))
        self.manifest.unlink()
        replace_path(self.partial, self.path)
