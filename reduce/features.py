"""Grouped upstream features: the transformer's synaptic input to a target.

A *synapse* is one upstream unit at one token lag. Per sample (a prompt and a target position
``t``) its activity is the unit's deviation from its baseline at position ``t - lag``
(the peak by default: a unit "fires" when it leaves its modal value, seed 004); positions that
hold special tokens (BOS, CLS, SEP) give no input (:func:`counted_sources`). Synapses are
grouped as the seed 003 neuron's were:

* **sign** (excitatory / inhibitory): the sign of the synapse's *connection* to the target, the
  mean gradient of the target at ``t`` with respect to the unit at ``t - lag`` over the
  training prompts (``sign = "gradient"``); or, without a backward pass, the sign of its
  covariance with the target on the training prompts (``sign = "correlation"``). Excitatory
  synapses push the target up when their unit deviates upwards.
* **distance**: layer distance ``target_layer - unit_layer`` (logit targets sit at
  ``n_layers``; for a neuron target, attention units of its own layer are at distance 0).
* **lag**: ``0..max_lag`` in causal models, ``-max_lag..max_lag`` in encoders.

``inputs[sample, group, distance, lag] = Σ_units weight · deviation``, with weight
``|connection|`` (``weights = "gradient"``) or 1 (``"none"``). Features are linear in the
deviations, so an ablation's effect on them is exact: validation feeds ablated activations
through the same fitted map.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import ReduceError

SIGN_GROUPS = ("excitatory", "inhibitory")


class GroupedFeatures:
    """Fit the synapse grouping on training data, then transform any activations into features.

    Parameters mirror the condition's ``[fit]`` section. After :meth:`fit`, ``synapses_`` is a
    Dataset over (unit, lag) with each synapse's ``group``, ``distance`` and ``weight``.
    """

    def __init__(self, *, max_lag: int = 8, history_lags: int = 4, deviation_from: str = "peak", weights: str = "gradient", causal: bool = True, chunk_prompts: int = 64):
        self.max_lag = max_lag
        self.history_lags = history_lags
        self.deviation_from = deviation_from
        self.weights = weights
        self.causal = causal
        self.chunk_prompts = chunk_prompts

    @property
    def lags(self) -> np.ndarray:
        return np.arange(0 if self.causal else -self.max_lag, self.max_lag + 1)

    def fit(self, stats: xr.Dataset, connection: xr.DataArray, *, target_layer: int, target_site: str | None = None) -> "GroupedFeatures":
        """Assign every (unit, lag) synapse a group, distance and weight.

        ``stats``: the unit table with ``peak``/``mean`` (from ``stats.nc``). ``connection``:
        (unit, lag) mean gradient or covariance of the target with each synapse, computed on
        training prompts only. ``target_layer``: the layer the target is read at (``n_layers``
        for logits). Units at or after the target (and the target's own site) are excluded.
        """
        if self.deviation_from not in ("peak", "mean", "zero"):
            raise ReduceError(f"deviation_from must be peak, mean or zero, not {self.deviation_from!r}", field="fit.deviation_from")
        if self.weights not in ("gradient", "none"):
            raise ReduceError(f"weights must be gradient or none, not {self.weights!r}", field="fit.weights")
        connection = connection.sel(lag=self.lags).transpose("unit", "lag").values.astype(np.float64)
        layer = stats["layer"].values
        kind = stats["kind"].values
        distance = target_layer - layer
        upstream = (distance > 0) | ((distance == 0) & (kind == "attn"))
        if target_site is not None:
            upstream &= stats["site"].values != target_site
        connected = upstream[:, None] & (connection != 0)
        weight = np.where(connected, np.abs(connection) if self.weights == "gradient" else 1.0, 0.0)
        group = np.where(connection >= 0, 0, 1)
        if not upstream.any():
            raise ReduceError("no recorded unit lies upstream of the target; record earlier layers", field="record.sites")
        self.baseline_ = np.zeros(stats.sizes["unit"]) if self.deviation_from == "zero" else stats[self.deviation_from].values.astype(np.float64)
        self.synapses_ = xr.Dataset(
            {
                "group": (("unit", "lag"), np.array(SIGN_GROUPS)[group]),
                "distance": ("unit", distance),
                "upstream": ("unit", upstream),
                "weight": (("unit", "lag"), weight),
                "connection": (("unit", "lag"), connection),
                "baseline": ("unit", self.baseline_),
                "spread": ("unit", np.sqrt(stats["var"].values.astype(np.float64))),
            },
            coords={"lag": self.lags, **{name: ("unit", stats[name].values) for name in ("site", "layer", "kind", "index")}},
        )
        self._index_synapses()
        return self

    def _index_synapses(self) -> None:
        """Build the (unit, lag) -> (group, distance) projection that transform multiplies by."""
        synapses = self.synapses_
        self.baseline_ = synapses["baseline"].values
        self.spread_ = synapses["spread"].values
        distance = synapses["distance"].values
        weight = synapses["weight"].values
        self.distances_ = np.unique(distance[synapses["upstream"].values])
        group = (synapses["group"].values == SIGN_GROUPS[1]).astype(int)
        position = np.searchsorted(self.distances_, np.clip(distance, self.distances_[0], None))
        columns = group * self.distances_.size + position[:, None]
        self._projection = np.zeros((distance.size, self.lags.size, len(SIGN_GROUPS) * self.distances_.size))
        units, lag_index = np.nonzero(weight)
        self._projection[units, lag_index, columns[units, lag_index]] = weight[units, lag_index]
        self._site_slices = _site_slices(synapses["site"].values)

    def to_dataset(self) -> xr.Dataset:
        """The fitted map with its parameters as attributes (saved beside the reduced model)."""
        return self.synapses_.assign_attrs(max_lag=self.max_lag, history_lags=self.history_lags, deviation_from=self.deviation_from, weights=self.weights, causal=int(self.causal))

    @classmethod
    def from_dataset(cls, dataset: xr.Dataset) -> "GroupedFeatures":
        attrs = dataset.attrs
        grouped = cls(max_lag=int(attrs["max_lag"]), history_lags=int(attrs["history_lags"]), deviation_from=attrs["deviation_from"], weights=attrs["weights"], causal=bool(attrs["causal"]))
        grouped.synapses_ = dataset.load()
        grouped._index_synapses()
        return grouped

    def transform(self, activations: xr.Dataset, *, replace=None, prompts=None) -> xr.Dataset:
        """Features for every target sample of ``activations`` (or of ``prompts`` only).

        ``replace``: optional ``f(site_name, prompt_indices, values) -> values`` applied to each
        site's (prompt, pos, units) block before deviations are taken — how ablations are
        expressed (validation's direct prediction).
        """
        prompts = np.arange(activations.sizes["prompt"]) if prompts is None else np.asarray(prompts)
        chunks = [self._transform_chunk(activations, prompts[i : i + self.chunk_prompts], replace) for i in range(0, prompts.size, self.chunk_prompts)]
        inputs, history, target, sample_prompt, sample_pos = (np.concatenate(parts) for parts in zip(*chunks))
        n_groups = len(SIGN_GROUPS)
        dataset = xr.Dataset(
            {
                "inputs": (("sample", "group", "distance", "lag"), inputs.reshape(len(inputs), self.lags.size, n_groups, self.distances_.size).transpose(0, 2, 3, 1)),
                "target": ("sample", target),
            },
            coords={
                "group": list(SIGN_GROUPS),
                "distance": self.distances_,
                "lag": self.lags,
                "prompt": ("sample", sample_prompt),
                "position": ("sample", sample_pos),
                "block": ("sample", sample_prompt),
            },
        )
        if self.history_lags:
            dataset["history"] = (("sample", "history_lag"), history)
            dataset = dataset.assign_coords(history_lag=np.arange(1, self.history_lags + 1))
        return dataset

    def _transform_chunk(self, activations, prompts, replace):
        counted = activations["counted"].values[prompts]
        chunk_index, positions = np.nonzero(activations["target_mask"].values[prompts])
        n_samples = chunk_index.size
        inputs = np.zeros((n_samples, self.lags.size, self._projection.shape[-1]))
        for site, units in self._site_slices.items():
            values = activations[site].values[prompts] if site in activations else None
            if values is None:
                raise ReduceError(f"site {site} is missing from the activations", field=site)
            values = values.reshape(values.shape[0], values.shape[1], -1).astype(np.float64)
            if replace is not None:
                values = replace(site, prompts, values)
            deviation = values - self.baseline_[units]
            for lag_index, lag in enumerate(self.lags):
                valid, source = counted_sources(counted, chunk_index, positions, lag)
                rows = deviation[chunk_index[valid], source]
                inputs[valid, lag_index] += rows @ self._projection[units, lag_index]
        target = activations["target"].values[prompts]
        history = np.zeros((n_samples, self.history_lags))
        for h in range(1, self.history_lags + 1):
            valid, source = counted_sources(counted, chunk_index, positions, h)
            history[valid, h - 1] = target[chunk_index[valid], source]
        return inputs, history, target[chunk_index, positions], prompts[chunk_index], positions

    def unit_inputs(self, activations: xr.Dataset, *, n_candidates: int = 256, replace=None, prompts=None) -> xr.Dataset:
        """Per-synapse weighted deviations for the ``n_candidates`` strongest synapses (unit level).

        Synapses are ranked by their expected effect, ``weight × unit spread``, which needs no
        extra pass over the data; the unit-level sparse GLM then selects a circuit among them.
        """
        spread = self.synapses_["weight"].values * self.spread_[:, None]
        order = np.argsort(spread, axis=None)[::-1][:n_candidates]
        order = order[spread.flat[order] > 0]
        units, lag_index = np.unravel_index(order, spread.shape)
        prompts = np.arange(activations.sizes["prompt"]) if prompts is None else np.asarray(prompts)
        chunk_index, positions = np.nonzero(activations["target_mask"].values[prompts])
        counted = activations["counted"].values[prompts]
        design = np.zeros((chunk_index.size, order.size))
        for site, site_units in self._site_slices.items():
            chosen = np.nonzero((units >= site_units.start) & (units < site_units.stop))[0]
            if chosen.size == 0:
                continue
            values = activations[site].values[prompts]
            values = values.reshape(values.shape[0], values.shape[1], -1).astype(np.float64)
            if replace is not None:
                values = replace(site, prompts, values)
            for column in chosen:
                unit, lag = units[column], self.lags[lag_index[column]]
                valid, source = counted_sources(counted, chunk_index, positions, lag)
                deviation = values[chunk_index[valid], source, unit - site_units.start] - self.baseline_[unit]
                sign = 1.0 if self.synapses_["connection"].values[unit, lag_index[column]] >= 0 else -1.0
                design[valid, column] = sign * deviation
        target = activations["target"].values[prompts][chunk_index, positions]
        table = self.synapses_.isel(unit=units)
        return xr.Dataset(
            {"inputs": (("sample", "synapse"), design), "target": ("sample", target)},
            coords={
                "unit": ("synapse", units),
                "lag": ("synapse", self.lags[lag_index]),
                **{name: ("synapse", table[name].values) for name in ("site", "layer", "kind", "index")},
                "prompt": ("sample", prompts[chunk_index]),
                "position": ("sample", positions),
                "block": ("sample", prompts[chunk_index]),
            },
        )


def covariance_by_lag(activations: xr.Dataset, stats: xr.Dataset, lags: np.ndarray, prompts) -> xr.DataArray:
    """(unit, lag) covariance of each synapse's activation with the target, over ``prompts``.

    The backward-free way to sign synapses (``sign = "correlation"``).
    """
    prompts = np.asarray(prompts)
    chunk_index, positions = np.nonzero(activations["target_mask"].values[prompts])
    counted = activations["counted"].values[prompts]
    target = activations["target"].values[prompts][chunk_index, positions]
    centred = target - target.mean()
    covariance = np.zeros((stats.sizes["unit"], lags.size))
    for site, units in _site_slices(stats["site"].values).items():
        values = activations[site].values[prompts]
        values = values.reshape(values.shape[0], values.shape[1], -1).astype(np.float64)
        for lag_index, lag in enumerate(lags):
            valid, source = counted_sources(counted, chunk_index, positions, lag)
            rows = values[chunk_index[valid], source]
            covariance[units, lag_index] = (rows - rows.mean(0)).T @ centred[valid] / max(valid.sum(), 1)
    return xr.DataArray(covariance, dims=("unit", "lag"), coords={"lag": lags})


def counted_sources(counted: np.ndarray, rows: np.ndarray, positions: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """The samples whose position ``lag`` tokens back is a counted token (real, not special), and that position.

    Special tokens (BOS, CLS, SEP) carry one context-free activation in every prompt: as an input
    their deviation is a constant, a second intercept that would inflate the filter at the lags
    that reach them, so they enter neither the features nor the history.
    """
    source = positions - lag
    inside = (source >= 0) & (source < counted.shape[1])
    valid = inside.copy()
    valid[inside] = counted[rows[inside], source[inside]]
    return valid, source[valid]


def _site_slices(sites: np.ndarray) -> dict[str, slice]:
    """Contiguous unit ranges per site (the unit table is ordered site by site)."""
    slices, start = {}, 0
    for i in range(1, len(sites) + 1):
        if i == len(sites) or sites[i] != sites[start]:
            slices[str(sites[start])] = slice(start, i)
            start = i
    return slices
